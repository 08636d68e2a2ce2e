"""Exports a U-shaped split as it deploys: the head and the top for the device, the middle for TF
Serving. The labels' layers never leave the device.

    <out_dir>/head_<dtype>.tflite|json   the head, as `export_head` writes it; its JSON also
                                         names the top (`"top"`), run on the middle's answer
    <out_dir>/top.tflite                 the top: the middle's output -> probabilities
    <out_dir>/serving/<model_name>_<dtype>/<v>/  the middle as a SavedModel for each head's
                                         wire dtype: the head's payload in (as a plain tail
                                         takes it), `middle` out in the second cut's wire dtype
                                         (float32 for an int8 second cut)

Every file is checked against the Keras model, and the deployed path (LiteRT head -> payload ->
middle SavedModel -> LiteRT top) against the Keras U-shaped model on the test set.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfsplit import codec
from tfsplit.device import spec as device_spec
from tfsplit.device.head import LiteModel
from tfsplit.device.payload import build_payload
from tfsplit.export import head as head_lib
from tfsplit.export import run as run_lib
from tfsplit.export import tail as tail_lib
from tfsplit.export.run import ExportError

TOP_FILE = "top.tflite"
MIDDLE_OUTPUT = "middle"
# The head flavours a U-shaped split exports (an int8 head is `export_split`'s, with its QAT).
USHAPED_DTYPES = ("float32", "float16")


@dataclasses.dataclass
class UShapedExport:
    """What `export_ushaped` wrote and measured.

    Attributes:
      out_dir: where the heads and the top are; the middles are under `<out_dir>/serving/`.
      top_path: the top's .tflite.
      heads: dtype -> `HeadExport` (its JSON names the top).
      middles: dtype -> the middle's `TailExport` for that head's wire dtype (its `parity`
        compares it with the Keras middle).
      rows: per dtype, the deployed path on the test set against Keras (`evaluate_ushaped`).
    """

    out_dir: str
    top_path: str
    heads: dict
    middles: dict
    rows: list


def middle_dtype(split):
    """What the middle answers in: the second cut's wire dtype; float32 for int8 (TF Serving
    answers a tensor, which has no int8 scale)."""
    return "float32" if split.top_activation_dtype == "int8" else split.top_activation_dtype


def _middle_outputs(split, real, indices):
    output = split.middle_output(real, indices)
    return {MIDDLE_OUTPUT: tf.cast(output, tail_lib.TF_DTYPES[middle_dtype(split)])}


def _keras_middle(run, values, indices, scale=1.0, zero_point=0):
    """The Keras middle's output on a payload (dequantized by the codec), in the answer's dtype:
    the middle's reference."""
    real = codec.dequantize(values, scale, zero_point)
    batches = tf.data.Dataset.from_tensor_slices(real).batch(256)
    indices = tf.constant(indices, tf.int32)
    outputs = [_middle_outputs(run.split, batch, indices)[MIDDLE_OUTPUT] for batch in batches]
    return np.concatenate([output.numpy() for output in outputs])


def convert_top(split):
    """The top as float32 TFLite: the middle's output -> softmax probabilities."""
    spec = tf.TensorSpec((None,) + split.top_shape, tf.float32, name="middle")
    function = tf.function(
        lambda middle: tf.nn.softmax(split.top(middle, training=False)), input_signature=[spec]
    ).get_concrete_function()
    return head_lib.convert_head(function, split.top, "float32")


def _top_parity(split, top_model, middle):
    expected = tf.nn.softmax(split.top(middle, training=False)).numpy()
    return float(np.abs(top_model(middle) - expected).max())


