"""Trains the device half of a split model against a tfsplit-train-server: no TensorFlow.

  tfsplit-export --config=configs/deprune.py --trainable --out=/tmp/head     # development machine
  tfsplit-train-server --config=configs/deprune.py --port=50051               # the server
  tfsplit-device-train --model_dir=/tmp/head --data=/data/shards --server=host:50051 \
      --workdir=/tmp/device [--token_file=token --tls_ca=server.crt]          # the device

Needs numpy, absl-py, ai-edge-litert, grpcio and protobuf (PNG shards and image folders: Pillow).
The model directory is what `tfsplit-export --trainable` wrote: head_train.tflite, its layout and
run description head_train.json, and tail_weights.pb (the tail a new run starts from). The data
is a shards directory (tfsplit-prepare-data; every shard's sha256 is checked) or an image folder
(train/<class>/, val/<class>/); a shard directory's pixels are copied to <workdir>/data (a
temporary directory without --workdir) and read batch by batch. Rerun the same command after a
crash: the device resumes from its last save (every checkpoint_every_steps steps) and the server
returns to the same step.

A U-shaped config's export adds top_train.tflite and top_train.json: the device then trains the
top as well, and no label leaves it (the server runs the same config, with its `ushaped` variant).
"""

import functools
import os
import sys
import tempfile

from absl import app, flags, logging

from tfsplit.auth import credentials
from tfsplit.device import batches as batching
from tfsplit.device import dataset
from tfsplit.device import image_folder as device_folder
from tfsplit.device.spec import DeviceError
from tfsplit.device.training import DeviceTrainer, TrainableHead, TrainingClient
from tfsplit.device.training.plan import build_phases
from tfsplit.device.training.top import TrainableTop, has_top
from tfsplit.device.training.ushaped import UShapedDeviceTrainer
from tfsplit_tools import cli

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "What tfsplit-export --trainable wrote.", required=True
)
_DATA = flags.DEFINE_string(
    "data", None, "Shards directory (index.json) or image folder.", required=True
)
_SERVER = flags.DEFINE_string("server", "127.0.0.1:50051", "host:port of tfsplit-train-server.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "State, metrics.jsonl and summary.json.", required=True
)
_DEVICE_ID = flags.DEFINE_string(
    "device_id", "device-0", "This device's id in the run (its token's, per-device tokens)."
)
_SHARD_INDEX = flags.DEFINE_integer(
    "shard_index", 0, "This device's part of the training data.", lower_bound=0
)
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 1, "Devices the training data is split among.", lower_bound=1
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Image folders: side in pixels; 0 = the model's.", lower_bound=0
)
_EPOCHS = flags.DEFINE_integer(
    "epochs", None, "Stop after this many epochs of the schedule (default: all).", lower_bound=1
)
_NUM_THREADS = flags.DEFINE_integer("num_threads", None, "Interpreter threads.", lower_bound=1)
_TOKEN_FILE = flags.DEFINE_string("token_file", None, "This device's token (or the shared one).")
_TLS_CA = flags.DEFINE_string("tls_ca", None, "PEM CA of the server's certificate: TLS.")
_TLS_CLIENT_CERT = flags.DEFINE_string(
    "tls_client_cert", None, "PEM client certificate (mutual TLS; its CN is the device id)."
)
_TLS_CLIENT_KEY = flags.DEFINE_string("tls_client_key", None, "PEM key of --tls_client_cert.")
_DEADLINE = flags.DEFINE_float("deadline_s", 60.0, "Each call's deadline in seconds.")


