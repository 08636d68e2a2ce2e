"""What every dataset reader shares: `DatasetInfo`, the errors, argument checks and resizing.

Readers return uint8 images (N, H, W, C) and int32 labels (N,) with a `DatasetInfo`; the helpers
here keep their conventions identical (which samples a size or a device takes, how images are
resized, what an offline download says).
"""

import contextlib
import dataclasses
import socket
import typing

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfsplit.codec.values import is_int

_DOWNLOAD_SOCKET_TIMEOUT_S = 30.0  # A blackholed network fails in seconds, not after minutes.


class DatasetFileError(ValueError):
    """A local dataset file or directory is missing or is not in the expected format."""


class DatasetDownloadError(RuntimeError):
    """A dataset could not be downloaded (the machine is offline or the download failed)."""


class Splits(typing.NamedTuple):
    """A source's pipelines: `validation` is held out of the training data (None where the
    run asked for none), `test` is evaluated once at the end of a run."""

    train: object
    validation: object
    test: object
    info: object


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and an exporter need to know about a dataset.

    Attributes:
      name: one of `tfsplit.data.DATASETS`.
      num_classes: number of labels; labels are 0..num_classes-1.
      image_shape: (H, W, C) of the images after preprocessing.
      train_size: number of training samples actually loaded.
      test_size: number of test samples actually loaded.
      mean: per-channel mean used by `normalize`, in [0, 1] pixel units.
      std: per-channel standard deviation used by `normalize`, in [0, 1] pixel units.
      validation_size: number of samples held out of the training set for validation.
    """

    name: str
    num_classes: int
    image_shape: tuple
    train_size: int
    test_size: int
    mean: tuple
    std: tuple
    validation_size: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`name` must be a non-empty string. Received: name={self.name!r}")
        check_positive_int("num_classes", self.num_classes)
        shape = tuple(self.image_shape)
        if len(shape) != 3 or not all(is_int(d) and d > 0 for d in shape):
            raise ValueError(
                f"`image_shape` must be (H, W, C) of positive ints. Received: image_shape={shape}"
            )
        for field in ("train_size", "test_size", "validation_size"):
            value = getattr(self, field)
            if not is_int(value) or value < 0:
                raise ValueError(f"`{field}` must be an int >= 0. Received: {field}={value!r}")
        channels = shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"`mean` and `std` need one value per channel ({channels}). "
                f"Received: mean={self.mean}, std={self.std}"
            )
        if not all(s > 0 for s in self.std):
            raise ValueError(f"`std` must be > 0 in every channel. Received: std={self.std}")


def check_positive_int(name, value):
    if not is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def check_optional_size(name, value):
    """Raises ValueError unless `value` is None (meaning "all" or "default") or an int >= 1."""
    if value is not None:
        check_positive_int(name, value)


def check_seed(seed):
    if not is_int(seed) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0. Received: seed={seed!r}")


def check_device_shard(shard_index, num_shards):
    """Raises ValueError unless device `shard_index` of `num_shards` is a valid pair."""
    check_positive_int("num_shards", num_shards)
    if not is_int(shard_index) or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"`shard_index` must be an int in [0, num_shards={num_shards}). "
            f"Received: shard_index={shard_index!r}"
        )


def check_pipeline_arguments(batch_size, eval_batch_size, seed, shard_index, num_shards, **flags):
    """The checks every pipeline builder makes before it reads anything; `flags` must be bools."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("eval_batch_size", eval_batch_size)
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"`{key}` must be a bool. Received: {key}={value!r}")
    check_seed(seed)
    check_device_shard(shard_index, num_shards)


def device_part(items, shard_index, num_shards, title, unit, advice=""):
    """Device `shard_index`'s part of the training `items`: every num_shards-th from the i-th.

    The devices' parts are disjoint and cover the set, whatever the source (arrays, files,
    shard files); `title` and `unit` name the set and its items when there are too few.
    """
    check_device_shard(shard_index, num_shards)
    if num_shards > len(items):
        raise ValueError(
            f"{title} has {len(items)} training {unit}, fewer than the devices sharing them. "
            f"Received: num_shards={num_shards}{advice}"
        )
    return items[shard_index::num_shards]


