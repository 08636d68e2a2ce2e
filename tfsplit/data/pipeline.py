"""Batches as every source gives them: normalized, augmented, from arrays or streamed samples.

`build_train_dataset` and `build_eval_dataset` batch arrays held in memory: indices are shuffled
instead of images, and each batch is gathered, augmented and normalized by one vectorised map,
faster than a per-image tf.image pipeline (measured: docs/results.md). The streamed sources
(image folders, shards) finish their batches with `augmented_and_normalized` and `finish_epoch`.
`normalize` is shared with export code, so a deployed model sees the pixels it was trained on.

The training order of in-memory sets and image folders is a function of the seed and the
epoch (`epoch_plans`): epoch e's order and batch b's crops depend on (seed, e) and (seed, e, b)
only, and an iterator starts at the (epoch, batch) its `position` variable holds. A run resumed
from a backup in the middle of an epoch (`tfsplit.callbacks.DataPosition`) so trains on the
batches the uninterrupted run trained on, from the one after its last backup.
"""

import math

import numpy as np
import tensorflow as tf

from tfsplit.data import common
from tfsplit.data.common import DatasetInfo

CROP_PADDING = 4  # The paper's augmentation: random crop of the image zero-padded by 4 pixels.


def normalize(images, info):
    """Per-channel normalization, the one the models are trained with (export code reuses it).

    Args:
      images: (..., C) integer pixels in 0..255 (e.g. uint8), or floats already in [0, 1].
      info: the `DatasetInfo` whose mean and std to use.

    Returns:
      float32 tensor of the same shape: (images / 255 - mean) / std for integers,
      (images - mean) / std for floats.
    """
    if not isinstance(info, DatasetInfo):
        raise ValueError(f"`info` must be a DatasetInfo. Received: info={info!r}")
    images = tf.convert_to_tensor(images)
    if images.dtype.is_integer:
        images = tf.cast(images, tf.float32) / 255.0
    elif images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    else:
        raise ValueError(f"`images` must be integer or float pixels. Received: {images.dtype}")
    channels = len(info.mean)
    if images.shape.rank == 0 or images.shape[-1] not in (None, channels):
        raise ValueError(
            f"`images` must end in {channels} channels. Received: shape {images.shape}"
        )
    return (images - tf.constant(info.mean, tf.float32)) / tf.constant(info.std, tf.float32)


