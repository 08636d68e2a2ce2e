"""The shard format: file names, index.json (parsed, validated, written) and file access.

index.json lists the format version, dataset, classes, image shape, mean and std, and per split
its shards with sample count, byte size and sha256. `load_index` checks every field and that the
counts add up, naming the file and the field on any error, so a reader can trust the index
before it opens a shard; `write_index` writes it last, through a partial file and a rename.

All access to shard and index files goes through `filesystem(path)`: local paths use tf.io.gfile,
`s3://bucket/prefix` paths the checked, retried S3 client of `object_store`.
"""

import dataclasses
import hashlib
import json
import math
import os
import re

import tensorflow as tf

from tfsplit.data import common
from tfsplit.data.common import DatasetFileError, DatasetInfo
from tfsplit.data.object_store import s3_filesystem

INDEX_FILE = "index.json"
FORMAT = "tfsplit-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
ENCODINGS = ("raw", "png")  # How "image" holds the pixels: uint8 bytes as stored, or a PNG.
PARTIAL_SUFFIX = ".partial"  # Files being written; renamed into place once complete.
MAX_SHARDS = 99999  # Five digits in the file names.
_SHARD_NAME = re.compile(r"^(train|test)-\d{5}-of-\d{5}\.tfrecord$")
_CHUNK_BYTES = 1 << 20  # Checksums stream the files in 1 MiB reads.


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
    digest = hashlib.sha256()
    with filesystem(path).open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Names and the index.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard file as its index lists it: full path, samples, bytes and sha256 (hex)."""

    path: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """A validated index.json: the dataset's `DatasetInfo` and the shards of each split."""

    path: str
    info: DatasetInfo
    train: tuple
    test: tuple
    encoding: str

    def split(self, name):
        return {"train": self.train, "test": self.test}[name]


def shard_name(split, index, count):
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def is_shard_output(name):
    """Whether a directory entry is one the writer makes (index, shard or partial file)."""
    name = name.rstrip("/")
    if name.endswith(PARTIAL_SUFFIX):
        name = name[: -len(PARTIAL_SUFFIX)]
    return name == INDEX_FILE or bool(_SHARD_NAME.match(name))


class _Fields:
    """Reads fields of index.json; every error names the file and the field."""

    def __init__(self, index_path):
        self.index_path = index_path

    def fail(self, field, expected, value):
        raise DatasetFileError(
            f"{self.index_path}: field {field} must be {expected}. Received: {value!r}"
        )

    def get(self, obj, key, where, check, expected):
        field = f"{where}.{key}" if where else key
        if not isinstance(obj, dict) or key not in obj:
            raise DatasetFileError(f"{self.index_path}: missing field {field} ({expected})")
        if not check(obj[key]):
            self.fail(field, expected, obj[key])
        return obj[key]

    def count(self, obj, key, where, minimum=0):
        check = lambda v: common.is_int(v) and v >= minimum  # noqa: E731
        return self.get(obj, key, where, check, f"an integer >= {minimum}")


def _is_dict(value):
    return isinstance(value, dict)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_shards(fields, split, obj, directory):
    where = f"splits.{split}"
    total = fields.count(obj, "num_samples", where)
    entries = fields.get(obj, "shards", where, lambda v: isinstance(v, list) and v, "a list")
    shards = []
    for i, entry in enumerate(entries):
        at = f"{where}.shards[{i}]"
        name = fields.get(
            entry,
            "file",
            at,
            lambda v: isinstance(v, str) and v not in ("", ".", "..") and "/" not in v + "\\",
            "a file name in the index's directory",
        )
        shards.append(
            Shard(
                filesystem(directory).join(directory, name),
                fields.count(entry, "num_samples", at, minimum=1),
                fields.count(entry, "num_bytes", at),
                fields.get(
                    entry,
                    "sha256",
                    at,
                    lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v),
                    "64 lowercase hex digits",
                ),
            )
        )
    if len({s.path for s in shards}) != len(shards):
        fields.fail(f"{where}.shards", "a list of distinct files", [s.path for s in shards])
    listed = sum(s.num_samples for s in shards)
    if listed != total:
        raise DatasetFileError(
            f"{fields.index_path}: the shards of {where} hold {listed} samples, but "
            f"{where}.num_samples is {total}"
        )
    return tuple(shards)


def _parse_index(obj, index_path):
    fields = _Fields(index_path)
    if not isinstance(obj, dict):
        fields.fail("(top level)", "a JSON object", type(obj).__name__)
    fields.get(obj, "format", "", lambda v: v == FORMAT, repr(FORMAT))
    version = fields.count(obj, "version", "")
    if version != FORMAT_VERSION:
        raise DatasetFileError(
            f"{index_path}: format version {version} is not supported; this tfsplit reads "
            f"version {FORMAT_VERSION} (rewrite the shards with tfsplit-prepare-data)"
        )
    name = fields.get(obj, "dataset", "", lambda v: isinstance(v, str) and v, "a dataset name")
    num_classes = fields.count(obj, "num_classes", "", minimum=1)
    shape = fields.get(
        obj,
        "image_shape",
        "",
        lambda v: isinstance(v, list)
        and len(v) == 3
        and all(common.is_int(d) and d > 0 for d in v),
        "[H, W, C] of positive integers",
    )
    per_channel = f"a list of {shape[-1]} numbers (one per channel)"
    mean = fields.get(
        obj, "mean", "", lambda v: isinstance(v, list) and len(v) == shape[-1], per_channel
    )
    std = fields.get(
        obj, "std", "", lambda v: isinstance(v, list) and len(v) == shape[-1], per_channel
    )
    if not all(_is_number(v) for v in mean):
        fields.fail("mean", per_channel, mean)
    if not all(_is_number(v) and v > 0 for v in std):
        fields.fail("std", "a list of numbers > 0", std)
    encoding = fields.get(obj, "encoding", "", lambda v: v in ENCODINGS, f"one of {ENCODINGS}")
    splits = fields.get(obj, "splits", "", lambda v: isinstance(v, dict), "an object")
    directory = os.path.dirname(index_path)
    train, test = (
        _parse_shards(
            fields, split, fields.get(splits, split, "splits", _is_dict, "an object"), directory
        )
        for split in SPLITS
    )
    info = DatasetInfo(
        name,
        num_classes,
        tuple(shape),
        sum(s.num_samples for s in train),
        sum(s.num_samples for s in test),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
    )
    return ShardIndex(index_path, info, train, test, encoding)


def _index_path(path):
    files = filesystem(path)
    path = os.fspath(path)
    return path if os.path.basename(path) == INDEX_FILE else files.join(path, INDEX_FILE)


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
    index_path = _index_path(path)
    files = filesystem(index_path)
    if not files.exists(index_path):
        raise DatasetFileError(
            f"{index_path} not found; expected a directory written by tfsplit-prepare-data "
            f"({INDEX_FILE} and its .tfrecord shards)"
        )
    try:
        with files.open(index_path, "r") as f:
            obj = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetFileError(f"{index_path} is not valid JSON: {err}") from err
    return _parse_index(obj, index_path)


def write_index(out_dir, info, splits, encoding):
    """Writes index.json for `info` and the written `splits` (each split's entries by name).

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
    files = filesystem(out_dir)
    path = files.join(out_dir, INDEX_FILE)
    with files.open(path + PARTIAL_SUFFIX, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    files.rename(path + PARTIAL_SUFFIX, path)
    return _parse_index(obj, path)
