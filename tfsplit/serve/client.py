"""Clients for a tail served by TailServer or by TF Serving itself (same protocols, same answers).

Both send one payload's parts, the k selected channels in the wire dtype with their indices and
int8 quantization parameters, and return the tail's class probabilities. `last_request_bytes` is
the size of what was actually serialised for the wire (the protobuf for gRPC, the JSON body for
REST), so the project can report what serving costs next to the codec's own byte counts.
"""

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from tfsplit.serve import tensors

OUTPUT_NAME = "probabilities"
_VALUE_DTYPES = (np.float32, np.float16, np.int8)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class TailServingError(RuntimeError):
    """The server refused a request or could not be reached.

    Attributes:
      message: the server's own explanation (or why it could not be reached).
      code: gRPC status name, e.g. "INVALID_ARGUMENT" (None for REST).
      http_status: HTTP status (None for gRPC).
    """

    def __init__(self, message, code=None, http_status=None):
        status = code if http_status is None else f"HTTP {http_status}"
        super().__init__(f"{status}: {message}" if status else message)
        self.message = message
        self.code = code
        self.http_status = http_status


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def prepare_inputs(values, indices, scale=1.0, zero_point=0):
    """The four signature inputs as arrays of their signature dtypes.

    Values are sent in the dtype they have: quantizing is the codec's job (`codec.quantize`),
    and a silent cast here would send something other than what the caller measured.

    Raises:
      ValueError: values not a rank-4 float32/float16/int8 array, indices not 1-D integers
        within int32, scale not a number, zero_point not an integer within int32.
    """
    values = np.asarray(values)
    if values.dtype not in _VALUE_DTYPES or values.ndim != 4:
        raise ValueError(
            "`values` must be a rank-4 (N, h, w, k) array of the export's wire dtype: float32, "
            "float16 or int8 (see tfsplit.codec.quantize). "
            f"Received: dtype={values.dtype}, shape={values.shape}"
        )
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"`indices` must be a 1-D integer array. Received: dtype={indices.dtype}, "
            f"shape={indices.shape}"
        )
    if indices.size and (indices.min() < _INT32_MIN or indices.max() > _INT32_MAX):
        raise ValueError(f"`indices` must fit in int32. Received: indices={indices}")
    if not isinstance(scale, (float, int, np.floating, np.integer)) or isinstance(scale, bool):
        raise ValueError(f"`scale` must be a number. Received: scale={scale!r}")
    if not _is_int(zero_point) or not _INT32_MIN <= zero_point <= _INT32_MAX:
        raise ValueError(
            f"`zero_point` must be an int32 integer. Received: zero_point={zero_point!r}"
        )
    return {
        "values": values,
        "indices": indices.astype(np.int32),
        "scale": np.float32(scale),
        "zero_point": np.int32(zero_point),
    }


def build_predict_request(
    model_name, values, indices, scale=1.0, zero_point=0, signature="serving_default", version=None
):
    """A PredictRequest for a tail signature, every tensor as raw `tensor_content`.

    Raises:
      ValueError: bad arguments (see `prepare_inputs`).
    """
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for name, array in prepare_inputs(values, indices, scale, zero_point).items():
        request.inputs[name].CopyFrom(tensors.to_tensor_proto(array))
    return request


def build_predict_body(values, indices, scale=1.0, zero_point=0, signature="serving_default"):
    """The REST :predict JSON body (columnar "inputs" format) for a tail signature.

    Raises:
      ValueError: bad arguments (see `prepare_inputs`).
    """
    inputs = prepare_inputs(values, indices, scale, zero_point)
    body = {
        "signature_name": signature,
        "inputs": {name: tensors.to_json(array) for name, array in inputs.items()},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _probabilities(array):
    array = np.asarray(array, np.float32)
    if array.ndim != 2:
        raise TailServingError(
            f"Expected {OUTPUT_NAME!r} of shape (N, num_classes). Received: shape={array.shape}"
        )
    return array


def _check_common(model_name, timeout_s):
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"`model_name` must be a non-empty string. Received: {model_name!r}")
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"`timeout_s` must be > 0 seconds. Received: timeout_s={timeout_s!r}")


