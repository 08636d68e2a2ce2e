"""A tail server that speaks TF Serving's gRPC and REST protocols.

TF Serving serves a tail SavedModel unchanged, but it checks nothing beyond what TensorFlow
itself refuses: a one-hot scatter takes an out-of-range index as "no channel", a duplicate as a
channel counted twice, and a bad shape fails deep inside the graph. TailServer serves the same
SavedModel with the same protocols (so one client works against both) and validates every request
first, answering what was wrong and what was expected.

Like `tfsplit-train-server`, it can ask for a shared token (gRPC: `authorization: Bearer <token>`
in the call metadata, else UNAUTHENTICATED; REST: the same Authorization header, else 401) and
serve both protocols over TLS from one PEM certificate and key. A refused call reaches neither
the validation nor the model.

Both frontends serve from bounded thread pools. The REST side also bounds what one client can
take before it is refused (see `tfsplit.serving.rest`): connections waiting for a worker, the
time a request may take to arrive, and the body it may send, derived from the largest batch the
tail accepts.
"""

import concurrent.futures
import threading
import time

import grpc
from absl import logging

from tfsplit.auth import credentials
from tfsplit.auth import grpc_server as security
from tfsplit.serving import grpc_service, model, rest, rest_json

DEFAULT_MAX_REQUEST_BYTES = 64 << 20
# Longest slice of `TailServer.wait`: how late a Ctrl-C or SIGTERM can be noticed.
_SIGNAL_POLL_S = 0.25


def _address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_port(name, port):
    if type(port) is not int or not 0 <= port <= 65535:
        raise ValueError(
            f"`{name}` must be an int in [0, 65535] (0: any free port). Received: {port!r}"
        )


