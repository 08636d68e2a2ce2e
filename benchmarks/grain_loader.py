"""Training batches from tfsplit's TFRecord shards through Google's Grain, to benchmark tf.data.

The loader gives what `build_shard_datasets` gives (normalized float32 images, int32 labels, the
paper's crop-and-flip augmentation, the last partial batch kept) from the very same files, so a
benchmark compares loader libraries rather than formats. Grain needs random access, which
TFRecord lacks: the record framing of every shard is scanned once (headers only) into a table of
(file, offset, length), and records are then read one by one with `os.pread`. Grain then
shuffles globally, parses, batches and augments in threads; never processes, since TensorFlow is
loaded in this process and forking it is unsafe.
"""

import io
import math
import os
import re
import struct
import weakref

import grain
import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2

from tfsplit.data import common
from tfsplit.data.common import DatasetFileError
from tfsplit.data.pipeline import CROP_PADDING
from tfsplit.data.shard_index import SPLITS, load_index

try:  # optional: Pillow decodes PNG without a TensorFlow op per image; TensorFlow is the fallback.
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

_HEADER = struct.Struct("<QI")  # A TFRecord frame: uint64 length, uint32 CRC, data, uint32 CRC.
_FOOTER_BYTES = 4


def _scan_records(fd, path):
    """(offsets, lengths) of the records of an open TFRecord file, from its headers alone."""
    size = os.fstat(fd).st_size
    offsets, lengths, offset = [], [], 0
    while offset < size:
        header = os.pread(fd, _HEADER.size, offset)
        if len(header) < _HEADER.size:
            raise DatasetFileError(f"{path} ends inside a record header at byte {offset}")
        length, _ = _HEADER.unpack(header)
        start = offset + _HEADER.size
        offset = start + length + _FOOTER_BYTES
        if offset > size:
            raise DatasetFileError(
                f"{path}: a record of {length} bytes at byte {start - _HEADER.size} runs past "
                f"the end of the file ({size} bytes; truncated or not a TFRecord file)"
            )
        offsets.append(start)
        lengths.append(length)
    return offsets, lengths


def _open_shard(shard):
    """(descriptor, offsets, lengths) of a shard whose record count matches its index entry."""
    try:
        fd = os.open(shard.path, os.O_RDONLY)
    except FileNotFoundError as err:
        raise DatasetFileError(
            f"Shard {shard.path} is missing; its index lists it with {shard.num_samples} samples"
        ) from err
    try:
        offsets, lengths = _scan_records(fd, shard.path)
        if len(offsets) != shard.num_samples:
            raise DatasetFileError(
                f"Shard {shard.path} holds {len(offsets)} records, but its index lists "
                f"{shard.num_samples} (a stale or replaced shard; rewrite the shards)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def _close_all(fds):
    while fds:
        os.close(fds.pop())


class ShardRecordSource:
    """Grain's random-access source over the records of local TFRecord shards (record bytes).

    One descriptor per shard stays open and every read is one `os.pread`, which has no shared
    file position: Grain's reader threads read concurrently without a lock.

    Args:
      shards: the `Shard` entries of an index's split; each file's record count must match.
    """

    def __init__(self, shards):
        self._fds = []
        self._closer = weakref.finalize(self, _close_all, self._fds)
        file_ids, offsets, lengths = [], [], []
        try:
            for shard in shards:
                fd, shard_offsets, shard_lengths = _open_shard(shard)
                file_ids.append(np.full(len(shard_offsets), len(self._fds), np.int32))
                self._fds.append(fd)
                offsets.append(shard_offsets)
                lengths.append(shard_lengths)
        except BaseException:
            self.close()
            raise
        self._file_ids = np.concatenate(file_ids)
        self._offsets = np.concatenate(offsets)
        self._lengths = np.concatenate(lengths)

    def __len__(self):
        return len(self._offsets)

    def __getitem__(self, index):
        fd = self._fds[self._file_ids[index]]
        length = int(self._lengths[index])
        return os.pread(fd, length, int(self._offsets[index]))

    def close(self):
        self._closer()


def _decode_png(data):
    if Image is None:  # pragma: no cover
        return tf.io.decode_png(data).numpy()
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _make_parse(image_shape, encoding):
    """A record's bytes -> (uint8 (H, W, C) image, int32 label); a wrong size names the shape."""
    image_shape = tuple(image_shape)
    pixels = math.prod(image_shape)

    def parse(record):
        features = example_pb2.Example.FromString(record).features.feature
        data = features["image"].bytes_list.value[0]
        label = np.int32(features["label"].int64_list.value[0])
        image = np.frombuffer(data, np.uint8) if encoding == "raw" else _decode_png(data)
        if image.size != pixels or image.dtype != np.uint8:
            raise DatasetFileError(
                f"A record's image has {image.size} {image.dtype} values; the index's "
                f"image_shape {image_shape} needs {pixels} uint8 values"
            )
        return image.reshape(image_shape), label

    return parse


def augment_batch(images, rng):
    """`pipeline.augment_batch` in numpy: crop of the zero-padded images and flip, per sample.

    The crop and flip are one gather of row and (possibly reversed) column indices.

    Args:
      images: (B, H, W, C) array.
      rng: the `np.random.Generator` drawing offsets in [0, 2 * CROP_PADDING] and flips.

    Returns:
      Array like `images`.
    """
    batch, height, width = images.shape[:3]
    padded = np.pad(images, [(0, 0), (CROP_PADDING,) * 2, (CROP_PADDING,) * 2, (0, 0)])
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(batch, 2))
    flip = rng.random((batch, 1)) < 0.5
    rows = offsets[:, :1] + np.arange(height)
    cols = offsets[:, 1:] + np.arange(width)
    cols = np.where(flip, cols[:, ::-1], cols)
    return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _check_local(path):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or a path. Received: path={path!r}")
    scheme = re.match(r"^([a-zA-Z][\w+.-]*)://", os.fspath(path))
    if scheme:
        raise ValueError(
            f"GrainShardLoader reads local shard files only (random access with os.pread); "
            f"{scheme.group(1)}:// paths are not supported. Received: path={os.fspath(path)!r}"
        )


