"""Batches as every source gives them: normalized, augmented, from arrays or streamed samples.

`build_train_dataset` and `build_eval_dataset` batch arrays held in memory: indices are shuffled
instead of images, and each batch is gathered, augmented and normalized by one vectorised map,
faster than a per-image tf.image pipeline (measured: docs/results.md). The streamed sources
(image folders, shards) finish their batches with `augmented_and_normalized` and `finish_epoch`,
so the same seed gives the same crops everywhere. `normalize` is shared with export code, so a
deployed model sees the pixels it was trained on.
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


def finish_epoch(batches, total, batch_size):
    """Streamed batches with their count per epoch asserted (Keras's steps; an epoch that ends
    short fails), then prefetched."""
    cardinality = tf.data.experimental.assert_cardinality(math.ceil(total / batch_size))
    return batches.apply(cardinality).prefetch(tf.data.AUTOTUNE)


def _batches(images, labels, info, batch_size, shuffle_seed=None, augment=False):
    """Batches of indices gathered, augmented (when asked) and normalized by one map.

    With `shuffle_seed` the order is shuffled anew every epoch and the augmentation seeds come
    from the same seed; without it the stored order is kept. The last partial batch is kept.
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
    indices = tf.data.Dataset.range(count)
    if shuffle_seed is not None:
        indices = indices.shuffle(count, seed=shuffle_seed, reshuffle_each_iteration=True)
    batches = indices.batch(batch_size)
    if augment:
        seeds = tf.data.Dataset.random(seed=shuffle_seed, rerandomize_each_iteration=True)
        batches = tf.data.Dataset.zip(batches, seeds.batch(2))
    return batches.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def build_train_dataset(images, labels, info, batch_size, augment=True, seed=0):
    """Shuffled, augmented, normalized batches; a new order and new crops every epoch.

    The order and the augmentation come from `seed`, so two runs with the same seed see the same
    batches. The last partial batch is kept.

    Args:
      images: uint8 (N, H, W, C) array.
      labels: int32 (N,) array.
      info: the dataset's `DatasetInfo` (for the normalization).
      batch_size: samples per batch.
      augment: whether to apply `augment_batch`.
      seed: int >= 0 fixing the order and the augmentation.

    Returns:
      A tf.data.Dataset of (float32 (B, H, W, C), int32 (B,)) batches.
    """
    common.check_seed(seed)
    return _batches(images, labels, info, batch_size, shuffle_seed=seed, augment=augment)


def build_eval_dataset(images, labels, info, batch_size):
    """Normalized batches in the stored order, without augmentation; the last partial batch kept.

    Args and returns as `build_train_dataset`.
    """
    return _batches(images, labels, info, batch_size)
