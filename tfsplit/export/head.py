"""Exports the device side: the head, its encoder and the fixed channel selection, as TFLite.

The exported model maps a normalized image to exactly what crosses the network: the k selected
channels (a `gather` on the last axis with the indices baked in as constants), in the order the
JSON beside the model lists them. Three flavours:

- float32: the float model; it matches the Keras head up to float rounding.
- float16: float16 weights; TFLite still computes and returns float32, so the device runner casts
  the output to float16 before sending (the wire dtype in the JSON says so).
- int8: full-integer; input and output tensors are int8, and the output tensor IS the wire
  payload, sent with the output's scale and zero point. Calibrated on training images normalized
  as in training, optionally fine-tuned with quantization-aware training (`tfsplit.export.qat`).

After writing each model, its LiteRT interpreter output is compared with the Keras reference on
test images and the agreement is stored in the JSON. The JSON itself is declared, and checked
before it is written, by `tfsplit.device.spec`: the module the device reads it with.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfsplit import codec
from tfsplit.device import spec as spec_lib
from tfsplit.device.head import LiteModel, quantize_input
from tfsplit.device.spec import HEAD_DTYPES, DeviceError
from tfsplit.export import qat as qat_lib
from tfsplit.export import run as run_lib
from tfsplit.export.run import ExportError

QAT_CHOICES = (True, False, "auto")
QAT_AUTO_MAX_LOSS = 0.01  # "auto" fine-tunes when int8 loses more than 1 accuracy point.


@dataclasses.dataclass
class HeadExport:
    """One exported head.

    Attributes:
      dtype: "float32", "float16" or "int8".
      model_path: the .tflite file.
      metadata_path: the JSON beside it.
      metadata: the JSON's content.
    """

    dtype: str
    model_path: str
    metadata_path: str
    metadata: dict

    @property
    def size_bytes(self):
        return os.path.getsize(self.model_path)


def check_dtypes(dtypes):
    """`dtypes` as a tuple of distinct HEAD_DTYPES names; a single name is accepted."""
    try:
        return spec_lib.check_head_dtypes(dtypes)
    except DeviceError as error:
        raise ExportError(str(error)) from None


def _check_qat(qat):
    if not (qat is True or qat is False or qat == "auto"):
        raise ExportError(f"`qat` must be one of {QAT_CHOICES}. Received: qat={qat!r}")


def head_function(model_fn, image_shape):
    """A concrete function image (None, H, W, C) float32 -> selected channels, for the converter.

    The batch axis is left open, so the model's default shape is (1, H, W, C) and a checker can
    resize it to run many images at once.
    """
    spec = tf.TensorSpec([None, *image_shape], tf.float32, name="image")
    return tf.function(model_fn, input_signature=[spec]).get_concrete_function()


def convert_head(concrete_function, trackable, dtype, representative_images=None):
    """The .tflite bytes of a `head_function` (reading `trackable`'s variables) in `dtype`.

    An int8 head calibrates its ranges on `representative_images`, normalized training images.
    """
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete_function], trackable)
    if dtype == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif dtype == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [representative_images[i : i + 1]] for i in range(len(representative_images))
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def run_head(model, images, batch_size=256):
    """Runs a head .tflite with the LiteRT interpreter, as the device does.

    Args:
      model: path of an exported head, or its flatbuffer bytes.
      images: normalized float32 NHWC images (int8 heads quantize them with their input scale).
      batch_size: images per interpreter call; the input is resized to it.

    Returns:
      (outputs, quantization): outputs in the model's output dtype (int8 values are the wire
      payload), quantization the output's (scale, zero_point), or None for a float output.
    """
    lite = LiteModel(model if isinstance(model, bytes) else os.fspath(model))
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if lite.input_quantization is not None:
            batch = quantize_input(batch, lite.input_quantization)
        outputs.append(lite(batch))
    return np.concatenate(outputs), lite.output_quantization


def dequantize(outputs, quantization):
    """Head outputs -> float32 as the receiver computes them (`codec.dequantize`)."""
    return codec.dequantize(outputs, *(quantization or (1.0, 0)))


def head_parity(outputs, quantization, reference):
    """How far a TFLite head's outputs are from the Keras reference on the same images.

    Returns:
      dict with samples, max_abs_diff and mean_abs_diff (float32 units); for int8 also
      max_quantization_steps and mean_quantization_steps, of |q - q_ref| with q_ref the reference
      quantized with the output's own scale and zero point. Every layer of a full-integer head
      rounds, so the mean is a few steps and the largest error a few times that.
    """
    difference = np.abs(dequantize(outputs, quantization) - reference)
    parity = {
        "samples": int(len(outputs)),
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
    }
    if quantization is not None:
        expected = quantize_input(reference, quantization)
        steps = np.abs(outputs.astype(np.int32) - expected.astype(np.int32))
        parity["max_quantization_steps"] = int(steps.max())
        parity["mean_quantization_steps"] = float(steps.mean())
    return parity


def head_metadata(run, model_path, dtype, indices, parity, conversion):
    """The JSON that travels with a head: everything a device runner needs besides the model."""
    lite = LiteModel(model_path)
    return spec_lib.head_json(
        os.path.basename(model_path),
        dtype,
        lite.input_detail,
        lite.output_detail,
        run.info.mean,
        run.info.std,
        indices,
        run.split.wire_shape,
        run.info.num_classes,
        dataset=run.info.name,
        source=run.source,
        versions=run_lib.versions(),
        parity=parity,
        conversion=conversion,
    )


def _representative_images(run, count):
    """`count` training images drawn with the run's seed, normalized as in training."""
    rng = np.random.default_rng(run.seed)
    chosen = np.sort(rng.choice(len(run.train_images), size=count, replace=False))
    return run.normalize(run.train_images[chosen])