class TailServer:
    """Serves one tail SavedModel over gRPC (PredictionService) and REST, as TF Serving does.

    The model is loaded in the constructor, so a bad model path or signature fails there; `start`
    binds the ports. Binds to loopback by default: exposing the tail is a deliberate choice.

    Args:
      model_base_path: the directory that holds numeric version directories, or its parent (then
        `<model_base_path>/<model_name>/<version>`).
      model_name: the name clients address, e.g. "tail".
      host: interface to bind.
      grpc_port, rest_port: ports to bind; 0 picks free ones (see the attributes after start).
      version: version to serve; None serves the latest.
      signature_name: signature to serve; None takes tfsplit_tail.json's, else serving_default.
      channels: bottleneck width C when the export wrote no tfsplit_tail.json.
      max_batch_size: the largest batch N per request.
      max_request_bytes: the largest request (gRPC message or REST body). A REST body is also
        held to what the tail accepts as JSON: `max_rest_body_bytes`.
      max_workers: handler threads of each protocol (gRPC calls, REST connections).
      max_queued_connections: REST connections that may wait for a handler thread; more are
        answered 503 at once.
      request_timeout_s: the time a REST request's headers and body (or a TLS handshake) may
        take to arrive once begun, and an answer to be taken.
      idle_timeout_s: the time a REST connection may wait for its next request.
      token: a string every call must carry as `authorization: Bearer <token>` (gRPC metadata,
        REST header), e.g. from `tfsplit.auth.credentials.read_token_file`; None asks for none.
      tls_cert_file, tls_key_file: PEM certificate chain and its unencrypted private key (both or
        neither): gRPC and REST (HTTPS, TLS 1.2+) serve over TLS only. Clients verify against the
        CA that signed the certificate (for a self-signed one, the certificate itself).

    Raises:
      ValueError, FileNotFoundError: a bad argument, token or TLS file, checked before the model
        loads; TailModelError (a ValueError): a bad model.

    Attributes:
      grpc_port, rest_port: the ports actually bound (after `start`).
      served: the ServedTail (model name, version, spec).
      tls: whether both frontends serve over TLS.
      max_rest_body_bytes: the largest REST :predict body accepted: what a full batch of the
        largest budget takes as JSON, within `max_request_bytes`.
    """

    def __init__(
        self,
        model_base_path,
        model_name,
        host="127.0.0.1",
        grpc_port=0,
        rest_port=0,
        version=None,
        signature_name=None,
        channels=None,
        max_batch_size=256,
        max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
        max_workers=8,
        max_queued_connections=32,
        request_timeout_s=30.0,
        idle_timeout_s=60.0,
        token=None,
        tls_cert_file=None,
        tls_key_file=None,
    ):
        _check_port("grpc_port", grpc_port)
        _check_port("rest_port", rest_port)
        for name, value in (("max_request_bytes", max_request_bytes), ("max_workers", max_workers)):
            if type(value) is not int or value < 1:
                raise ValueError(f"`{name}` must be >= 1. Received: {value!r}")
        rest.check_limits(max_workers, max_queued_connections, request_timeout_s, idle_timeout_s)
        self._token = credentials.check_token(token)
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError(
                "`tls_cert_file` and `tls_key_file` go together: pass both or neither. Received: "
                f"tls_cert_file={tls_cert_file!r}, tls_key_file={tls_key_file!r}"
            )
        self.tls = tls_cert_file is not None
        self._rest_tls = self._grpc_tls = None
        if self.tls:  # The SSL context checks that the key is the certificate's.
            self._rest_tls = rest.tls_context(tls_cert_file, tls_key_file)
            self._grpc_tls = security.server_credentials(tls_cert_file, tls_key_file)
        self.served = model.ServedTail(
            model_base_path, model_name, version, signature_name, channels, max_batch_size
        )
        self.host = host
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        self._max_request_bytes = max_request_bytes
        self.max_rest_body_bytes, _ = rest_json.body_limit(self.served, max_request_bytes)
        self._max_workers = max_workers
        self._rest_limits = dict(
            max_workers=max_workers,
            max_queued=max_queued_connections,
            request_timeout_s=request_timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
        self._grpc_server = None
        self._rest_server = None
        self._rest_thread = None
        self._stopped = threading.Event()

    @property
    def grpc_target(self):
        """host:port for a gRPC channel (a secure one with TLS) or the device's gRPC client."""
        return _address(self.host, self.grpc_port)

    @property
    def rest_url(self):
        """Base URL for the device's REST client: https:// with TLS."""
        return f"{'https' if self.tls else 'http'}://{_address(self.host, self.rest_port)}"

    def _start_grpc(self):
        limit = self._max_request_bytes
        # gRPC sets SO_REUSEPORT by default, so a second server on a taken port would start and
        # silently share it; without it, a taken port is an error here.
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(self._max_workers, "tfsplit-grpc"),
            options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
            interceptors=[security.TokenInterceptor(self._token)] if self._token else None,
        )
        servicer = grpc_service.PredictionServicer(self.served, limit)
        grpc_service.add_servicer(servicer, server, grpc_service.SERVICE_NAME, grpc_service.METHODS)
        address = _address(self.host, self.grpc_port)
        try:
            if self._grpc_tls is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self._grpc_tls)
        except RuntimeError as error:
            port, reason = 0, error
        else:
            reason = "port in use or host not local"
        if not port:
            raise OSError(f"Cannot bind gRPC to {address}: {reason}")
        server.start()
        self._grpc_server, self.grpc_port = server, port

    def _start_rest(self):
        server = rest.RestServer(
            self.host,
            self.rest_port,
            self.served,
            self._max_request_bytes,
            token=self._token,
            ssl_context=self._rest_tls,
            **self._rest_limits,
        )
        self.rest_port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, name="tfsplit-rest", daemon=True)
        thread.start()
        self._rest_server, self._rest_thread = server, thread

    def start(self):
        """Binds both ports and starts answering; returns self.

        Raises:
          RuntimeError: already started.
          OSError: a port cannot be bound.
        """
        if self._grpc_server is not None:
            raise RuntimeError("TailServer.start() was already called; a server starts once.")
        self._start_grpc()
        try:
            self._start_rest()
        except OSError:
            self._grpc_server.stop(None)
            raise
        logging.info(
            "Serving model %r version %d: gRPC on %s, REST on %s (%s, %s)",
            self.served.name,
            self.served.version,
            self.grpc_target,
            self.rest_url,
            "TLS" if self.tls else "no TLS",
            "token required" if self._token else "no token",
        )
        return self

    def stop(self, grace_s=1.0):
        """Stops both frontends; in-flight gRPC calls get `grace_s` seconds to finish."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace_s).wait()
        if self._rest_server is not None:
            self._rest_server.shutdown()
            self._rest_server.server_close()
            self._rest_thread.join()
        self._rest_server = self._rest_thread = None
        self._stopped.set()
        logging.info("Stopped serving model %r", self.served.name)

    def wait(self, timeout_s=None):
        """Blocks until `stop` (from another thread or a signal handler); True once stopped.

        Waits in short slices: a signal the kernel hands to one of the server's threads does not
        wake a main thread blocked on a lock, and Python runs signal handlers (Ctrl-C, SIGTERM)
        only in the main thread, so one endless wait could miss them.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = _SIGNAL_POLL_S if deadline is None else deadline - time.monotonic()
            if self._stopped.wait(max(0.0, min(remaining, _SIGNAL_POLL_S))):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
