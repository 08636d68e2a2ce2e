"""TF Serving's REST API in front of a ServedTail, on the standard library's HTTP server.

Routes, as TF Serving has them:

    GET  /v1/models/<name>[/versions/<v>]            model status
    GET  /v1/models/<name>[/versions/<v>]/metadata   signature def
    POST /v1/models/<name>[/versions/<v>]:predict    {"inputs": {...}} -> {"outputs": ...}
                                                     {"instances": [...]} -> {"predictions": [...]}

Numbers travel as plain JSON numbers for every dtype; the signature decides how they are read. In
the row ("instances") format TF Serving would stack every input along a new batch dimension, which
`indices`, `scale` and `zero_point` do not have; here every instance must carry the same three and
only `values` is stacked, so the row format stays usable by hand (curl). Clients use the columnar
format, which a real TF Serving answers identically.

With a token, every request must carry `Authorization: Bearer <token>`; one without it, or with
another, gets 401 (a JSON error and a WWW-Authenticate header) before its route or body is read,
so it reaches nothing. With an `ssl.SSLContext` (`tls_context`) the server speaks HTTPS only.

What one client can take is bounded:
  - Threads: connections are served by a pool of `max_workers` threads; up to `max_queued` more
    wait for one, and any further connection is answered 503 (plain HTTP) or closed (TLS) at once.
    While connections wait, a worker closes its keep-alive connection after each answer, and
    drops one that sits idle.
  - Time: a connection may sit idle (before its TLS handshake, or between requests) for
    `idle_timeout_s`; once a request's first byte arrives, its headers and body (or the TLS
    handshake) must arrive within `request_timeout_s`, and each answer must be taken within it.
  - Memory: a POST needs a Content-Length (else 411) of at most `max_body_bytes` (else 413),
    checked before the body is read. That bound follows from what the model accepts (a full
    batch of the largest budget as JSON, `validation.max_json_body_bytes`), within the server's
    `max_request_bytes`. Before the body is parsed, its '[', ',' and ':' are counted: a body
    holding more JSON values than such a request is refused (`validation.max_json_values`), so
    parsing builds no more than a full batch would. Each input's shape is then read from its
    nested lists and checked against the spec before numpy builds an array.
  - A refused request's body is never read into memory: after the answer the server stops
    sending and drops at most a little of what the client has already sent (so the client reads
    the answer rather than a reset), then closes. A client announcing `Expect: 100-continue` is
    not told to continue unless it carries the token and an acceptable Content-Length.
"""

import concurrent.futures
import hmac
import http
import http.server
import io
import json
import re
import selectors
import socket
import ssl
import sys
import threading
import time

import grpc
from absl import logging
from google.protobuf import json_format

from tfsplit.auth import credentials
from tfsplit.serving import tensors, validation

_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>:predict|/metadata)?$"
)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_BODY_KEYS = {"signature_name", "inputs", "instances"}
_SHARED_INPUTS = ("indices", "scale", "zero_point")
# Longest wait on a socket between checks of the server's state (stopping, connections waiting).
_POLL_S = 0.25
# After refusing a request unread: how long, and how much of the body, to drop before closing.
_LINGER_S = 2.0
_LINGER_BYTES = 1 << 20
_READ_BUFFER_BYTES = 1 << 16
# How much of a client's path a log line quotes.
_LOGGED_PATH_CHARS = 200


def tls_context(certificate_file, key_file):
    """The server-side TLS 1.2+ context for a PEM certificate chain and its unencrypted key.

    Raises:
      FileNotFoundError, ValueError: a missing or non-PEM file, an encrypted key, or a key that
        is not the certificate's.
    """
    credentials.read_pem(certificate_file, "TLS certificate")
    credentials.read_pem(key_file, "TLS key")

    def no_password():  # gRPC takes no passphrase either; never prompt on the terminal.
        raise ValueError(f"TLS key file {key_file} is encrypted; give an unencrypted key.")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate_file, key_file, password=no_password)
    except ssl.SSLError as error:
        raise ValueError(
            f"TLS certificate {certificate_file} and key {key_file} do not make a pair: {error}"
        ) from None
    return context


