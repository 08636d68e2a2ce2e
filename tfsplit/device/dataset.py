"""Training data on a device without TensorFlow: shard directories, and what the loaders share.

A device that trains without TensorFlow must see the pixels the TensorFlow pipeline
(`tfsplit.data`) gives, or the model it trains is not the one evaluated elsewhere. `load_shards`
reads a local directory written by `tfsplit-prepare-data` (index.json checked by
`tfsplit.records.shard_index`, every shard's size and sha256 checked before it is parsed) and
gives exactly, bit for bit, the images of the TensorFlow pipeline's evaluation batches (float32,
or the uint8 pixels with `normalized=False`). Image folders: `tfsplit.device.image_folder`;
shuffled and augmented batches: `tfsplit.device.batches`.
"""

import hashlib
import io
import math
import os
import re

import numpy as np
from absl import logging

from tfsplit.device.disk_images import DiskImages
from tfsplit.device.spec import DeviceError
from tfsplit.records import RecordError, ShardIndexError, parse_example, read_index, split_records

SPLITS = ("train", "validation", "test")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # Pillow's 8-bit modes by channel count.


class DeviceDataError(DeviceError):
    """A dataset a device cannot read (index, shard, record, image file) or a bad argument."""


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(name, value, minimum):
    if not _is_int(value) or value < minimum:
        raise DeviceDataError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")


def _check_split(split):
    if split not in SPLITS:
        raise DeviceDataError(f"`split` must be one of {SPLITS}. Received: split={split!r}")


def _check_local_dir(path, what):
    if not isinstance(path, (str, os.PathLike)):
        raise DeviceDataError(f"`path` must be a str or a path. Received: path={path!r}")
    path = os.fspath(path)
    if re.match(r"^[a-zA-Z][\w+.-]*://", path):
        raise DeviceDataError(
            f"A device reads {what} from a local directory; copy it here first. Received: {path}"
        )
    return path


def _device_part(items, split, shard_index, num_shards, title, unit, advice=""):
    """Device `shard_index`'s part of the training `items` (every num_shards-th from the i-th,
    as `tfsplit.data` splits them); the test split is never split across devices."""
    _check_int("num_shards", num_shards, 1)
    if not _is_int(shard_index) or not 0 <= shard_index < num_shards:
        raise DeviceDataError(
            f"`shard_index` must be an int in [0, num_shards={num_shards}). "
            f"Received: shard_index={shard_index!r}"
        )
    if split != "train":
        return items
    if num_shards > len(items):
        raise DeviceDataError(
            f"{title} has {len(items)} training {unit}, fewer than the devices sharing them. "
            f"Received: num_shards={num_shards}{advice}"
        )
    return items[shard_index::num_shards]


def normalize(images, mean, std):
    """uint8 (..., C) pixels to float32 (pixel / 255 - mean) / std, in the float32 steps of
    `tfsplit.data.pipeline.normalize`, so that the values are the same bits."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 1 or images.shape[-1] != len(mean):
        raise DeviceDataError(
            f"`images` must be uint8 pixels ending in {len(mean)} channels. "
            f"Received: dtype={images.dtype}, shape={images.shape}"
        )
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def _info(name, num_classes, image_shape, mean, std, size, classes=None):
    """The loaders' info: what a model needs, and `pad_value` for `tfsplit.device.batches.batches(augment=True)`."""
    black = normalize(np.zeros(len(mean), np.uint8), mean, std)
    return dict(
        name=name,
        num_classes=int(num_classes),
        image_shape=tuple(int(d) for d in image_shape),
        mean=tuple(mean),
        std=tuple(std),
        size=int(size),
        classes=classes,
        pad_value=tuple(float(v) for v in black),
    )


def _pillow(purpose, advice):
    try:
        from PIL import Image  # optional: Pillow, for PNG/JPEG images on a device
    except ImportError:
        raise DeviceDataError(f"{purpose} needs Pillow (pip install pillow); {advice}") from None
    return Image


# ----------------------------------------------------------------------------------------------
# Shards.
# ----------------------------------------------------------------------------------------------


def _check_sizes(shards):
    """Every shard exists with its indexed size (before any is read, as tfsplit.data checks)."""
    for shard in shards:
        if not os.path.isfile(shard.path):
            raise DeviceDataError(
                f"Shard {shard.path} is missing; its index lists it with "
                f"{shard.num_samples} samples"
            )
        size = os.path.getsize(shard.path)
        if size != shard.num_bytes:
            raise DeviceDataError(
                f"Shard {shard.path} has {size} bytes; its index expects {shard.num_bytes} "
                "(truncated or replaced)"
            )


