"""Training data on a device without TensorFlow: shard directories, image folders, batches.

A device that trains without TensorFlow must see the pixels the TensorFlow pipeline
(`tfsplit.data`) gives, or the model it trains is not the one evaluated elsewhere:

- `load_shards` reads a local directory written by `tfsplit-prepare-data` (index.json checked by
  `tfsplit.records.shard_index`, every shard's size and sha256 checked before it is parsed) and
  gives exactly, bit for bit, the float32 images of the TensorFlow pipeline's evaluation batches.
- `load_image_folder` reads train/<class>/ and val/<class>/ (or test/) as
  `tfsplit.data.image_folder` does: the same classes, labels, file order and normalization.
  PNGs already at the target size give the same pixels. Resized images use Pillow's
  antialiased bilinear filter in float32, the filter of tf.image.resize, but the sums round in
  another order: a pixel may be one level (1/255) away. JPEGs differ by a few levels: TensorFlow
  decodes them with libjpeg's fast integer IDCT, Pillow with the accurate one. For pixels
  identical to TensorFlow's, write the folder as shards (`tfsplit-prepare-data`).
- `batches` shuffles and augments with numpy: the order is a permutation drawn from (seed,
  epoch), and the augmentation (random crop of the image padded with 4 black pixels, random
  horizontal flip) is the TensorFlow pipeline's, drawn from another random stream.

Everything is held in memory as normalized float32: 4 bytes per pixel value.
"""

import hashlib
import io
import math
import os
import re

import numpy as np
from absl import logging

from tfsplit.device.spec import DeviceError
from tfsplit.records import RecordError, ShardIndexError, parse_example, read_index, split_records

SPLITS = ("train", "test")
CROP_PADDING = 4  # As tfsplit.data.pipeline: random crop of the image zero-padded by 4 pixels.
# As tfsplit.data.image_folder (a test holds them equal): layout, default size and statistics.
IMAGE_FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_IMAGE_SIZE = 64
IMAGE_FOLDER_MEAN = (0.485, 0.456, 0.406)
IMAGE_FOLDER_STD = (0.229, 0.224, 0.225)
_TEST_FOLDERS = ("val", "test")
_LAYOUT = "expected path/train/<class>/*.jpg|*.jpeg|*.png and path/val/<class>/* (or test/)"
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
    """The loaders' info: what a model needs, and `pad_value` for `batches(augment=True)`."""
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


