"""Datasets by name as numpy arrays: `load_arrays` dispatches to the reader of each source.

Every reader returns uint8 images (N, H, W, C), int32 labels (N,) and a `DatasetInfo`; this
module adds what applies to all of them: one argument check up front (before any download) and
`channels=3`, which turns a gray dataset into RGB for models that want three channels.
"""

import dataclasses
import functools
import os

import numpy as np
from absl import logging

from tfsplit.data import cifar, common, fashion_mnist, image_folder, stl10, synthetic

# Readers of files or downloads, called as reader(path, train_size, test_size, image_size).
_READERS = {
    "cifar10": functools.partial(cifar.load, "cifar10"),
    "cifar100": functools.partial(cifar.load, "cifar100"),
    "fashion_mnist": fashion_mnist.load,
    "stl10": stl10.load,
    "image_folder": image_folder.load,
}
_GENERATED = ("synthetic", "synthetic_hard")  # Embedded sets, generated from the seed.
DATASETS = (*_GENERATED, *_READERS)
_GRAYSCALE = ("fashion_mnist",)  # Datasets with one channel, which `channels=3` can repeat.


def _check_load_arguments(name, path, seed, train_size, test_size, image_size, channels):
    if name not in DATASETS:
        raise ValueError(f"`name` must be one of {DATASETS}. Received: name={name!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be None, a str or a path. Received: path={path!r}")
    if name in _GENERATED and path is not None:
        raise ValueError(f"The {name} set is generated, not read. Received: path={path!r}")
    common.check_seed(seed)
    common.check_optional_size("train_size", train_size)
    common.check_optional_size("test_size", test_size)
    common.check_optional_size("image_size", image_size)
    if channels is not None and (not common.is_int(channels) or channels not in (1, 3)):
        raise ValueError(f"`channels` must be None, 1 or 3. Received: channels={channels!r}")
    if channels == 1 and name not in _GRAYSCALE:
        raise ValueError(
            f"{name} has RGB images; `channels=1` applies to {_GRAYSCALE} only (None keeps the "
            f"native channels, 3 repeats a gray channel). Received: channels=1"
        )


def _map_images(train, test, info, function, **info_changes):
    """Applies `function` to the images of both splits; the info takes the new image shape."""
    train, test = (function(train[0]), train[1]), (function(test[0]), test[1])
    return train, test, dataclasses.replace(info, image_shape=train[0].shape[1:], **info_changes)


def load_arrays(
    name, path=None, seed=0, train_size=None, test_size=None, image_size=None, channels=None
):
    """Loads a dataset as numpy arrays.

    Args:
      name: one of `DATASETS` (see the table in `tfsplit.data`).
      path: local files, for offline machines or datasets that are not downloaded:
        "cifar10"/"cifar100": the python archive (cifar-10-python.tar.gz, cifar-100-python.tar.gz)
        or its extracted directory; its batches are pickles, so use trusted files.
        "fashion_mnist": a directory holding the four IDX files (plain or .gz).
        "stl10": stl10_binary.tar.gz or the extracted stl10_binary directory (required).
        "image_folder": a directory holding train/<class>/ and val/<class>/ (required).
        None downloads CIFAR and Fashion-MNIST through keras.datasets; must be None for
        "synthetic".
      seed: seed of the synthetic set (same seed, same arrays on any machine); unused otherwise.
      train_size: take the first `train_size` training samples (for smoke runs); the synthetic
        set is generated at that size (default 10000).
      test_size: the same for the test split (synthetic default 2000).
      image_size: side of the square images; None keeps each dataset's default (see the table).
      channels: None keeps the dataset's channels; 3 repeats Fashion-MNIST's gray channel.

    Returns:
      ((x_train, y_train), (x_test, y_test), info): uint8 images (N, H, W, C), int32 labels (N,)
      and the `DatasetInfo`.

    Raises:
      ValueError: on a bad argument, or a size larger than the dataset's split.
      DatasetFileError: when `path` is missing (where required) or does not hold the expected
        files, or a file is corrupt.
      DatasetDownloadError: when the keras download fails (offline machine).
    """
    _check_load_arguments(name, path, seed, train_size, test_size, image_size, channels)
    if name in _GENERATED:
        train, test, info = synthetic.load_synthetic(seed, train_size, test_size, name)
        resize = functools.partial(common.resize_images, size=image_size)
        train, test, info = _map_images(train, test, info, resize)
    else:  # Files fix their content; only the synthetic set is generated from the seed.
        train, test, info = _READERS[name](path, train_size, test_size, image_size)
    if channels == 3 and info.image_shape[-1] == 1:
        # The statistics repeat with the channel, so normalization stays the same.
        repeat = functools.partial(np.repeat, repeats=3, axis=-1)
        train, test, info = _map_images(
            train, test, info, repeat, mean=info.mean * 3, std=info.std * 3
        )
    logging.info(
        "Loaded %s: %d train and %d test images of shape %s, %d classes.",
        name,
        info.train_size,
        info.test_size,
        info.image_shape,
        info.num_classes,
    )
    return train, test, info
