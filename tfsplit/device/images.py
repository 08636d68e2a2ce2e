"""Images for the device runner: PNG/JPEG files (with Pillow) or .npy arrays.

Every source gives uint8 (N, H, W, C) pixels of exactly the head's input size; a mismatch is an
error naming the file and both shapes (resizing silently would change what the model sees).
PNG/JPEG need Pillow and .npy only numpy. A run's test set needs TensorFlow, so it is loaded
outside this room, by `tfsplit.export.load_run_test_images` on a development machine.
"""

import os

import numpy as np

from tfsplit.device.spec import DeviceError

NUMPY_SUFFIX = ".npy"
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _read_pillow(path, channels):
    try:
        from PIL import Image  # optional: Pillow, for PNG/JPEG files only; a device may lack it
    except ImportError:
        raise DeviceError(
            f"Reading {path} needs Pillow (pip install pillow); or pass the image as a uint8 "
            ".npy array."
        ) from None
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DeviceError(f"Image files hold 1 or 3 channels; the head takes {channels}.")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert(mode))
    except (OSError, ValueError) as error:
        raise DeviceError(f"Cannot read the image {path}: {error}") from None
    return pixels[None, ..., None] if channels == 1 else pixels[None]


def _read_numpy(path):
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DeviceError(f"Cannot read {path} as a .npy array: {error}") from None
    if array.ndim == 3:
        array = array[None]
    if array.dtype.kind not in "iu" or array.size == 0 or array.min() < 0 or array.max() > 255:
        raise DeviceError(
            f"{path} must hold integer pixels in 0..255 (e.g. uint8), one image (H, W, C) or a "
            f"batch (N, H, W, C). Received: dtype={array.dtype}, shape={array.shape}"
        )
    return array


def _read(path, channels):
    suffix = os.path.splitext(path)[1].lower()
    if suffix == NUMPY_SUFFIX:
        return _read_numpy(path)
    if suffix in PILLOW_SUFFIXES:
        return _read_pillow(path, channels)
    raise DeviceError(
        f"Unsupported image file {path}: expected {NUMPY_SUFFIX} or one of {PILLOW_SUFFIXES}."
    )


def load_images(paths, image_shape):
    """Reads image files into one uint8 (N, H, W, C) batch of the head's input size.

    Args:
      paths: image files; a .npy may hold one image (H, W, C) or a batch (N, H, W, C).
      image_shape: the head's (H, W, C).

    Returns:
      uint8 (N, H, W, C) images, in the order given (a .npy batch expands in place).

    Raises:
      DeviceError: no paths, a missing or unreadable file, an unsupported suffix, or an image of
        another size.
    """
    if isinstance(paths, (str, os.PathLike)) or not paths:
        raise DeviceError(f"`paths` must be a non-empty list of image files. Received: {paths!r}")
    image_shape = tuple(image_shape)
    batches = []
    for path in paths:
        if not os.path.isfile(path):
            raise DeviceError(f"No image file at {path!r}.")
        images = _read(os.fspath(path), image_shape[-1])
        if images.shape[1:] != image_shape:
            raise DeviceError(
                f"{path} holds images of shape {images.shape[1:]} (H, W, C); the head takes "
                f"{image_shape}. Resize or crop to {image_shape[1]}x{image_shape[0]} first."
            )
        batches.append(images.astype(np.uint8))
    return np.concatenate(batches)
