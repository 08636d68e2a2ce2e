"""TF Serving's REST API from the device, on the standard library alone.

The :predict body is the columnar format, `{"signature_name": ..., "inputs": {"values": ...,
"indices": ..., "scale": ..., "zero_point": ...}}`, with every number plain JSON (float16 and
float32 values survive the trip bit for bit). One HTTP/1.1 connection is kept open between
requests, as a device sending image after image would; a connection the server closed is reopened
once. The same client works against `tfsplit-serve` and a real TF Serving.

Against a server that asks for a token (`tfsplit-serve --token_file`), every request carries
`Authorization: Bearer <token>`; over https:// the server's certificate is verified against the
given CA (or the system's CAs without one) and its host name. A token goes over http:// to
loopback only: to another host the client refuses it before connecting (`tfsplit.auth.transport`).
"""

import http.client
import json
import ssl
import threading
import time
import urllib.parse

import numpy as np

from tfsplit.auth import credentials, transport
from tfsplit.device.spec import DeviceError

OUTPUT_NAME = "probabilities"
_RECONNECT_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class ServingError(RuntimeError):
    """The tail server refused a request or could not be reached.

    Attributes:
      message: the server's explanation, or why it could not be reached.
      code: the gRPC status name ("UNAVAILABLE" also for an unreachable REST server), or None.
      http_status: the HTTP status of a REST refusal, or None.
    """

    def __init__(self, message, code=None, http_status=None):
        status = f"HTTP {http_status}" if http_status is not None else code
        super().__init__(f"{status}: {message}" if status else message)
        self.message = message
        self.code = code
        self.http_status = http_status


