"""Who may call a tfsplit server: a shared token and TLS files, on the standard library alone.

Shared by networked training (`tfsplit.auth.grpc_server`, which adds gRPC's interceptor and server
credentials), the tail server (`tfsplit.serving`) and the device's tail clients (`tfsplit.device`,
which runs without TensorFlow and, over REST, without grpcio). The token travels as
`authorization: Bearer <token>`: in gRPC call metadata, or as HTTP's Authorization header. A test
TLS pair is in docs/networked-training.md#security.
"""

import os

HEADER = "authorization"
SCHEME = "Bearer "
MAX_TOKEN_BYTES = 4096


def read_token_file(path):
    """The token in `path` (surrounding whitespace dropped); it must not be empty."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Token file {path} not found; expected a file holding the token.")
    with open(path, "rb") as f:
        raw = f.read(MAX_TOKEN_BYTES + 1)
    token = raw.decode("utf-8", "replace").strip()
    if not token or len(raw) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise ValueError(
            f"Token file {path} must hold one token: 1 to {MAX_TOKEN_BYTES} bytes without "
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


def check_token(token):
    """`token` if it is None or one printable word, as `read_token_file` gives; else ValueError.

    A header value cannot carry whitespace or control characters, and an empty token would let
    an empty header pass.
    """
    if token is None:
        return None
    if (
        not isinstance(token, str)
        or not token
        or len(token.encode()) > MAX_TOKEN_BYTES
        or not token.isprintable()
        or any(c.isspace() for c in token)
    ):
        raise ValueError(
            f"`token` must be None or a non-empty string of at most {MAX_TOKEN_BYTES} bytes "
            "without whitespace or control characters."
        )
    return token


def check_root_certificates(root_certificates):
    """`root_certificates` if it is None or PEM bytes (as `read_pem` gives); else ValueError."""
    if root_certificates is None:
        return None
    if not isinstance(root_certificates, bytes) or b"-----BEGIN " not in root_certificates:
        raise ValueError(
            "`root_certificates` must be None or the PEM bytes of a CA certificate (e.g. "
            f"read_pem(path, 'TLS CA')). Received: {root_certificates!r:.60}"
        )
    return root_certificates


def call_metadata(token):
    """The metadata that carries `token` (none without one)."""
    return ((HEADER, SCHEME + token),) if token else ()
