"""TFRecord shards: a dataset written once as N files per split, streamed back by tf.data.

Layout of a shard directory (written by `write_shards`, i.e. `tfsplit-prepare-data`):

    index.json                       format version, dataset, classes, image shape, mean and std,
                                     image encoding, per split: shards with sample count, byte
                                     size and sha256
    train-00000-of-00008.tfrecord    tf.train.Example records: "image" (the uint8 pixels, raw or
    ...                              as a lossless PNG) and "label" (int64)
    test-00000-of-00008.tfrecord

The directory is a local path or an object-store URL (`s3://bucket/prefix`).

This module is the format's public face; the code is in three modules with one job each:
`shard_index` (file names, the index: parsed, validated, written; file access and checksums),
`shard_writer` (`write_shards`, `write_array_shards`) and `shard_reader`
(`build_shard_datasets`, `load_shard_arrays`, `device_shards`, the per-shard count checks).
"""

from tfsplit.data.shard_index import (
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    SPLITS,
    Shard,
    ShardIndex,
    load_index,
    shard_name,
)
from tfsplit.data.shard_reader import build_shard_datasets, device_shards, load_shard_arrays
from tfsplit.data.shard_writer import DEFAULT_ENCODING, write_array_shards, write_shards

__all__ = [
    "DEFAULT_ENCODING",
    "ENCODINGS",
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "SPLITS",
    "Shard",
    "ShardIndex",
    "build_shard_datasets",
    "device_shards",
    "load_index",
    "load_shard_arrays",
    "shard_name",
    "write_array_shards",
    "write_shards",
]