def _bearer_matches(authorization, token):
    """Whether an Authorization header value is `Bearer <token>`; the token compared in constant
    time. The header arrives decoded as latin-1, so encoding it back gives the bytes sent."""
    scheme, _, sent = authorization.strip().partition(" ")
    sent = sent.strip().encode("latin-1", "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, token.encode())


def _http_error(status, message):
    """A refusal that only REST has (a route, a method, a body size)."""
    return validation.RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, http_status=status)


def _route(path):
    """(name, version or None, label or None, suffix or "") of a TF Serving REST path."""
    match = _ROUTE.match(path)
    if match is None:
        raise _http_error(
            http.HTTPStatus.NOT_FOUND,
            f"Malformed request: {path!r}. Expected /v1/models/<name>[/versions/<v>] followed by "
            "nothing (status), /metadata or :predict.",
        )
    version = match["version"]
    return match["name"], None if version is None else int(version), match["label"], match["suffix"]


def _arrays(served, inputs):
    """The inputs (name -> parsed JSON) as numpy arrays; every shape is read from the nested lists
    and checked against the spec before any array is built."""
    spec, shapes = served.spec, {}
    for name in validation.INPUT_NAMES:
        try:
            shapes[name] = tensors.json_shape(inputs[name])
        except tensors.TensorDecodeError as error:
            raise validation.invalid(f"Input {name!r}: {error}") from None
    validation.check_shapes(spec, shapes, served.max_batch_size)
    arrays = {}
    for name in validation.INPUT_NAMES:
        try:
            arrays[name] = tensors.from_json(inputs[name], validation.input_dtype(spec, name))
        except tensors.TensorDecodeError as error:
            raise validation.invalid(f"Input {name!r}: {error}") from None
    return arrays


def _columnar_arrays(served, inputs):
    if not isinstance(inputs, dict):
        raise validation.invalid(
            f"'inputs' must be an object mapping the input names {list(validation.INPUT_NAMES)} "
            f"to values. Received: {type(inputs).__name__}"
        )
    validation.check_input_names(served.spec, inputs)
    return _arrays(served, inputs)


def _row_arrays(served, instances):
    """Stacks the instances' `values`; the batch-less inputs must be equal in every instance."""
    if not isinstance(instances, list) or not instances:
        raise validation.invalid("'instances' must be a non-empty list of objects.")
    if len(instances) > served.max_batch_size:
        raise validation.invalid(
            f"Too many instances: at most {served.max_batch_size} accepted. "
            f"Received: {len(instances)}"
        )
    for row in instances:
        if not isinstance(row, dict):
            raise validation.invalid(
                f"Every instance must be an object. Received: {type(row).__name__}"
            )
        validation.check_input_names(served.spec, row)
    for name in _SHARED_INPUTS:
        if any(row[name] != instances[0][name] for row in instances[1:]):
            raise validation.invalid(
                f"In the row format every instance must carry the same {name!r}: it has no batch "
                "dimension. Send instances that share it, or use the columnar 'inputs' format."
            )
    inputs = {name: instances[0][name] for name in _SHARED_INPUTS}
    inputs["values"] = [row["values"] for row in instances]
    return _arrays(served, inputs)


def _outputs_json(outputs, rows):
    """Columnar, or one object per instance; TF Serving omits the name of a single output."""
    first = next(iter(outputs.values()))
    if len(outputs) == 1:
        return tensors.to_json(first)
    if not rows:
        return {name: tensors.to_json(array) for name, array in outputs.items()}
    return [{name: tensors.to_json(a[i]) for name, a in outputs.items()} for i in range(len(first))]


