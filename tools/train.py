"""Trains a split model (SL, CA-SL, deprune or prune) from a config file.

  tfsplit-train --config=configs/deprune.py --workdir=/tmp/tfsplit/deprune
  tfsplit-train --config=configs/deprune.py:smoke --config.data.name=cifar10 --workdir=...
  tfsplit-train --config=configs/deprune.py --workdir=... --server=HOST:50051   # networked

With --server this process is the device (data, head, gates, phases) and the tail trains on a
`tfsplit-train-server` of the same config. It joins the run as device `device-<shard_index>`
(--config.data.shard_index, 0 by default): with per-device credentials, --token_file holds this
device's token from the server's tokens file, or --tls_cert/--tls_key are a client certificate
whose subject CN is that id (mutual TLS). A token goes in clear text to loopback only: to another
host --tls_ca is needed.

Config -> data -> SplitModel -> fit with PhaseSchedule, records, TensorBoard and BackupAndRestore.
Writes metrics.jsonl, summary.json, config.json, checkpoints/ and tensorboard/ into --workdir;
re-running on the same --workdir resumes from the last backup (every checkpoint_every_steps).
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import training as train_lib
from tfsplit.auth import credentials
from tfsplit.device.training.channel import TrainingClient
from tfsplit_tools import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for results and checkpoints.", required=True
)
_SERVER = flags.DEFINE_string(
    "server", None, "host:port of a tfsplit-train-server: train the tail there."
)
_TOKEN_FILE = flags.DEFINE_string(
    "token_file", None, "--server: the file of the token to send (the shared one or this device's)."
)
_TLS_CA = flags.DEFINE_string("tls_ca", None, "--server: PEM CA of the server's certificate (TLS).")
_TLS_CERT = flags.DEFINE_string(
    "tls_cert",
    None,
    "--server: PEM client certificate of this device (mutual TLS; its subject CN is the device id).",
)
_TLS_KEY = flags.DEFINE_string("tls_key", None, "--server: PEM private key of --tls_cert.")
_RETRY_FOR_S = flags.DEFINE_float(
    "retry_for_s",
    120.0,
    "--server: how long a call keeps retrying while the server is unreachable (a restart).",
    lower_bound=0.0,
)
flags.mark_flags_as_required(["config"])


def _read(path, reader, *args):
    """`reader(path, *args)`, or None without a path."""
    return reader(path, *args) if path else None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    logging.info("Training %s in %s", config.mode, _WORKDIR.value)
    if bool(_TLS_CERT.value) != bool(_TLS_KEY.value):
        raise app.UsageError("--tls_cert and --tls_key go together.")
    client = None
    if _SERVER.value:
        client = TrainingClient(
            _SERVER.value,
            token=_read(_TOKEN_FILE.value, credentials.read_token_file),
            root_certificates=_read(_TLS_CA.value, credentials.read_pem, "TLS CA"),
            retry_for_s=_RETRY_FOR_S.value,
            certificate_chain=_read(_TLS_CERT.value, credentials.read_pem, "TLS certificate"),
            private_key=_read(_TLS_KEY.value, credentials.read_pem, "TLS key"),
        )
    summary = train_lib.train(config, _WORKDIR.value, client=client)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