def _verified_bytes(shard):
    with open(shard.path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != shard.num_bytes or digest != shard.sha256:
        raise DeviceDataError(
            f"Shard {shard.path} has sha256 {digest}; its index expects {shard.sha256} "
            "(corrupt or replaced)"
        )
    return data


def _sample(record, path, number, num_classes):
    """(image bytes, label) of one record of shard `path`, its features checked."""
    try:
        features = parse_example(record)
    except RecordError as error:
        raise DeviceDataError(f"Shard {path}, record {number}: {error}") from None
    image, label = features.get("image"), features.get("label")
    if not isinstance(image, list) or len(image) != 1:
        raise DeviceDataError(
            f"Shard {path}, record {number}: feature image must be one bytes value"
        )
    if not isinstance(label, np.ndarray) or label.dtype != np.int64 or label.shape != (1,):
        raise DeviceDataError(f"Shard {path}, record {number}: feature label must be one int64")
    if not 0 <= label[0] < num_classes:
        raise DeviceDataError(
            f"Shard {path} holds a label outside 0..{num_classes - 1}: {label[0]} (record {number})"
        )
    return image[0], int(label[0])


def _decode_png(png, path, number, shape):
    if png[:8] != _PNG_SIGNATURE:
        raise DeviceDataError(f"Shard {path} holds an image that is not a PNG (record {number})")
    Image = _pillow(f"Reading the PNG shard {path}", "or write raw shards (--encoding=raw)")
    try:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            mode, pixels = image.mode, np.asarray(image)
    except (OSError, ValueError) as error:
        raise DeviceDataError(f"Shard {path}, record {number}: bad PNG: {error}") from None
    if _PNG_MODES.get(mode) != shape[-1] or pixels.dtype != np.uint8:
        raise DeviceDataError(
            f"Shard {path}, record {number}: a PNG of mode {mode}; expected 8-bit pixels of "
            f"{shape[-1]} channel(s)"
        )
    pixels = pixels.reshape(*pixels.shape[:2], -1)
    if pixels.shape != shape:
        raise DeviceDataError(
            f"Shard {path}, record {number}: an image of shape {pixels.shape}; expected {shape}"
        )
    return pixels


def _read_shard(shard, parsed):
    """uint8 images (n, H, W, C) and int32 labels (n,) of one shard, its checksum checked first."""
    data = _verified_bytes(shard)
    try:
        records = split_records(data, shard.path)
    except RecordError as error:
        raise DeviceDataError(str(error)) from None
    if len(records) != shard.num_samples:
        raise DeviceDataError(
            f"Shard {shard.path} gave {len(records)} samples but its index lists "
            f"{shard.num_samples}: the file is corrupt or truncated"
        )
    # One record at a time into the shard's arrays: a device holds the pixels once, not a copy
    # of every record's bytes besides.
    shape, count = parsed.image_shape, len(records)
    images, labels = np.empty((count, *shape), np.uint8), np.empty(count, np.int32)
    pixels = math.prod(shape)
    for number in range(count):
        image, labels[number] = _sample(records[number], shard.path, number, parsed.num_classes)
        records[number] = None
        if parsed.encoding == "png":
            images[number] = _decode_png(image, shard.path, number, shape)
        elif len(image) != pixels:
            raise DeviceDataError(
                f"Shard {shard.path} holds an image that is not {pixels} bytes of {shape} "
                f"uint8 pixels (record {number}: {len(image)} bytes)"
            )
        else:
            images[number] = np.frombuffer(image, np.uint8).reshape(shape)
    return images, labels


def load_shards(path, split, shard_index=0, num_shards=1, normalized=True, disk_dir=None):
    """One split of a local shard directory, as the TensorFlow pipeline normalizes it.

    Args:
      path: the shard directory written by `tfsplit-prepare-data` (or its index.json).
      split: "train", "validation" (held out of the training set when the shards were written)
        or "test".
      shard_index: this device's number, 0 <= shard_index < num_shards.
      num_shards: devices sharing the training shards: device i reads every num_shards-th shard
        file from the i-th, as `tfsplit.data.shards.device_shards` does. The test split is
        read whole (evaluation is not split across devices).
      normalized: False keeps the uint8 pixels (a quarter of the memory): pass
        `normalization=(info["mean"], info["std"])` to `batches`, which normalizes each batch.
      disk_dir: with `normalized=False`, a directory where the uint8 pixels go to one file
        (`DiskImages`, read batch by batch) instead of the process's memory; each shard is
        checked and parsed as without it.

    Returns:
      (images, labels, info): float32 (N, H, W, C) images (pixel / 255 - mean) / std with the
      index's mean and std, int32 (N,) labels in stored shard order, and a dict with name,
      num_classes, image_shape, mean, std, size (N), classes (None: the index names none) and
      pad_value (the normalized black pixel, for `tfsplit.device.batches.batches(augment=True)`).

    Raises:
      DeviceDataError: on a bad argument, a missing or invalid index, a missing shard, one whose
        size or sha256 differs from its index entry, or a record that does not parse.
    """
    _check_split(split)
    path = _check_local_dir(path, "shards")
    try:
        parsed = read_index(path)
    except ShardIndexError as error:
        raise DeviceDataError(str(error)) from None
    if not parsed.split(split):
        raise DeviceDataError(
            f"The shards at {parsed.path} hold no {split} split: write them again with "
            "tfsplit-prepare-data (its --validation_fraction holds one out of the training set)."
        )
    advice = " (each device reads whole shard files: write more with tfsplit-prepare-data)"
    shards = _device_part(
        parsed.split(split), split, shard_index, num_shards, "The shard index", "shards", advice
    )
    _check_sizes(shards)
    if disk_dir is not None:
        if normalized:
            raise DeviceDataError("`disk_dir` keeps the uint8 pixels: pass normalized=False.")
        name = f"{split}-{shard_index}-of-{num_shards}.u8"
        writer = DiskImages.writer(os.path.join(disk_dir, name), parsed.image_shape)
        labels = []
        for shard in shards:
            images, shard_labels = _read_shard(shard, parsed)
            writer.append(images)
            labels.append(shard_labels)
        images, labels = writer.finish(), np.concatenate(labels)
    else:
        parts = [_read_shard(shard, parsed) for shard in shards]
        images = np.concatenate([p[0] for p in parts])
        if normalized:
            images = normalize(images, parsed.mean, parsed.std)
        labels = np.concatenate([p[1] for p in parts])
    logging.info(
        "Read %d %s samples of %s from %d shards of %s (device %d of %d, %s).",
        len(labels),
        split,
        parsed.name,
        len(shards),
        parsed.path,
        shard_index,
        num_shards,
        parsed.encoding,
    )
    info = _info(
        parsed.name, parsed.num_classes, parsed.image_shape, parsed.mean, parsed.std, len(labels)
    )
    return images, labels, info
