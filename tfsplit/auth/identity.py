"""Which device a gRPC call comes from: per-device tokens, or the client certificate (mutual TLS).

With one shared token every holder can act as any device. Here each device has its own
credential, and the server derives the device id from it instead of trusting the message:

- **A tokens file**, one device per line, `<device id> <token>`:

      # tokens: chmod 600; `kill -HUP <server>` after editing
      device-0 jX2v5QeS9y1X5pZc7l0A1tqkq3h8mQ4VwGmF9cB2nYs
      device-1 3nT0oQ_2b8fZ1qLk9cXvW7uR5sY4eA6dH0jM2pN8gKo

  Blank lines and lines starting with `#` are skipped. A device id is 1 to 64 letters, digits,
  '.', '_' or '-' (as the training server's messages); a token is 16 to 4096 printable characters
  without whitespace (`python3 -c "import secrets; print(secrets.token_urlsafe(32))"`). Ids and
  tokens are unique. A call must carry one of the tokens (`authorization: Bearer <token>`), else
  it is refused with UNAUTHENTICATED before it reaches the service. The tokens are compared in
  constant time (SHA-256 digests, every entry compared). Revoking a device is removing its line and
  calling `reload` (the training server does on SIGHUP): later calls with that token are refused,
  no restart. A file that fails to load keeps the previous table.
- **Mutual TLS**: the server requires a client certificate signed by its client CA
  (`grpc_server.server_credentials(..., client_ca_file=...)`); the certificate's subject CN is the
  device id (e.g. `/CN=device-0`). A CN that is not a device id is refused with UNAUTHENTICATED.

With both, a call's token and certificate must name the same device (else PERMISSION_DENIED), and
the tokens file is what revokes a device whose certificate is still valid.

`DeviceIdentity` is the server interceptor; its `identify(context)` gives the servicer the device id
that the call authenticated (the training servicer refuses a request acting as another device).
"""

import hashlib
import hmac
import os
import re
import threading

import grpc

from tfsplit.auth.credentials import HEADER, MAX_TOKEN_BYTES, SCHEME

DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_DEVICE_TOKEN_CHARS = 16
MAX_TOKENS_FILE_BYTES = 1 << 20
COMMON_NAME_KEY = "x509_common_name"


class TokensFileError(ValueError):
    """A tokens file that cannot be used: says which line and why (never the token)."""


def check_device_id(device_id, where="device id"):
    """`device_id` if it is a valid device id; else ValueError (the id shortened)."""
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise ValueError(
            f"{where} must be 1 to 64 letters, digits, '.', '_' or '-'. "
            f"Received: {str(device_id)[:80]!r}"
        )
    return device_id


def parse_tokens(text, source="tokens file"):
    """{device id: token} from the text of a tokens file (format: the module's docstring).

    Raises:
      TokensFileError: a malformed line, a bad id or token, a repeated id or token, or no device.
    """
    tokens, seen = {}, set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{source}, line {number}"
        if len(fields) != 2:
            raise TokensFileError(
                f"{where}: expected '<device id> <token>' (two fields separated by spaces), found "
                f"{len(fields)} field(s)."
            )
        device_id, token = fields
        try:
            check_device_id(device_id, "the device id")
        except ValueError as error:
            raise TokensFileError(f"{where}: {error}") from None
        if not (
            MIN_DEVICE_TOKEN_CHARS <= len(token)
            and len(token.encode()) <= MAX_TOKEN_BYTES
            and token.isprintable()
        ):
            raise TokensFileError(
                f"{where}: the token of {device_id!r} must be {MIN_DEVICE_TOKEN_CHARS} to "
                f"{MAX_TOKEN_BYTES} printable characters (e.g. secrets.token_urlsafe(32))."
            )
        if device_id in tokens:
            raise TokensFileError(f"{where}: device {device_id!r} is listed twice.")
        digest = _digest(token)
        if digest in seen:
            raise TokensFileError(f"{where}: the token of {device_id!r} is another device's too.")
        seen.add(digest)
        tokens[device_id] = token
    if not tokens:
        raise TokensFileError(f"{source} lists no device: one '<device id> <token>' line each.")
    return tokens


