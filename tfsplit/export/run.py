"""A finished training run loaded for export: config, weights, data and the Keras reference.

Every exporter starts from a training workdir (what `tfsplit.train.train` wrote: `config.json`,
`summary.json`, `checkpoints/`). `load_run` rebuilds the split model from the config, restores
its latest checkpoint and loads the run's dataset, so the exported files can be checked against
the very model that was trained, on the data it was trained and tested on.
"""

import dataclasses
import importlib.metadata
import json
import numbers
import os

import ml_collections
import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

import tfsplit
from tfsplit import budget as budget_lib
from tfsplit import data
from tfsplit.models import SplitModel
from tfsplit.train import trainer

CONFIG_FILE = "config.json"


class ExportError(ValueError):
    """An export was asked for something the run or the arguments cannot give; says what and why."""


@dataclasses.dataclass
class TrainedRun:
    """A training run ready for export.

    Attributes:
      workdir: the training workdir.
      config: the run's ConfigDict.
      summary: the run's summary.json (final budget, accuracy, ...).
      info: the dataset's `DatasetInfo` (normalization, shapes, classes).
      split: the `SplitModel` with the checkpoint's weights.
      checkpoint: path prefix of the restored checkpoint.
      train_images, train_labels, test_images, test_labels: the run's data, uint8 NHWC images and
        int32 labels, exactly as the trainer loaded them.
    """

    workdir: str
    config: ml_collections.ConfigDict
    summary: dict
    info: data.DatasetInfo
    split: SplitModel
    checkpoint: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def channels(self):
        """Channels C that cross the cut; a budget selects k of them."""
        return self.split.channels

    @property
    def final_budget(self):
        """The budget in force at the end of training: the default for export."""
        return int(self.summary["final_budget"])

    def normalize(self, images):
        """uint8 images -> float32 numpy array normalized as in training (the head's input)."""
        return np.asarray(data.normalize(images, self.info), np.float32)


def _read_json(path, what):
    if not os.path.isfile(path):
        raise ExportError(
            f"The workdir has no {what}: expected {path} (written by tfsplit-train). "
            "Received a directory that is not a finished training run."
        )
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as error:
            raise ExportError(f"{path} is not valid JSON: {error}") from error


def _load_data(config):
    (train_images, train_labels), (test_images, test_labels), info = data.load_arrays(
        config.data.name, **trainer.data_arguments(config)
    )
    return info, train_images, train_labels, test_images, test_labels


def load_run(workdir):
    """Rebuilds a trained split model and its data from a training workdir.

    Args:
      workdir: directory of a finished `tfsplit-train` run.

    Returns:
      A `TrainedRun`.

    Raises:
      ExportError: the directory is missing, lacks config.json / summary.json, or has no
        checkpoint.
    """
    if not isinstance(workdir, (str, os.PathLike)) or not os.path.isdir(workdir):
        raise ExportError(f"`workdir` must be an existing directory. Received: workdir={workdir!r}")
    workdir = os.fspath(workdir)
    config = ml_collections.ConfigDict(_read_json(os.path.join(workdir, CONFIG_FILE), "config"))
    summary = _read_json(os.path.join(workdir, trainer.SUMMARY_FILE), "summary")
    checkpoint_dir = os.path.join(workdir, trainer.CHECKPOINT_DIR)
    if tf.train.latest_checkpoint(checkpoint_dir) is None:
        raise ExportError(
            f"The workdir has no checkpoint: expected one in {checkpoint_dir}/ (written by "
            f"tfsplit-train). Received: workdir={workdir!r}"
        )
    info, train_images, train_labels, test_images, test_labels = _load_data(config)
    split = trainer.build_split_model(config, info)
    checkpoint = trainer.restore_weights(split, workdir)
    logging.info("Loaded %s: %s, final budget %s", workdir, checkpoint, summary["final_budget"])
    return TrainedRun(
        workdir=workdir,
        config=config,
        summary=summary,
        info=info,
        split=split,
        checkpoint=checkpoint,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
    )


def as_run(workdir_or_run):
    """A `TrainedRun` from a workdir path, or the run itself (lets callers load only once)."""
    if isinstance(workdir_or_run, TrainedRun):
        return workdir_or_run
    return load_run(workdir_or_run)