class GrpcTailClient:
    """Calls PredictionService.Predict of a TailServer or a TF Serving model server.

    Args:
      target: "host:port" of the gRPC endpoint.
      model_name: the served model's name.
      signature: the signature key.
      timeout_s: deadline of each call.
      version: a version to address; None addresses the latest.
      max_message_bytes: the largest message sent or received (gRPC's default is 4 MiB).

    Attributes:
      last_request_bytes: serialized size of the last PredictRequest sent (`ByteSize()`).
    """

    def __init__(
        self,
        target,
        model_name,
        signature="serving_default",
        timeout_s=30.0,
        version=None,
        max_message_bytes=_DEFAULT_MAX_MESSAGE_BYTES,
    ):
        _check_common(model_name, timeout_s)
        self.model_name = model_name
        self.signature = signature
        self.timeout_s = timeout_s
        self.version = version
        self.last_request_bytes = None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise TailServingError(error.details(), code=error.code().name) from None

    def predict(self, values, indices, scale=1.0, zero_point=0):
        """Runs the tail on one payload; returns (N, num_classes) float32 probabilities.

        Raises:
          ValueError: bad arguments, before anything is sent.
          TailServingError: the server refused the request (with its message) or is unreachable.
        """
        request = build_predict_request(
            self.model_name, values, indices, scale, zero_point, self.signature, self.version
        )
        self.last_request_bytes = request.ByteSize()
        response = self._call(self._stub.Predict, request)
        if OUTPUT_NAME not in response.outputs:
            raise TailServingError(
                f"The response lacks {OUTPUT_NAME!r}; it has {sorted(response.outputs)}."
            )
        try:
            return _probabilities(tensors.from_tensor_proto(response.outputs[OUTPUT_NAME]))
        except tensors.TensorDecodeError as error:
            raise TailServingError(f"Unreadable {OUTPUT_NAME!r} in the response: {error}") from None

    def predict_payload(self, payload):
        """Sends a decoded `codec.Payload` as is (values in its wire dtype)."""
        return self.predict(payload.values, payload.indices, payload.scale, payload.zero_point)

    def signature_def_map(self):
        """The served signature defs (GetModelMetadata), as a SignatureDefMap proto."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        if self.version is not None:
            request.model_spec.version.value = self.version
        response = self._call(self._stub.GetModelMetadata, request)
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_defs)
        return signature_defs

    def wait_ready(self, timeout_s):
        """Blocks until the channel connects (e.g. a server process starting); bounded.

        Raises:
          TailServingError: not connected within `timeout_s`.
        """
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise TailServingError(
                f"No gRPC server ready within {timeout_s} s.", code="UNAVAILABLE"
            ) from None

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class RestTailClient:
    """Calls the REST :predict endpoint of a TailServer or a TF Serving model server.

    Args:
      base_url: e.g. "http://127.0.0.1:8501".
      model_name: the served model's name.
      signature: the signature key.
      timeout_s: timeout of each HTTP request.
      version: a version to address; None addresses the latest.

    Attributes:
      last_request_bytes: length of the last HTTP request body sent.
    """

    def __init__(
        self, base_url, model_name, signature="serving_default", timeout_s=30.0, version=None
    ):
        _check_common(model_name, timeout_s)
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"`base_url` must be an http(s) URL. Received: {base_url!r}")
        self.model_name = model_name
        self.signature = signature
        self.timeout_s = timeout_s
        self.last_request_bytes = None
        versions = "" if version is None else f"/versions/{int(version)}"
        quoted = urllib.parse.quote(model_name, safe="")
        self._model_url = f"{base_url.rstrip('/')}/v1/models/{quoted}{versions}"

    def _request(self, url, body=None):
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise TailServingError(_error_message(error), http_status=error.code) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TailServingError(f"Cannot reach {url}: {reason}", code="UNAVAILABLE") from None
        except ValueError as error:
            raise TailServingError(f"The server sent malformed JSON: {error}") from None

    def predict(self, values, indices, scale=1.0, zero_point=0):
        """Runs the tail on one payload; returns (N, num_classes) float32 probabilities.

        Raises:
          ValueError: bad arguments, before anything is sent.
          TailServingError: the server refused the request (with its message) or is unreachable.
        """
        body = build_predict_body(values, indices, scale, zero_point, self.signature)
        self.last_request_bytes = len(body)
        answer = self._request(f"{self._model_url}:predict", body)
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if isinstance(outputs, dict):
            outputs = outputs.get(OUTPUT_NAME)
        if outputs is None:
            raise TailServingError(f"The response lacks 'outputs'. Received keys: {list(answer)}")
        return _probabilities(outputs)

    def predict_payload(self, payload):
        """Sends a decoded `codec.Payload` as is (values in its wire dtype)."""
        return self.predict(payload.values, payload.indices, payload.scale, payload.zero_point)

    def status(self):
        """GET /v1/models/<name>: the model_version_status JSON."""
        return self._request(self._model_url)

    def metadata(self):
        """GET /v1/models/<name>/metadata: the signature def JSON."""
        return self._request(f"{self._model_url}/metadata")

    def wait_ready(self, timeout_s, poll_s=0.1):
        """Polls the status endpoint until it answers (e.g. a server process starting); bounded.

        Raises:
          TailServingError: no answer within `timeout_s`, or an HTTP error (the server is up but
            refuses, e.g. an unknown model).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.status()
            except TailServingError as error:
                if error.code != "UNAVAILABLE":
                    raise
                if time.monotonic() + poll_s > deadline:
                    raise TailServingError(
                        f"No REST server ready within {timeout_s} s: {error.message}",
                        code="UNAVAILABLE",
                    ) from None
            time.sleep(poll_s)


def _error_message(error):
    """TF Serving's error body is {"error": "..."}; fall back to the raw text."""
    text = error.read().decode("utf-8", "replace")
    try:
        return json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text or error.reason