def load_shards(path, split, shard_index=0, num_shards=1, normalized=True):
    """One split of a local shard directory, as the TensorFlow pipeline normalizes it.

    Args:
      path: the shard directory written by `tfsplit-prepare-data` (or its index.json).
      split: "train" or "test".
      shard_index: this device's number, 0 <= shard_index < num_shards.
      num_shards: devices sharing the training shards: device i reads every num_shards-th shard
        file from the i-th, as `tfsplit.data.shards.device_shards` does. The test split is
        read whole (evaluation is not split across devices).
      normalized: False keeps the uint8 pixels (a quarter of the memory): pass
        `normalization=(info["mean"], info["std"])` to `batches`, which normalizes each batch.

    Returns:
      (images, labels, info): float32 (N, H, W, C) images (pixel / 255 - mean) / std with the
      index's mean and std, int32 (N,) labels in stored shard order, and a dict with name,
      num_classes, image_shape, mean, std, size (N), classes (None: the index names none) and
      pad_value (the normalized black pixel, for `batches(augment=True)`).

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
    advice = " (each device reads whole shard files: write more with tfsplit-prepare-data)"
    shards = _device_part(
        parsed.split(split), split, shard_index, num_shards, "The shard index", "shards", advice
    )
    _check_sizes(shards)
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


# ----------------------------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------------------------


def _subdirectories(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_in(folder):
    names = [e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    return sorted(
        os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_FOLDER_EXTENSIONS)
    )


def _folder_classes(path):
    """(train folder, test folder, class names) of the image folder at `path`."""
    train = os.path.join(path, "train")
    if not os.path.isdir(train):
        raise DeviceDataError(f"Image folder {path} has no train/ directory; {_LAYOUT}")
    tests = [os.path.join(path, n) for n in _TEST_FOLDERS if os.path.isdir(os.path.join(path, n))]
    if not tests:
        raise DeviceDataError(f"Image folder {path} has neither val/ nor test/; {_LAYOUT}")
    classes = _subdirectories(train)
    if not classes:
        raise DeviceDataError(f"{train} holds no class directories; {_LAYOUT}")
    test_classes = _subdirectories(tests[0])
    if test_classes != classes:
        raise DeviceDataError(
            f"{train} and {tests[0]} must hold the same class directories. Only in train: "
            f"{sorted(set(classes) - set(test_classes))}; only in "
            f"{os.path.basename(tests[0])}: {sorted(set(test_classes) - set(classes))}"
        )
    return train, tests[0], tuple(classes)


def _folder_files(folder, classes):
    """(paths, int32 labels) of one split, round-robin over the classes (first file of every
    class, then the second, ...), the order of `tfsplit.data.image_folder`."""
    per_class = []
    for name in classes:
        files = _images_in(os.path.join(folder, name))
        if not files:
            raise DeviceDataError(
                f"{os.path.join(folder, name)} holds no images "
                f"({', '.join(IMAGE_FOLDER_EXTENSIONS)}); {_LAYOUT}"
            )
        per_class.append(files)
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(f) for f in per_class])
    ranks = np.concatenate([np.arange(len(f)) for f in per_class])
    order = np.lexsort((labels, ranks))  # by rank within the class, then by class
    paths = [f for files in per_class for f in files]
    return [paths[i] for i in order], labels[order]


def _read_image(Image, path, size):
    """uint8 (size, size, 3): decoded as RGB (gray repeated, alpha dropped, as TensorFlow's
    decode_image does), resized when its size differs (see the module docstring)."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise DeviceDataError(f"Image file {path} could not be read or decoded: {error}") from None
    if rgb.shape[:2] == (size, size):
        return rgb
    bilinear = Image.Resampling.BILINEAR  # antialiased when shrinking, as tf.image.resize's
    channels = [
        np.asarray(Image.fromarray(rgb[..., c].astype(np.float32)).resize((size, size), bilinear))
        for c in range(3)  # in float32 ("F" images), as TensorFlow resizes before rounding
    ]
    return np.clip(np.round(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def load_image_folder(
    path, split, image_size=DEFAULT_IMAGE_SIZE, shard_index=0, num_shards=1, normalized=True
):
    """One split of an image folder (path/train/<class>/, path/val/<class>/ or test/), decoded
    with Pillow, resized to image_size x image_size and normalized with ImageNet's statistics.

    Args:
      path: the dataset directory.
      split: "train" or "test" (the val/ folder, or test/ when there is no val/).
      image_size: side of the square images; None: `DEFAULT_IMAGE_SIZE` (64), as tfsplit.data.
      shard_index, num_shards: this device's part of the training files (every num_shards-th
        file in the round-robin order from the i-th, as `tfsplit.data` gives it); the test split
        is read whole.

    Returns:
      (images, labels, info) as `load_shards`: labels index `info["classes"]`, the class
      directory names sorted.

    Raises:
      DeviceDataError: on a bad argument or layout, a class without images, different classes
        in train/ and val/, an image that cannot be decoded, or no Pillow.
    """
    _check_split(split)
    image_size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    _check_int("image_size", image_size, 1)
    path = _check_local_dir(path, "an image folder")
    if not os.path.isdir(path):
        raise DeviceDataError(f"Image folder path is not a directory: {path}; {_LAYOUT}")
    train, test, classes = _folder_classes(path)
    paths, labels = _folder_files(train if split == "train" else test, classes)
    title = f"Image folder {path}"
    paths, labels = (
        _device_part(items, split, shard_index, num_shards, title, "files")
        for items in (paths, labels)
    )
    Image = _pillow(f"Reading the image folder {path}", "or write it as shards on a workstation")
    pixels = np.stack([_read_image(Image, p, image_size) for p in paths])
    logging.info(
        "Read %d %s images of %s at %dpx (%d classes).",
        len(labels),
        split,
        path,
        image_size,
        len(classes),
    )
    images = normalize(pixels, IMAGE_FOLDER_MEAN, IMAGE_FOLDER_STD) if normalized else pixels
    info = _info(
        "image_folder",
        len(classes),
        (image_size, image_size, 3),
        IMAGE_FOLDER_MEAN,
        IMAGE_FOLDER_STD,
        len(labels),
        classes,
    )
    return images, np.asarray(labels, np.int32), info


# ----------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------


def _augment_batch(images, rng, pad_value):
    """The pipeline's augmentation with numpy: each image cropped at its own offset in
    [0, 2 * CROP_PADDING] of the image padded with `pad_value`, then flipped with probability
    1/2. The same crops as `tfsplit.data.pipeline.augment_batch` for the same offsets and flips;
    the random stream (numpy's) differs from TensorFlow's.
    """
    count, height, width, channels = images.shape
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(count, 2))
    flip = rng.random((count, 1)) < 0.5
    rows = offsets[:, :1] + np.arange(height)
    cols = offsets[:, 1:] + np.arange(width)
    cols = np.where(flip, cols[:, ::-1], cols)
    padded = np.empty(
        (count, height + 2 * CROP_PADDING, width + 2 * CROP_PADDING, channels), images.dtype
    )
    padded[...] = np.asarray(pad_value, images.dtype)
    padded[:, CROP_PADDING:-CROP_PADDING, CROP_PADDING:-CROP_PADDING] = images
    return padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _check_batches(images, labels, batch_size, seed, epoch, shuffle, augment, drop_remainder):
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise DeviceDataError(
            f"`images` must be a numpy array (N, H, W, C). Received: shape {np.shape(images)}"
        )
    if not isinstance(labels, np.ndarray) or labels.shape != images.shape[:1]:
        raise DeviceDataError(
            f"`labels` must be a numpy array (N,) with N = {len(images)}. "
            f"Received: shape {np.shape(labels)}"
        )
    if not len(images):
        raise DeviceDataError("`images` must hold at least one sample. Received: 0 samples")
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("epoch", epoch, 0)
    for name, value in (
        ("shuffle", shuffle),
        ("augment", augment),
        ("drop_remainder", drop_remainder),
    ):
        if not isinstance(value, bool):
            raise DeviceDataError(f"`{name}` must be a bool. Received: {name}={value!r}")
    if drop_remainder and batch_size > len(images):
        raise DeviceDataError(
            f"`drop_remainder` would drop every sample: {len(images)} samples, fewer than "
            f"batch_size={batch_size}"
        )


def batches(
    images,
    labels,
    batch_size,
    seed,
    epoch,
    shuffle=True,
    augment=False,
    drop_remainder=False,
    pad_value=None,
    normalization=None,
):
    """One epoch of (images, labels) batches from arrays held in memory.

    The TensorFlow pipelines keep the last partial batch, for training and evaluation alike,
    and so does this by default (`drop_remainder=False`).

    Args:
      images: (N, H, W, C) array, e.g. `load_shards`'s normalized float32 images.
      labels: (N,) array.
      batch_size: samples per batch.
      seed, epoch: ints >= 0; the epoch's order (and augmentation) are drawn from both, so the
        same pair gives the same batches and each epoch another order. The order cannot match
        tf.data's: numpy draws it.
      shuffle: False keeps the stored order (evaluation).
      augment: random crop of the padded image and random horizontal flip, per image.
      drop_remainder: drop the last batch when it is partial.
      pad_value: what the crop pads with, one value or one per channel; required with
        `augment`. Pass the loader's `info["pad_value"]`, the normalized black pixel: the
        TensorFlow pipeline pads the uint8 pixels with 0 before it normalizes.
      normalization: (mean, std) for uint8 `images` (a loader's `normalized=False`): each batch
        is augmented as uint8 (padded with 0, as TensorFlow does) and then normalized, so the
        set stays in memory as uint8. `pad_value` is then not needed.

    Returns:
      An iterator of (images, labels) batches; the arguments are checked before it is returned.

    Raises:
      DeviceDataError: on a bad argument.
    """
    _check_batches(images, labels, batch_size, seed, epoch, shuffle, augment, drop_remainder)
    if augment and normalization is None:
        pad = np.asarray(pad_value if pad_value is not None else [], np.float64)
        if pad.size not in (1, images.shape[-1]) or not np.all(np.isfinite(pad)):
            raise DeviceDataError(
                f"`pad_value` must be one finite number or {images.shape[-1]} (one per channel) "
                f"with augment=True: pass info['pad_value']. Received: pad_value={pad_value!r}"
            )
    order_seed, augment_seed = np.random.SeedSequence([seed, epoch]).spawn(2)
    count = len(images)
    order = np.random.default_rng(order_seed).permutation(count) if shuffle else np.arange(count)
    stop = count - count % batch_size if drop_remainder else count
    augment_rng = np.random.default_rng(augment_seed)

    def iterate():
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            batch = images[index]
            if augment:
                batch = _augment_batch(batch, augment_rng, 0 if normalization else pad_value)
            if normalization is not None:
                batch = normalize(batch, *normalization)
            yield batch, labels[index]

    return iterate()