def resolve_budget(run, budget=None):
    """The number of channels k to send: the run's final budget by default.

    Any 1 <= k <= C is allowed (adaptive inference); a k above the final budget sends channels
    whose gates training had no reason to keep useful, so it is logged.

    Raises:
      ExportError: k is not an integer in [1, C], or the run has no masked bottleneck and k < C.
    """
    if budget is None:
        return run.final_budget
    channels = run.channels
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool):
        raise ExportError(f"`budget` must be an integer in [1, {channels}]. Received: {budget=!r}")
    if not 1 <= budget <= channels:
        raise ExportError(
            f"`budget` must be in [1, {channels}] (the channels at the cut). Received: {budget=}"
        )
    if run.split.encoder is None and budget != channels:
        raise ExportError(
            f"The run has no masked bottleneck, so every one of its {channels} channels is sent. "
            f"Received: {budget=}"
        )
    if budget > run.final_budget:
        logging.warning(
            "Budget %d exceeds the run's final budget %d.", int(budget), run.final_budget
        )
    return int(budget)


def selected_channels(run, k):
    """The k channel indices to send, most important first, as a numpy int32 array.

    The ranking is `tfsplit.budget.top_k_channels` on the restored gates, the one the trainer used;
    a run without a bottleneck sends all its channels in order.
    """
    if run.split.encoder is None:
        return np.arange(run.channels, dtype=np.int32)
    return budget_lib.top_k_channels(run.split.encoder.gate_logits, k).numpy().astype(np.int32)


def scatter_channels(values, indices, channels):
    """(N, h, w, k) values -> (N, h, w, channels): channel indices[i] holds values[..., i].

    Channels not in `indices` are zero, as the server's decoder expects. The channel axis is moved
    first so one `scatter_nd` places all k channels at once.
    """
    moved = tf.transpose(values, [3, 0, 1, 2])
    shape = tf.concat([[channels], tf.shape(moved)[1:]], axis=0)
    full = tf.scatter_nd(tf.reshape(indices, [-1, 1]), moved, shape)
    return tf.transpose(full, [1, 2, 3, 0])


def selected_head(head, indices):
    """Keras head -> a function image -> its k selected channels, in inference mode."""
    indices = tf.constant(indices, tf.int32)

    def head_with_selection(images):
        return tf.gather(head(images, training=False), indices, axis=-1)

    return head_with_selection


def image_batches(run, images, labels=None, batch_size=256, shuffle=False):
    """A tf.data pipeline of images normalized as in training, with their labels if given.

    Normalizing batch by batch keeps memory flat on large sets (CIFAR's 50000 training images
    would take 600 MB as float32).
    """
    elements = images if labels is None else (images, labels)
    dataset = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=run.config.seed)
    dataset = dataset.batch(batch_size)
    if labels is None:
        return dataset.map(lambda x: data.normalize(x, run.info))
    return dataset.map(lambda x, y: (data.normalize(x, run.info), y))


def keras_split_logits(run, images, indices, batch_size=256):
    """Logits of the float Keras split model sending only `indices`: the accuracy reference.

    Args:
      run: a `TrainedRun`.
      images: uint8 NHWC images.
      indices: channel indices to send.
      batch_size: images per forward pass.

    Returns:
      (N, num_classes) float32 numpy logits.
    """
    head = selected_head(run.split.head, indices)
    indices = tf.constant(indices, tf.int32)

    @tf.function(reduce_retracing=True)
    def logits(batch):
        full = scatter_channels(head(batch), indices, run.channels)
        return run.split.tail(full, training=False)

    batches = image_batches(run, images, batch_size=batch_size)
    return np.concatenate([logits(batch).numpy() for batch in batches])


def versions():
    """Versions of the software that made an export, recorded beside it."""
    return {
        "tfsplit": tfsplit.__version__,
        "tensorflow": tf.__version__,
        "tf_keras": keras.__version__,
        "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
        "tensorflow_model_optimization": importlib.metadata.version(
            "tensorflow-model-optimization"
        ),
    }
