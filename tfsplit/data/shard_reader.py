"""Streams TFRecord shards back as tf.data pipelines (or arrays), as `build_datasets` gives.

A device (`shard_index` of `num_shards`) reads whole shard files: every num_shards-th one.

An epoch never ends short without an error. Every shard is read through `_read_shard`: records
that fail to parse or decode are dropped (their cause logged) and an end-of-shard marker then
asserts that the shard gave exactly the count its index entry lists, naming the file; so a
corrupt, truncated or replaced shard fails the epoch when that shard ends, whether or not its
checksum was verified up front. The batched pipelines also assert their number of batches
(`assert_cardinality`), which gives Keras its steps per epoch.
"""

import concurrent.futures
import dataclasses
import math

import tensorflow as tf
from absl import logging

from tfsplit.data import common, pipeline
from tfsplit.data.common import DatasetFileError
from tfsplit.data.shard_index import file_sha256, filesystem, load_index

_INTERLEAVE_CYCLE = 8  # Shards read at once; fixed (not AUTOTUNE) so the order is machine-free.
_SHUFFLE_BUFFER_SAMPLES = 10000  # Decoded uint8 samples held for shuffling (30 MB for CIFAR).
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def _check_shard_files(shards, verify_checksums):
    """Every shard exists with its indexed size and (when asked) sha256; hashed in parallel."""
    for shard in shards:
        files = filesystem(shard.path)
        if not files.exists(shard.path):
            raise DatasetFileError(
                f"Shard {shard.path} is missing; its index lists it with {shard.num_samples} "
                "samples"
            )
        size = files.size(shard.path)
        if size != shard.num_bytes:
            raise DatasetFileError(
                f"Shard {shard.path} has {size} bytes; its index expects {shard.num_bytes} "
                "(truncated or replaced)"
            )
    if not verify_checksums:
        return
    with concurrent.futures.ThreadPoolExecutor(min(8, len(shards))) as pool:
        digests = list(pool.map(file_sha256, [s.path for s in shards]))
    for shard, digest in zip(shards, digests):
        if digest != shard.sha256:
            raise DatasetFileError(
                f"Shard {shard.path} has sha256 {digest}; its index expects {shard.sha256} "
                "(corrupt or replaced)"
            )


def _read_shard(path, expected, info):
    """(uint8 image, int32 label) samples of one shard; fails at its end unless it gave
    exactly `expected` samples, naming the file (see the module doc)."""
    shape = tuple(info.image_shape)

    def decode(record):
        example = tf.io.parse_single_example(record, _FEATURES)
        image = tf.ensure_shape(tf.io.decode_png(example["image"], channels=shape[-1]), shape)
        label = example["label"]
        valid = tf.logical_and(label >= 0, label < info.num_classes)
        with tf.control_dependencies([tf.debugging.Assert(valid, ["label out of range", label])]):
            return image, tf.cast(label, tf.int32), True

    samples = tf.data.TFRecordDataset(path).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    samples = samples.ignore_errors(log_warning=True)  # counted below instead
    end = tf.data.Dataset.from_tensors((tf.zeros(shape, tf.uint8), tf.constant(-1), False))

    def count(n, sample):
        n += tf.cast(sample[2], tf.int64)
        return n, (*sample, n)

    def check_end(n):
        message = tf.strings.join(
            [
                "Shard ",
                path,
                " gave ",
                tf.strings.as_string(n),
                " samples but its index lists ",
                tf.strings.as_string(expected),
                ": the file is corrupt or truncated (the first error is logged)",
            ]
        )
        with tf.control_dependencies([tf.debugging.Assert(tf.equal(n, expected), [message])]):
            return tf.constant(False)

    def keep(image, label, is_sample, n):
        return tf.cond(is_sample, lambda: tf.constant(True), lambda: check_end(n))

    counted = samples.concatenate(end).scan(tf.constant(0, tf.int64), count).filter(keep)
    return counted.map(lambda image, label, is_sample, n: (image, label))


def _shard_table(shards):
    paths = tf.constant([s.path for s in shards])
    counts = tf.constant([s.num_samples for s in shards], tf.int64)
    return tf.data.Dataset.from_tensor_slices((paths, counts))


def _stored_order(shards, info):
    """The samples of `shards` in stored order: one shard after the other."""
    return _shard_table(shards).flat_map(lambda path, n: _read_shard(path, n, info))


