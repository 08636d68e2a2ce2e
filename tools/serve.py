"""Serves a tail SavedModel over TF Serving's gRPC and REST protocols, validating every request.

  tfsplit-serve --model_base_path=/tmp/tfsplit/export/tail --model_name=tail
  python -m tools.serve --model_base_path=... --model_name=tail --grpc_port=0 --rest_port=0

`--model_base_path` is TF Serving's: the directory holding numeric version directories (or its
parent, as in TF Serving's Docker image). Binds to 127.0.0.1 unless --host says otherwise; port 0
picks a free port. Prints one line with the bound ports when ready; runs until interrupted
(Ctrl-C or SIGTERM).
"""

import signal

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.serve.server import DEFAULT_MAX_REQUEST_BYTES, TailServer
from tools import run_tool

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
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
        )
        # SIGTERM (docker stop, kill) shuts down as cleanly as Ctrl-C.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        server.start()
    except OSError as error:  # a port in use; TailModelError, a ValueError, reaches run_tool
        raise app.UsageError(str(error)) from None
    try:
        print(
            f"Serving {server.served.name!r} version {server.served.version}: "
            f"grpc={server.grpc_target} rest={server.rest_url}",
            flush=True,
        )
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def run():
    run_tool(main)


if __name__ == "__main__":
    run()
