"""CIFAR-10 and CIFAR-100 from keras.datasets or from the standard python archive on disk.

The python archive (cifar-10-python.tar.gz / cifar-100-python.tar.gz) or its extracted directory
lets offline machines train on CIFAR. Its batches are pickles: use trusted files only.
"""

import dataclasses
import functools
import pickle

import numpy as np

from tfsplit.data import common, files
from tfsplit.data.common import DatasetFileError

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    """Where a CIFAR variant keeps its batches in the python archive, and its statistics."""

    title: str
    archive: str
    folder: str
    train_files: tuple
    test_files: tuple
    label_key: bytes
    num_classes: int
    keras_loader: str
    keras_kwargs: dict
    mean: tuple
    std: tuple


_CIFAR = {
    "cifar10": _CifarLayout(
        title="CIFAR-10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        keras_loader="cifar10",
        keras_kwargs={},
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarLayout(
        title="CIFAR-100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        keras_loader="cifar100",
        keras_kwargs={"label_mode": "fine"},
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _expected(layout):
    return (
        f"expected {layout.archive} or the extracted {layout.folder} directory "
        f"({', '.join(layout.train_files + layout.test_files)}) from {_CIFAR_URL}"
    )


def _parse_batch(raw, source, layout):
    """Images (N, 32, 32, 3) and labels (N,) from one pickled CIFAR batch."""
    try:
        batch = pickle.loads(raw, encoding="bytes")
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[layout.label_key], np.int32)
    except Exception as err:  # pickle raises many types on bad bytes.
        raise DatasetFileError(
            f"{layout.title} file {source} is corrupt or not a CIFAR python batch "
            f"(needs keys b'data' and {layout.label_key!r}): {err!r}"
        ) from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DatasetFileError(
            f"{layout.title} file {source} has data of shape {data.shape} and "
            f"{labels.shape} labels; expected (N, 3072) and (N,)"
        )
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values, each row by row).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar(path, layout):
    """(train, test) arrays from the CIFAR python archive or its extracted directory."""
    names = layout.train_files + layout.test_files
    raw = files.read_dataset_files(path, layout.folder, names, layout.title, _expected(layout))

    def join(names):
        parts = [_parse_batch(raw[name][1], raw[name][0], layout) for name in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return join(layout.train_files), join(layout.test_files)


def _download_cifar(layout):
    """(train, test) arrays through keras.datasets, which downloads on first use."""
    advice = (
        f"To use a local copy instead, download {layout.archive} from {_CIFAR_URL} and pass "
        f"its path (or the extracted {layout.folder} directory) as `path`, e.g. "
        f"--config.data.path=/data/{layout.archive}."
    )
    return common.download_with_keras(
        layout.title, layout.keras_loader, advice, **layout.keras_kwargs
    )


def load(name, path=None, train_size=None, test_size=None, image_size=None):
    """Loads CIFAR-10 or CIFAR-100 as numpy arrays.

    Args:
      name: "cifar10" or "cifar100".
      path: the python archive or its extracted directory (or that directory's parent); None
        downloads through keras.datasets.
      train_size: take the first `train_size` training samples; None takes all 50000.
      test_size: the same for the 10000 test samples.
      image_size: resize to image_size x image_size; None keeps 32.

    Returns:
      ((x_train, y_train), (x_test, y_test), info): uint8 (N, H, W, 3), int32 (N,) fine labels.

    Raises:
      ValueError: on a bad name or a size larger than the split.
      DatasetFileError: when `path` is missing or does not hold the expected CIFAR files.
      DatasetDownloadError: when the keras download fails (offline machine).
    """
    if name not in _CIFAR:
        raise ValueError(f"`name` must be one of {tuple(_CIFAR)}. Received: name={name!r}")
    common.check_optional_size("image_size", image_size)
    layout = _CIFAR[name]
    splits = _download_cifar(layout) if path is None else _read_cifar(path, layout)
    resize = functools.partial(common.resize_images, size=image_size)
    train, test = common.take_first_and_fit(splits, (train_size, test_size), layout.title, resize)
    info = common.make_info(name, layout.num_classes, train, test, layout.mean, layout.std)
    return train, test, info
