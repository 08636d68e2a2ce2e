"""The server half of networked split training: holds the decoder, the tail and their optimizer.

  tfsplit-train-server --config=configs/deprune.py --workdir=/tmp/tfsplit/server --port=50051
  tfsplit-train --config=configs/deprune.py --workdir=/tmp/tfsplit/device --server=127.0.0.1:50051

Use the same config (and overrides) on both sides: the device drives the run (data, head, gates,
phases) and the server refuses a device whose model differs. The server keeps its state in
--workdir (a checkpoint each time the device backs up, and a log of every step since): restarted
on the same --workdir after a crash, it carries on where the run was, and the device's retries
reach it without any action. Listens on 127.0.0.1 unless --host says otherwise; prints the
address, then serves until stopped.

Who may call: --token_file (one token shared by every device), or an identity per device, so that
a device can act only as itself (PERMISSION_DENIED otherwise): --tokens_file (lines
`<device id> <token>`; edit it and send SIGHUP to add or revoke a device, no restart) and/or
--tls_client_ca (mutual TLS: the client certificate's subject CN is the device id). A --host
other than loopback needs TLS (--tls_cert, --tls_key), unless --insecure. See
docs/networked-training.md#security.

Several devices (`--config.data.shard_index=i --config.data.num_shards=N` each) share the tail:
in turn (--mode=sequential, SplitNN) or, with --mode=parallel, their concurrent steps trained as
one batch and their heads averaged after every epoch (SplitFed).
"""

import signal
import sys
import types

# isort: off
import tfsplit  # noqa: F401  (first: selects Keras 2 before TensorFlow loads)

# isort: on
import tf_keras
from absl import app, flags, logging
from ml_collections import config_flags

from tfsplit.auth import credentials as credentials_lib
from tfsplit.auth import grpc_server as security
from tfsplit.auth import identity as identity_lib
from tfsplit.auth import transport
from tfsplit.training import trainer
from tfsplit.training.server import distributed
from tfsplit.training.server import service as service_lib
from tfsplit.training.server.tail_trainer import MAX_JOINED_BATCH
from tfsplit_tools import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The server's directory.", required=True)
_PORT = flags.DEFINE_integer("port", 50051, "Port to listen on; 0 picks a free one.", lower_bound=0)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_TOKEN_FILE = flags.DEFINE_string(
    "token_file", None, "Refuse calls without the token in it (one token shared by all devices)."
)
_TOKENS_FILE = flags.DEFINE_string(
    "tokens_file",
    None,
    "Per-device tokens, one '<device id> <token>' line each: a call must carry one of them and "
    "acts only as its device. SIGHUP reloads the file (revokes removed devices).",
)
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate chain: serve over TLS.")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert.")
_TLS_CLIENT_CA = flags.DEFINE_string(
    "tls_client_ca",
    None,
    "PEM CA: require client certificates signed by it (mutual TLS); the certificate's subject "
    "CN is the device id. Needs --tls_cert.",
)
_INSECURE = flags.DEFINE_bool(
    "insecure",
    False,
    "Allow a --host other than loopback without TLS (tokens and tensors in clear text); a "
    "warning is logged on every start.",
)
_MAX_BATCH_SIZE = flags.DEFINE_integer(
    "max_batch_size",
    None,
    "Largest batch per step (default: the larger of the config's training and evaluation batch).",
    lower_bound=1,
)
_MAX_DEVICES = flags.DEFINE_integer(
    "max_devices",
    None,
    "Most devices in the run at once (default: the server's own).",
    lower_bound=1,
)
_MAX_LEARNING_RATE = flags.DEFINE_float(
    "max_learning_rate",
    None,
    "Largest learning rate a device may ask for (default: the highest rate the config's phases "
    "set).",
    lower_bound=0.0,
)
_DEVICE_TIMEOUT_S = flags.DEFINE_float(
    "device_timeout_s",
    None,
    "A device silent this long leaves the run and frees its slot (default: the server's own).",
    lower_bound=0.0,
)
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
_MAX_JOINED_BATCH = flags.DEFINE_integer(
    "max_joined_batch",
    MAX_JOINED_BATCH,
    "--mode=parallel: the most samples one joined batch trains; more steps at once train as "
    "several batches, in the order they arrived.",
    lower_bound=1,
)
_AVERAGE_TIMEOUT_S = flags.DEFINE_float(
    "average_timeout_s",
    120.0,
    "--mode=parallel: how long an epoch's head averaging waits for the last devices.",
    lower_bound=1.0,
)
_WARM_UP = flags.DEFINE_bool(
    "warm_up",
    None,
    "Before the run's first step, run the tail's steps once at every batch size up to "
    "--max_batch_size: the server's memory then reaches its level at the start and stays there "
    "whatever sizes devices send (seconds to a minute). Default: on for a --host other than "
    "loopback (devices you may not trust), off on loopback.",
)
_STRATEGY = flags.DEFINE_enum(
    "strategy",
    "none",
    list(distributed.STRATEGIES),
    "none: the tail on one device; mirrored: each training step's batch split across the local "
    "GPUs, or across --cpu_replicas logical CPU devices where there is none "
    "(docs/networked-training.md#a-tail-on-several-accelerators).",
)
_CPU_REPLICAS = flags.DEFINE_integer(
    "cpu_replicas",
    2,
    "--strategy=mirrored without a GPU: the logical CPU devices the batch is split across.",
    lower_bound=1,
)
flags.mark_flags_as_required(["config"])


