"""The shard directory's index.json, parsed and validated in plain Python.

The data pipeline (`tfsplit.data.shard_index`, local or object-store files) and a device that
trains without TensorFlow (`tfsplit.device.dataset`, local files) read the same index, so its
rules live here once: every field checked, the counts added up, and every error naming the file
and the field, so that a reader can trust the index before it opens a shard.
"""

import dataclasses
import hashlib
import json
import math
import numbers
import os
import re

INDEX_FILE = "index.json"
FORMAT = "tfsplit-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")  # validation: optional (indexes written before it)
ENCODINGS = ("raw", "png")  # How "image" holds the pixels: uint8 bytes as stored, or a PNG.
_CHUNK_BYTES = 1 << 20  # Checksums stream the files in 1 MiB reads.


class ShardIndexError(ValueError):
    """An index.json that is missing, is not JSON, or does not describe a valid shard set."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard file as its index lists it: full path, samples, bytes and sha256 (hex)."""

    path: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class ParsedIndex:
    """A validated index.json: the dataset's fields and the shards of each split.

    Attributes:
      path: the index file.
      name: the dataset's name.
      num_classes: labels are 0..num_classes-1.
      image_shape: (H, W, C) of the stored images.
      mean, std: per-channel normalization, in [0, 1] pixel units.
      encoding: one of `ENCODINGS`.
      train, test: the `Shard`s of each split, in stored order.
      validation: the `Shard`s of the samples held out of the training set (none in shards
        written without a validation split).
      validation_fraction: the share of the training set they hold (0: none).
    """

    path: str
    name: str
    num_classes: int
    image_shape: tuple
    mean: tuple
    std: tuple
    encoding: str
    train: tuple
    test: tuple
    validation: tuple = ()
    validation_fraction: float = 0.0

    def split(self, name):
        if name not in SPLITS:
            raise ShardIndexError(f"`split` must be one of {SPLITS}. Received: split={name!r}")
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


class _Fields:
    """Reads fields of index.json; every error names the file and the field."""

    def __init__(self, index_path):
        self.index_path = index_path

    def fail(self, field, expected, value):
        raise ShardIndexError(
            f"{self.index_path}: field {field} must be {expected}. Received: {value!r}"
        )

    def get(self, obj, key, where, check, expected):
        field = f"{where}.{key}" if where else key
        if not isinstance(obj, dict) or key not in obj:
            raise ShardIndexError(f"{self.index_path}: missing field {field} ({expected})")
        if not check(obj[key]):
            self.fail(field, expected, obj[key])
        return obj[key]

    def count(self, obj, key, where, minimum=0):
        check = lambda v: _is_int(v) and v >= minimum  # noqa: E731
        return self.get(obj, key, where, check, f"an integer >= {minimum}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_dict(value):
    return isinstance(value, dict)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_file_name(value):
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value + "\\"


def _parse_shards(fields, split, obj, directory, join):
    where = f"splits.{split}"
    total = fields.count(obj, "num_samples", where)
    entries = fields.get(obj, "shards", where, lambda v: isinstance(v, list) and v, "a list")
    shards = []
    for i, entry in enumerate(entries):
        at = f"{where}.shards[{i}]"
        name = fields.get(entry, "file", at, _is_file_name, "a file name in the index's directory")
        shards.append(
            Shard(
                join(directory, name),
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
        raise ShardIndexError(
            f"{fields.index_path}: the shards of {where} hold {listed} samples, but "
            f"{where}.num_samples is {total}"
        )
    return tuple(shards)


def parse_index(obj, index_path, join=os.path.join):
    """Validates the decoded JSON `obj` of `index_path` (shard paths are made with `join`, so an
    object store can pass its own).

    Returns:
      A `ParsedIndex`.

    Raises:
      ShardIndexError: a field is missing or invalid, the version is another, or the counts do
        not add up; the message names the file and the field.
    """
    fields = _Fields(index_path)
    if not isinstance(obj, dict):
        fields.fail("(top level)", "a JSON object", type(obj).__name__)
    fields.get(obj, "format", "", lambda v: v == FORMAT, repr(FORMAT))
    version = fields.count(obj, "version", "")
    if version != FORMAT_VERSION:
        raise ShardIndexError(
            f"{index_path}: format version {version} is not supported; this tfsplit reads "
            f"version {FORMAT_VERSION} (rewrite the shards with tfsplit-prepare-data)"
        )
    name = fields.get(obj, "dataset", "", lambda v: isinstance(v, str) and v, "a dataset name")
    num_classes = fields.count(obj, "num_classes", "", minimum=1)
    shape = fields.get(
        obj,
        "image_shape",
        "",
        lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(d) and d > 0 for d in v),
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
    present = [split for split in SPLITS if split != "validation" or split in splits]
    parsed = {
        split: _parse_shards(
            fields,
            split,
            fields.get(splits, split, "splits", _is_dict, "an object"),
            directory,
            join,
        )
        for split in present
    }
    fraction = 0.0
    if "validation" in parsed:
        fraction = fields.get(
            obj,
            "validation_fraction",
            "",
            lambda v: _is_number(v) and 0 < v < 1,
            "the share of the training set held out, in (0, 1)",
        )
    return ParsedIndex(
        index_path,
        name,
        int(num_classes),
        tuple(int(d) for d in shape),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        encoding,
        parsed["train"],
        parsed["test"],
        parsed.get("validation", ()),
        float(fraction),
    )


def index_path(path, join=os.path.join):
    """The index file of `path`: a shard directory, or its index.json itself."""
    path = os.fspath(path)
    return path if os.path.basename(path) == INDEX_FILE else join(path, INDEX_FILE)


def missing_index(index_path):
    """The error for an index file that does not exist (raised by whoever looked)."""
    return ShardIndexError(
        f"{index_path} not found; expected a directory written by tfsplit-prepare-data "
        f"({INDEX_FILE} and its .tfrecord shards)"
    )


def parse_index_text(text, index_path, join=os.path.join):
    """`parse_index` of the text (str or bytes) of `index_path`; not JSON is a ShardIndexError."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardIndexError(f"{index_path} is not valid JSON: {err}") from err
    return parse_index(obj, index_path, join)


def read_index(path):
    """Reads and validates the index.json of a local shard directory (or the file itself).

    Raises:
      ShardIndexError: as `parse_index`, or when the file is missing or is not JSON.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ShardIndexError(f"`path` must be a str or a path. Received: path={path!r}")
    path = index_path(path)
    if not os.path.isfile(path):
        raise missing_index(path)
    with open(path, "rb") as f:
        return parse_index_text(f.read(), path)


def stream_sha256(f):
    """Hex sha256 of an open binary file read to its end in chunks (bounded memory)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path):
    """Hex sha256 of a local file."""
    with open(path, "rb") as f:
        return stream_sha256(f)