def _parse_body(body, max_values):
    if max_values is not None:
        values = body.count(b"[") + body.count(b",") + body.count(b":")
        if values > max_values:
            raise validation.invalid(
                f"The body holds up to {values} JSON values (counting '[', ',' and ':'); a "
                f"request this model accepts holds at most {max_values}."
            )
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise validation.invalid(f"Malformed JSON in the request body: {error}") from None
    except RecursionError:
        raise validation.invalid("Malformed JSON in the request body: nested too deeply.") from None
    if not isinstance(request, dict):
        raise validation.invalid(
            f"The body must be a JSON object. Received: {type(request).__name__}"
        )
    unknown = sorted(set(request) - _BODY_KEYS)
    if unknown or ("inputs" in request) == ("instances" in request):
        raise validation.invalid(
            "The body must hold exactly one of 'inputs' (columnar) or 'instances' (row), and "
            f"optionally 'signature_name'. Received keys: {sorted(request)}"
        )
    signature_name = request.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise validation.invalid(f"'signature_name' must be a string. Received: {signature_name!r}")
    return request, signature_name


def predict_json(served, target, body):
    """Answers one :predict body; returns the response object. Raises RequestError.

    Args:
      served: the ServedTail.
      target: (model name, version or None, label or None) from the path.
      body: the request body, bytes.
    """
    max_values = validation.max_json_values(served.spec, served.max_batch_size)
    request, signature_name = _parse_body(body, max_values)
    name, version, label = target
    served.check_target(name, version, label, signature_name)
    if "inputs" in request:
        arrays = _columnar_arrays(served, request["inputs"])
        return {"outputs": _outputs_json(served.predict(arrays), rows=False)}
    try:
        arrays = _row_arrays(served, request["instances"])
    except RecursionError:  # comparing the instances' deeply nested lists
        raise validation.invalid("The instances nest too deeply.") from None
    return {"predictions": _outputs_json(served.predict(arrays), rows=True)}


def status_json(served):
    status = {"error_code": "OK", "error_message": ""}
    version = {"version": str(served.version), "state": "AVAILABLE", "status": status}
    return {"model_version_status": [version]}


def metadata_json(served):
    signature_defs = json_format.MessageToDict(
        served.signature_def_map(), preserving_proto_field_name=True
    )
    return {
        "model_spec": {"name": served.name, "signature_name": "", "version": str(served.version)},
        "metadata": {"signature_def": signature_defs},
    }


class _Dropped(TimeoutError):
    """A connection given up: idle while others wait, or the server is stopping. A TimeoutError,
    so that the HTTP handler closes the connection quietly."""


