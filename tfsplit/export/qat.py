"""Quantization-aware fine-tuning of the head, for int8 heads that keep the float accuracy.

Route: every head layer is annotated with tfmot's default 8-bit scheme, the `MaskedEncoder` with
`tfsplit.layers.bottleneck.MaskedEncoderQuantizeConfig`, and `quantize_apply` builds a
fake-quantized copy of the head (the trained model is left untouched). That copy and a frozen copy
of the float tail make a `SplitModel` that `fit` fine-tunes for a short while on the training
images at the export's budget (budget loss off), then the head is converted to int8 like a
post-training head.

Two choices make a *short* fine-tune useful:
- tfmot starts every activation range at [-6, 6] and moves it as a 0.999 moving average, so after
  a few hundred steps the ranges would still be far too wide; they are set first from the float
  head's observed ranges on the representative images (post-training calibration), and the
  moving averages refine them from there.
- the gate logits do not move (their own optimizer has a zero learning rate): the channel
  selection is fixed at export, and a gate that moved would no longer rank channels as the
  exported indices say.

Limits: tfmot's `quantize_apply` accepts flat functional or Sequential models of built-in layers
(plus layers with a QuantizeConfig); a head with nested models or other custom layers raises an
ExportError, and post-training int8 (qat=False) still works for it. Batch norm inside the encoder
is fake-quantized unfolded (tfmot folds only Conv+BN pairs of built-in layers), so the int8 model
differs from the fine-tuned Keras model by slightly more than the usual rounding.
"""

import re

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from absl import logging

from tfsplit.engine.split_model import SplitModel
from tfsplit.export import run as run_lib
from tfsplit.export.run import ExportError
from tfsplit.layers.bottleneck import MaskedEncoder, MaskedEncoderQuantizeConfig

LEARNING_RATE_FACTOR = 0.1  # Fine-tuning rate: this times the run's last learning rate.
_ACTIVATION_RANGE = re.compile(r"(output|post_activation|quantize_layer)_(min|max):0$")
_QUANTIZE = tfmot.quantization.keras


def _annotate(layer):
    if isinstance(layer, keras.layers.InputLayer):
        return layer
    if isinstance(layer, MaskedEncoder):
        return _QUANTIZE.quantize_annotate_layer(layer, MaskedEncoderQuantizeConfig())
    return _QUANTIZE.quantize_annotate_layer(layer)


def build_qat_head(head):
    """A fake-quantized copy of `head` (same weights) ready for quantization-aware training.

    Raises:
      ExportError: tfmot cannot quantize the head (nested models or unsupported custom layers).
    """
    scope = {cls.__name__: cls for cls in (MaskedEncoder, MaskedEncoderQuantizeConfig)}
    try:
        annotated = keras.models.clone_model(head, clone_function=_annotate)
        with _QUANTIZE.quantize_scope(scope):
            return _QUANTIZE.quantize_apply(annotated)
    except (ValueError, RuntimeError, TypeError) as error:
        raise ExportError(
            "Quantization-aware training needs a flat functional head of built-in Keras layers "
            f"and MaskedEncoder; tfmot refused {head.name!r}: {error}. Export it with qat=False "
            "(post-training int8) instead."
        ) from error


def calibrate_ranges(qat_head, head, images):
    """Starts every activation range of `qat_head` at the float `head`'s range on `images`.

    Args:
      qat_head: from `build_qat_head(head)`.
      head: the float head it was built from.
      images: normalized float32 images, e.g. the int8 representative set.
    """
    targets = {}
    for layer in qat_head.layers:
        variables = [w for w in layer.non_trainable_weights if _ACTIVATION_RANGE.search(w.name)]
        if variables:
            inner = getattr(layer, "layer", None)
            targets[layer.name] = (variables, None if inner is None else inner.name)
    probed = sorted({name for _, name in targets.values() if name is not None})
    probe = keras.Model(head.input, [head.get_layer(name).output for name in probed])
    observed = dict(zip(probed, tf.nest.flatten(probe(images, training=False))))
    for variables, name in targets.values():
        values = images if name is None else observed[name]
        low = min(float(tf.reduce_min(values)), 0.0)
        high = max(float(tf.reduce_max(values)), 0.0)
        for variable in variables:
            variable.assign(low if variable.name.endswith("_min:0") else high)


