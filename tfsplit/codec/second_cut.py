"""The second cut of a U-shaped split as a payload: every channel of the middle's output going
down, or of the top's gradient going up, in the cut's wire dtype, never with labels. Numpy only:
the server, the Keras device and the device without TensorFlow encode and check it the same way.
A flat (N, C) tensor travels as (N, 1, 1, C)."""

import numpy as np

from tfsplit.codec.layout import decode, encode
from tfsplit.codec.values import PayloadError


def geometry(top_shape):
    """(height, width, channels) of the second cut's payload for the middle's output shape
    `top_shape` ((h, w, C) or (C,))."""
    top_shape = tuple(int(d) for d in top_shape)
    height, width = (top_shape[:-1] + (1, 1))[:2]
    return height, width, top_shape[-1]


def encode_second_cut(values, top_shape, dtype, kind):
    """`values` (N, *top_shape) as a codec payload of every channel."""
    height, width, channels = geometry(top_shape)
    values = np.asarray(values, np.float32).reshape(-1, height, width, channels)
    return encode(values, np.arange(channels, dtype=np.int32), channels, dtype, kind=kind)


def decode_second_cut(payload, top_shape, dtype, kind, batch=None):
    """The float32 (N, *top_shape) tensor of a second-cut payload, checked: `kind`, `dtype`,
    every channel in order, the positions, no labels and (given) the batch.

    Raises:
      PayloadError: a payload that is not such a tensor, with what was expected.
    """
    what = "middle output" if kind == "activations" else "top gradient"
    height, width, channels = geometry(top_shape)
    try:
        decoded = decode(payload, expect_kind=kind, expect_dtype=dtype, max_channels=channels)
    except PayloadError as error:
        raise PayloadError(f"Bad {what} payload: {error}") from None
    shape = decoded.values.shape
    problem = None
    if decoded.channels != channels or tuple(shape[1:]) != (height, width, channels):
        problem = f"shape {tuple(shape)} of a {decoded.channels}-channel cut"
    elif not np.array_equal(decoded.indices, np.arange(channels)):
        problem = "channels out of order"
    elif decoded.labels is not None:
        problem = "labels"
    elif batch is not None and shape[0] != batch:
        problem = f"a batch of {shape[0]}"
    if problem is not None:
        wanted = (
            f"{dtype}, every channel in order, shaped (N, h, w, C) = "
            f"(N, {height}, {width}, {channels})"
        )
        if batch is not None:
            wanted += f" with N = {batch}"
        raise PayloadError(f"The {what} must be {wanted}, without labels. Received: {problem}")
    return decoded.dequantized().reshape((-1,) + tuple(int(d) for d in top_shape))
