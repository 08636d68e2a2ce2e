"""A tiny real tail SavedModel with the export's exact signature, and its numpy twin.

The export writes `<base>/<model_name>/<version>/` with a `serving_default` signature taking
`values` (N, h, w, k) in the wire dtype, `indices` (k,) int32, `scale` () float32 and `zero_point`
() int32, returning `probabilities` (N, num_classes), plus `assets.extra/tfsplit_tail.json`.
This module builds one like it (dequantize, one-hot scatter into C channels, one dense layer,
softmax) so that the serving tests need no training; `reference_probabilities` computes the same
in numpy, from the codec's own scatter, so that answers are checked against hand-computable math.
`wire` turns a codec payload into what the device's clients send; `stop_server` ends a
`tfsplit-serve` process that a test started.
"""

import json
import os
import subprocess

import numpy as np
import pytest

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import codec, device

import tensorflow as tf  # isort: skip  (after tfsplit)

CHANNELS = 6
HEIGHT = 3
WIDTH = 2
MAX_BUDGET = 4
NUM_CLASSES = 5
_SEED = 7


def _weights():
    rng = np.random.default_rng(_SEED)
    kernel = rng.normal(0.0, 0.5, (HEIGHT * WIDTH * CHANNELS, NUM_CLASSES)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, NUM_CLASSES).astype(np.float32)
    return kernel, bias


class _TinyTail(tf.Module):
    """Dequantize, scatter the k channels into C (zeros elsewhere), dense, softmax."""

    def __init__(self, dtype):
        super().__init__()
        kernel, bias = _weights()
        self.kernel = tf.Variable(kernel, trainable=False)
        self.bias = tf.Variable(bias, trainable=False)
        self.serve = tf.function(
            self._serve,
            input_signature=[
                tf.TensorSpec((None, HEIGHT, WIDTH, None), dtype, name="values"),
                tf.TensorSpec((None,), tf.int32, name="indices"),
                tf.TensorSpec((), tf.float32, name="scale"),
                tf.TensorSpec((), tf.int32, name="zero_point"),
            ],
        )
        self._dtype = dtype

    def _serve(self, values, indices, scale, zero_point):
        real = tf.cast(values, tf.float32)
        if self._dtype == "int8":
            real = scale * (real - tf.cast(zero_point, tf.float32))
        full = tf.einsum("nhwk,kc->nhwc", real, tf.one_hot(indices, CHANNELS))
        flat = tf.reshape(full, (-1, HEIGHT * WIDTH * CHANNELS))
        return {"probabilities": tf.nn.softmax(tf.matmul(flat, self.kernel) + self.bias)}


def spec_json(dtype):
    """The tfsplit_tail.json content the export writes for this tail."""
    return {
        "dtype": dtype,
        "channels": CHANNELS,
        "height": HEIGHT,
        "width": WIDTH,
        "max_budget": MAX_BUDGET,
        "num_classes": NUM_CLASSES,
        "signature": "serving_default",
    }


def write_spec(version_dir, spec):
    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    with open(os.path.join(version_dir, "assets.extra", "tfsplit_tail.json"), "w") as f:
        json.dump(spec, f)


def build_tail_saved_model(base_dir, model_name, dtype, version=1, with_spec=True):
    """Writes `<base_dir>/<model_name>/<version>/` in TF Serving's layout; returns that dir."""
    version_dir = os.path.join(base_dir, model_name, str(version))
    module = _TinyTail(dtype)
    tf.saved_model.save(module, version_dir, signatures={"serving_default": module.serve})
    if with_spec:
        write_spec(version_dir, spec_json(dtype))
    return version_dir


def make_payload(dtype, batch=2, k=MAX_BUDGET, seed=0):
    """A decoded codec payload of random activations with k distinct, shuffled indices."""
    rng = np.random.default_rng(seed)
    activations = rng.normal(0.0, 1.0, (batch, HEIGHT, WIDTH, k)).astype(np.float32)
    indices = rng.permutation(CHANNELS)[:k]
    return codec.decode(codec.encode(activations, indices, CHANNELS, dtype))


def wire(payload):
    """The device clients' `WirePayload` of a decoded codec payload (values in the wire dtype)."""
    return device.wire_payload(payload.values, payload.indices, payload.scale, payload.zero_point)


def reference_probabilities(payload):
    """What the tail must answer for a payload, in numpy (codec scatter, dense, softmax)."""
    kernel, bias = _weights()
    flat = payload.scatter().reshape(payload.values.shape[0], -1).astype(np.float64)
    logits = flat @ kernel + bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def stop_server(process, log_path, timeout_s=30):
    """SIGTERMs a `tfsplit-serve` process and returns its exit code; fails the test, after a
    SIGKILL so that no server outlives it, if it has not exited within `timeout_s`."""
    process.terminate()
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(
            f"tfsplit-serve ignored SIGTERM for {timeout_s} s:\n{log_path.read_text()[-3000:]}"
        )
