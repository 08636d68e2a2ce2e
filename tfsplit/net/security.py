"""Who may talk to a split training server: a shared token in call metadata, and TLS.

The token travels as `authorization: Bearer <token>` in every call's metadata; a call without
the right one is refused with UNAUTHENTICATED before it reaches the service, so it changes no
state. TLS keeps the token and the payloads private on the way. A test pair (a self-signed
certificate for 127.0.0.1 that is also the client's CA):

  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=127.0.0.1 \
      -addext subjectAltName=IP:127.0.0.1 -keyout server.key -out server.crt
"""

import hmac
import os

import grpc

_HEADER = "authorization"
_SCHEME = "Bearer "
_MAX_TOKEN_BYTES = 4096


def read_token_file(path):
    """The token in `path` (surrounding whitespace dropped); it must not be empty."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Token file {path} not found; expected a file holding the token.")
    with open(path, "rb") as f:
        raw = f.read(_MAX_TOKEN_BYTES + 1)
    token = raw.decode("utf-8", "replace").strip()
    if not token or len(raw) > _MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise ValueError(
            f"Token file {path} must hold one token: 1 to {_MAX_TOKEN_BYTES} bytes without "
            "spaces or line breaks inside."
        )
    return token


def read_pem(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} not found; expected a PEM file.")
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} file {path} is not PEM (no -----BEGIN line).")
    return data


def server_credentials(certificate_file, key_file):
    """TLS credentials of a server from its PEM certificate chain and private key."""
    return grpc.ssl_server_credentials(
        [(read_pem(key_file, "TLS key"), read_pem(certificate_file, "TLS certificate"))]
    )


def call_metadata(token):
    """The metadata that carries `token` (none without one)."""
    return ((_HEADER, _SCHEME + token),) if token else ()


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks `authorization: Bearer <token>`."""

    def __init__(self, token):
        if not isinstance(token, str) or not token:
            raise ValueError("`token` must be a non-empty string.")
        self._expected = (_SCHEME + token).encode()

    def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata or ()).get(_HEADER, "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(_refuse)


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "Missing or wrong token.")
