"""Exports the server side: the tail as a SavedModel that TF Serving serves unchanged.

Layout: `<base_path>/<model_name>/<version>/` (TF Serving's), with one signature,
`serving_default`, that takes a payload exactly as the device sends it:

    values      (None, h, w, None)  the wire dtype (float32, float16 or int8)
    indices     (None,)             int32, channel of each value slice, k <= max_budget
    scale       ()                  float32, int8 scale (ignored for float wires: send 1.0)
    zero_point  ()                  int32, int8 zero point (ignored for float wires: send 0)
  returns
    probabilities (None, num_classes) float32, softmax of the tail's logits

Inside the graph: payload checks (k matches the values, k <= max_budget, indices distinct and in
[0, C), a sane int8 scale and zero point; a bad payload is an InvalidArgumentError, which TF
Serving returns as a request error), dequantization `scale * (q - zero_point)` or a cast, then the
model's own server half `SplitModel.receive` (the k channels placed back among C, zeros elsewhere,
so any budget up to max_budget works; decoder and tail in inference mode) and a softmax.
`assets.extra/tfsplit_tail.json` beside it tells a server the sizes the signature leaves open.
"""

import dataclasses
import functools
import json
import os
import shutil

import numpy as np
import tensorflow as tf
from absl import logging

from tfsplit import codec
from tfsplit.export import run as run_lib
from tfsplit.export.run import ExportError

TAIL_DTYPES = codec.WIRE_DTYPES
SIGNATURE = "serving_default"
OUTPUT = "probabilities"
METADATA_FILE = os.path.join("assets.extra", "tfsplit_tail.json")
TF_DTYPES = {"float32": tf.float32, "float16": tf.float16, "int8": tf.int8}


@dataclasses.dataclass
class TailExport:
    """One exported tail.

    Attributes:
      dtype: the wire dtype its signature takes.
      path: the version directory `<base_path>/<model_name>/<version>`.
      metadata: the content of `assets.extra/tfsplit_tail.json`.
      parity: the check of the reloaded SavedModel against the Keras tail (see `tail_parity`).
    """

    dtype: str
    path: str
    metadata: dict
    parity: dict

    @property
    def size_bytes(self):
        """Bytes of every file in the version directory."""
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(self.path)
            for name in names
        )


def _payload_checks(values, indices, scale, zero_point, dtype, channels, max_budget):
    """Graph assertions on one payload; the server answers a failed one with a clear error."""
    k = tf.size(indices)
    checks = [
        tf.debugging.assert_equal(
            tf.shape(values)[3], k, message="values must have one channel (last axis) per index"
        ),
        tf.debugging.assert_greater_equal(k, 1, message="at least one channel must be sent"),
        tf.debugging.assert_less_equal(
            k, max_budget, message=f"at most max_budget={max_budget} channels may be sent"
        ),
        tf.debugging.assert_greater_equal(indices, 0, message="indices must be >= 0"),
        tf.debugging.assert_less(indices, channels, message=f"indices must be < {channels}"),
        tf.debugging.assert_equal(
            tf.size(tf.unique(indices).y), k, message="indices must be distinct"
        ),
    ]
    if dtype == "int8":
        checks += [
            tf.debugging.assert_all_finite(scale, message="scale must be finite"),
            tf.debugging.assert_greater(scale, 0.0, message="scale must be > 0"),
            tf.debugging.assert_greater_equal(zero_point, -128, message="zero_point >= -128"),
            tf.debugging.assert_less_equal(zero_point, 127, message="zero_point <= 127"),
        ]
    return checks


def _probabilities(split, real, indices):
    return {OUTPUT: tf.nn.softmax(tf.cast(split.receive(real, indices), tf.float32))}


def serving_function(split, dtype, max_budget, outputs=_probabilities):
    """The `serving_default` function of a tail taking `dtype` payloads of up to max_budget;
    `outputs(split, real values, indices)` gives its outputs (the probabilities)."""
    height, width, channels = split.wire_shape
    specs = [
        tf.TensorSpec([None, height, width, None], TF_DTYPES[dtype], name="values"),
        tf.TensorSpec([None], tf.int32, name="indices"),
        tf.TensorSpec([], tf.float32, name="scale"),
        tf.TensorSpec([], tf.int32, name="zero_point"),
    ]

    def serve(values, indices, scale, zero_point):
        checks = _payload_checks(values, indices, scale, zero_point, dtype, channels, max_budget)
        with tf.control_dependencies(checks):  # the indices too: placing them scatters
            real, indices = tf.cast(values, tf.float32), tf.identity(indices)
            if dtype == "int8":  # the codec's order of operations
                real = (real - tf.cast(zero_point, tf.float32)) * scale
        return outputs(split, real, indices)

    return tf.function(serve, input_signature=specs)


