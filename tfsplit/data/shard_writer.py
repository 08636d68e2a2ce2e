"""Writes a dataset once as TFRecord shards plus index.json (what `tfsplit-prepare-data` runs).

Each split becomes `num_shards` files of tf.train.Example records: "image" (the uint8 pixels,
raw or as a lossless PNG, as the index's "encoding" says) and "label" (int64); the "validation"
split, held out of the training set, gets as many as it has samples, up to `num_shards`. Samples
go to shards in contiguous blocks (shard i of a split holds the i-th slice of the stored order,
`np.array_split` sizes), so reading a split's shards in file order gives the stored order. Every
file is written under a partial name and renamed into place once complete; the index goes last
(see `shard_index`).
"""

import os
import posixpath
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from tfsplit.data import common
from tfsplit.data.arrays import load_arrays
from tfsplit.data.common import DatasetInfo
from tfsplit.data.shard_index import (
    ENCODINGS,
    INDEX_FILE,
    MAX_SHARDS,
    PARTIAL_SUFFIX,
    SPLITS,
    file_sha256,
    filesystem,
    is_local,
    is_shard_output,
    shard_name,
    write_index,
)
from tfsplit.records import holdout

DEFAULT_ENCODING = "raw"
_UPLOAD_CHUNK_BYTES = 8 << 20


def _check_out_dir(out_dir, overwrite):
    """Raises unless `out_dir` is missing, empty or an earlier output (or `overwrite`)."""
    files = filesystem(out_dir)
    out_dir = os.fspath(out_dir)
    if not files.exists(out_dir):
        return out_dir
    if not files.isdir(out_dir):
        raise NotADirectoryError(f"`out_dir` must be a directory. Received: {out_dir} (a file)")
    foreign = sorted(n for n in files.listdir(out_dir) if not is_shard_output(n))
    if foreign and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty and holds files other than earlier shards "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
            "expected an empty directory or an earlier output (pass overwrite to write anyway)"
        )
    return out_dir


def _check_num_shards(num_shards):
    common.check_positive_int("num_shards", num_shards)
    if num_shards > MAX_SHARDS:
        raise ValueError(f"`num_shards` must be <= {MAX_SHARDS}. Received: {num_shards}")


def _check_arrays(split, arrays, info):
    images, labels = arrays
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.shape[1:] != tuple(info.image_shape)
        or np.ndim(labels) != 1
        or len(labels) != len(images)
    ):
        raise ValueError(
            f"`{split}` must be (uint8 images of shape (N, *{tuple(info.image_shape)}), labels "
            f"(N,)). Received: images {getattr(images, 'dtype', type(images))} "
            f"{np.shape(images)}, labels {np.shape(labels)}"
        )
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`{split}` labels must be integers. Received: dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise ValueError(
            f"`{split}` labels must be in 0..{info.num_classes - 1}. "
            f"Received: {labels.min()}..{labels.max()}"
        )


def _encoded(images, labels, encoding):
    """(image bytes, label) per sample: the uint8 pixels as stored, or PNG (encoded in parallel)."""
    if encoding == "raw":
        return ((image.tobytes(), label) for image, label in zip(images, labels))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))
    encode = lambda image, label: (tf.io.encode_png(image), label)  # noqa: E731
    dataset = dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.as_numpy_iterator()


def _example(image, label):
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_shard(path, images, labels, encoding):
    """Writes one shard (via a partial file renamed into place); returns its index entry.

    TFRecordWriter writes local files only: a shard for object storage is written to a local
    temporary file first and then uploaded (streamed) under the partial name.
    """
    files = filesystem(path)
    partial = path + PARTIAL_SUFFIX
    with tempfile.TemporaryDirectory(prefix="tfsplit-shard-") as scratch:
        local = partial if is_local(path) else os.path.join(scratch, os.path.basename(partial))
        with tf.io.TFRecordWriter(local) as writer:
            for image, label in _encoded(images, labels, encoding):
                writer.write(_example(image, label))
        entry = dict(
            file=posixpath.basename(path),
            num_samples=len(labels),
            num_bytes=os.path.getsize(local),
            sha256=file_sha256(local),
        )
        if local != partial:
            with open(local, "rb") as source, files.open(partial, "wb") as target:
                shutil.copyfileobj(source, target, _UPLOAD_CHUNK_BYTES)
    files.rename(partial, path)
    return entry


def _write_split(out_dir, split, images, labels, num_shards, encoding):
    blocks = np.array_split(np.arange(len(labels)), num_shards)  # contiguous, sizes differ by <= 1
    entries = []
    for i, block in enumerate(blocks):
        path = filesystem(out_dir).join(out_dir, shard_name(split, i, num_shards))
        block_images = images[block[0] : block[-1] + 1]
        entries.append(_write_shard(path, block_images, labels[block], encoding))
    return dict(
        num_samples=len(labels),
        num_bytes=sum(e["num_bytes"] for e in entries),
        shards=entries,
    )


