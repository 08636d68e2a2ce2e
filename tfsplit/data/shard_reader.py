"""Streams TFRecord shards back as tf.data pipelines (or arrays), as `build_datasets` gives.

A device (`shard_index` of `num_shards`) reads whole shard files: every num_shards-th one.

Shards are decoded whole: a shard's records are read as one tensor (natively for local files,
through the object store's checked, retried reads for `s3://`), parsed by one `parse_example`
and, for raw pixels, turned into images by one reshape. Training shuffles the shard order every
epoch, gathers `_WINDOW_SHARDS` decoded shards, permutes their samples and rebatches them, so
no per-sample work runs in Python or in tf.data's per-element machinery; the per-sample cost is
what makes streaming keep up with training on two cores.

An epoch never ends short without an error: every shard asserts that it gave exactly the
count its index entry lists, naming the file (a corrupt, truncated or replaced shard fails the
epoch when it is read, whether or not its checksum was verified up front), and the batched
pipelines assert their number of batches (`assert_cardinality`, which gives Keras its steps).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf
from absl import logging

from tfsplit.data import common
from tfsplit.data.pipeline import augmented_and_normalized, build_train_dataset, finish_epoch
from tfsplit.data.shard_fetch import check_shard_files, local_records, remote_records
from tfsplit.data.shard_index import is_local, load_index
from tfsplit.records import holdout

# Shards decoded and shuffled together; fixed (not AUTOTUNE) so that the order is machine-free.
# Memory holds about two windows of decoded samples (one being batched, one being read).
_WINDOW_SHARDS = 8
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def _decode(records, path, expected, info, encoding):
    """(uint8 images (n, H, W, C), int32 labels (n,)) of a whole shard's records."""
    shape = tuple(info.image_shape)

    def fail_unless(condition, *what):
        message = tf.strings.join(["Shard ", path, *what])
        return tf.debugging.Assert(condition, [message])

    count = tf.cast(tf.size(records), tf.int64)
    checks = [
        fail_unless(
            tf.equal(count, expected),
            " gave ",
            tf.strings.as_string(count),
            " samples but its index lists ",
            tf.strings.as_string(expected),
            ": the file is corrupt or truncated (a record error, if any, is logged)",
        )
    ]
    with tf.control_dependencies(checks):
        example = tf.io.parse_example(records, _FEATURES)
    labels = example["label"]
    checks = [
        fail_unless(
            tf.reduce_all((labels >= 0) & (labels < info.num_classes)),
            f" holds a label outside 0..{info.num_classes - 1}",
        )
    ]
    if encoding == "raw":
        pixels = math.prod(shape)
        checks.append(
            fail_unless(
                tf.reduce_all(tf.strings.length(example["image"]) == pixels),
                f" holds an image that is not {pixels} bytes of {shape} uint8 pixels",
            )
        )
        with tf.control_dependencies(checks):
            images = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), (-1, *shape))
    else:
        decode_png = lambda png: tf.ensure_shape(  # noqa: E731
            tf.io.decode_png(png, channels=shape[-1]), shape
        )
        checks.append(
            fail_unless(
                tf.reduce_all(tf.strings.substr(example["image"], 0, 8) == _PNG_SIGNATURE),
                " holds an image that is not a PNG",
            )
        )
        with tf.control_dependencies(checks):
            images = tf.map_fn(
                decode_png,
                example["image"],
                fn_output_signature=tf.TensorSpec(shape, tf.uint8),
                parallel_iterations=16,
            )
    return images, tf.cast(labels, tf.int32)


def _shard_table(shards):
    return tf.data.Dataset.from_tensor_slices(
        (
            tf.constant([s.path for s in shards]),
            tf.constant([s.num_samples for s in shards], tf.int64),
            tf.constant([s.num_bytes for s in shards], tf.int64),
            tf.constant([s.sha256 for s in shards]),
        )
    )