def _train_batches(shards, info, batch_size, augment, seed):
    total = sum(s.num_samples for s in shards)
    files = _shard_table(shards).shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)
    samples = files.interleave(
        lambda path, n: _read_shard(path, n, info),
        cycle_length=min(len(shards), _INTERLEAVE_CYCLE),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    samples = samples.shuffle(
        min(total, _SHUFFLE_BUFFER_SAMPLES), seed=seed, reshuffle_each_iteration=True
    )
    batches = samples.batch(batch_size)

    def make_batch(images, labels, augment_seed=None):
        if augment_seed is not None:
            images = pipeline.augment_batch(images, augment_seed)
        return pipeline.normalize(images, info), labels

    if augment:  # Augmentation seeds as pipeline.py draws them: one (2,) seed per batch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        batches = tf.data.Dataset.zip(batches, seeds)
        batch_map = lambda batch, augment_seed: make_batch(*batch, augment_seed)  # noqa: E731
    else:
        batch_map = make_batch
    batches = batches.map(batch_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(batches, total, batch_size)


def _eval_batches(shards, info, batch_size):
    batches = _stored_order(shards, info).batch(batch_size)
    normalized = batches.map(
        lambda images, labels: (pipeline.normalize(images, info), labels),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return _finish(normalized, sum(s.num_samples for s in shards), batch_size)


def _finish(batches, total, batch_size):
    """Known batches per epoch (Keras's steps; a short epoch fails here too), then prefetch."""
    cardinality = tf.data.experimental.assert_cardinality(math.ceil(total / batch_size))
    return batches.apply(cardinality).prefetch(tf.data.AUTOTUNE)


def device_shards(shards, shard_index, num_shards):
    """The shard files of device `shard_index` of `num_shards`: every num_shards-th one."""
    pipeline.check_device_shard(shard_index, num_shards)
    if num_shards > len(shards):
        raise ValueError(
            f"Each device needs a whole shard file, and there are {len(shards)} training shards. "
            f"Received: num_shards={num_shards} (write more shards with tfsplit-prepare-data)"
        )
    return tuple(shards[shard_index::num_shards])


def build_shard_datasets(
    path,
    batch_size,
    eval_batch_size,
    augment=True,
    seed=0,
    shard_index=0,
    num_shards=1,
    cache=False,
    verify_checksums=True,
):
    """Training and test pipelines streamed from a shard directory, as `build_datasets` gives.

    Training: this device's shard files in an order shuffled from `seed` every epoch, read
    `_INTERLEAVE_CYCLE` at a time in parallel (deterministic), decoded in parallel, shuffled in
    a seeded buffer, batched, then augmented and normalized by one map per batch. Same seed, same
    batches on any machine. Test: all test shards in stored order, normalized, not augmented
    (evaluation is not split across devices).

    Args:
      path: the shard directory (or its index.json).
      batch_size, eval_batch_size, augment, seed: as in `build_datasets`.
      shard_index: this device's number, 0 <= shard_index < num_shards.
      num_shards: devices sharing the training shards; each reads whole shard files.
      cache: decode this device's training shards once, up front, and train from them in memory
        (the in-memory pipeline's order and speed; the shards' checks still apply).
      verify_checksums: hash every shard read against the index first (sizes are always checked).

    Returns:
      (train_ds, test_ds, info): float32 normalized (B, H, W, C) images and int32 (B,) labels;
      `info.train_size` counts this device's samples.

    Raises:
      ValueError: on a bad argument.
      DatasetFileError: on a bad index, or a missing shard or one whose size or checksum differs.
    """
    common.check_positive_int("batch_size", batch_size)
    common.check_positive_int("eval_batch_size", eval_batch_size)
    for key, value in dict(augment=augment, cache=cache, verify_checksums=verify_checksums).items():
        if not isinstance(value, bool):
            raise ValueError(f"`{key}` must be a bool. Received: {key}={value!r}")
    common.check_seed(seed)
    index = load_index(path)
    train_shards = device_shards(index.train, shard_index, num_shards)
    _check_shard_files(train_shards + index.test, verify_checksums)
    info = dataclasses.replace(index.info, train_size=sum(s.num_samples for s in train_shards))
    logging.info(
        "Reading %s shards from %s: device %d of %d, %d training shards (%d samples).",
        info.name,
        index.path,
        shard_index,
        num_shards,
        len(train_shards),
        info.train_size,
    )
    if cache:
        # Decoded once, the device's part trains as an in-memory set does (index shuffle, batch
        # gather): 0.91x of memory's samples/s through a sample cache, measured on 2 cores.
        images, labels = _decoded(train_shards, info)
        train = pipeline.build_train_dataset(images, labels, info, batch_size, augment, seed)
    else:
        train = _train_batches(train_shards, info, batch_size, augment, seed)
    test = _eval_batches(index.test, info, eval_batch_size)
    return train, test, info


def _decoded(shards, info):
    """uint8 images and int32 labels of `shards` in stored order, each shard's count checked."""
    batch = _stored_order(shards, info).batch(sum(s.num_samples for s in shards))
    images, labels = batch.get_single_element()
    return images.numpy(), labels.numpy()


def load_shard_arrays(path, verify_checksums=True):
    """A shard directory back as arrays, in stored order (what `load_arrays` gave its writer).

    Returns:
      ((x_train, y_train), (x_test, y_test), info): uint8 images and int32 labels.
    """
    index = load_index(path)
    _check_shard_files(index.train + index.test, verify_checksums)
    train, test = (_decoded(shards, index.info) for shards in (index.train, index.test))
    return train, test, index.info
