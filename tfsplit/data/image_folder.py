"""Image classification folders (Imagenet100-style): one sub-directory of images per class.

Layout:

    path/train/<class>/*.jpg|*.jpeg|*.png
    path/val/<class>/...      (or path/test/<class>/...; val/ wins when both exist)

Classes, labels and the round-robin file order are `tfsplit.records.image_folder`'s (shared with
the device's reader): the first n samples of a split are balanced, which keeps
`train_size`/`test_size` smoke runs sensible.

Every image is decoded by `_decode_image` (JPEG or PNG whatever its extension says, gray and RGBA
turned into RGB) and resized to image_size x image_size (bilinear, antialiased, aspect ratio not
kept), in parallel inside tf.data. Two ways use it:

- `build_image_folder_datasets` (for training): only the file list is held in memory; every epoch
  reads and decodes the files again inside the tf.data pipeline, so a set of any size trains in
  constant memory. A file that cannot be read or decoded fails the epoch, naming the file.
- `load` (behind `load_arrays`, for tools that want arrays): the whole split is decoded once and
  held in memory as uint8, N x S x S x 3 bytes. Every bad file is named before anything is
  returned.
"""

import contextlib
import math
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfsplit.data import common
from tfsplit.data.common import DatasetFileError
from tfsplit.data.pipeline import (
    augment_batch,
    augmented_and_normalized,
    batch_seeds,
    epoch_plans,
    finish_epoch,
    new_position,
    normalize,
)
from tfsplit.records import holdout
from tfsplit.records import image_folder as listing
from tfsplit.records.image_folder import DEFAULT_IMAGE_SIZE, LAYOUT, MEAN, STD

_MAX_NAMED_FILES = 10
_UNREADABLE = " could not be read or decoded as JPEG or PNG (its error is logged above)"


def list_classes(path):
    """The class names of the image folder at `path`; label i is the i-th name.

    Raises:
      DatasetFileError: when the layout is wrong, there are no classes, or train/ and val/
        (or test/) hold different classes.
    """
    with _as_dataset_error():
        return listing.list_classes(path)


@contextlib.contextmanager
def _as_dataset_error():
    try:
        yield
    except listing.ImageFolderError as error:
        raise DatasetFileError(str(error)) from None


def _split_folders(path):
    with _as_dataset_error():
        return listing.split_folders(path)


def _list_split(folder, classes):
    with _as_dataset_error():
        paths, labels = listing.list_split(folder, classes)
    return np.array(paths), labels


