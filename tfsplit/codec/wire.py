"""The codec as TensorFlow ops: what a compiled training step needs to see the wire without
leaving the graph (the receiver's values, the payload's size as a tensor, a straight-through wire).
"""

import tensorflow as tf

from tfsplit.codec import values as values_lib
from tfsplit.codec.layout import _nbytes
from tfsplit.codec.values import WIRE_DTYPES, PayloadError


def payload_nbytes_tensor(batch, k, height, width, dtype, with_labels, channels):
    """`payload_nbytes` as int64 tensor ops, for a compiled step whose batch and k are tensors.

    No checks: the caller's shapes come from a built model, and the eager `payload_nbytes` is the
    one that validates. The arithmetic is the same `_nbytes` formula.
    """
    batch, k = tf.cast(batch, tf.int64), tf.cast(k, tf.int64)
    index_count = tf.where(k == channels, tf.constant(0, tf.int64), k)
    return _nbytes(batch, height, width, k, dtype, with_labels, index_count)


def step_nbytes(batch, k, dtypes, training, with_labels, height, width, channels):
    """One step's bytes across one cut, (forward, backward): the k channels forward every step
    (with the labels when `with_labels`), their gradient back in training; `dtypes` is the
    (forward, backward) wire dtypes. Int64 tensors, as `payload_nbytes_tensor`."""
    shape = dict(height=height, width=width, channels=channels)
    forward = payload_nbytes_tensor(batch, k, dtype=dtypes[0], with_labels=with_labels, **shape)
    if not training:
        return forward, tf.constant(0, tf.int64)
    return forward, payload_nbytes_tensor(batch, k, dtype=dtypes[1], with_labels=False, **shape)


def _fake_quantize_int8(x):
    """TensorFlow mirror of `codec_values.quantize` then `dequantize` for int8, op for op."""
    x = tf.where(tf.abs(x) < values_lib.FLOAT32_TINY, tf.zeros_like(x), x)
    lo = tf.cast(tf.minimum(tf.reduce_min(x), 0.0), tf.float64)
    hi = tf.cast(tf.maximum(tf.reduce_max(x), 0.0), tf.float64)
    scale = tf.cast((hi - lo) / 255.0, tf.float32)
    scale = tf.where(scale < values_lib.MIN_INT8_SCALE, tf.constant(1.0, tf.float32), scale)
    zero_point = tf.round(-128.0 - lo / tf.cast(scale, tf.float64))
    int8_range = values_lib.INT8_MIN, values_lib.INT8_MAX
    zero_point = tf.cast(tf.clip_by_value(zero_point, *int8_range), tf.float32)
    q = tf.clip_by_value(tf.round(x / scale) + zero_point, *int8_range)
    return (q - zero_point) * scale


def fake_quantize(x, dtype):
    """The float32 values `decode(encode(x))` would give, as TensorFlow ops.

    Lets a compiled training step see exactly what the receiver will see without leaving the
    graph. Only the forward op: it has no useful gradient, so a caller that trains through it wraps
    it in a straight-through estimator. It does not check values for NaN/inf (that would need a
    graph assert on the hot path); `encode` does.

    Args:
      x: floating tensor of any shape (one payload: int8 statistics cover the whole tensor).
      dtype: wire dtype, a Python string from WIRE_DTYPES.

    Returns:
      float32 tensor shaped like x.

    Raises:
      PayloadError: unknown dtype or a non-floating x.
    """
    values_lib.check_choice("dtype", dtype, WIRE_DTYPES)
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise PayloadError(f"`x` must be a floating tensor. Received: x.dtype={x.dtype.name}")
    x = tf.cast(x, tf.float32)
    if dtype == "float16":
        return tf.cast(tf.cast(x, tf.float16), tf.float32)
    if dtype == "int8":
        return _fake_quantize_int8(x)
    return x


def perturb(gradient, noise):
    """`gradient` plus Gaussian noise whose standard deviation is `noise` times the gradient's
    root mean square over the batch: a defence against label leakage with a set noise level
    (0 = none)."""
    if not noise:
        return gradient
    scale = noise * tf.sqrt(tf.reduce_mean(tf.square(gradient)))
    return gradient + tf.random.normal(tf.shape(gradient)) * scale


def make_wire(activation_dtype, gradient_dtype, gradient_noise=0.0):
    """Quantize what crosses the cut both ways: activations forward, their gradient backward.

    A straight-through estimator: the tail sees exactly what the codec would deliver, and the head
    gets back exactly the gradient the server would encode, perturbed by `perturb` first when
    `gradient_noise` is set.
    """

    @tf.custom_gradient
    def wire(values):
        def backward(upstream):
            return fake_quantize(perturb(upstream, gradient_noise), gradient_dtype)

        return fake_quantize(values, activation_dtype), backward

    return wire