class _ConnectionReader(io.RawIOBase):
    """The raw stream under a connection's buffered `rfile`: every read runs under a deadline.

    Waiting for a request, the deadline is the idle timeout, and the wait is given up early when
    other connections wait for a worker or the server stops. The first byte of a request starts
    the request timeout, which then bounds its headers and body together: a client that trickles
    bytes cannot hold a worker longer.
    """

    def __init__(self, sock, server):
        super().__init__()
        self._sock = sock
        self._server = server
        self._idle = True
        self._deadline = 0.0

    def readable(self):
        return True

    def await_request(self):
        """Starts waiting (idle) for the next request."""
        self._idle = True
        self._deadline = time.monotonic() + self._server.idle_timeout_s

    def start_request(self):
        """Starts the request timeout (the first byte of a request or handshake has come)."""
        self._idle = False
        self._deadline = time.monotonic() + self._server.request_timeout_s

    def next_wait(self):
        """Seconds to wait before checking again; raises when the connection is to be dropped."""
        if self._server.stopping:
            raise _Dropped("The server is stopping.")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            if self._idle:
                raise _Dropped(f"Idle for {self._server.idle_timeout_s} s.")
            raise TimeoutError(f"The request took over {self._server.request_timeout_s} s.")
        return min(remaining, _POLL_S)

    def waited_in_vain(self):
        """After a wait that brought nothing: an idle connection makes way for waiting ones."""
        if self._idle and self._server.connections_waiting():
            raise _Dropped("Idle while other connections wait.")

    def readinto(self, buffer):
        while True:
            self._sock.settimeout(self.next_wait())
            try:
                count = self._sock.recv_into(buffer)
            except TimeoutError:  # a slice without data; the socket stays usable
                self.waited_in_vain()
                continue
            if self._idle and count:
                self.start_request()
            return count

    def wait_first_byte(self):
        """Waits, idle, until the socket has something to read (before a TLS handshake)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            while not selector.select(self.next_wait()):
                self.waited_in_vain()
        self.start_request()


class _Handler(http.server.BaseHTTPRequestHandler):
    """One HTTP/1.1 connection; `self.server` is the RestServer."""

    protocol_version = "HTTP/1.1"
    server_version = "tfsplit-serve"
    timeout = None  # the _ConnectionReader sets every read's timeout
    # Headers and body go out in two writes; with Nagle on, the body waits ~40 ms for the
    # client's delayed ACK on every answer.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        text = validation.clip_message(format % args, _LOGGED_PATH_CHARS)
        logging.debug("REST %s: %s", self.address_string(), text)

    def setup(self):
        super().setup()
        self.rfile.close()  # the socket's own file; reads go through the deadline reader instead
        self._reader = _ConnectionReader(self.connection, self.server)
        self._reader.await_request()
        self.rfile = io.BufferedReader(self._reader, _READ_BUFFER_BYTES)
        self._body_pending = False
        if isinstance(self.connection, ssl.SSLSocket):
            self._reader.wait_first_byte()
            self._handshake()

    def _handshake(self):
        """The TLS handshake, under the request timeout: a stalled client holds this worker for
        at most that long."""
        while True:
            self.connection.settimeout(self._reader.next_wait())
            try:
                self.connection.do_handshake()
                return
            except TimeoutError:  # a slice without progress; the handshake resumes
                continue

    def handle(self):
        self.close_connection = True
        self._handle_one()
        while not self.close_connection:
            self._handle_one()
        if self._body_pending:
            self._linger()

    def _handle_one(self):
        self._reader.await_request()
        self._body_pending = False
        self.handle_one_request()

    def _linger(self):
        """Closes a connection whose request body was not read: stops sending (the answer is
        out), then reads and drops what the client already sent, at most _LINGER_BYTES for
        _LINGER_S, so that closing with unread data does not reset the connection before the
        client has read the answer."""
        deadline, left = time.monotonic() + _LINGER_S, _LINGER_BYTES
        scratch = bytearray(min(left, _READ_BUFFER_BYTES))
        try:
            self.connection.shutdown(socket.SHUT_WR)  # on TLS, reads are then raw: no decryption
            while left > 0 and not self.server.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.connection.settimeout(min(remaining, _POLL_S))
                try:
                    count = self.connection.recv_into(scratch, min(left, len(scratch)))
                except TimeoutError:
                    continue
                if not count:
                    return
                left -= count
        except OSError:  # the client is gone: nothing to protect
            pass

    def _send_json(self, status, obj, headers=()):
        body = json.dumps(obj, separators=(",", ":")).encode()
        # An unread body would be taken for the next request; waiting connections need this
        # worker: either way the connection ends after this answer.
        if self._body_pending or self.server.connections_waiting():
            self.close_connection = True
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.connection.settimeout(self.server.request_timeout_s)  # a client that does not read
        self.wfile.write(body)

    def _send_error_json(self, status, message, headers=()):
        self.close_connection = True
        message = validation.clip_message(message)
        path = validation.clip_message(self.path, _LOGGED_PATH_CHARS)
        logging.warning("Rejected REST %s %s (%d): %s", self.command, path, status, message)
        self._send_json(status, {"error": message}, headers)

    def _authorized(self):
        """Whether the request carries the server's token (always, without one)."""
        token = self.server.token
        sent = self.headers.get("Authorization")
        return token is None or (sent is not None and _bearer_matches(sent, token))

    def _refuse_unauthorized(self):
        """Answers 401 (True) unless the request carries the server's token; the body unread."""
        if self._authorized():
            return False
        # RFC 6750: no error code when no credentials were sent.
        challenge = 'Bearer realm="tfsplit-serve"'
        if "Authorization" in self.headers:
            challenge += ', error="invalid_token"'
        self._send_error_json(
            http.HTTPStatus.UNAUTHORIZED,
            "Missing or wrong token: send the header 'Authorization: Bearer <token>'.",
            (("WWW-Authenticate", challenge),),
        )
        return True

    def _declared_length(self):
        """The Content-Length of a POST, checked against the body limit before any byte of the
        body is read. Raises RequestError: 411, 400 or 413."""
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers or not lengths:
            raise _http_error(
                http.HTTPStatus.LENGTH_REQUIRED,
                "The request needs a Content-Length header (chunked bodies are not accepted).",
            )
        if len(lengths) != 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
            raise validation.invalid(
                "Content-Length must be one decimal integer. "
                f"Received: {validation.clip_message(repr(lengths), 100)}"
            )
        length, limit = int(lengths[0]), self.server.max_body_bytes
        if length > limit:
            raise _http_error(
                http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"The request body must be at most {limit} bytes ({self.server.body_limit_reason})."
                f" Received: Content-Length={length}",
            )
        return length

    def _read_body(self):
        length = self._declared_length()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _http_error(
                http.HTTPStatus.REQUEST_TIMEOUT,
                f"Timed out reading a {length}-byte body: a request must arrive within "
                f"{self.server.request_timeout_s} s.",
            ) from None
        if len(body) != length:
            raise validation.invalid(f"The body ended after {len(body)} of {length} bytes.")
        self._body_pending = False
        return body

    def handle_expect_100(self):
        """Tells the client to send its body only if it would be read: the token is right and
        the Content-Length acceptable. Otherwise the refusal follows at once, without "100
        Continue", and the client need not send the body at all."""
        try:
            acceptable = self._authorized() and self._declared_length() is not None
        except validation.RequestError:
            acceptable = False
        return super().handle_expect_100() if acceptable else True

    def _handle(self, answer):
        try:
            self._send_json(http.HTTPStatus.OK, answer())
        except validation.RequestError as error:
            self._send_error_json(error.http_status, str(error))
        except Exception as error:  # noqa: BLE001  (one bad request must not take the server down)
            logging.exception("Internal error in REST %s", self.command)
            self._send_error_json(
                http.HTTPStatus.INTERNAL_SERVER_ERROR, f"Internal error: {type(error).__name__}"
            )

    def _get(self):
        *target, suffix = _route(self.path)
        served = self.server.served
        served.check_target(*target, "")
        if suffix == ":predict":
            raise _http_error(http.HTTPStatus.METHOD_NOT_ALLOWED, "Use POST for :predict.")
        return metadata_json(served) if suffix == "/metadata" else status_json(served)

    def _post(self):
        *target, suffix = _route(self.path)
        if suffix != ":predict":
            raise _http_error(http.HTTPStatus.METHOD_NOT_ALLOWED, "Only :predict takes POST.")
        body = self._read_body()
        return predict_json(self.server.served, target, body)

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:  # a body it announces stays unread until _read_body
            length = self.headers.get("Content-Length", "0").strip()
            self._body_pending = "Transfer-Encoding" in self.headers or length != "0"
        return parsed

    def do_GET(self):  # noqa: N802  (the base class's dispatch name)
        if not self._refuse_unauthorized():
            self._handle(self._get)

    def do_POST(self):  # noqa: N802  (the base class's dispatch name)
        if not self._refuse_unauthorized():
            self._handle(self._post)