@dataclasses.dataclass(frozen=True)
class _Reader:
    """How one index's shards are read: its dataset, image encoding and filesystem."""

    info: common.DatasetInfo
    encoding: str
    remote: bool  # An object store: read through `_remote_records`.
    local_cache_dir: str = None

    def decoded(self, shards, table=None, parallel=4):
        """One (images, labels) element per shard of `table` (default: `shards` in stored
        order), `parallel` shards read at a time, in the table's order."""
        table = _shard_table(shards) if table is None else table

        def load(path, num_samples, num_bytes, sha256):
            if self.remote:
                records = remote_records(path, num_bytes, sha256, self.local_cache_dir)
            else:
                records = local_records(path, num_samples)
            return records.map(lambda r: _decode(r, path, num_samples, self.info, self.encoding))

        return table.interleave(
            load,
            cycle_length=min(parallel, len(shards)),
            block_length=1,
            num_parallel_calls=min(parallel, len(shards)),
            deterministic=True,
        )


def _train_batches(reader, shards, batch_size, augment, seed, service_address):
    info = reader.info
    total = sum(s.num_samples for s in shards)
    window = min(len(shards), _WINDOW_SHARDS)
    files = _shard_table(shards).shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)
    decoded = reader.decoded(shards, files, window)
    if service_address:
        decoded = decoded.apply(
            tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                service=service_address,
            )
        )
    windows = decoded.ragged_batch(window).map(
        lambda images, labels: (images.values, labels.values)
    )

    def permute(window, window_seed):
        images, labels = window
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(labels)[0]), window_seed)
        return tf.gather(images, order), tf.gather(labels, order)

    window_seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True).batch(2)
    windows = tf.data.Dataset.zip(windows, window_seeds).map(permute)
    batches = augmented_and_normalized(windows.rebatch(batch_size), info, augment, seed)
    return finish_epoch(batches, total, batch_size)


def _eval_batches(reader, shards, batch_size):
    batches = augmented_and_normalized(reader.decoded(shards).rebatch(batch_size), reader.info)
    return finish_epoch(batches, sum(s.num_samples for s in shards), batch_size)


def device_shards(shards, shard_index, num_shards):
    """The shard files of device `shard_index` of `num_shards`: every num_shards-th one."""
    advice = " (each device reads whole shard files: write more with tfsplit-prepare-data)"
    part = common.device_part(shards, shard_index, num_shards, "The shard index", "shards", advice)
    return tuple(part)


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
    service_address=None,
    local_cache_dir=None,
    validation_fraction=0.0,
):
    """Training, validation and test pipelines streamed from a shard directory, as
    `build_datasets` gives.

    Training: this device's shard files in an order shuffled from `seed` every epoch, read and
    decoded whole `_WINDOW_SHARDS` at a time in parallel, the samples of each window permuted
    (seeded), rebatched, then augmented and normalized by one map per batch. Same seed, same
    batches on any machine. Validation and test: all their shards in stored order, normalized,
    not augmented (evaluation is not split across devices).

    Args:
      path: the shard directory (or its index.json): a local path or `s3://bucket/prefix`.
      batch_size, eval_batch_size, augment, seed: as in `build_datasets`.
      shard_index: this device's number, 0 <= shard_index < num_shards.
      num_shards: devices sharing the training shards; each reads whole shard files.
      cache: decode this device's training shards once, up front, and train from them in memory
        (the in-memory pipeline's order and speed; the shards' checks still apply).
      verify_checksums: hash every local shard against the index first (sizes are always
        checked up front; object-store shards are always hashed as they are read).
      service_address: a tf.data service dispatcher ("grpc://host:port"): its workers read and
        decode the shards (each shard once per epoch, in the order workers finish them) and
        this process windows, batches and augments. Local (or shared) shard paths only.
      local_cache_dir: object-store shards: keep each verified shard in this local directory
        (named by its sha256) and read it from there on later epochs and runs.
      validation_fraction: 0 reads no validation split; otherwise the shards' validation split,
        which must have been written with this fraction (`tfsplit-prepare-data
        --validation_fraction`).

    Returns:
      `Splits` of float32 normalized (B, H, W, C) images and int32 (B,) labels;
      `info.train_size` counts this device's samples.

    Raises:
      ValueError: on a bad argument, or shards written with another validation split.
      DatasetFileError: on a bad index, or a missing shard or one whose size or checksum differs.
    """
    common.check_pipeline_arguments(
        batch_size,
        eval_batch_size,
        seed,
        shard_index,
        num_shards,
        augment=augment,
        cache=cache,
        verify_checksums=verify_checksums,
    )
    holdout.check_validation_fraction(validation_fraction)
    index = load_index(path)
    _check_service(service_address, index, cache)
    if validation_fraction and validation_fraction != index.validation_fraction:
        raise ValueError(
            f"The shards at {index.path} hold out {index.validation_fraction:g} of the training "
            f"set for validation, not {validation_fraction:g}: write them again with "
            f"tfsplit-prepare-data --validation_fraction={validation_fraction:g}, or ask for "
            f"{index.validation_fraction:g}."
        )
    train_shards = device_shards(index.train, shard_index, num_shards)
    validation = index.validation if validation_fraction else ()
    check_shard_files(train_shards + validation + index.test, verify_checksums)
    info = dataclasses.replace(
        index.info,
        train_size=sum(s.num_samples for s in train_shards),
        validation_size=sum(s.num_samples for s in validation),
    )
    _check_local_cache_dir(local_cache_dir, index)
    reader = _Reader(info, index.encoding, not is_local(index.path), local_cache_dir)
    logging.info(
        "Reading %s shards from %s: device %d of %d, %d training shards (%d samples, %s).",
        info.name,
        index.path,
        shard_index,
        num_shards,
        len(train_shards),
        info.train_size,
        index.encoding,
    )
    if cache:
        # Decoded once, the device's part trains as an in-memory set does (index shuffle, batch
        # gather), at the in-memory pipeline's speed.
        images, labels = _decoded(reader, train_shards)
        train = build_train_dataset(images, labels, info, batch_size, augment, seed)
    else:
        train = _train_batches(reader, train_shards, batch_size, augment, seed, service_address)
    return common.Splits(
        train,
        _eval_batches(reader, validation, eval_batch_size) if validation else None,
        _eval_batches(reader, index.test, eval_batch_size),
        info,
    )