def _decode_image(path, image_size):
    """uint8 (S, S, 3) image of the file `path` (a string tensor): the one decode both ways use."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return common.to_uint8(common.resize_image(image, image_size))


def _decode_files(paths, image_size):
    """uint8 (N, S, S, 3) images of `paths`, decoded and resized in parallel.

    Files that cannot be read or decoded are dropped by `ignore_errors` and found again from the
    indices that did not come through, so the error can name every bad file.
    """
    dataset = tf.data.Dataset.from_tensor_slices((paths, np.arange(len(paths))))
    dataset = dataset.map(
        lambda path, index: (_decode_image(path, image_size), index),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    batches = list(dataset.batch(len(paths)).as_numpy_iterator())
    decoded = batches[0][1] if batches else np.zeros(0, np.int64)
    bad = np.setdiff1d(np.arange(len(paths)), decoded)
    if len(bad):
        named = ", ".join(str(p) for p in paths[bad[:_MAX_NAMED_FILES]])
        more = f" and {len(bad) - _MAX_NAMED_FILES} more" if len(bad) > _MAX_NAMED_FILES else ""
        raise DatasetFileError(
            f"{len(bad)} image file(s) could not be read or decoded as JPEG or PNG: {named}{more}"
        )
    return batches[0][0]


def _split_files(folder, classes, size, split):
    """(paths, labels) of the first `size` files of a split (all when None), round-robin."""
    paths, labels = _list_split(folder, classes)
    return common.take_first((paths, labels), size, split, f"Image folder {folder}")


def _load_split(folder, classes, size, split, image_size):
    paths, labels = _split_files(folder, classes, size, split)
    logging.info("Decoding %d %s images from %s at %dpx.", len(paths), split, folder, image_size)
    return _decode_files(paths, image_size), labels


def _open(path, image_size):
    """(path, classes, train folder, test folder, image side) of the image folder at `path`."""
    common.check_optional_size("image_size", image_size)
    if path is None:
        raise DatasetFileError(f"The image_folder dataset needs `path`; {LAYOUT}. Received: None")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DatasetFileError(f"Image folder path is not a directory: {path}; {LAYOUT}")
    classes = list_classes(path)
    train_folder, test_folder = _split_folders(path)
    logging.info("Image folder %s: %d classes (label: name) %s", path, len(classes), classes)
    return path, classes, train_folder, test_folder, image_size or DEFAULT_IMAGE_SIZE


def load(path=None, train_size=None, test_size=None, image_size=None):
    """Loads an image folder as numpy arrays held in memory.

    Args:
      path: the dataset directory holding train/ and val/ (or test/). Required.
      train_size: decode only the first `train_size` training files (round-robin order, so
        balanced over classes); None decodes all.
      test_size: the same for the val/test split.
      image_size: side of the square images; None uses `DEFAULT_IMAGE_SIZE` (64).

    Returns:
      ((x_train, y_train), (x_test, y_test), info): uint8 (N, S, S, 3), int32 (N,) labels that
      index `list_classes(path)`.

    Raises:
      ValueError: on a size larger than the split.
      DatasetFileError: when `path` is None or the layout is wrong, a class has no images, the
        class sets differ, or an image cannot be decoded (the message names the files).
    """
    path, classes, train_folder, test_folder, size = _open(path, image_size)
    train = _load_split(train_folder, classes, train_size, "train", size)
    test = _load_split(test_folder, classes, test_size, "test", size)
    return train, test, common.make_info("image_folder", len(classes), train, test, MEAN, STD)


def _decoded_in_order(paths, labels, order, image_size):
    """(uint8 image, int32 label) of the files `paths[order]`, in that order.

    The files are read and decoded in parallel (deterministic order). One that cannot be read or
    decoded is dropped by `ignore_errors` (its error logged), and the gap it leaves in the
    positions fails the epoch with an error naming it (the first such file): at the next sample
    that comes through, or at the end.
    """
    count = tf.size(order, out_type=tf.int64)

    def decode(position):
        index = order[position]
        return _decode_image(paths[index], image_size), labels[index], position

    samples = tf.data.Dataset.range(count).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    samples = samples.ignore_errors(log_warning=True)  # found again below, to name the file
    # Pulled only when a file is missing (then fewer than `count` samples come through).
    blank = tf.zeros((image_size, image_size, 3), tf.uint8)
    end = tf.data.Dataset.from_tensors((blank, tf.constant(-1, tf.int32), count))

    def check(expected, sample):
        image, label, position = sample
        missing = paths[order[tf.minimum(expected, count - 1)]]
        message = tf.strings.join(["Image file ", missing, _UNREADABLE])
        in_order = tf.debugging.Assert(tf.equal(position, expected), [message])
        with tf.control_dependencies([in_order]):
            return position + 1, (image, label)

    return samples.concatenate(end).scan(tf.constant(0, tf.int64), check).take(count)


def _train_batches(paths, labels, info, batch_size, augment, seed, position):
    """This device's files in a new order every epoch, decoded, batched, augmented, normalized:
    the order and crops of `pipeline.epoch_plans` and `batch_seeds`, so the same seed gives the
    batches the in-memory pipeline gives, and a resumed run the batches it would have seen."""
    count, steps = len(paths), math.ceil(len(paths) / batch_size)
    paths, labels = tf.constant(paths), tf.constant(labels)

    def epoch_batches(order, epoch, first):
        batches = _decoded_in_order(paths, labels, order, info.image_shape[0]).batch(batch_size)
        if not augment:
            return batches
        return tf.data.Dataset.zip(batches, batch_seeds(seed, epoch, first, steps))

    def make_batch(batch, augment_seed=None):
        images, batch_labels = batch
        if augment_seed is not None:
            images = augment_batch(images, augment_seed)
        return normalize(images, info), batch_labels

    batches = epoch_plans(count, batch_size, seed, position).flat_map(epoch_batches)
    if not augment:
        batches = batches.map(lambda images, batch_labels: ((images, batch_labels),))
    batches = batches.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return finish_epoch(batches, count, batch_size)


def _eval_batches(paths, labels, info, batch_size):
    """The files in stored order, decoded, batched and normalized."""
    order = tf.range(len(paths), dtype=tf.int64)
    samples = _decoded_in_order(tf.constant(paths), tf.constant(labels), order, info.image_shape[0])
    batches = augmented_and_normalized(samples.batch(batch_size), info)
    return finish_epoch(batches, len(paths), batch_size)


def build_image_folder_datasets(
    path,
    batch_size,
    eval_batch_size,
    image_size=DEFAULT_IMAGE_SIZE,
    augment=True,
    seed=0,
    shard_index=0,
    num_shards=1,
    train_size=None,
    test_size=None,
    validation_fraction=0.0,
    position=None,
):
    """Training, validation and test pipelines that decode the image files every epoch, as
    `build_datasets` gives.

    Only the file list (paths and labels) is held in memory. Training: this device's files in an
    order shuffled from `seed` every epoch (the index shuffle of `pipeline.build_train_dataset`, so
    the same seed gives the same batches as that pipeline on `load`'s arrays, on any machine),
    read and decoded in parallel, batched, then augmented and normalized by one map per batch.
    Test: all test files in stored order, normalized, not augmented (never split across devices).
    A file that cannot be read or decoded fails the epoch with an error naming it.

    Args:
      path: the dataset directory holding train/ and val/ (or test/).
      batch_size, eval_batch_size, augment, seed: as in `build_datasets`.
      image_size: side of the square images; None uses `DEFAULT_IMAGE_SIZE` (64).
      shard_index: this device's number, 0 <= shard_index < num_shards.
      num_shards: devices sharing the training files; device i trains on every num_shards-th
        file (round-robin order) from the i-th, as `build_datasets` splits in-memory arrays.
      train_size, test_size: the first n files of each split (round-robin order, so balanced
        over the classes), before the device split; None takes all.
      validation_fraction: the share of the training files held out for validation
        (`tfsplit.records.holdout`, drawn from `seed`), before the device split.
      position: as in `pipeline.build_train_dataset`.

    Returns:
      `Splits` of float32 normalized (B, S, S, 3) images and int32 (B,) labels; `info.train_size`
      counts this device's samples. Each knows its batches per epoch.

    Raises:
      ValueError: on a bad argument, a size larger than its split, or more devices than files.
      DatasetFileError: when the layout is wrong, a class has no images or the class sets differ.
    """
    common.check_pipeline_arguments(
        batch_size, eval_batch_size, seed, shard_index, num_shards, augment=augment
    )
    position = new_position() if position is None else position
    path, classes, train_folder, test_folder, size = _open(path, image_size)
    train_paths, train_labels = _split_files(train_folder, classes, train_size, "train")
    test_paths, test_labels = _split_files(test_folder, classes, test_size, "test")
    kept, held = holdout.held_out(len(train_paths), validation_fraction, seed)
    val_paths, val_labels = train_paths[held], train_labels[held]
    train_paths, train_labels = (
        common.device_part(items[kept], shard_index, num_shards, f"Image folder {path}", "files")
        for items in (train_paths, train_labels)
    )
    info = common.DatasetInfo(
        "image_folder",
        len(classes),
        (size, size, 3),
        len(train_paths),
        len(test_paths),
        MEAN,
        STD,
        validation_size=len(held),
    )
    logging.info(
        "Streaming image folder %s at %dpx: device %d of %d, %d training, %d validation and %d "
        "test files.",
        path,
        size,
        shard_index,
        num_shards,
        info.train_size,
        info.validation_size,
        info.test_size,
    )
    return common.Splits(
        _train_batches(train_paths, train_labels, info, batch_size, augment, seed, position),
        _eval_batches(val_paths, val_labels, info, eval_batch_size) if len(held) else None,
        _eval_batches(test_paths, test_labels, info, eval_batch_size),
        info,
    )
