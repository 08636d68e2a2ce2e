"""Serves a tail SavedModel over TF Serving's gRPC and REST protocols, validating every request.

  tfsplit-serve --model_base_path=/tmp/tfsplit/export/tail --model_name=tail
  tfsplit-serve --model_base_path=... --model_name=tail --grpc_port=0 --rest_port=0

`--model_base_path` is TF Serving's: the directory holding numeric version directories (or its
parent, as in TF Serving's Docker image). Binds to 127.0.0.1 unless --host says otherwise; port 0
picks a free port. Prints one line with the bound ports when ready; runs until interrupted
(Ctrl-C or SIGTERM).

`--token_file`, `--tls_cert` and `--tls_key` mean what they mean for tfsplit-train-server: every
gRPC call and REST request must carry the token (`Authorization: Bearer <token>`), and both
protocols serve over TLS (REST as HTTPS). The device's side: tfsplit-run-head --token_file
--tls_ca. A --host other than loopback needs TLS, unless --insecure (then a warning is logged on
every start); the device's clients send a token in clear text to loopback only.
"""

import signal
import sys

from absl import app, flags, logging

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.auth import credentials, transport
from tfsplit.serving.server import DEFAULT_MAX_REQUEST_BYTES, TailServer
from tfsplit_tools import cli

_MODEL_BASE_PATH = flags.DEFINE_string(
    "model_base_path", None, "Directory with the tail's numeric version directories.", required=True
)
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name clients address.", required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind.")
_GRPC_PORT = flags.DEFINE_integer("grpc_port", 8500, "gRPC port (0: any free port).")
_REST_PORT = flags.DEFINE_integer("rest_port", 8501, "REST port (0: any free port).")
_MODEL_VERSION = flags.DEFINE_integer("model_version", None, "Version to serve (default latest).")
_CHANNELS = flags.DEFINE_integer(
    "channels", None, "Bottleneck width C, only for an export without tfsplit_tail.json."
)
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 256, "Largest batch per request.")
_MAX_REQUEST_BYTES = flags.DEFINE_integer(
    "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES, "Largest request accepted."
)
_TOKEN_FILE = flags.DEFINE_string("token_file", None, "Refuse calls without the token in it.")
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate chain: serve over TLS.")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert.")
_INSECURE = flags.DEFINE_bool(
    "insecure",
    False,
    "Allow a --host other than loopback without TLS (tokens and tensors in clear text); a "
    "warning is logged on every start.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.return_freed_buffers_to_the_os()
    if bool(_TLS_CERT.value) != bool(_TLS_KEY.value):
        raise app.UsageError("--tls_cert and --tls_key go together.")
    warning = transport.check_listen(_HOST.value, bool(_TLS_CERT.value), _INSECURE.value)
    if warning:
        logging.warning(warning)
    token = _TOKEN_FILE.value and credentials.read_token_file(_TOKEN_FILE.value)
    if not token and not transport.is_loopback(_HOST.value):
        logging.warning(
            "Serving on %r with no --token_file: whoever reaches it can use the tail.", _HOST.value
        )
    try:
        server = TailServer(
            _MODEL_BASE_PATH.value,
            _MODEL_NAME.value,
            host=_HOST.value,
            grpc_port=_GRPC_PORT.value,
            rest_port=_REST_PORT.value,
            version=_MODEL_VERSION.value,
            channels=_CHANNELS.value,
            max_batch_size=_MAX_BATCH_SIZE.value,
            max_request_bytes=_MAX_REQUEST_BYTES.value,
            token=token or None,
            tls_cert_file=_TLS_CERT.value or None,
            tls_key_file=_TLS_KEY.value or None,
        )
        # SIGTERM (docker stop, kill) shuts down as cleanly as Ctrl-C.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        server.start()
    except OSError as error:  # a port in use, a missing TLS file; ValueErrors reach run_tool
        raise app.UsageError(str(error)) from None
    try:
        print(
            f"Serving {server.served.name!r} version {server.served.version}: "
            f"grpc={server.grpc_target} rest={server.rest_url}"
            f"{' (TLS)' if server.tls else ''}{' (token required)' if token else ''}",
            flush=True,
        )
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