def _check_local_cache_dir(local_cache_dir, index):
    if local_cache_dir is None:
        return
    if not isinstance(local_cache_dir, str) or not local_cache_dir or not is_local(local_cache_dir):
        raise ValueError(
            "`local_cache_dir` must be a local directory. "
            f"Received: local_cache_dir={local_cache_dir!r}"
        )
    if is_local(index.path):
        raise ValueError(
            f"`local_cache_dir` keeps shards read from an object store; {index.path} is local "
            "already (leave local_cache_dir unset)"
        )


def _check_service(service_address, index, cache):
    if service_address is None:
        return
    if not isinstance(service_address, str) or not service_address.strip():
        raise ValueError(
            "`service_address` must be a tf.data service dispatcher address such as "
            f"'grpc://127.0.0.1:5050'. Received: service_address={service_address!r}"
        )
    if cache:
        raise ValueError(
            "`cache` decodes the shards in this process; it cannot be combined with "
            f"`service_address`. Received: cache=True, service_address={service_address!r}"
        )
    if not is_local(index.path):
        raise ValueError(
            "tf.data service workers read shards from a local or shared filesystem; "
            f"{index.path} is in an object store (copy the shards to the workers' filesystem, "
            "or train without the service)"
        )


def _decoded(reader, shards):
    """uint8 images and int32 labels of `shards` in stored order, each shard's count checked."""
    parts = list(reader.decoded(shards))
    return (
        np.concatenate([images.numpy() for images, _ in parts]),
        np.concatenate([labels.numpy() for _, labels in parts]),
    )


def load_shard_arrays(path, verify_checksums=True):
    """A shard directory back as arrays, in stored order (what `load_arrays` gave its writer).

    Returns:
      ((x_train, y_train), (x_test, y_test), info): uint8 images and int32 labels.
    """
    index = load_index(path)
    check_shard_files(index.train + index.test, verify_checksums)
    reader = _Reader(index.info, index.encoding, not is_local(index.path))
    train, test = (_decoded(reader, shards) for shards in (index.train, index.test))
    return train, test, index.info
