"""The shard format: file names, index.json (parsed, validated, written) and file access.

index.json lists the format version, dataset, classes, image shape, mean and std, and per split
its shards with sample count, byte size and sha256. `load_index` checks every field and that the
counts add up, naming the file and the field on any error, so a reader can trust the index
before it opens a shard; `write_index` writes it last, through a partial file and a rename. The
rules themselves are `tfsplit.records.shard_index`'s, shared with the device that reads shards
without TensorFlow; here they are applied to any filesystem and turned into a `DatasetInfo`.

All access to shard and index files goes through `filesystem(path)`: local paths use tf.io.gfile,
`s3://bucket/prefix` paths the checked, retried S3 client of `object_store`.
"""

import dataclasses
import json
import os
import re

import tensorflow as tf

from tfsplit.data.common import DatasetFileError, DatasetInfo
from tfsplit.data.object_store import s3_filesystem
from tfsplit.records import shard_index as records_index
from tfsplit.records.shard_index import (  # noqa: F401  (the format's names, re-exported)
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    SPLITS,
    Shard,
    ShardIndexError,
)

PARTIAL_SUFFIX = ".partial"  # Files being written; renamed into place once complete.
MAX_SHARDS = 99999  # Five digits in the file names.
_SHARD_NAME = re.compile(r"^(train|validation|test)-\d{5}-of-\d{5}\.tfrecord$")


# ----------------------------------------------------------------------------------------------
# File access: the one place that touches shard and index files.
# ----------------------------------------------------------------------------------------------


class _LocalFiles:
    """Local paths through tf.io.gfile (a remote filesystem would offer the same methods)."""

    open = staticmethod(tf.io.gfile.GFile)
    exists = staticmethod(tf.io.gfile.exists)
    isdir = staticmethod(tf.io.gfile.isdir)
    listdir = staticmethod(tf.io.gfile.listdir)
    makedirs = staticmethod(tf.io.gfile.makedirs)
    remove = staticmethod(tf.io.gfile.remove)
    join = staticmethod(os.path.join)

    @staticmethod
    def size(path):
        return tf.io.gfile.stat(path).length

    @staticmethod
    def rename(source, target):
        tf.io.gfile.rename(source, target, overwrite=True)


_LOCAL = _LocalFiles()


def filesystem(path):
    """The filesystem of `path`: local files, or S3 for `s3://bucket/key`."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a str or a path. Received: path={path!r}")
    scheme = re.match(r"^([a-zA-Z][\w+.-]*)://", os.fspath(path))
    if not scheme:
        return _LOCAL
    if scheme.group(1) == "s3":
        return s3_filesystem()
    raise ValueError(
        f"{scheme.group(1)}:// paths are not supported; expected a local directory or "
        f"s3://bucket/prefix. Received: path={os.fspath(path)!r}"
    )


def is_local(path):
    """Whether `path` is on the local filesystem (tf.data reads it natively)."""
    return filesystem(path) is _LOCAL


def file_sha256(path):
    """Hex sha256 of a file, streamed in chunks (bounded memory)."""
    with filesystem(path).open(path, "rb") as f:
        return records_index.stream_sha256(f)


# ----------------------------------------------------------------------------------------------
# Names and the index.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """A validated index.json: the dataset's `DatasetInfo` and the shards of each split
    (`validation`: the samples held out of the training set, none in older shards, with the
    share `validation_fraction` of it)."""

    path: str
    info: DatasetInfo
    train: tuple
    test: tuple
    encoding: str
    validation: tuple = ()
    validation_fraction: float = 0.0

    def split(self, name):
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def shard_name(split, index, count):
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def is_shard_output(name):
    """Whether a directory entry is one the writer makes (index, shard or partial file)."""
    name = name.rstrip("/")
    if name.endswith(PARTIAL_SUFFIX):
        name = name[: -len(PARTIAL_SUFFIX)]
    return name == INDEX_FILE or bool(_SHARD_NAME.match(name))


def _from_parsed(parsed):
    """The `ShardIndex` of a parsed index: its fields as the dataset's `DatasetInfo`."""
    info = DatasetInfo(
        parsed.name,
        parsed.num_classes,
        parsed.image_shape,
        sum(s.num_samples for s in parsed.train),
        sum(s.num_samples for s in parsed.test),
        parsed.mean,
        parsed.std,
        validation_size=sum(s.num_samples for s in parsed.validation),
    )
    return ShardIndex(
        parsed.path,
        info,
        parsed.train,
        parsed.test,
        parsed.encoding,
        parsed.validation,
        parsed.validation_fraction,
    )


def _parse_index(obj, index_path):
    try:
        return _from_parsed(records_index.parse_index(obj, index_path, filesystem(index_path).join))
    except ShardIndexError as err:
        raise DatasetFileError(str(err)) from None


def load_index(path):
    """Reads and validates a shard directory's index.json.

    Args:
      path: the shard directory, or its index.json.

    Returns:
      A `ShardIndex`; its `info` counts all samples of each split.

    Raises:
      DatasetFileError: when index.json is missing, is not JSON, has another format version, a
        field is missing or invalid, or the counts do not add up; the message names the file
        and the field.
    """
    files = filesystem(path)
    index_path = records_index.index_path(path, files.join)
    try:
        if not files.exists(index_path):
            raise records_index.missing_index(index_path)
        with files.open(index_path, "r") as f:
            text = f.read()
        parsed = records_index.parse_index_text(text, index_path, files.join)
    except ShardIndexError as err:
        raise DatasetFileError(str(err)) from err.__cause__
    return _from_parsed(parsed)


def write_index(out_dir, info, splits, encoding, validation_fraction=0.0):
    """Writes index.json for `info` and the written `splits` (each split's entries by name;
    a "validation" split holds `validation_fraction` of the training set).

    Written through a partial file and a rename, so a reader never sees half an index.

    Returns:
      The written `ShardIndex`.
    """
    obj = dict(
        format=FORMAT,
        version=FORMAT_VERSION,
        dataset=info.name,
        num_classes=info.num_classes,
        image_shape=list(info.image_shape),
        mean=list(info.mean),
        std=list(info.std),
        encoding=encoding,
        shard_assignment="contiguous",
        splits=splits,
    )
    if "validation" in splits:
        obj["validation_fraction"] = validation_fraction
    files = filesystem(out_dir)
    path = files.join(out_dir, INDEX_FILE)
    with files.open(path + PARTIAL_SUFFIX, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    files.rename(path + PARTIAL_SUFFIX, path)
    return _parse_index(obj, path)
