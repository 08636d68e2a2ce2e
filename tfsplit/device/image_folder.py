"""Image folders on a device without TensorFlow: train/<class>/ and val/<class>/ (or test/), read
as `tfsplit.data.image_folder` does: the same classes, labels, file order and normalization.

The layout, labels and file order are `tfsplit.records.image_folder`'s, shared with tf.data's
reader. PNGs already at the target size give the same pixels. Resized images use Pillow's antialiased
bilinear filter in float32, the filter of tf.image.resize, but the sums round in another order: a
pixel may be one level (1/255) away. JPEGs differ by a few levels: TensorFlow decodes them with
libjpeg's fast integer IDCT, Pillow with the accurate one. For pixels identical to TensorFlow's,
write the folder as shards (`tfsplit-prepare-data`).
"""

import os

import numpy as np
from absl import logging

from tfsplit.device.dataset import (
    DeviceDataError,
    _check_int,
    _check_local_dir,
    _check_split,
    _device_part,
    _info,
    _pillow,
    normalize,
)
from tfsplit.records import holdout
from tfsplit.records import image_folder as listing
from tfsplit.records.image_folder import DEFAULT_IMAGE_SIZE, LAYOUT, MEAN, STD


def _listed(path, split, validation_fraction, seed):
    """(classes, paths, labels) of one split, as `tfsplit.records.image_folder` lists them and
    `tfsplit.records.holdout` holds the validation files out of the training ones."""
    try:
        classes = listing.list_classes(path)
        train, test = listing.split_folders(path)
        paths, labels = listing.list_split(test if split == "test" else train, classes)
        if split != "test":
            kept, held = holdout.held_out(len(paths), validation_fraction, seed)
            chosen = held if split == "validation" else kept
            paths, labels = [paths[i] for i in chosen], np.asarray(labels)[chosen]
    except (listing.ImageFolderError, ValueError) as error:
        raise DeviceDataError(str(error)) from None
    return classes, paths, labels


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
    path,
    split,
    image_size=DEFAULT_IMAGE_SIZE,
    shard_index=0,
    num_shards=1,
    normalized=True,
    validation_fraction=0.0,
    seed=0,
):
    """One split of an image folder (path/train/<class>/, path/val/<class>/ or test/), decoded
    with Pillow, resized to image_size x image_size and normalized with ImageNet's statistics.

    Args:
      path: the dataset directory.
      split: "train", "validation" (`validation_fraction` of train/'s files, drawn from `seed`
        as `tfsplit.data` draws them, and left out of "train") or "test" (the val/ folder, or
        test/ when there is no val/).
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
        raise DeviceDataError(f"Image folder path is not a directory: {path}; {LAYOUT}")
    classes, paths, labels = _listed(path, split, validation_fraction, seed)
    if not len(paths):
        raise DeviceDataError(
            f"The image folder {path} holds no {split} files (validation: "
            f"validation_fraction={validation_fraction!r})."
        )
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
    images = normalize(pixels, MEAN, STD) if normalized else pixels
    info = _info(
        "image_folder",
        len(classes),
        (image_size, image_size, 3),
        MEAN,
        STD,
        len(labels),
        classes,
    )
    return images, np.asarray(labels, np.int32), info
