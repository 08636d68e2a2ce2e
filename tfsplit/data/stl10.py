"""STL-10 (labelled part) from a local copy of the standard binary archive.

STL-10 is not in keras.datasets and is 2.6 GB, so it is never downloaded here: the user fetches
`stl10_binary.tar.gz` once and passes the archive or its extracted `stl10_binary/` directory.
Only the labelled files are read (train_X.bin, train_y.bin: 5000 images; test_X.bin, test_y.bin:
8000); reading from the archive stops before the 2.7 GB of unlabeled images when it can.

Images are 96x96 RGB; `image_size` resizes them (antialiased), e.g. to 32 for the CIFAR-sized
models. Labels are stored as 1..10 and returned as 0..9.
"""

import functools

import numpy as np

from tfsplit.data import common, files
from tfsplit.data.common import DatasetFileError

NATIVE_SIZE = 96
NUM_CLASSES = 10
# Per-channel statistics of the 5000 training images, as commonly used for STL-10.
MEAN = (0.4467, 0.4398, 0.4066)
STD = (0.2603, 0.2566, 0.2713)
_URL = "https://cs.stanford.edu/~acoates/stl10/"
_ARCHIVE = "stl10_binary.tar.gz"
_FOLDER = "stl10_binary"
_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
_IMAGE_BYTES = 3 * NATIVE_SIZE * NATIVE_SIZE


def _expected():
    names = ", ".join(name for pair in _FILES.values() for name in pair)
    return (
        f"expected {_ARCHIVE} or the extracted {_FOLDER} directory ({names}) from {_URL}, "
        f"e.g. --config.data.path=/data/{_ARCHIVE}"
    )


def parse_images(raw, source):
    """(N, 96, 96, 3) uint8 images from the bytes of an STL-10 `*_X.bin` file.

    Each image is stored channel by channel (red, green, blue), and each channel column by column
    (column-major), as the official reader's `reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)` says.

    Raises:
      ValueError: when `raw` is not bytes.
      DatasetFileError: when the size is not a whole, non-zero number of images.
    """
    common.check_bytes("raw", raw)
    if len(raw) == 0 or len(raw) % _IMAGE_BYTES:
        raise DatasetFileError(
            f"STL-10 file {source} holds {len(raw)} bytes; expected a positive multiple of "
            f"{_IMAGE_BYTES} (3x96x96 images)"
        )
    images = np.frombuffer(raw, np.uint8).reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE)
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1))


def parse_labels(raw, source, count):
    """int32 labels 0..9 from the bytes of an STL-10 `*_y.bin` file (one byte 1..10 per image).

    Raises:
      ValueError: when `raw` is not bytes or `count` is not a positive int.
      DatasetFileError: when there is not one label per image or a label is outside 1..10.
    """
    common.check_bytes("raw", raw)
    common.check_positive_int("count", count)
    labels = np.frombuffer(raw, np.uint8)
    if len(labels) != count:
        raise DatasetFileError(
            f"STL-10 file {source} holds {len(labels)} labels for {count} images; expected one each"
        )
    if labels.min() < 1 or labels.max() > NUM_CLASSES:
        raise DatasetFileError(
            f"STL-10 file {source} holds labels {labels.min()}..{labels.max()}; expected 1..10"
        )
    return labels.astype(np.int32) - 1


def _read(path):
    names = tuple(name for pair in _FILES.values() for name in pair)
    raw = files.read_dataset_files(path, _FOLDER, names, "STL-10", _expected())

    def split(images_name, labels_name):
        images = parse_images(raw[images_name][1], raw[images_name][0])
        return images, parse_labels(raw[labels_name][1], raw[labels_name][0], len(images))

    return split(*_FILES["train"]), split(*_FILES["test"])


def load(path=None, train_size=None, test_size=None, image_size=None):
    """Loads the labelled STL-10 splits as numpy arrays.

    Args:
      path: `stl10_binary.tar.gz` (or an uncompressed .tar), the extracted `stl10_binary`
        directory, or its parent. Required: STL-10 is not downloaded.
      train_size: take the first `train_size` of the 5000 training samples; None takes all.
      test_size: the same for the 8000 test samples.
      image_size: resize to image_size x image_size; None keeps 96.

    Returns:
      ((x_train, y_train), (x_test, y_test), info): uint8 (N, S, S, 3), int32 (N,) labels 0..9.

    Raises:
      ValueError: on a size larger than the split.
      DatasetFileError: when `path` is None, missing, or does not hold the expected files.
    """
    common.check_optional_size("image_size", image_size)
    if path is None:
        raise DatasetFileError(
            "STL-10 is not downloaded automatically (it is not in keras.datasets). Download "
            f"{_ARCHIVE} (2.6 GB) from {_URL} and pass it, or the extracted {_FOLDER} directory, "
            f"as `path`, e.g. --config.data.path=/data/{_ARCHIVE}. Received: path=None"
        )
    resize = functools.partial(common.resize_images, size=image_size)
    train, test = common.take_first_and_fit(_read(path), (train_size, test_size), "STL-10", resize)
    return train, test, common.make_info("stl10", NUM_CLASSES, train, test, MEAN, STD)