def check_client_args(model_name, timeout_s):
    if not isinstance(model_name, str) or not model_name:
        raise DeviceError(f"`model_name` must be a non-empty string. Received: {model_name!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise DeviceError(f"`timeout_s` must be > 0 seconds. Received: timeout_s={timeout_s!r}")


def check_security_args(token, root_certificates, target=None, tls=None):
    """The checks of `credentials`, raising DeviceError; with `target` (host:port) and `tls`, also
    that a token would not travel in clear text to anything but loopback (`auth.transport`)."""
    try:
        credentials.check_token(token)
        credentials.check_root_certificates(root_certificates)
        if target is not None:
            transport.check_token_transport(target, token, tls)
    except ValueError as error:
        raise DeviceError(str(error)) from None


def _tls_context(root_certificates):
    """Verifies the server's certificate and host name, against `root_certificates` if given."""
    if root_certificates is None:
        context = ssl.create_default_context()
    else:
        try:
            context = ssl.create_default_context(cadata=root_certificates.decode("ascii"))
        except (UnicodeDecodeError, ssl.SSLError) as error:
            raise DeviceError(
                f"`root_certificates` holds no usable PEM certificate: {error}"
            ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def predict_body(payload, signature="serving_default"):
    """The REST :predict body of a `WirePayload`, as compact JSON bytes."""
    inputs = {name: np.asarray(array).tolist() for name, array in payload.inputs().items()}
    body = {"signature_name": signature, "inputs": inputs}
    return json.dumps(body, separators=(",", ":")).encode()


def output_from_answer(answer, name=OUTPUT_NAME):
    """The (N, ...) float32 output `name` of a :predict answer (the probabilities, or a U-shaped
    split's middle output); TF Serving drops the name of a lone output."""
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    if isinstance(outputs, dict):
        outputs = outputs.get(name)
    try:
        array = np.asarray(outputs, np.float32)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim < 2:
        raise ServingError(f"The answer lacks (N, ...) {name!r} outputs: {answer!r:.200}")
    return array


class RestClient:
    """Sends payloads to `<base_url>/v1/models/<model_name>[/versions/<v>]:predict`.

    Safe to share between threads: requests on its one connection take turns.

    Args:
      base_url: "http://host:port" of TF Serving's REST port (or a TailServer's).
      model_name: the served model's name.
      signature: the signature key.
      timeout_s: socket timeout of each request.
      version: a model version; None addresses the latest.
      token: sent as `Authorization: Bearer <token>` with every request; None: no header.
      root_certificates: PEM bytes of the CA that signed the server's certificate (for a
        self-signed one, the certificate), e.g. `tfsplit.auth.credentials.read_pem(path, "TLS CA")`;
        needs an https:// URL. None: an https:// server is verified against the system's CAs.
      output: the answer's output that `send` returns (a U-shaped split's middle output).

    Raises:
      DeviceError: a bad URL, name, timeout, token or CA, or a token for an http:// URL that is
        not loopback.
    """

    protocol = "rest"

    def __init__(
        self,
        base_url,
        model_name,
        signature="serving_default",
        timeout_s=30.0,
        version=None,
        token=None,
        root_certificates=None,
        output=OUTPUT_NAME,
    ):
        check_client_args(model_name, timeout_s)
        check_security_args(token, root_certificates)
        parsed = urllib.parse.urlsplit(base_url) if isinstance(base_url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise DeviceError(
                f"`base_url` must be an http(s) URL such as http://127.0.0.1:8501. "
                f"Received: {base_url!r:.100}"
            )
        # A token goes over https://, or over http:// to loopback only.
        authority = parsed.netloc.rpartition("@")[2]
        check_security_args(token, None, authority, tls=parsed.scheme == "https")
        if root_certificates is not None and parsed.scheme != "https":
            raise DeviceError(
                f"A CA (`root_certificates`) is for TLS: use an https:// URL. "
                f"Received: {base_url!r}"
            )
        self.signature, self.output = signature, output
        versions = "" if version is None else f"/versions/{int(version)}"
        self._model_path = f"/v1/models/{urllib.parse.quote(model_name, safe='')}{versions}"
        # Bytes, so that http.client sends a non-ASCII token as UTF-8 instead of failing.
        self._headers = {} if token is None else {"Authorization": f"Bearer {token}".encode()}
        if parsed.scheme == "https":
            self._connection = http.client.HTTPSConnection(
                parsed.hostname,
                parsed.port,
                timeout=timeout_s,
                context=_tls_context(root_certificates),
            )
        else:
            self._connection = http.client.HTTPConnection(
                parsed.hostname, parsed.port, timeout=timeout_s
            )
        self._lock = threading.Lock()
        self.url = f"{base_url.rstrip('/')}{self._model_path}:predict"

    def encode(self, payload):
        """The request body for a `WirePayload`; its length is the request_bytes."""
        return predict_body(payload, self.signature)

    def _exchange(self, method, path, body):
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        self._connection.request(method, path, body=body, headers=headers)
        response = self._connection.getresponse()
        return response.status, response.read()

    def _call(self, method, path, body=None):
        """One HTTP exchange -> the parsed JSON answer; a refusal raises its error message."""
        return self._call_sized(method, path, body)[0]

    def _call_sized(self, method, path, body=None):
        """`_call`, with the answer's size in bytes (its body)."""
        try:
            with self._lock:
                try:
                    status, answer = self._exchange(method, path, body)
                except _RECONNECT_ERRORS:
                    self._connection.close()
                    status, answer = self._exchange(method, path, body)
        except ssl.SSLError as error:  # also a wrong CA, or a server without TLS
            self._connection.close()
            raise ServingError(f"TLS with {self.url} failed: {error}", code="UNAVAILABLE") from None
        except (OSError, http.client.HTTPException) as error:
            self._connection.close()
            raise ServingError(f"Cannot reach {self.url}: {error}", code="UNAVAILABLE") from None
        size = len(answer)
        try:
            answer = json.loads(answer)
        except ValueError as error:
            raise ServingError(f"Malformed JSON answer (HTTP {status}): {error}") from None
        if status != http.HTTPStatus.OK:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise ServingError(message or repr(answer), http_status=status)
        return answer, size

    def send(self, body):
        """Posts an encoded body; returns the (N, ...) float32 `output` (the probabilities).

        Raises:
          ServingError: the server refused the request (its message and HTTP status), sent an
            unreadable answer, or could not be reached.
        """
        return self.exchange(body)[0]

    def exchange(self, body):
        """`send`, with the answer's size in bytes (the JSON body)."""
        answer, size = self._call_sized("POST", f"{self._model_path}:predict", body)
        return output_from_answer(answer, self.output), size

    def predict(self, payload):
        """encode + send."""
        return self.send(self.encode(payload))

    def status(self):
        """GET /v1/models/<name>: the served version's status, as TF Serving answers it."""
        return self._call("GET", self._model_path)

    def wait_ready(self, timeout_s, poll_s=0.1):
        """Polls the model status until the server answers (e.g. a server still starting).

        Raises:
          ServingError: no answer within `timeout_s`, or a refusal (the server is up but does
            not serve this model).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.status()
            except ServingError as error:
                if error.code != "UNAVAILABLE":
                    raise
                if time.monotonic() + poll_s > deadline:
                    raise ServingError(
                        f"No REST server ready within {timeout_s} s: {error.message}",
                        code="UNAVAILABLE",
                    ) from None
            time.sleep(poll_s)

    def close(self):
        self._connection.close()
