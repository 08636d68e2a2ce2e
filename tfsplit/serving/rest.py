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
so it reaches nothing. With an `ssl.SSLContext` (`tls_context`) the server speaks HTTPS only; the
TLS handshake runs in the connection's own thread, under its timeout, so a client that connects
and says nothing holds one thread, not the server.
"""

import hmac
import http
import http.server
import json
import re
import socket
import ssl
import sys

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
_BODY_KEYS = {"signature_name", "inputs", "instances"}
_SHARED_INPUTS = ("indices", "scale", "zero_point")
_DRAIN_FACTOR = 8
_DRAIN_CHUNK_BYTES = 1 << 16


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


def _decode_input(spec, name, value, max_elements):
    try:
        return tensors.from_json(value, validation.input_dtype(spec, name), max_elements)
    except tensors.TensorDecodeError as error:
        raise validation.invalid(f"Input {name!r}: {error}") from None


def _columnar_arrays(served, inputs, max_elements):
    if not isinstance(inputs, dict):
        raise validation.invalid(
            f"'inputs' must be an object mapping the input names {list(validation.INPUT_NAMES)} "
            f"to values. Received: {type(inputs).__name__}"
        )
    validation.check_input_names(served.spec, inputs)
    return {name: _decode_input(served.spec, name, inputs[name], max_elements) for name in inputs}


def _row_arrays(served, instances, max_elements):
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
    arrays = {name: instances[0][name] for name in _SHARED_INPUTS}
    arrays["values"] = [row["values"] for row in instances]
    return {name: _decode_input(served.spec, name, arrays[name], max_elements) for name in arrays}


def _outputs_json(outputs, rows):
    """Columnar, or one object per instance; TF Serving omits the name of a single output."""
    first = next(iter(outputs.values()))
    if len(outputs) == 1:
        return tensors.to_json(first)
    if not rows:
        return {name: tensors.to_json(array) for name, array in outputs.items()}
    return [{name: tensors.to_json(a[i]) for name, a in outputs.items()} for i in range(len(first))]


def _parse_body(body):
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise validation.invalid(f"Malformed JSON in the request body: {error}") from None
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


def predict_json(served, target, body, max_elements):
    """Answers one :predict body; returns the response object. Raises RequestError."""
    request, signature_name = _parse_body(body)
    name, version, label = target
    served.check_target(name, version, label, signature_name)
    if "inputs" in request:
        arrays = _columnar_arrays(served, request["inputs"], max_elements)
        return {"outputs": _outputs_json(served.predict(arrays), rows=False)}
    arrays = _row_arrays(served, request["instances"], max_elements)
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


class _Handler(http.server.BaseHTTPRequestHandler):
    """One HTTP/1.1 connection; `self.server` is the RestServer."""

    protocol_version = "HTTP/1.1"
    server_version = "tfsplit-serve"
    timeout = 60  # seconds a stalled client may hold a connection
    # Headers and body go out in two writes; with Nagle on, the body waits ~40 ms for the
    # client's delayed ACK on every answer.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        logging.debug("REST %s: " + format, self.address_string(), *args)

    def setup(self):
        super().setup()  # sets the connection's timeout, which bounds the handshake too
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def _send_json(self, status, obj, headers=()):
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error_json(self, status, message, headers=()):
        # The unread rest of a refused body would be taken for the next request: close instead.
        self.close_connection = True
        logging.warning("Rejected REST %s %s (%d): %s", self.command, self.path, status, message)
        self._send_json(status, {"error": message}, (*headers, ("Connection", "close")))

    def _refuse_unauthorized(self):
        """Answers 401 (True) unless the request carries the server's token."""
        token = self.server.token
        sent = self.headers.get("Authorization")
        if token is None or (sent is not None and _bearer_matches(sent, token)):
            return False
        self._drop_small_body()
        # RFC 6750: no error code when no credentials were sent.
        challenge = 'Bearer realm="tfsplit-serve"'
        if sent is not None:
            challenge += ', error="invalid_token"'
        self._send_error_json(
            http.HTTPStatus.UNAUTHORIZED,
            "Missing or wrong token: send the header 'Authorization: Bearer <token>'.",
            (("WWW-Authenticate", challenge),),
        )
        return True

    def _drop_small_body(self):
        """Reads and drops the body of a refused request up to the size limit (an authorized
        request could send as much), so that the client reads the answer, not a reset."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if 0 < length <= self.server.max_request_bytes:
            try:
                self._discard(length, self.server.max_request_bytes)
            except OSError:  # a stalled or gone client: answer anyway
                pass

    def _handle(self, answer):
        try:
            self._send_json(http.HTTPStatus.OK, answer())
        except validation.RequestError as error:
            self._send_error_json(error.http_status, str(error))
        except Exception as error:  # noqa: BLE001  (one bad request must not take the server down)
            logging.exception("Internal error in REST %s %s", self.command, self.path)
            self._send_error_json(
                http.HTTPStatus.INTERNAL_SERVER_ERROR, f"Internal error: {type(error).__name__}"
            )

    def _read_body(self):
        if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
            raise _http_error(
                http.HTTPStatus.LENGTH_REQUIRED, "The request needs a Content-Length header."
            )
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise validation.invalid("Content-Length must be an integer.") from None
        limit = self.server.max_request_bytes
        if length < 0:
            raise validation.invalid(f"Content-Length must be >= 0. Received: {length}")
        if length > limit:
            self._discard(length, limit)
            raise _http_error(
                http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"The request body must be at most {limit} bytes. Received: {length}",
            )
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _http_error(
                http.HTTPStatus.REQUEST_TIMEOUT,
                f"Timed out after {self.timeout} s reading a {length}-byte body.",
            ) from None
        if len(body) != length:
            raise validation.invalid(f"The body ended after {len(body)} of {length} bytes.")
        return body

    def _discard(self, length, limit):
        """Reads and drops a refused body that is not absurdly large, so the client, still
        sending, reads the 413 answer instead of a connection reset."""
        if length > _DRAIN_FACTOR * limit:
            return
        while length > 0:
            chunk = self.rfile.read(min(length, _DRAIN_CHUNK_BYTES))
            if not chunk:
                return
            length -= len(chunk)

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
        return predict_json(self.server.served, target, body, self.server.max_request_bytes)

    def do_GET(self):  # noqa: N802  (the base class's dispatch name)
        if not self._refuse_unauthorized():
            self._handle(self._get)

    def do_POST(self):  # noqa: N802  (the base class's dispatch name)
        if not self._refuse_unauthorized():
            self._handle(self._post)


class RestServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server for one ServedTail.

    Args:
      host, port: where to bind; port 0 picks a free port (read `server_address` after).
      served: the ServedTail.
      max_request_bytes: the largest request body accepted.
      token: the token every request must carry (`Authorization: Bearer <token>`); None: none.
      ssl_context: a server-side `ssl.SSLContext` (see `tls_context`): HTTPS only; None: HTTP.
    """

    daemon_threads = True

    def __init__(self, host, port, served, max_request_bytes, token=None, ssl_context=None):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.served = served
        self.max_request_bytes = max_request_bytes
        self.token = credentials.check_token(token)
        super().__init__((host, port), _Handler)
        if ssl_context is not None:
            # Accepting then only wraps the connection; its handler thread does the handshake.
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def handle_error(self, request, client_address):
        """A connection that failed at the socket or TLS level (a plain-text client on the TLS
        port, a reset, a stalled handshake) is one log line, not a traceback on stderr."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handle_error(request, client_address)
            return
        logging.warning("REST connection from %s dropped: %s", client_address[0], error)
