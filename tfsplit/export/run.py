"""A trained `SplitModel` with its data, ready for export: from a workdir or from the model itself.

Every exporter checks the files it writes against the Keras model they came from, on the data it
was trained and tested on, so a `TrainedRun` carries both. `load_run(workdir)` loads the model
that `tfsplit-train` saved (`checkpoints/model.keras`) and reloads the run's dataset;
`TrainedRun.from_model` wraps a `SplitModel` trained anywhere with data the caller passes. The
forward pass at a budget is always the model's own (`channel_indices`, `send`, `receive`), so an
export is checked against exactly what training measured.
"""

import dataclasses
import importlib.metadata
import os

import ml_collections
import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

import tfsplit
from tfsplit import callbacks, data
from tfsplit.device import spec as spec_lib
from tfsplit.engine.split_model import SplitModel
from tfsplit.training import trainer


class ExportError(ValueError):
    """An export was asked for something the run or the arguments cannot give; says what and why."""


@dataclasses.dataclass
class TrainedRun:
    """A trained split model and its data.

    Attributes:
      split: the trained `SplitModel`.
      info: the dataset's `DatasetInfo` (normalization, shapes, classes).
      train_images, train_labels, test_images, test_labels: uint8 NHWC images and int32 labels;
        training images calibrate int8 heads and fine-tune them, test images check every export.
      final_budget: the budget in force at the end of training, the default for export.
      seed: seeds the choice of calibration images and the fine-tuning order.
      batch_size, learning_rate, momentum: SGD settings of quantization-aware fine-tuning
        (`learning_rate` is the one training ended with; fine-tuning scales it down).
      workdir: the training workdir ("" for a model given directly).
      model_path: the saved model file ("" for a model given directly).
      config: the run's ConfigDict (None for a model given directly).
      summary: the run's summary.json ({} for a model given directly).
    """

    split: SplitModel
    info: data.DatasetInfo
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    final_budget: int
    seed: int = 0
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.0
    workdir: str = ""
    model_path: str = ""
    config: ml_collections.ConfigDict = None
    summary: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_model(cls, model, info, train, test, budget=None, **settings):
        """A run from a trained `SplitModel` and its data, to export a model built in Python.

        Args:
          model: the trained `SplitModel`.
          info: its dataset's `DatasetInfo`; `normalize` must give what the model was trained on.
          train: (uint8 images, int labels) of the training set.
          test: (uint8 images, int labels) of the test set.
          budget: the default export budget; the model's budget in force by default.
          **settings: seed, batch_size, learning_rate, momentum (see the attributes).

        Raises:
          ExportError: a model that is not a `SplitModel`, data of the wrong shape, a bad budget.
        """
        if not isinstance(model, SplitModel):
            raise ExportError(f"`model` must be a tfsplit SplitModel. Received: {type(model)}")
        if not isinstance(info, data.DatasetInfo):
            raise ExportError(f"`info` must be a tfsplit.data.DatasetInfo. Received: {type(info)}")
        arrays = {}
        for name, pair in (("train", train), ("test", test)):
            arrays[f"{name}_images"], arrays[f"{name}_labels"] = _check_split(name, pair, model)
        budget = int(model.budget.numpy()) if budget is None else budget
        _check_budget(model, budget)
        return cls(split=model, info=info, final_budget=budget, **arrays, **settings)

    @property
    def channels(self):
        """Channels C that cross the cut; a budget selects k of them."""
        return self.split.channels

    @property
    def source(self):
        """Where the exported model came from, recorded in the exports' JSON."""
        return {
            "workdir": os.path.abspath(self.workdir) if self.workdir else "",
            "model": os.path.abspath(self.model_path) if self.model_path else "",
        }

    def normalize(self, images):
        """uint8 images -> float32 numpy array normalized as in training (the head's input)."""
        return np.asarray(data.normalize(images, self.info), np.float32)

    def select(self, budget=None):
        """(k, indices): the budget to export (the final one by default) and its top-k channels.

        Any 1 <= k <= C is allowed (adaptive inference); a k above the final budget sends channels
        whose gates training had no reason to keep useful, so it is logged.

        Raises:
          ExportError: k is not an integer in [1, C], or the model has no masked bottleneck and
            k < C.
        """
        k = self.final_budget if budget is None else budget
        _check_budget(self.split, k)
        if k > self.final_budget:
            logging.warning("Budget %d exceeds the run's final budget %d.", k, self.final_budget)
        return k, self.split.channel_indices(k).numpy().astype(np.int32)