def write_array_shards(
    train,
    test,
    info,
    out_dir,
    num_shards=8,
    overwrite=False,
    encoding=DEFAULT_ENCODING,
    validation_fraction=0.0,
    seed=0,
):
    """Writes arrays as `num_shards` TFRecord shards per split plus index.json (see module doc).

    The index is removed first and written last (through a partial file and a rename), so a
    crash never leaves an index that lists missing or half-written shards. Shards of an earlier
    output that the new index does not list are removed.

    Args:
      train: (uint8 images (N, H, W, C), int labels (N,)), as `load_arrays` gives; C in 1..4.
      test: the same for the test split.
      info: the dataset's `DatasetInfo` (name, classes, shape, mean and std go into the index).
      out_dir: directory to write; created if missing. It must be empty or an earlier output.
      num_shards: shards per split; each split needs at least this many samples.
      overwrite: write into a directory that also holds other files (they are left alone).
      encoding: "raw" (the uint8 pixels; decoding is a reshape, the fastest to train from) or
        "png" (lossless and smaller, decoded image by image).
      validation_fraction: the share of `train` held out (drawn from `seed`, as
        `tfsplit.records.holdout` draws it for every source) and written as the "validation"
        split, in at most `num_shards` shards; 0 writes none.
      seed: the draw of the held-out samples.

    Returns:
      The written `ShardIndex`.

    Raises:
      ValueError: on bad arrays, `num_shards` or `validation_fraction`.
      FileExistsError: when `out_dir` holds other files and `overwrite` is False.
    """
    if not isinstance(info, DatasetInfo):
        raise ValueError(f"`info` must be a DatasetInfo. Received: info={info!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"`encoding` must be one of {ENCODINGS}. Received: encoding={encoding!r}")
    if encoding == "png" and info.image_shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"PNG holds 1 to 4 channels. Received: image_shape={info.image_shape}")
    _check_num_shards(num_shards)
    for split, arrays in (("train", train), ("test", test)):
        _check_arrays(split, arrays, info)
    kept, held = holdout.held_out(len(train[1]), validation_fraction, seed)
    arrays = {"train": (train[0][kept], np.asarray(train[1])[kept]), "test": test}
    if len(held):
        arrays["validation"] = (train[0][held], np.asarray(train[1])[held])
    counts = {"train": num_shards, "validation": min(num_shards, len(held)), "test": num_shards}
    for split in ("train", "test"):
        if not num_shards <= len(arrays[split][1]):
            raise ValueError(
                f"Every shard needs a sample: the {split} split has {len(arrays[split][1])} "
                f"samples. Received: num_shards={num_shards}"
            )
    out_dir = _check_out_dir(out_dir, overwrite)
    files = filesystem(out_dir)
    files.makedirs(out_dir)
    old = [n.rstrip("/") for n in files.listdir(out_dir) if is_shard_output(n)]
    if INDEX_FILE in old:
        files.remove(files.join(out_dir, INDEX_FILE))
    splits = {
        split: _write_split(out_dir, split, images, np.asarray(labels), counts[split], encoding)
        for split, (images, labels) in arrays.items()
    }
    listed = {e["file"] for s in splits.values() for e in s["shards"]}
    for name in old:  # Stale shards and partial files of an earlier (or crashed) run.
        stale = files.join(out_dir, name)
        if name != INDEX_FILE and name not in listed and files.exists(stale):
            files.remove(stale)
    index = write_index(out_dir, info, splits, encoding, validation_fraction)
    logging.info(
        "Wrote %s shards of %s to %s",
        " + ".join(f"{len(splits[s]['shards'])} {s}" for s in SPLITS if s in splits),
        info.name,
        out_dir,
    )
    return index


def write_shards(
    name,
    out_dir,
    num_shards=8,
    path=None,
    seed=0,
    train_size=None,
    test_size=None,
    image_size=None,
    channels=None,
    overwrite=False,
    encoding=DEFAULT_ENCODING,
    validation_fraction=holdout.VALIDATION_FRACTION,
):
    """Writes the dataset `load_arrays(name, path, seed, ...)` gives as TFRecord shards.

    Args:
      name, path, seed, train_size, test_size, image_size, channels: as in `load_arrays`
        (`seed` also draws the validation split).
      out_dir, num_shards, overwrite, encoding, validation_fraction: as in
        `write_array_shards`.

    Returns:
      The written `ShardIndex`.
    """
    _check_num_shards(num_shards)  # Fail before a long load or download.
    holdout.check_validation_fraction(validation_fraction)
    _check_out_dir(out_dir, overwrite)
    train, test, info = load_arrays(name, path, seed, train_size, test_size, image_size, channels)
    return write_array_shards(
        train, test, info, out_dir, num_shards, overwrite, encoding, validation_fraction, seed
    )
