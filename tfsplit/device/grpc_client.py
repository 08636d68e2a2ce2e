"""TF Serving's gRPC PredictionService/Predict from the device, with grpcio and no TensorFlow.

The request and the answer are (de)serialized by `tfsplit.device.protowire`; grpcio only carries
the bytes (a generic unary call with no serializers), so `tensorflow-serving-api`, whose protos
import TensorFlow, is not needed on the device. The same client works against `tfsplit-serve` and
a real TF Serving.

Against a server that asks for a token (`tfsplit-serve --token_file`), every call carries
`authorization: Bearer <token>` in its metadata; with a CA the channel is TLS and the server's
certificate is verified against it. Without TLS a token goes to loopback only: to another host the
client refuses it before connecting (`tfsplit.auth.transport`).
"""

import grpc

from tfsplit.auth import credentials
from tfsplit.device import protowire
from tfsplit.device.rest import OUTPUT_NAME, ServingError, check_client_args, check_security_args
from tfsplit.device.spec import DeviceError

PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
_DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class GrpcClient:
    """Calls Predict of TF Serving (or a TailServer) at `target`; safe to share between threads.

    Args:
      target: "host:port" of the gRPC endpoint.
      model_name: the served model's name.
      signature: the signature key.
      timeout_s: deadline of each call.
      version: a model version; None addresses the latest.
      max_message_bytes: the largest message sent or received (gRPC's default is 4 MiB).
      token: sent as `authorization: Bearer <token>` in every call's metadata; None: none.
      root_certificates: PEM bytes of the CA that signed the server's certificate (for a
        self-signed one, the certificate), e.g. `tfsplit.auth.credentials.read_pem(path, "TLS CA")`:
        the channel is TLS. None: plain TCP.
      output: the answer's output that `send` returns (a U-shaped split's middle output).

    Raises:
      DeviceError: a bad target, name, timeout, token or CA, or a token that would travel in
        clear text off this machine.
    """

    protocol = "grpc"

    def __init__(
        self,
        target,
        model_name,
        signature="serving_default",
        timeout_s=30.0,
        version=None,
        max_message_bytes=_DEFAULT_MAX_MESSAGE_BYTES,
        token=None,
        root_certificates=None,
        output=OUTPUT_NAME,
    ):
        check_client_args(model_name, timeout_s)
        check_security_args(token, root_certificates)
        if not isinstance(target, str) or "://" in target or ":" not in target:
            raise DeviceError(
                f"`target` must be host:port of a gRPC endpoint, e.g. 127.0.0.1:8500 (no "
                f"scheme). Received: {target!r:.100}"
            )
        # A token goes over TLS, or in clear text to loopback only.
        check_security_args(token, None, target, tls=root_certificates is not None)
        self.model_name = model_name
        self.signature, self.output = signature, output
        self.version = version
        self.timeout_s = timeout_s
        self.url = target
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if root_certificates is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            tls = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, tls, options=options)
        self._metadata = credentials.call_metadata(token)
        self._predict = self._channel.unary_unary(PREDICT_METHOD)

    def encode(self, payload):
        """The serialized PredictRequest for a `WirePayload`; its length is the request_bytes."""
        return protowire.predict_request(
            self.model_name, payload.inputs(), self.signature, self.version
        )

    def send(self, request):
        """Sends a serialized PredictRequest; returns the (N, ...) float32 `output` (the
        probabilities).

        Raises:
          ServingError: the server refused the request (gRPC status and message), its answer is
            unreadable, or it cannot be reached.
        """
        return self.exchange(request)[0]

    def exchange(self, request):
        """`send`, with the answer's size in bytes (the serialized PredictResponse)."""
        try:
            answer = self._predict(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ServingError(error.details(), code=error.code().name) from None
        try:
            outputs = protowire.read_outputs(answer)
        except protowire.ProtoError as error:
            raise ServingError(f"Unreadable PredictResponse: {error}") from None
        output = outputs.get(self.output)
        if output is None or output.ndim < 2:
            raise ServingError(
                f"The answer lacks (N, ...) {self.output!r}; it has "
                f"{ {name: array.shape for name, array in outputs.items()} }."
            )
        return output.astype("float32"), len(answer)

    def predict(self, payload):
        """encode + send."""
        return self.send(self.encode(payload))

    def wait_ready(self, timeout_s):
        """Blocks until the channel connects (e.g. a server still starting); bounded.

        Raises:
          ServingError: not connected within `timeout_s`.
        """
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ServingError(
                f"No gRPC server ready within {timeout_s} s.", code="UNAVAILABLE"
            ) from None

    def close(self):
        self._channel.close()