def export_ushaped(
    workdir,
    out_dir=None,
    budget=None,
    dtypes=USHAPED_DTYPES,
    model_name="tfsplit_tail",
    version=1,
    overwrite=False,
):
    """Exports the heads, the top and one middle per wire dtype of a U-shaped run, and checks
    the deployed path.

    Args:
      workdir: a U-shaped training workdir, or its `TrainedRun`.
      out_dir: where to write; `<workdir>/export` by default.
      budget: the channels the heads send; the run's final budget by default.
      dtypes: head flavours, and the first cut's wire dtypes, from USHAPED_DTYPES.
      model_name, version: the middles' TF Serving name prefix (the dtype is appended) and
        version.
      overwrite: replace existing files instead of failing.

    Returns:
      A `UShapedExport`.

    Raises:
      ExportError: a plain run, bad arguments, or existing files.
    """
    run = run_lib.as_run(workdir, ushaped=True)
    split = run.split
    dtypes = head_lib.check_dtypes(dtypes)
    if not set(dtypes) <= set(USHAPED_DTYPES):
        raise ExportError(
            f"`dtypes` must be some of {USHAPED_DTYPES} for a U-shaped split. Received: {dtypes}"
        )
    if out_dir is None and not run.workdir:
        raise ExportError("`out_dir` is required for a run without a workdir.")
    out_dir = os.path.join(run.workdir, "export") if out_dir is None else os.fspath(out_dir)
    top_path = os.path.join(out_dir, TOP_FILE)
    if os.path.exists(top_path) and not overwrite:
        raise ExportError(f"{top_path} already exists; pass overwrite=True.")
    heads = head_lib.export_head(
        run,
        out_dir,
        budget,
        dtypes,
        representative_samples=min(200, len(run.train_images)),  # float heads: none calibrate
        parity_samples=min(100, len(run.test_images)),
        qat=False,
        overwrite=overwrite,
    )
    k = next(iter(heads.values())).metadata["budget"]
    middles = {
        dtype: tail_lib.export_tail(
            run,
            os.path.join(out_dir, "serving"),
            f"{model_name}_{dtype}",
            version,
            dtype,
            k,
            parity_samples=min(100, len(run.test_images)),
            overwrite=overwrite,
            outputs=(_middle_outputs, MIDDLE_OUTPUT, split.top_shape, _keras_middle),
        )
        for dtype in dtypes
    }
    with open(top_path, "wb") as f:
        f.write(convert_top(split))
    for head in heads.values():  # its JSON names the top that finishes the middle's answer
        head.metadata["top"] = {
            "model": TOP_FILE,
            "output": MIDDLE_OUTPUT,
            "shape": list(split.top_shape),
        }
        device_spec.spec_from_json(head.metadata, head.metadata_path)
        with open(head.metadata_path, "w") as f:
            json.dump(head.metadata, f, indent=2)
    rows = [evaluate_ushaped(run, heads[d], top_path, middles[d]) for d in dtypes]
    logging.info("Exported the U-shaped split to %s: %s", out_dir, rows)
    return UShapedExport(out_dir, top_path, heads, middles, rows)


def evaluate_ushaped(run, head, top_path, middle):
    """The deployed path on the test set (LiteRT head -> payload -> middle SavedModel -> LiteRT
    top) against the Keras U-shaped model at the head's budget: accuracy, agreement, and the
    bytes of one image at each cut."""
    split, indices = run.split, head.metadata["indices"]
    images = run.normalize(run.test_images)
    outputs, _ = head_lib.run_head(head.model_path, images)
    spec = device_spec.spec_from_json(head.metadata, head.metadata_path)
    payload = build_payload(outputs, spec)
    signature = tf.saved_model.load(middle.path).signatures[tail_lib.SIGNATURE]
    answers = tail_lib.run_tail(signature, *payload.inputs().values(), output=MIDDLE_OUTPUT)
    top = LiteModel(top_path)
    probabilities = top(answers.astype(np.float32))
    keras = run_lib.keras_split_logits(run, run.test_images, indices).argmax(-1)
    predictions = probabilities.argmax(-1)
    height, width, channels = split.wire_shape
    second = (split.top_height, split.top_width, split.top_channels)
    return {
        "dtype": head.dtype,
        "budget": int(len(indices)),
        "samples": int(len(images)),
        "accuracy": float(np.mean(predictions == run.test_labels)),
        "keras_accuracy": float(np.mean(keras == run.test_labels)),
        "agreement": float(np.mean(predictions == keras)),
        "top_max_abs_diff": _top_parity(split, top, answers[:100].astype(np.float32)),
        "payload_bytes": codec.payload_nbytes(
            1, height, width, len(indices), head.dtype, False, channels
        ),
        "answer_bytes": int(np.prod(second)) * np.dtype(middle_dtype(split)).itemsize,
    }