def check_bytes(name, value):
    """Raises ValueError unless `value` is bytes-like (the raw content of a file)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"`{name}` must be bytes. Received: {name} of type {type(value).__name__}")


def make_info(name, num_classes, train, test, mean, std):
    """The `DatasetInfo` of (images, labels) splits: shapes and sizes come from the arrays."""
    shape = tuple(int(d) for d in train[0].shape[1:])
    return DatasetInfo(
        name, num_classes, shape, len(train[0]), len(test[0]), tuple(mean), tuple(std)
    )


def take_first(arrays, size, split, title):
    """The first `size` samples of (images, labels), or all of them when `size` is None.

    Readers keep the stored order, so a smoke run on n samples always sees the same n.
    """
    check_optional_size(f"{split}_size", size)
    if size is None:
        return arrays
    if size > len(arrays[0]):
        raise ValueError(
            f"{title} has {len(arrays[0])} {split} samples; cannot take the first {size}. "
            f"Received: {split}_size={size}"
        )
    return arrays[0][:size], arrays[1][:size]


def take_first_and_fit(splits, sizes, title, fit):
    """(train, test): the first `sizes` samples of both `splits`, their images passed to `fit`.

    Every reader ends this way, so a size means the same (a prefix in stored order) everywhere.

    Args:
      splits: (train, test) pairs of (images, labels).
      sizes: (train_size, test_size), each None for all samples.
      title: the dataset's name for messages.
      fit: maps images to the shape the caller asked for (resize, pad).
    """
    fitted = []
    for split, arrays, size in zip(("train", "test"), splits, sizes):
        images, labels = take_first(arrays, size, split, title)
        fitted.append((fit(images), labels))
    return tuple(fitted)


def to_uint8(images):
    """Float pixels in 0..255 to uint8, rounded to the nearest value (not truncated)."""
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def resize_image(image, size):
    """One (H, W, C) image to float (size, size, C): bilinear, antialiased when shrinking.

    Antialiasing matters when STL-10 (96) or photos are shrunk to 32 pixels: without it, thin
    details alias into noise. The aspect ratio is not kept (as in Keras's image loaders).
    """
    return tf.image.resize(image, (size, size), method="bilinear", antialias=True)


def resize_images(images, size):
    """uint8 (N, H, W, C) to uint8 (N, size, size, C); unchanged when `size` is None or theirs.

    Images are resized one by one inside a tf.data map and gathered into one batch, so memory
    holds the uint8 result and a few float images, never the whole set as float32.
    """
    check_optional_size("image_size", size)
    if size is None or images.shape[1:3] == (size, size):
        return images
    dataset = tf.data.Dataset.from_tensor_slices(images).map(
        lambda image: to_uint8(resize_image(image, size)), num_parallel_calls=tf.data.AUTOTUNE
    )
    return dataset.batch(len(images)).get_single_element().numpy()


@contextlib.contextmanager
def _socket_timeout(seconds):
    """Gives new sockets a default timeout (unless one is set): a dead network fails fast."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_with_keras(title, loader_name, advice, **kwargs):
    """`keras.datasets.<loader_name>.load_data(**kwargs)`, which downloads on first use.

    Args:
      title: the dataset's name for messages, e.g. "CIFAR-10".
      loader_name: the module under `keras.datasets`, e.g. "cifar10".
      advice: what to do instead when offline (which files to fetch and what `path` to pass).
      **kwargs: passed to `load_data`.

    Returns:
      ((x_train, y_train), (x_test, y_test)) as uint8 images and int32 labels of shape (N,).

    Raises:
      DatasetDownloadError: when the download fails; the message holds the cause and `advice`.
    """
    loader = getattr(keras.datasets, loader_name).load_data
    try:
        with _socket_timeout(_DOWNLOAD_SOCKET_TIMEOUT_S):
            splits = loader(**kwargs)
    except Exception as err:  # Keras wraps network errors in a bare Exception.
        raise DatasetDownloadError(
            f"Could not download {title} with keras.datasets.{loader_name}.load_data(): {err}. "
            f"This machine looks offline (or the download failed). {advice}"
        ) from err
    return tuple((np.asarray(x, np.uint8), np.asarray(y, np.int32).reshape(-1)) for x, y in splits)
