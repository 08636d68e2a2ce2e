"""Who may talk to a split training server: a shared token in call metadata, and TLS.

The token travels as `authorization: Bearer <token>` in every call's metadata; a call without
the right one is refused with UNAUTHENTICATED before it reaches the service, so it changes no
state. TLS keeps the token and the payloads private on the way; with a client CA the server also
requires each client's certificate (mutual TLS). Per-device tokens and the device id of a client
certificate: `tfsplit.auth.identity`. A test pair (a self-signed certificate for 127.0.0.1 that
is also the client's CA):

  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=127.0.0.1 \
      -addext subjectAltName=IP:127.0.0.1 -keyout server.key -out server.crt
"""

import hmac

import grpc

from tfsplit.auth.credentials import HEADER as _HEADER
from tfsplit.auth.credentials import SCHEME as _SCHEME
from tfsplit.auth.credentials import read_pem


def server_credentials(certificate_file, key_file, client_ca_file=None):
    """TLS credentials of a server from its PEM certificate chain and private key.

    With `client_ca_file` (PEM), every client must present a certificate signed by that CA
    (mutual TLS): a client without one fails the handshake.
    """
    pair = (read_pem(key_file, "TLS key"), read_pem(certificate_file, "TLS certificate"))
    if client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=read_pem(client_ca_file, "TLS client CA"),
        require_client_auth=True,
    )


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