def _frozen_copy(tail):
    """The tail, copied and frozen: fine-tuning the head must not change the exported tail.

    A frozen Keras model also runs its batch norm in inference mode, as the server will.
    """
    copy = keras.models.clone_model(tail)
    copy.set_weights(tail.get_weights())
    copy.trainable = False
    return copy


def build_qat_split(split, qat_head, budget):
    """A `SplitModel` of `qat_head` and a frozen copy of the float tail, at a fixed selection.

    The fake-quantized head already rounds its output as the int8 wire will, so the wire here is
    float32 both ways, and the budget loss is off. Compile it with a zero-rate `gate_optimizer`
    (as `fine_tune_head` does) so the top-k channels stay the exported ones: gates that moved
    would rank channels differently from the indices baked into the head.
    """
    qat_split = SplitModel(
        qat_head,
        _frozen_copy(split.tail),
        cut=split.cut,
        activation_dtype="float32",
        gradient_dtype="float32",
        name=f"{split.name}_qat",
    )
    # tfmot wraps the encoder in a QuantizeWrapper, which SplitModel does not look into.
    wrapped = [getattr(layer, "layer", None) for layer in qat_head.layers]
    encoders = [layer for layer in wrapped if isinstance(layer, MaskedEncoder)]
    if encoders:
        qat_split.encoder = encoders[0]
    qat_split.set_budget(budget, masking=False)
    return qat_split


def fine_tune_head(run, indices, representative, epochs=1, learning_rate=None):
    """Quantization-aware fine-tuning of the run's head with `fit`, at a fixed channel selection.

    Args:
      run: a `TrainedRun`.
      indices: the exported channel indices (the run's top-k for their count k).
      representative: normalized training images whose ranges start the activation quantizers.
      epochs: passes over the training set.
      learning_rate: SGD rate; by default LEARNING_RATE_FACTOR times the run's last rate.

    Returns:
      (qat_split, settings): the fine-tuned `SplitModel` (its `head` is fake-quantized, its
      `send(images, indices)` is what the int8 head must compute) and a dict of what was done,
      for the export's JSON.

    Raises:
      ExportError: bad epochs / learning rate, or a head tfmot cannot quantize.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ExportError(f"`epochs` must be a positive integer. Received: {epochs=!r}")
    if learning_rate is None:
        learning_rate = LEARNING_RATE_FACTOR * float(run.learning_rate)
    if not learning_rate > 0:
        raise ExportError(f"`learning_rate` must be > 0. Received: {learning_rate=!r}")
    indices = np.asarray(indices, np.int32)
    qat_head = build_qat_head(run.split.head)
    calibrate_ranges(qat_head, run.split.head, representative)
    qat_split = build_qat_split(run.split, qat_head, len(indices))
    qat_split.compile(
        keras.optimizers.SGD(learning_rate, momentum=run.momentum),
        gate_optimizer=keras.optimizers.SGD(0.0),
    )
    batches = run_lib.image_batches(
        run, run.train_images, run.train_labels, run.batch_size, shuffle=True
    )
    history = qat_split.fit(batches, epochs=epochs, verbose=0).history
    if not np.array_equal(qat_split.channel_indices(len(indices)).numpy(), indices):
        raise ExportError(
            "Quantization-aware fine-tuning changed the channel selection; expected the exported "
            f"indices {indices.tolist()}."
        )
    settings = {
        "epochs": epochs,
        "steps": epochs * int(batches.cardinality()),
        "learning_rate": learning_rate,
        "batch_size": int(run.batch_size),
        "epoch_losses": [float(loss) for loss in history["loss"]],
        "epoch_accuracies": [float(accuracy) for accuracy in history["accuracy"]],
    }
    logging.info("Quantization-aware fine-tuning: %s", settings)
    return qat_split, settings