def tflite_split_accuracy(run, model, indices):
    """Test top-1 accuracy of a TFLite head feeding the float Keras tail (no exported tail)."""
    outputs, quantization = run_head(model, run.normalize(run.test_images))
    logits = run_lib.keras_tail_logits(run, dequantize(outputs, quantization), indices)
    return float(np.mean(np.argmax(logits, axis=-1) == run.test_labels))


def _int8_model(run, indices, float_function, representative, qat):
    """Post-training int8 head, replaced by a quantization-aware one when `qat` asks for it.

    With qat="auto" the fine-tuned model is kept only if its accuracy is at least the
    post-training one; the JSON records both either way.

    Returns:
      (flatbuffer, split, record): the model, the `SplitModel` whose `send` it must agree with,
      and how it was quantized (with the accuracies that decided it).
    """
    flatbuffer = convert_head(float_function, run.split.head, "int8", representative)
    record = {"method": "post-training", "qat": qat}
    if qat is False:
        return flatbuffer, run.split, record
    float_logits = run_lib.keras_split_logits(run, run.test_images, indices)
    record["float_accuracy"] = float(np.mean(np.argmax(float_logits, -1) == run.test_labels))
    record["post_training_accuracy"] = tflite_split_accuracy(run, flatbuffer, indices)
    loss = record["float_accuracy"] - record["post_training_accuracy"]
    if qat == "auto" and loss <= QAT_AUTO_MAX_LOSS:
        return flatbuffer, run.split, record
    qat_split, settings = qat_lib.fine_tune_head(run, indices, representative)
    function = head_function(lambda images: qat_split.send(images, indices), run.info.image_shape)
    qat_flatbuffer = convert_head(function, qat_split.head, "int8", representative)
    record["fine_tuning"] = settings
    record["quantization_aware_accuracy"] = tflite_split_accuracy(run, qat_flatbuffer, indices)
    if qat == "auto" and record["quantization_aware_accuracy"] < record["post_training_accuracy"]:
        logging.info("Keeping the post-training int8 head, fine-tuning did not help: %s", record)
        return flatbuffer, run.split, record
    record["method"] = "quantization-aware"
    logging.info("Quantization-aware int8 head: %s", record)
    return qat_flatbuffer, qat_split, record


def _head_model(run, dtype, indices, float_function, representative, qat):
    if dtype == "int8":
        return _int8_model(run, indices, float_function, representative, qat)
    flatbuffer = convert_head(float_function, run.split.head, dtype)
    method = "float16 weights" if dtype == "float16" else "none"
    return flatbuffer, run.split, {"method": method}


def _output_paths(out_dir, dtypes, overwrite):
    paths = {
        d: [os.path.join(out_dir, f"head_{d}.{ext}") for ext in ("tflite", "json")] for d in dtypes
    }
    existing = [path for pair in paths.values() for path in pair if os.path.exists(path)]
    if existing and not overwrite:
        raise ExportError(
            f"Export files already exist: {existing}; pass overwrite=True to replace them."
        )
    return paths


def export_head(
    workdir,
    out_dir,
    budget=None,
    dtypes=HEAD_DTYPES,
    representative_samples=200,
    qat="auto",
    parity_samples=100,
    overwrite=False,
):
    """Writes the head with its channel selection as `head_<dtype>.tflite` + `head_<dtype>.json`.

    Args:
      workdir: a training workdir, or a `TrainedRun` (`load_run`, `TrainedRun.from_model`).
      out_dir: directory for the files (created).
      budget: channels k to send; the run's final budget by default, any 1 <= k <= C allowed.
      dtypes: which of HEAD_DTYPES to write.
      representative_samples: training images that calibrate the int8 ranges.
      qat: True fine-tunes the int8 head with quantization-aware training, False never does,
        "auto" does when post-training int8 (int8 head -> float tail) loses more than 1 top-1
        point against the float model on the test set.
      parity_samples: test images on which each model is compared with its Keras reference.
      overwrite: replace existing files instead of failing.

    Returns:
      dict dtype -> `HeadExport`.

    Raises:
      ExportError: bad arguments, a workdir that is not a finished run, or existing files.
    """
    run = run_lib.as_run(workdir, ushaped=None)
    dtypes = check_dtypes(dtypes)
    run_lib.check_count(
        "representative_samples", representative_samples, len(run.train_images), "training set size"
    )
    run_lib.check_count("parity_samples", parity_samples, len(run.test_images), "test set size")
    _check_qat(qat)
    _, indices = run.select(budget)
    paths = _output_paths(out_dir, dtypes, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    representative = _representative_images(run, representative_samples)
    float_function = head_function(
        lambda images: run.split.send(images, indices), run.info.image_shape
    )
    parity_images = run.normalize(run.test_images[:parity_samples])
    exports = {}
    for dtype in dtypes:
        flatbuffer, split, record = _head_model(
            run, dtype, indices, float_function, representative, qat
        )
        model_path, metadata_path = paths[dtype]
        with open(model_path, "wb") as f:
            f.write(flatbuffer)
        outputs, quantization = run_head(model_path, parity_images)
        parity = head_parity(outputs, quantization, split.send(parity_images, indices).numpy())
        metadata = head_metadata(run, model_path, dtype, indices, parity, record)
        with open(metadata_path, "w") as f:
            json.dump(metadata, f, indent=2)
        logging.info("Wrote %s (%d bytes), parity %s", model_path, len(flatbuffer), parity)
        exports[dtype] = HeadExport(dtype, model_path, metadata_path, metadata)
    return exports
