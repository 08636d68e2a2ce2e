"""TF Serving's REST API in front of a ServedTail, on the standard library's HTTP server.

`rest_json` reads the requests and writes the answers; `rest_handler` serves one connection (its
deadlines, the token, the body's size). With an `ssl.SSLContext` (`tls_context`) the server speaks
HTTPS only.

What one client can take is bounded:
  - Threads: connections are served by a pool of `max_workers` threads; up to `max_queued` more
    wait for one, and any further connection is answered 503 (plain HTTP) or closed (TLS) at once.
    While connections wait, a worker closes its keep-alive connection after each answer, and
    drops one that sits idle.
  - Time: a connection may sit idle (before its TLS handshake, or between requests) for
    `idle_timeout_s`; once a request's first byte arrives, its headers and body (or the TLS
    handshake) must arrive within `request_timeout_s`, and each answer must be taken within it.
  - Memory: a body is at most what the model accepts as JSON, within the server's
    `max_request_bytes` (`rest_json.body_limit`), refused before it is read, and counted before
    it is parsed.
"""

import concurrent.futures
import http.server
import json
import socket
import ssl
import sys
import threading

from absl import logging

from tfsplit.auth import credentials
from tfsplit.serving import rest_handler, rest_json


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
        and what the served tail accepts (`rest_json.body_limit`).
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
        self.max_body_bytes, self.body_limit_reason = rest_json.body_limit(
            served, max_request_bytes
        )
        self.token = credentials.check_token(token)
        self.max_workers, self.max_queued = max_workers, max_queued
        self.request_timeout_s, self.idle_timeout_s = request_timeout_s, idle_timeout_s
        self.stopping = False
        self._connections = 0  # served or waiting to be
        self._connections_lock = threading.Lock()
        super().__init__((host, port), rest_handler.Handler)
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
        if isinstance(error, rest_handler.Dropped):  # idle, or the server stopping: routine
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
