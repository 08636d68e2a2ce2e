"""Where the channels a device sent go in the tail's input, and what stands in for the others.

A device sends k of the C' bottleneck channels with their indices: (k,) for a batch from one
device, (N, k) per sample for a batch that joins several devices' steps. The tail expects all C';
a channel that was not sent gets its fill value: zero for a closed channel, and for one that a
smaller budget leaves out of the prefix the mean it has when sent (zero would be far from any
value it takes: the encoder's outputs are sigmoids times the gate).
"""

import tensorflow as tf


def place(values, indices, channels, fill=None):
    """(N, ..., k) values of channels `indices` into (N, ..., C'), `fill` (C',) elsewhere."""
    values = tf.convert_to_tensor(values)
    placed, sent = _place_with_mask(values, indices, channels)
    if fill is None:
        return placed
    return placed + tf.cast(fill, values.dtype) * (1.0 - sent)


def sent_channel_means(values, indices, channels):
    """(C',) mean value of each channel over the samples and positions that sent it; 0 if none."""
    values = tf.convert_to_tensor(values)
    placed, sent = _place_with_mask(values, indices, channels)
    axes = list(range(values.shape.rank - 1))
    counts = tf.reduce_sum(tf.ones_like(placed) * sent, axis=axes)
    return tf.math.divide_no_nan(tf.reduce_sum(placed, axis=axes), counts)


def _place_with_mask(values, indices, channels):
    """(placed values with zeros where not sent, 1 where sent: (C',) or per sample (N, 1.., C'))."""
    indices = tf.convert_to_tensor(indices)
    if indices.shape.rank == 2:
        return _place_per_sample(values, indices, channels)
    # A gather, not a product with one-hot columns: a matmul's kernel would be compiled (and
    # cached by oneDNN, on a server) for every batch size and budget a device sends.
    indices = tf.cast(indices, tf.int32)
    k = tf.shape(indices)[0]
    positions = tf.tensor_scatter_nd_update(tf.fill([channels], k), indices[:, None], tf.range(k))
    rank = values.shape.rank
    padded = tf.pad(values, [[0, 0]] * (rank - 1) + [[0, 1]])
    return tf.gather(padded, positions, axis=rank - 1), tf.cast(positions < k, values.dtype)


def _place_per_sample(values, indices, channels):
    """Each sample's channels in place: every channel gathers its value, or the zero appended
    after the k sent."""
    batch, k = tf.shape(indices)[0], tf.shape(indices)[1]
    rows = tf.repeat(tf.range(batch), k)
    positions = tf.tensor_scatter_nd_update(
        tf.fill([batch, channels], k),
        tf.stack([rows, tf.reshape(indices, [-1])], axis=1),
        tf.tile(tf.range(k), [batch]),
    )
    rank = values.shape.rank
    padded = tf.pad(values, [[0, 0]] * (rank - 1) + [[0, 1]])
    sent = tf.cast(positions < k, values.dtype)
    sent = tf.reshape(sent, tf.concat([[batch], tf.ones([rank - 2], tf.int32), [channels]], 0))
    return tf.gather(padded, positions, axis=rank - 1, batch_dims=1), sent