def _load(run, disk_dir):
    """{split: (images, labels)} of --data's train, validation (when the run has one) and test
    splits, and the info, checked against the run; a shard directory's pixels go to files in
    `disk_dir`, read batch by batch."""
    path = _DATA.value
    splits = (
        ("train", "validation", "test") if run.get("validation_fraction") else ("train", "test")
    )
    if os.path.isfile(os.path.join(path, "index.json")):
        load = functools.partial(dataset.load_shards, path, disk_dir=disk_dir, normalized=False)
    else:
        size = _IMAGE_SIZE.value or run["image_shape"][0]
        load = functools.partial(
            device_folder.load_image_folder,
            path,
            image_size=size,
            normalized=False,
            validation_fraction=run.get("validation_fraction", 0.0),
            seed=run["seed"],
        )
    part = dict(shard_index=_SHARD_INDEX.value, num_shards=_NUM_SHARDS.value)
    loaded = {split: load(split, **(part if split == "train" else {})) for split in splits}
    train_x, _, info = loaded["train"]
    if list(train_x.shape[1:]) != run["image_shape"] or info["num_classes"] != run["num_classes"]:
        raise DeviceError(
            f"{path} holds {info['num_classes']} classes of {list(train_x.shape[1:])} images; "
            f"the model was built for {run['num_classes']} classes of {run['image_shape']}."
        )
    return {split: (images, labels) for split, (images, labels, _) in loaded.items()}, info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.return_freed_buffers_to_the_os()  # a long run's batches and messages, not kept for good
    token = _TOKEN_FILE.value and credentials.read_token_file(_TOKEN_FILE.value)
    ca = _TLS_CA.value and credentials.read_pem(_TLS_CA.value, "TLS CA")
    chain = _TLS_CLIENT_CERT.value and credentials.read_pem(_TLS_CLIENT_CERT.value, "certificate")
    key = _TLS_CLIENT_KEY.value and credentials.read_pem(_TLS_CLIENT_KEY.value, "private key")
    head = TrainableHead(_MODEL_DIR.value, _NUM_THREADS.value)
    run = head.run
    budgets = [phase.effective_budget(run["channels"]) for phase in build_phases(run)]
    head.warm_up(run["batch_size"], max(budgets))  # before the data: its peak stays low
    scratch = None if _WORKDIR.value else tempfile.TemporaryDirectory(prefix="tfsplit-device-")
    disk_dir = os.path.join(_WORKDIR.value, "data") if _WORKDIR.value else scratch.name
    os.makedirs(disk_dir, exist_ok=True)
    loaded, info = _load(run, disk_dir)
    (train_x, train_y), seed, size = loaded["train"], run["seed"], run["batch_size"]
    normalization = (info["mean"], info["std"])  # the sets stay uint8; each batch is normalized

    def train_batches(epoch):
        return batching.batches(
            train_x, train_y, size, seed, epoch, augment=run["augment"], normalization=normalization
        )

    def eval_batches(split):
        if split not in loaded:
            return None
        images, labels = loaded[split]
        return lambda: batching.batches(
            images, labels, run["eval_batch_size"], seed, 0, False, normalization=normalization
        )

    client = TrainingClient(
        _SERVER.value,
        token=token or None,
        root_certificates=ca or None,
        deadline_s=_DEADLINE.value,
        certificate_chain=chain or None,
        private_key=key or None,
    )
    try:
        if has_top(_MODEL_DIR.value):  # U-shaped: the top and the labels stay here
            top = TrainableTop(_MODEL_DIR.value, _NUM_THREADS.value)
            trainer = UShapedDeviceTrainer(head, top, client, _WORKDIR.value, _DEVICE_ID.value)
        else:
            trainer = DeviceTrainer(head, client, _WORKDIR.value, _DEVICE_ID.value)
        trainer.connect()
        steps = -(-len(train_y) // size)
        logging.info("%d training images, %d steps an epoch", len(train_y), steps)
        summary = trainer.fit(
            train_batches,
            steps,
            eval_batches("validation"),
            epochs=_EPOCHS.value,
            test_batches=eval_batches("test"),
        )
        trainer.leave()
    finally:
        client.close()
    print(
        f"Trained {summary['epochs']} epochs: validation accuracy "
        f"{summary.get('final_val_accuracy', float('nan')):.4f}, test accuracy "
        f"{summary.get('final_test_accuracy', float('nan')):.4f} at budget "
        f"{summary['final_budget']}; training payload bytes up {summary['train_payload_bytes_up']}, "
        f"down {summary['train_payload_bytes_down']}; {summary['wall_seconds']:.1f} s, peak "
        f"memory {summary['peak_rss_mib']:.0f} MiB"
    )
    if "train_top_payload_bytes_down" in summary:
        print(
            f"Second cut: middle output down {summary['train_top_payload_bytes_down']}, top "
            f"gradient up {summary['train_top_payload_bytes_up']} bytes"
        )


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