def _security():
    """(server credentials or None, interceptors, the DeviceIdentity or None) from the flags."""
    if bool(_TLS_CERT.value) != bool(_TLS_KEY.value):
        raise app.UsageError("--tls_cert and --tls_key go together.")
    if _TLS_CLIENT_CA.value and not _TLS_CERT.value:
        raise app.UsageError("--tls_client_ca (mutual TLS) needs --tls_cert and --tls_key.")
    if _TOKEN_FILE.value and _TOKENS_FILE.value:
        raise app.UsageError(
            "--token_file (one shared token) and --tokens_file (one per device) exclude each other."
        )
    warning = transport.check_listen(_HOST.value, bool(_TLS_CERT.value), _INSECURE.value)
    if warning:
        logging.warning(warning)
    credentials = None
    if _TLS_CERT.value:
        credentials = security.server_credentials(
            _TLS_CERT.value, _TLS_KEY.value, client_ca_file=_TLS_CLIENT_CA.value or None
        )
    interceptors, identity = [], None
    if _TOKEN_FILE.value:
        interceptors.append(
            security.TokenInterceptor(credentials_lib.read_token_file(_TOKEN_FILE.value))
        )
    if _TOKENS_FILE.value or _TLS_CLIENT_CA.value:
        tokens = identity_lib.DeviceTokens(_TOKENS_FILE.value) if _TOKENS_FILE.value else None
        if tokens is not None and identity_lib.readable_by_others(tokens.path):
            logging.warning("The tokens file %s is readable by others: chmod 600 it.", tokens.path)
        identity = identity_lib.DeviceIdentity(
            tokens, client_certificates=bool(_TLS_CLIENT_CA.value)
        )
        interceptors.append(identity)
    if not interceptors and not transport.is_loopback(_HOST.value):
        logging.warning(
            "Listening on %r with no token and no client certificates: whoever reaches it can "
            "train and read the tail.",
            _HOST.value,
        )
    return credentials, interceptors, identity


def _reload_on_sighup(identity):
    """SIGHUP reloads the tokens file: a removed device is refused from its next call on."""

    def reload(signum, frame):
        try:
            devices = identity.reload()
        except (OSError, ValueError) as error:
            logging.error("Tokens file not reloaded, the previous one stays in force: %s", error)
            return
        logging.info("Tokens file reloaded: %d devices (%s).", len(devices), ", ".join(devices))

    signal.signal(signal.SIGHUP, reload)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.return_freed_buffers_to_the_os()
    config = _CONFIG.value
    if _STRATEGY.value != "none" and config.budget_sampling.nested:
        raise app.UsageError(
            "--strategy: a run with nested budgets (config.budget_sampling.nested, deprune's "
            "default) trains its tail without a strategy; its distillation keeps the whole "
            "batch's channel means. Give --config.budget_sampling.nested=False, or "
            "--strategy=none."
        )
    service_lib.one_inter_op_thread()
    strategy = distributed.make_strategy(_STRATEGY.value, _CPU_REPLICAS.value)  # before any op
    credentials, interceptors, identity = _security()
    if identity is not None and identity.tokens is not None:
        _reload_on_sighup(identity)
    trainer.write_config(config, _WORKDIR.value)

    def build_split(image_shape, num_classes):
        info = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
        with distributed.scope(strategy):
            split = trainer.build_split_model(config, info)
        if strategy is not None:
            distributed.synchronize_batch_norm(split.tail)
        # The tail's random draws (dropout) from the run's seed: a rerun trains the same model.
        tf_keras.utils.set_random_seed(config.seed)
        return split

    # The bounds the run's own config implies, unless a flag sets them.
    limits = service_lib.config_limits(config)
    for name, flag in (
        ("max_batch_size", _MAX_BATCH_SIZE),
        ("max_learning_rate", _MAX_LEARNING_RATE),
    ):
        if flag.value is not None:
            limits[name] = flag.value
    warm_up = _WARM_UP.value
    if warm_up is None:
        warm_up = not transport.is_loopback(_HOST.value)
    if warm_up:
        logging.info(
            "The tail's steps run once at every batch size up to %d before the run's first step "
            "(--warm_up).",
            limits["max_batch_size"],
        )
    servicer = service_lib.TrainingServicer(
        build_split,
        state_dir=_WORKDIR.value,
        identify=identity.identify if identity is not None else None,
        max_devices=_MAX_DEVICES.value,
        device_timeout_s=_DEVICE_TIMEOUT_S.value,
        **limits,
        parallel=_MODE.value == "parallel",
        gather_timeout_s=_GATHER_TIMEOUT_MS.value / 1000,
        max_joined_batch=_MAX_JOINED_BATCH.value,
        average_timeout_s=_AVERAGE_TIMEOUT_S.value,
        warm_up=warm_up,
        strategy=strategy,
    )
    server, port = service_lib.serve(
        servicer, _PORT.value, _HOST.value, credentials=credentials, interceptors=interceptors
    )
    print(f"listening on {_HOST.value}:{port}")
    sys.stdout.flush()
    server.wait_for_termination()


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
