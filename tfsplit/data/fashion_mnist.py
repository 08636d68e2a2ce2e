"""Fashion-MNIST from keras.datasets or from its four IDX files on disk.

Images are 28x28 grayscale. The VGG backbones halve the resolution five times, so by default the
images are zero-padded by 2 pixels on each side to 32x32 (exact pixels, no resampling: the usual
LeNet-style padding) and keep their single channel; `tfsplit.data.load_arrays(..., channels=3)`
repeats the gray channel for models that want RGB. `image_size=28` keeps the original images and
any other size resizes them.

An offline machine reads the files Keras would download (the same ones the Fashion-MNIST
repository publishes) from a local directory: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each plain or gzipped (`.gz`).
"""

import functools
import gzip
import math
import os
import struct
import zlib

import numpy as np

from tfsplit.data import common
from tfsplit.data.common import DatasetFileError

NATIVE_SIZE = 28
PADDED_SIZE = 32  # The default image size: 2 black pixels on each side.
NUM_CLASSES = 10
# Statistics of the 28x28 training images, the values the Fashion-MNIST literature uses; padded
# images are normalized with them too, as in the usual PyTorch recipes (Pad, then Normalize).
MEAN = (0.2860,)
STD = (0.3530,)
_URL = "https://github.com/zalandoresearch/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes; magic numbers are 0x0000 08 <ndim>.


def _expected():
    names = ", ".join(name for pair in _FILES.values() for name in pair)
    return f"expected a directory holding {names} (each may end in .gz) from {_URL}"


def parse_idx(raw, ndim, source):
    """The uint8 array stored in an IDX file, after checking its magic number and size.

    Args:
      raw: the file's bytes (already gunzipped).
      ndim: the number of dimensions the file must have (3 for images, 1 for labels).
      source: where the bytes came from, for error messages.

    Returns:
      uint8 array of the shape written in the header.

    Raises:
      ValueError: when `raw` is not bytes or `ndim` is not a positive int.
      DatasetFileError: on a wrong magic number (not unsigned bytes, or not `ndim` dimensions) or
        when the data does not match the header's shape.
    """
    common.check_bytes("raw", raw)
    common.check_positive_int("ndim", ndim)
    expected_magic = (_IDX_UBYTE << 8) | ndim
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected_magic:
        found = "missing (under 4 bytes)" if magic is None else f"0x{magic:08x}"
        raise DatasetFileError(
            f"{source} is not an IDX file of unsigned bytes with {ndim} dimension(s): magic number "
            f"{found}, expected 0x{expected_magic:08x}; {_expected()}"
        )
    if len(raw) < header:
        raise DatasetFileError(f"{source} ends inside its IDX header; {_expected()}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise DatasetFileError(
            f"{source} holds {len(raw) - header} data bytes but its IDX header says shape {shape} "
            f"({math.prod(shape)} bytes); the file is truncated or corrupt"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def _read_idx(directory, name, ndim):
    """Parses `directory/name`, or `directory/name.gz` when only the gzipped file is there."""
    plain = os.path.join(directory, name)
    source = plain if os.path.isfile(plain) else plain + ".gz"
    if not os.path.isfile(source):
        raise DatasetFileError(f"Fashion-MNIST file not found: {plain}[.gz]; {_expected()}")
    try:
        with open(source, "rb") as handle:
            raw = handle.read()
        if source.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFileError(f"Cannot read {source}: {err!r}; {_expected()}") from err
    return parse_idx(raw, ndim, source)


def _read_split(directory, split):
    images_name, labels_name = _FILES[split]
    images = _read_idx(directory, images_name, ndim=3)
    labels = _read_idx(directory, labels_name, ndim=1)
    where = os.path.join(directory, images_name)
    if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE) or len(images) == 0:
        raise DatasetFileError(
            f"{where} holds images of shape {images.shape}; expected (N, 28, 28) with N >= 1"
        )
    if len(labels) != len(images):
        raise DatasetFileError(
            f"{split} split of {directory} has {len(images)} images but {len(labels)} labels"
        )
    if labels.max() >= NUM_CLASSES:
        raise DatasetFileError(
            f"{os.path.join(directory, labels_name)} holds label {labels.max()}; expected 0..9"
        )
    return images, labels.astype(np.int32)


def _read_directory(path):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DatasetFileError(f"Fashion-MNIST path is not a directory: {path}; {_expected()}")
    return _read_split(path, "train"), _read_split(path, "test")


def _download():
    names = ", ".join(f"{name}.gz" for pair in _FILES.values() for name in pair)
    advice = (
        f"To use a local copy instead, download {names} from {_URL} into one directory and pass "
        "it as `path`, e.g. --config.data.path=/data/fashion-mnist."
    )
    return common.download_with_keras("Fashion-MNIST", "fashion_mnist", advice)


def _fit(images, image_size):
    """(N, 28, 28) to (N, S, S, 1): zero-padded to 32 by default, else resized (28 is a no-op)."""
    images = images[..., None]
    if image_size in (None, PADDED_SIZE):
        pad = (PADDED_SIZE - NATIVE_SIZE) // 2
        return np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return common.resize_images(images, image_size)


def load(path=None, train_size=None, test_size=None, image_size=None):
    """Loads Fashion-MNIST as numpy arrays with one (gray) channel.

    Args:
      path: directory holding the four IDX files (plain or .gz); None downloads through
        keras.datasets.
      train_size: take the first `train_size` of the 60000 training samples; None takes all.
      test_size: the same for the 10000 test samples.
      image_size: None or 32 pads to 32x32 (the default), 28 keeps the originals, any other
        size resizes the 28x28 originals.

    Returns:
      ((x_train, y_train), (x_test, y_test), info): uint8 (N, S, S, 1), int32 (N,) labels 0..9.

    Raises:
      ValueError: on a size larger than the split.
      DatasetFileError: when `path` is not a directory or its files are missing or corrupt.
      DatasetDownloadError: when the keras download fails (offline machine).
    """
    common.check_optional_size("image_size", image_size)
    splits = _download() if path is None else _read_directory(path)
    fit = functools.partial(_fit, image_size=image_size)
    train, test = common.take_first_and_fit(splits, (train_size, test_size), "Fashion-MNIST", fit)
    return train, test, common.make_info("fashion_mnist", NUM_CLASSES, train, test, MEAN, STD)
