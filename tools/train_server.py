"""The server half of networked split training: holds the decoder, the tail and their optimizer.

  tfsplit-train-server --config=configs/deprune.py --workdir=/tmp/tfsplit/server --port=50051
  tfsplit-train --config=configs/deprune.py --workdir=/tmp/tfsplit/device --server=127.0.0.1:50051

Use the same config (and overrides) on both sides: the device drives the run (data, head, gates,
phases) and the server refuses a device whose model differs. The server keeps its state in
--workdir (a checkpoint each time the device backs up, and a log of every step since): restarted
on the same --workdir after a crash, it carries on where the run was, and the device's retries
reach it without any action. Listens on 127.0.0.1 unless --host
says otherwise; prints the address, then serves until stopped.

Several devices (`--config.data.shard_index=i --config.data.num_shards=N` each) share the tail:
in turn (--mode=sequential, SplitNN) or, with --mode=parallel, their concurrent steps trained as
one batch and their heads averaged after every epoch (SplitFed).
"""

import sys
import types

# isort: off
import tfsplit  # noqa: F401  (first: selects Keras 2 before TensorFlow loads)

# isort: on
import tf_keras
from absl import app, flags
from ml_collections import config_flags

from tfsplit.auth import credentials as credentials_lib
from tfsplit.auth import grpc_server as security
from tfsplit.training import trainer
from tfsplit.training.server import service as service_lib
from tfsplit_tools import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The server's directory.", required=True)
_PORT = flags.DEFINE_integer("port", 50051, "Port to listen on; 0 picks a free one.", lower_bound=0)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_TOKEN_FILE = flags.DEFINE_string("token_file", None, "Refuse calls without the token in it.")
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate chain: serve over TLS.")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert.")
_MODE = flags.DEFINE_enum(
    "mode",
    "sequential",
    ["sequential", "parallel"],
    "How devices share the tail: each step in turn as it arrives (sequential), or concurrent "
    "devices' steps trained as one batch with their heads averaged after every epoch (parallel).",
)
_GATHER_TIMEOUT_MS = flags.DEFINE_float(
    "gather_timeout_ms",
    200.0,
    "--mode=parallel: how long a step waits for the other devices' steps.",
    lower_bound=1.0,
)
_AVERAGE_TIMEOUT_S = flags.DEFINE_float(
    "average_timeout_s",
    120.0,
    "--mode=parallel: how long an epoch's head averaging waits for the last devices.",
    lower_bound=1.0,
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    trainer.write_config(config, _WORKDIR.value)

    def build_split(image_shape, num_classes):
        info = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
        split = trainer.build_split_model(config, info)
        # The tail's random draws (dropout) from the run's seed: a rerun trains the same model.
        tf_keras.utils.set_random_seed(config.seed)
        return split

    if bool(_TLS_CERT.value) != bool(_TLS_KEY.value):
        raise app.UsageError("--tls_cert and --tls_key go together.")
    credentials = None
    if _TLS_CERT.value:
        credentials = security.server_credentials(_TLS_CERT.value, _TLS_KEY.value)
    interceptors = []
    if _TOKEN_FILE.value:
        interceptors.append(
            security.TokenInterceptor(credentials_lib.read_token_file(_TOKEN_FILE.value))
        )
    server, port = service_lib.serve(
        service_lib.TrainingServicer(
            build_split,
            state_dir=_WORKDIR.value,
            parallel=_MODE.value == "parallel",
            gather_timeout_s=_GATHER_TIMEOUT_MS.value / 1000,
            average_timeout_s=_AVERAGE_TIMEOUT_S.value,
        ),
        _PORT.value,
        _HOST.value,
        credentials=credentials,
        interceptors=interceptors,
    )
    print(f"listening on {_HOST.value}:{port}")
    sys.stdout.flush()
    server.wait_for_termination()


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