def read_tokens_file(path):
    """{device id: token} from the tokens file at `path`.

    Raises:
      FileNotFoundError: no such file.
      TokensFileError: the file is too large, not UTF-8, or malformed (`parse_tokens`).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Tokens file {path} not found; expected one '<device id> <token>' line per device."
        )
    with open(path, "rb") as f:
        raw = f.read(MAX_TOKENS_FILE_BYTES + 1)
    if len(raw) > MAX_TOKENS_FILE_BYTES:
        raise TokensFileError(f"Tokens file {path} is over {MAX_TOKENS_FILE_BYTES} bytes.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TokensFileError(f"Tokens file {path} is not UTF-8 text.") from None
    return parse_tokens(text, f"tokens file {path}")


def readable_by_others(path):
    """Whether the group or others may read `path` (a tokens file should be chmod 600)."""
    return bool(os.stat(path).st_mode & 0o044)


def _digest(token):
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class DeviceTokens:
    """The device tokens of a tokens file, reloadable while a server runs; safe between threads.

    Args:
      path: the tokens file.

    Raises:
      FileNotFoundError, TokensFileError: as `read_tokens_file`.
    """

    def __init__(self, path):
        self.path = path
        self._entries = ()
        self.reload()

    def reload(self):
        """Reads the file again; returns the device ids now known. A file that fails to load
        (missing, malformed) raises and leaves the previous table in place."""
        tokens = read_tokens_file(self.path)
        # One tuple, swapped whole: a call sees the old table or the new one, never a mix.
        self._entries = tuple((_digest(token), device) for device, token in tokens.items())
        return sorted(tokens)

    @property
    def devices(self):
        return sorted(device for _, device in self._entries)

    def device_of(self, token):
        """The device whose token is `token`, or None; compares against every entry in constant
        time (no early exit, equal-length digests)."""
        sent = _digest(token if isinstance(token, str) else "")  # "" is no device's token
        found = None
        for digest, device in self._entries:
            if hmac.compare_digest(digest, sent):
                found = device
        return found


def bearer_token(metadata):
    """The token of `authorization: Bearer <token>` in call metadata, or None."""
    for key, value in metadata or ():
        if key == HEADER:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return value[len(SCHEME) :] if value.startswith(SCHEME) else None
    return None


def certificate_device(context):
    """The subject CN of the call's verified client certificate, or None without one."""
    auth_context = context.auth_context() or {}
    names = auth_context.get(COMMON_NAME_KEY) or ()
    if len(names) != 1:
        return None
    name = names[0]
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


class DeviceIdentity(grpc.ServerInterceptor):
    """Authenticates every call as one device, and tells the servicer which (`identify`).

    Args:
      tokens: a `DeviceTokens`: a call must carry one of its tokens (None: no token check).
      client_certificates: whether the server requires client certificates (mutual TLS): the
        certificate's subject CN is the device id. Give the server credentials that require them
        (`grpc_server.server_credentials(..., client_ca_file=...)`).

    Refusals: no known token, or a certificate whose CN is not a device id -> UNAUTHENTICATED;
    token and certificate naming two devices -> PERMISSION_DENIED. Unary-unary methods only (the
    training and prediction services have no other kind).
    """

    def __init__(self, tokens=None, client_certificates=False):
        if tokens is None and not client_certificates:
            raise ValueError("DeviceIdentity needs `tokens`, `client_certificates` or both.")
        if tokens is not None and not isinstance(tokens, DeviceTokens):
            raise ValueError(f"`tokens` must be a DeviceTokens. Received: {type(tokens).__name__}")
        self.tokens = tokens
        self.client_certificates = bool(client_certificates)
        self._lock = threading.Lock()
        self._calls = {}  # id(context) -> (context, device id) while the call runs

    def reload(self):
        """Reloads the tokens file (a no-op with certificates alone); returns the devices known
        (None with certificates alone). Raises as `DeviceTokens.reload`, keeping the old table."""
        return None if self.tokens is None else self.tokens.reload()

    def intercept_service(self, continuation, handler_call_details):
        token_device = None
        if self.tokens is not None:
            token = bearer_token(handler_call_details.invocation_metadata)
            token_device = self.tokens.device_of(token)
            if token_device is None:
                return _refusal(grpc.StatusCode.UNAUTHENTICATED, "Missing or unknown token.")
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = self._authenticated(handler.unary_unary, token_device)
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _authenticated(self, behavior, token_device):
        def call(request, context):
            device = token_device
            if self.client_certificates:
                named = certificate_device(context)
                if named is None or not DEVICE_ID.fullmatch(named):
                    context.abort(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "The client certificate's subject CN must be a device id: 1 to 64 "
                        "letters, digits, '.', '_' or '-'.",
                    )
                if device is not None and named != device:
                    context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "The token and the client certificate name different devices.",
                    )
                device = named
            key = id(context)
            with self._lock:
                self._calls[key] = (context, device)
            try:
                return behavior(request, context)
            finally:
                with self._lock:
                    self._calls.pop(key, None)

        return call

    def identify(self, context):
        """The device id that the call of `context` authenticated, for the servicer.

        Raises:
          PermissionError: `context` is not a call that this interceptor let through (the
            interceptor is not installed on the server).
        """
        with self._lock:
            entry = self._calls.get(id(context))
        if entry is None or entry[0] is not context:
            raise PermissionError("This call was not authenticated by the DeviceIdentity.")
        return entry[1]


def _refusal(code, details):
    def refuse(request, context):
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(refuse)