class GrainShardLoader:
    """Epochs of normalized, optionally augmented batches of a shard directory, read by Grain.

    Every `iter()` is a new epoch: a global shuffle of all records whose seed comes from `seed`
    and the epoch number, and augmentation drawn from `seed`, the epoch and the batch number, so
    two loaders with the same seed give the same batches whatever the thread timing.

    Args:
      path: a local shard directory written by `tfsplit-prepare-data` (or its index.json).
      batch_size: samples per batch; the last partial batch is kept.
      seed: int >= 0 fixing the order and the augmentation.
      augment: whether batches get the random crop (zero padding 4) and horizontal flip.
      num_threads: Grain's reader threads, each building whole batches.
      split: "train" or "test".

    Raises:
      ValueError: on a bad argument or an object-store (s3://) path.
      DatasetFileError: on a bad index or a shard whose record count differs from the index.
    """

    def __init__(self, path, batch_size, seed=0, augment=True, num_threads=8, split="train"):
        _check_local(path)
        common.check_positive_int("batch_size", batch_size)
        common.check_seed(seed)
        if seed >= 2**32:
            raise ValueError(f"`seed` must be < 2**32 (Grain's shuffle). Received: seed={seed}")
        if not isinstance(augment, bool):
            raise ValueError(f"`augment` must be a bool. Received: augment={augment!r}")
        common.check_positive_int("num_threads", num_threads)
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
        index = load_index(path)
        self.info = index.info
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.num_threads = num_threads
        self._source = ShardRecordSource(index.split(split))
        self._parse = _make_parse(index.info.image_shape, index.encoding)
        self._mean = np.asarray(index.info.mean, np.float32)
        self._std = np.asarray(index.info.std, np.float32)
        self._epoch = 0

    @property
    def num_samples(self):
        return len(self._source)

    def __len__(self):
        return math.ceil(len(self._source) / self.batch_size)

    def __iter__(self):
        epoch = self._epoch
        self._epoch += 1
        (shuffle_seed,) = np.random.SeedSequence([self.seed, epoch]).generate_state(1)

        def finish(batch_number, batch):
            images, labels = batch
            if self.augment:
                images = augment_batch(
                    images, np.random.default_rng([self.seed, epoch, batch_number])
                )
            images = (images.astype(np.float32) / np.float32(255) - self._mean) / self._std
            return images, labels

        dataset = (
            grain.MapDataset.source(self._source)
            .shuffle(seed=int(shuffle_seed))
            .map(self._parse)
            .batch(self.batch_size, drop_remainder=False)
            .map_with_index(finish)
        )
        options = grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=2 * self.num_threads
        )
        return iter(dataset.to_iter_dataset(options))

    def close(self):
        """Closes the shard files (also done when the loader is garbage collected)."""
        self._source.close()
