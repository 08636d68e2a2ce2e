"""The device's gRPC channel to a split training server: deadlines, retries, token and TLS, and
the message bytes each way. Both device trainers use it (the Keras one and the LiteRT one).
"""

import time

import grpc
from absl import logging

from tfsplit.auth.credentials import call_metadata, check_root_certificates, check_token
from tfsplit.auth.transport import check_token_transport
from tfsplit.protocol import split_training_pb2_grpc as pb_grpc
from tfsplit.protocol.framing import GRPC_PREFIX_BYTES, MAX_MESSAGE_BYTES

# Failures worth another try: the server restarting or briefly out of reach.
_RETRIABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TrainingClient:
    """A gRPC channel to a split training server, with deadlines and retries with backoff.

    Args:
      address: "host:port" of the server.
      token: the token sent in every call's metadata: the shared one, or this device's own from
        the server's tokens file (None: none). Refused (ValueError, before connecting) over a
        plain channel to anything but loopback.
      root_certificates: PEM bytes of the CA that signed the server's certificate, for TLS
        (None: plain TCP, or the system's CAs with a client certificate).
      deadline_s: each call's deadline.
      retry_for_s: how long a call keeps retrying while the server is unreachable.
      certificate_chain, private_key: PEM bytes of this device's client certificate and its key,
        for a server that requires them (mutual TLS, `--tls_client_ca`; the certificate's subject
        CN is the device id). Both or neither; they make the channel TLS.

    Raises:
      ValueError: a bad address, token, CA or client certificate, or a token that would travel
        in clear text off this machine.
    """

    def __init__(
        self,
        address,
        token=None,
        root_certificates=None,
        deadline_s=60,
        retry_for_s=120,
        *,
        certificate_chain=None,
        private_key=None,
    ):
        if not isinstance(address, str) or not address.rpartition(":")[2].isdigit():
            raise ValueError(f"`address` must be 'host:port'. Received: address={address!r:.100}")
        check_token(token)
        check_root_certificates(root_certificates)
        if (certificate_chain is None) != (private_key is None):
            raise ValueError(
                "`certificate_chain` and `private_key` go together: pass both (mutual TLS) or "
                "neither."
            )
        for name, pem in (("certificate_chain", certificate_chain), ("private_key", private_key)):
            if pem is not None and (not isinstance(pem, bytes) or b"-----BEGIN " not in pem):
                raise ValueError(f"`{name}` must be None or PEM bytes (read_pem(path, ...)).")
        tls = root_certificates is not None or certificate_chain is not None
        check_token_transport(address, token, tls)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if not tls:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.SplitTrainingStub(self._channel)
        self._metadata = call_metadata(token)
        self.address, self.deadline_s, self.retry_for_s = address, deadline_s, retry_for_s
        self.wire_bytes = [0, 0]  # gRPC message bytes up and down, framing prefix included.

    def call(self, method, request, deadline_s=None):
        """`method` of the service with retries while the server is unreachable (each try gets
        `deadline_s`, by default the client's)."""
        stub_method = getattr(self._stub, method)
        give_up_at, backoff = time.monotonic() + self.retry_for_s, 0.1
        deadline_s = self.deadline_s if deadline_s is None else deadline_s
        while True:
            try:
                reply = stub_method(request, timeout=deadline_s, metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() not in _RETRIABLE or time.monotonic() + backoff > give_up_at:
                    raise
                logging.warning(
                    "%s to %s failed (%s); retrying", method, self.address, error.code()
                )
                time.sleep(backoff)
                backoff = min(2 * backoff, 5.0)
                continue
            self.wire_bytes[0] += request.ByteSize() + GRPC_PREFIX_BYTES
            self.wire_bytes[1] += reply.ByteSize() + GRPC_PREFIX_BYTES
            return reply

    def close(self):
        self._channel.close()