def check_count(name, value, maximum, what):
    """Refuses anything but an integer in [1, maximum]; `what` says what the maximum is."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ExportError(
            f"`{name}` must be an integer in [1, {maximum}] (the {what}). "
            f"Received: {name}={value!r}"
        )


def _check_budget(split, budget):
    try:
        split.check_budget(budget)
    except ValueError as error:
        raise ExportError(str(error)) from error


def _check_split(name, pair, model):
    try:
        images, labels = pair
    except (TypeError, ValueError):
        raise ExportError(f"`{name}` must be a pair (images, labels).") from None
    images, labels = np.asarray(images), np.asarray(labels)
    expected = tuple(model.head.input.shape[1:])
    if images.dtype != np.uint8 or images.shape[1:] != expected or len(images) != len(labels):
        raise ExportError(
            f"`{name}` must be uint8 images (N, {', '.join(map(str, expected))}) and N labels. "
            f"Received: {images.dtype} {images.shape} and {labels.shape}"
        )
    if not len(images):
        raise ExportError(f"`{name}` must hold at least one sample.")
    return images, labels.astype(np.int32)


def _read_json(path, what, missing=None):
    missing = missing or (
        f"The workdir has no {what}: expected {path} (written by tfsplit-train). "
        "Received a directory that is not a finished training run."
    )
    try:
        return spec_lib.read_json(path, missing)
    except spec_lib.DeviceError as error:
        raise ExportError(str(error)) from error


def load_run(workdir):
    """The trained `SplitModel` of a training workdir, with the run's data and settings.

    Raises:
      ExportError: the directory is missing, lacks config.json / summary.json, or has no saved
        model.
    """
    if not isinstance(workdir, (str, os.PathLike)) or not os.path.isdir(workdir):
        raise ExportError(f"`workdir` must be an existing directory. Received: workdir={workdir!r}")
    workdir = os.fspath(workdir)
    config = ml_collections.ConfigDict(
        _read_json(os.path.join(workdir, trainer.CONFIG_FILE), "config")
    )
    summary = _read_json(os.path.join(workdir, callbacks.SUMMARY_FILE), "summary")
    model_path = os.path.join(workdir, trainer.MODEL_FILE)
    if not os.path.isfile(model_path):
        raise ExportError(
            f"The workdir has no trained model: expected {model_path} (saved by tfsplit-train "
            f"at the end of a run). Received: workdir={workdir!r}"
        )
    split = trainer.load_model(workdir)
    train, test, info = trainer.load_run_arrays(config)
    logging.info("Loaded %s, final budget %s", model_path, summary["final_budget"])
    return TrainedRun(
        split,
        info,
        *train,
        *test,
        int(summary["final_budget"]),
        seed=config.seed,
        batch_size=config.data.batch_size,
        learning_rate=float(config.phases[-1]["learning_rate"]),
        momentum=config.optimizer.momentum,
        workdir=workdir,
        model_path=model_path,
        config=config,
        summary=summary,
    )


def load_run_test_images(workdir, count):
    """The first `count` test images and labels of a training run's dataset.

    What `tfsplit-run-head --dataset_images` feeds a device's head on a development machine: the
    data arguments come from the run's config.json, as the trainer used them (the embedded
    synthetic set is regenerated from the run's seed), and no model is loaded.

    Returns:
      (uint8 (count, H, W, C) images, int32 (count,) labels).

    Raises:
      ExportError: a count that is not a positive integer, a workdir without config.json, or too
        few test images.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ExportError(f"`count` must be an integer >= 1. Received: count={count!r}")
    path = os.path.join(os.fspath(workdir), trainer.CONFIG_FILE)
    missing = (
        f"No training config at {path}: --dataset_images needs the workdir of the run that made "
        "the head (pass it, or keep the head JSON's source.workdir valid)."
    )
    config = ml_collections.ConfigDict(_read_json(path, "config", missing))
    test_size = config.data.test_size or count
    if count > test_size:
        raise ExportError(f"The run's test set has {test_size} images. Received: count={count}")
    _, (images, labels), _ = trainer.load_run_arrays(config, train_size=1, test_size=count)
    if count > len(images):  # a shards run: its whole test split, whatever its size.
        raise ExportError(f"The run's test set has {len(images)} images. Received: count={count}")
    return images[:count], labels[:count]


def as_run(source, ushaped=False):
    """A `TrainedRun` from a workdir path, or the run itself (lets callers load only once), of
    a plain split (`ushaped` False), a U-shaped one (True) or either (None: the head, which both
    deploy alike).

    Raises:
      ExportError: a workdir that is not a finished run, or a run of the other kind.
    """
    run = source if isinstance(source, TrainedRun) else _load(source)
    if hasattr(run.split, "top") and ushaped is False:
        raise ExportError(
            f"This is a U-shaped split (its top after {run.split.top_cut!r} stays on the device "
            "with the labels): this export would carry the top to the server. Export it with "
            "`export_ushaped` (tfsplit-export does for a U-shaped run)."
        )
    if ushaped is True and not hasattr(run.split, "top"):
        raise ExportError("This run is a plain split: export it with `export_split`.")
    return run


def _load(source):
    if isinstance(source, SplitModel):
        raise ExportError(
            "Exporting a SplitModel needs its data: pass "
            "TrainedRun.from_model(model, info, (train_images, train_labels), "
            "(test_images, test_labels)), or the workdir of a tfsplit-train run."
        )
    return load_run(source)


def image_batches(run, images, labels=None, batch_size=256, shuffle=False):
    """A tf.data pipeline of images normalized as in training, with their labels if given.

    Normalizing batch by batch keeps memory flat on large sets (CIFAR's 50000 training images
    would take 600 MB as float32).
    """
    elements = images if labels is None else (images, labels)
    dataset = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=run.seed)
    dataset = dataset.batch(batch_size)
    if labels is None:
        return dataset.map(lambda x: data.normalize(x, run.info))
    return dataset.map(lambda x, y: (data.normalize(x, run.info), y))


def _logits(function, batches, indices):
    indices = tf.constant(indices, tf.int32)
    compiled = tf.function(lambda batch: function(batch, indices), reduce_retracing=True)
    return np.concatenate([compiled(batch).numpy() for batch in batches])


def keras_split_logits(run, images, indices, batch_size=256):
    """(N, classes) logits of the Keras split model on uint8 images, float32 wire: the reference."""
    split = run.split
    batches = image_batches(run, images, batch_size=batch_size)
    return _logits(lambda x, i: split.receive(split.send(x, i), i), batches, indices)


def keras_tail_logits(run, values, indices, batch_size=256):
    """Logits of the Keras server half on dequantized (N, h, w, k) values of channels `indices`."""
    batches = tf.data.Dataset.from_tensor_slices(np.asarray(values, np.float32)).batch(batch_size)
    return _logits(run.split.receive, batches, indices)


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