def _check_args(dtype, model_name, version, max_budget, channels):
    if dtype not in TAIL_DTYPES:
        raise ExportError(f"`dtype` must be one of {TAIL_DTYPES}. Received: dtype={dtype!r}")
    if not isinstance(model_name, str) or not model_name or os.sep in model_name:
        raise ExportError(
            f"`model_name` must be a non-empty name without '{os.sep}'. "
            f"Received: model_name={model_name!r}"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ExportError(
            f"`version` must be a positive integer (TF Serving's version directory). "
            f"Received: version={version!r}"
        )
    if max_budget is not None and (
        not isinstance(max_budget, int) or isinstance(max_budget, bool) or max_budget < 1
    ):
        raise ExportError(
            f"`max_budget` must be an integer in [1, {channels}]. Received: {max_budget=!r}"
        )


def run_tail(signature, values, indices, scale=1.0, zero_point=0, batch_size=256, output=OUTPUT):
    """Calls a tail signature on a payload batch by batch; returns its `output` (numpy)."""
    shared = {
        "indices": tf.constant(indices, tf.int32),
        "scale": tf.constant(scale, tf.float32),
        "zero_point": tf.constant(zero_point, tf.int32),
    }
    starts = range(0, len(values), batch_size)
    outputs = [signature(values=tf.constant(values[i : i + batch_size]), **shared) for i in starts]
    return np.concatenate([answer[output].numpy() for answer in outputs])


def keras_tail_probabilities(run, values, indices, scale=1.0, zero_point=0):
    """Softmax of the Keras tail on a payload (dequantized by the codec): the tail's reference."""
    real = codec.dequantize(values, scale, zero_point)
    return tf.nn.softmax(run_lib.keras_tail_logits(run, real, indices)).numpy()


def tail_parity(run, signature, dtype, indices, images, reference=None, output=OUTPUT):
    """Compares a tail signature with the Keras tail on payloads made from `images`.

    The payload is the Keras head's selected channels encoded in `dtype` by the codec;
    `reference(run, values, indices, scale, zero_point)` is what the signature's `output` should
    be (`keras_tail_probabilities` by default).

    Returns:
      dict: samples, budget, max_abs_diff (same payload through SavedModel and Keras tail),
      max_abs_diff_vs_float (against the Keras split model with an unquantized float32 wire)
      and agreement_vs_float (share of equal top-1 predictions).
    """
    reference = reference or keras_tail_probabilities
    sent = run.split.send(tf.constant(images), indices).numpy()
    wire, scale, zero_point = codec.quantize(sent, dtype)
    served = run_tail(signature, wire, indices, scale, zero_point, output=output)
    same_payload = reference(run, wire, indices, scale, zero_point)
    float_wire = reference(run, sent, indices)
    return {
        "samples": int(len(images)),
        "budget": int(len(indices)),
        "max_abs_diff": float(np.abs(served - same_payload).max()),
        "max_abs_diff_vs_float": float(np.abs(served - float_wire).max()),
        "agreement_vs_float": float(
            np.mean(
                served.reshape(len(served), -1).argmax(-1)
                == float_wire.reshape(len(served), -1).argmax(-1)
            )
        ),
    }


def _save(run, metadata, path, overwrite, function):
    """Saves into a hidden sibling directory first: TF Serving never sees a half-written version."""
    if os.path.exists(path) and not overwrite:
        raise ExportError(f"{path} already exists; pass overwrite=True or another version.")
    staging = os.path.join(os.path.dirname(path), f".staging-{os.path.basename(path)}")
    shutil.rmtree(staging, ignore_errors=True)
    function = function(run.split, metadata["dtype"], metadata["max_budget"])
    module = tf.Module()
    module.tail_variables = list(run.split.tail.variables)
    module.serve = function
    tf.saved_model.save(module, staging, signatures={SIGNATURE: function.get_concrete_function()})
    os.makedirs(os.path.join(staging, os.path.dirname(METADATA_FILE)), exist_ok=True)
    with open(os.path.join(staging, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(staging, path)


def export_tail(
    workdir,
    base_path,
    model_name="tfsplit_tail",
    version=1,
    dtype="float16",
    max_budget=None,
    parity_samples=100,
    overwrite=False,
    outputs=None,
):
    """Writes the tail SavedModel to `<base_path>/<model_name>/<version>/` and checks it.

    Args:
      workdir: a training workdir, or a `TrainedRun` (`load_run`, `TrainedRun.from_model`).
      base_path: TF Serving's model base path.
      model_name: the served model's name (a directory).
      version: the version directory, a positive integer.
      dtype: wire dtype the signature takes, one of TAIL_DTYPES.
      max_budget: the largest k accepted; the run's final budget by default, at most C.
      parity_samples: test images whose payloads check the reloaded model against Keras.
      overwrite: replace an existing version directory instead of failing.
      outputs: what the tail answers, when not the probabilities: (the outputs' function as
        `serving_function` takes it, the output's name, its shape without the batch, the
        reference function as `tail_parity` takes it); a U-shaped split's middle.

    Returns:
      A `TailExport`.

    Raises:
      ExportError: bad arguments, a workdir that is not a finished run, or an existing version.
    """
    run = run_lib.as_run(workdir, ushaped=outputs is not None)
    _check_args(dtype, model_name, version, max_budget, run.channels)
    max_budget, indices = run.select(max_budget)
    run_lib.check_count("parity_samples", parity_samples, len(run.test_images), "test set size")
    path = os.path.join(os.fspath(base_path), model_name, str(version))
    height, width, channels = run.split.wire_shape
    metadata = {
        "dtype": dtype,
        "channels": int(channels),
        "height": int(height),
        "width": int(width),
        "max_budget": max_budget,
        "num_classes": int(run.info.num_classes),
        "signature": SIGNATURE,
        "source": run.source["workdir"],
    }
    function, output, reference = serving_function, OUTPUT, None
    if outputs is not None:
        function, output, shape, reference = outputs
        metadata.update(output=output, output_shape=[int(d) for d in shape])
        function = functools.partial(serving_function, outputs=function)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _save(run, metadata, path, overwrite, function)
    signature = tf.saved_model.load(path).signatures[SIGNATURE]
    images = run.normalize(run.test_images[:parity_samples])
    parity = tail_parity(run, signature, dtype, indices, images, reference, output)
    logging.info("Wrote tail %s (%s wire, k <= %d), parity %s", path, dtype, max_budget, parity)
    return TailExport(dtype, path, metadata, parity)
