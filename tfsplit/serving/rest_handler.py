"""One REST connection: its requests read under deadlines, the token checked, answers as JSON.

With a token, every request must carry `Authorization: Bearer <token>`; one without it, or with
another, gets 401 (a JSON error and a WWW-Authenticate header) before its route or body is read.
A POST needs a Content-Length (else 411) within the server's body limit (else 413), checked before
the body is read. A refused request's body is never read into memory: after the answer the server
stops sending and drops at most a little of what the client has already sent (so the client reads
the answer rather than a reset), then closes. A client announcing `Expect: 100-continue` is not
told to continue unless it carries the token and an acceptable Content-Length.
"""

import hmac
import http
import http.server
import io
import json
import re
import selectors
import socket
import ssl
import time

from absl import logging

from tfsplit.serving import rest_json, validation

_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
# Longest wait on a socket between checks of the server's state (stopping, connections waiting).
_POLL_S = 0.25
# After refusing a request unread: how long, and how much of the body, to drop before closing.
_LINGER_S = 2.0
_LINGER_BYTES = 1 << 20
_READ_BUFFER_BYTES = 1 << 16
# How much of a client's path a log line quotes.
_LOGGED_PATH_CHARS = 200


def _bearer_matches(authorization, token):
    """Whether an Authorization header value is `Bearer <token>`; the token compared in constant
    time. The header arrives decoded as latin-1, so encoding it back gives the bytes sent."""
    scheme, _, sent = authorization.strip().partition(" ")
    sent = sent.strip().encode("latin-1", "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, token.encode())


class Dropped(TimeoutError):
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
            raise Dropped("The server is stopping.")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            if self._idle:
                raise Dropped(f"Idle for {self._server.idle_timeout_s} s.")
            raise TimeoutError(f"The request took over {self._server.request_timeout_s} s.")
        return min(remaining, _POLL_S)

    def waited_in_vain(self):
        """After a wait that brought nothing: an idle connection makes way for waiting ones."""
        if self._idle and self._server.connections_waiting():
            raise Dropped("Idle while other connections wait.")

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


class Handler(http.server.BaseHTTPRequestHandler):
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
            raise rest_json.http_error(
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
            raise rest_json.http_error(
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
            raise rest_json.http_error(
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
        *target, suffix = rest_json.route(self.path)
        served = self.server.served
        served.check_target(*target, "")
        if suffix == ":predict":
            raise rest_json.http_error(http.HTTPStatus.METHOD_NOT_ALLOWED, "Use POST for :predict.")
        if suffix == "/metadata":
            return rest_json.metadata_json(served)
        return rest_json.status_json(served)

    def _post(self):
        *target, suffix = rest_json.route(self.path)
        if suffix != ":predict":
            raise rest_json.http_error(
                http.HTTPStatus.METHOD_NOT_ALLOWED, "Only :predict takes POST."
            )
        body = self._read_body()
        return rest_json.predict_json(self.server.served, target, body)

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