def body_limit(served, max_request_bytes):
    """(The largest :predict body accepted, why): what the served tail accepts as JSON
    (`validation.max_json_body_bytes`), within `max_request_bytes`."""
    spec, batch = served.spec, served.max_batch_size
    from_spec = validation.max_json_body_bytes(spec, batch)
    if from_spec is None or from_spec > max_request_bytes:
        return max_request_bytes, "the server's request limit"
    shape = f"({batch}, {spec.height}, {spec.width}, {spec.max_budget})"
    return from_spec, f"enough for 'values' of shape up to {shape} as JSON"


def _busy_response():
    body = json.dumps({"error": "The server is busy: too many connections. Retry later."})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return (head + body).encode()


_BUSY_RESPONSE = _busy_response()


class RestServer(http.server.HTTPServer):
    """An HTTP server for one ServedTail, its connections served by a bounded thread pool.

    Args:
      host, port: where to bind; port 0 picks a free port (read `server_address` after).
      served: the ServedTail.
      max_request_bytes: the largest request body accepted; the body limit is the smaller of it
        and what the served tail accepts (`body_limit`).
      token: the token every request must carry (`Authorization: Bearer <token>`); None: none.
      ssl_context: a server-side `ssl.SSLContext` (see `tls_context`): HTTPS only; None: HTTP.
      max_workers: threads serving connections, one connection each at a time.
      max_queued: accepted connections that may wait for a worker; further ones get 503.
      request_timeout_s: the time a request's headers and body (or a TLS handshake) may take to
        arrive once its first byte has, and an answer to be taken.
      idle_timeout_s: the time a connection may wait for its next request (or its handshake).

    Attributes:
      max_body_bytes: the largest :predict body accepted.
    """

    request_queue_size = 64  # the listen backlog: connections not yet accepted

    def __init__(
        self,
        host,
        port,
        served,
        max_request_bytes,
        token=None,
        ssl_context=None,
        max_workers=8,
        max_queued=32,
        request_timeout_s=30.0,
        idle_timeout_s=60.0,
    ):
        check_limits(max_workers, max_queued, request_timeout_s, idle_timeout_s)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.served = served
        self.max_body_bytes, self.body_limit_reason = body_limit(served, max_request_bytes)
        self.token = credentials.check_token(token)
        self.max_workers, self.max_queued = max_workers, max_queued
        self.request_timeout_s, self.idle_timeout_s = request_timeout_s, idle_timeout_s
        self.stopping = False
        self._connections = 0  # served or waiting to be
        self._connections_lock = threading.Lock()
        super().__init__((host, port), _Handler)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, "tfsplit-rest")
        if ssl_context is not None:
            # Accepting then only wraps the connection; its worker does the handshake.
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def connections_waiting(self):
        """Whether accepted connections wait for a worker."""
        return self._connections > self.max_workers

    def process_request(self, request, client_address):
        """Hands the connection to the pool, or refuses it at once when the pool and its queue
        are full (this runs in the accepting thread, which must never wait on a client)."""
        with self._connections_lock:
            admitted = self._connections < self.max_workers + self.max_queued
            self._connections += admitted
        if not admitted:
            self._refuse_busy(request, client_address)
            return
        try:
            self._pool.submit(self._serve_connection, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._release()
            self.shutdown_request(request)

    def _serve_connection(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001  (as socketserver does: one connection, one log line)
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._release()

    def _release(self):
        with self._connections_lock:
            self._connections -= 1

    def _refuse_busy(self, request, client_address):
        logging.log_every_n_seconds(
            logging.WARNING,
            "REST refused a connection from %s: %d connections served or waiting (the most).",
            10,
            client_address[0],
            self.max_workers + self.max_queued,
        )
        if not isinstance(request, ssl.SSLSocket):  # over TLS, a 503 would need a handshake
            try:
                request.setblocking(False)
                request.send(_BUSY_RESPONSE)
            except OSError:
                pass
        self.shutdown_request(request)

    def server_close(self):
        """Closes the port; connections still open end within a poll slice (an answer being
        computed is finished), and this returns once they have."""
        self.stopping = True
        super().server_close()
        self._pool.shutdown(wait=True)

    def handle_error(self, request, client_address):
        """A connection that failed at the socket or TLS level (a plain-text client on the TLS
        port, a reset, a stalled handshake) is one log line, not a traceback on stderr."""
        error = sys.exc_info()[1]
        if isinstance(error, _Dropped):  # idle, or the server stopping: routine
            logging.debug("REST connection from %s closed: %s", client_address[0], error)
            return
        if not isinstance(error, OSError):
            super().handle_error(request, client_address)
            return
        logging.warning("REST connection from %s dropped: %s", client_address[0], error)


def check_limits(max_workers, max_queued, request_timeout_s, idle_timeout_s):
    """Raises ValueError unless the REST server's limits are usable."""
    for name, value, low in (("max_workers", max_workers, 1), ("max_queued", max_queued, 0)):
        if type(value) is not int or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}. Received: {value!r}")
    for name, value in (
        ("request_timeout_s", request_timeout_s),
        ("idle_timeout_s", idle_timeout_s),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise ValueError(
                f"`{name}` must be a number of seconds in (0, 1e6). Received: {value!r}"
            )