def augment_batch(images, seed):
    """The paper's augmentation on a batch: random crop of the zero-padded image, random flip.

    Each image gets its own crop offset in [0, 2 * CROP_PADDING] and flip. The crop and flip are
    one gather of row and (possibly reversed) column indices, vectorised over the batch.

    Args:
      images: (B, H, W, C) tensor, any dtype (padding is zeros, i.e. black pixels).
      seed: int tensor of shape (2,), the stateless seed; the same seed gives the same result.

    Returns:
      Tensor like `images`.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"`images` must be (B, H, W, C). Received: shape {images.shape}")
    height, width = images.shape[1], images.shape[2]
    batch = tf.shape(images)[0]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform(
        [batch, 2], crop_seed, minval=0, maxval=2 * CROP_PADDING + 1, dtype=tf.int32
    )
    flip = tf.random.stateless_uniform([batch, 1], flip_seed) < 0.5
    rows = offsets[:, :1] + tf.range(height)
    cols = offsets[:, 1:] + tf.range(width)
    cols = tf.where(flip, tf.reverse(cols, axis=[1]), cols)
    padded = tf.pad(images, [[0, 0], [CROP_PADDING] * 2, [CROP_PADDING] * 2, [0, 0]])
    return tf.gather(tf.gather(padded, rows, batch_dims=1), cols, axis=2, batch_dims=1)


def augmented_and_normalized(batches, info, augment=False, seed=None):
    """One map per batch of uint8 (images, labels): `augment_batch` when asked (one (2,) seed per
    batch, drawn from `seed` as the in-memory pipeline draws them), then `normalize`."""

    def make_batch(images, labels, augment_seed=None):
        if augment_seed is not None:
            images = augment_batch(images, augment_seed)
        return normalize(images, info), labels

    if augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        batches = tf.data.Dataset.zip(batches, seeds)
        batch_map = lambda batch, augment_seed: make_batch(*batch, augment_seed)  # noqa: E731
    else:
        batch_map = make_batch
    return batches.map(batch_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def epoch_plans(count, batch_size, seed, position):
    """The plan of the epoch an iterator starts in: one element, (order, epoch, first batch).

    `position` (an int64 variable of shape (2,)) holds (epoch, first batch) for the next
    iterator, which reads it when it starts and moves it on to (epoch + 1, 0): each iterator
    (an epoch of `fit`, or a calibration's pass) draws a new order. `order` is the epoch's
    permutation of the `count` samples, drawn from `seed` and the epoch alone, from the first
    batch on.
    """

    def plan(_):
        start = tf.identity(position.read_value())
        epoch, first = start[0], start[1]
        with tf.control_dependencies([start]):
            moved = position.assign(tf.stack([epoch + 1, tf.constant(0, tf.int64)]))
        with tf.control_dependencies([moved]):
            shuffle_seed = tf.random.experimental.stateless_fold_in(_seed_pair(seed, 0), epoch)
            order = tf.random.experimental.stateless_shuffle(
                tf.range(count, dtype=tf.int64), seed=shuffle_seed
            )
        return order[first * batch_size :], epoch, first

    return tf.data.Dataset.range(1).map(plan)


def new_position():
    """The (epoch, first batch) variable of a training pipeline that starts at the beginning."""
    return tf.Variable([0, 0], dtype=tf.int64, trainable=False, name="data_position")


def batch_seeds(seed, epoch, first, steps):
    """The augmentation seeds of an epoch's batches `first`..`steps - 1`: batch b of epoch e
    gets a (2,) seed drawn from (`seed`, e x steps + b)."""
    pair = _seed_pair(seed, 1)
    return tf.data.Dataset.range(first, steps).map(
        lambda batch: tf.random.experimental.stateless_fold_in(pair, epoch * steps + batch)
    )


def _seed_pair(seed, stream):
    return tf.constant([seed, stream], tf.int64)


def finish_epoch(batches, total, batch_size):
    """Streamed batches with their count per epoch asserted (Keras's steps; an epoch that ends
    short fails), then prefetched."""
    cardinality = tf.data.experimental.assert_cardinality(math.ceil(total / batch_size))
    return batches.apply(cardinality).prefetch(tf.data.AUTOTUNE)


def _batches(images, labels, info, batch_size, shuffle_seed=None, augment=False, position=None):
    """Batches of indices gathered, augmented (when asked) and normalized by one map.

    With `shuffle_seed` the order is `epoch_plans`' (a new one every epoch, from `position`) and
    the augmentation seeds `batch_seeds`'; without it the stored order is kept. The last partial
    batch is kept.
    """
    if np.ndim(images) != 4 or np.ndim(labels) != 1 or len(images) != len(labels):
        raise ValueError(
            "`images` must be (N, H, W, C) and `labels` (N,). "
            f"Received: shapes {np.shape(images)} and {np.shape(labels)}"
        )
    if len(images) == 0:
        raise ValueError("`images` must hold at least one sample. Received: 0 samples")
    common.check_positive_int("batch_size", batch_size)
    images, labels = tf.constant(images), tf.constant(labels)

    def make_batch(index, augment_seed=None):
        batch = tf.gather(images, index)
        if augment_seed is not None:
            batch = augment_batch(batch, augment_seed)
        return normalize(batch, info), tf.gather(labels, index)

    count = int(images.shape[0])
    if shuffle_seed is None:
        batches = tf.data.Dataset.range(count).batch(batch_size)
        return batches.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
            tf.data.AUTOTUNE
        )
    steps = math.ceil(count / batch_size)

    def epoch_batches(order, epoch, first):
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        if not augment:
            return batches
        return tf.data.Dataset.zip(batches, batch_seeds(shuffle_seed, epoch, first, steps))

    batches = epoch_plans(count, batch_size, shuffle_seed, position).flat_map(epoch_batches)
    batches = batches.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return finish_epoch(batches, count, batch_size)


def build_train_dataset(images, labels, info, batch_size, augment=True, seed=0, position=None):
    """Shuffled, augmented, normalized batches; a new order and new crops every epoch.

    The order and the augmentation come from `seed` and the epoch (`epoch_plans`), so two runs
    with the same seed see the same batches, and a resumed run sees the batches the
    uninterrupted one saw. The last partial batch is kept.

    Args:
      images: uint8 (N, H, W, C) array.
      labels: int32 (N,) array.
      info: the dataset's `DatasetInfo` (for the normalization).
      batch_size: samples per batch.
      augment: whether to apply `augment_batch`.
      seed: int >= 0 fixing the order and the augmentation.
      position: the (epoch, first batch) variable of `epoch_plans` (None: `new_position()`);
        `tfsplit.callbacks.DataPosition` sets it from the steps trained, after a resume too.

    Returns:
      A tf.data.Dataset of (float32 (B, H, W, C), int32 (B,)) batches.
    """
    common.check_seed(seed)
    position = new_position() if position is None else position
    return _batches(images, labels, info, batch_size, seed, augment, position)


def build_eval_dataset(images, labels, info, batch_size):
    """Normalized batches in the stored order, without augmentation; the last partial batch kept.

    Args and returns as `build_train_dataset`.
    """
    return _batches(images, labels, info, batch_size)
