"""TFRecord files, `tf.train.Example` records and the shard index, read without TensorFlow.

The dataset shards are written by TensorFlow (`tfsplit.data`), and a device that trains without
TensorFlow reads the same files: the record framing (`tfrecord`), the Example protobuf
(`example`) and the index.json that lists and checksums the shards (`shard_index`) are small
enough to parse here, in plain Python, once for both readers.
"""

from tfsplit.records.example import parse_example
from tfsplit.records.shard_index import (
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    SPLITS,
    ParsedIndex,
    Shard,
    ShardIndexError,
    file_sha256,
    parse_index,
    read_index,
)
from tfsplit.records.tfrecord import RecordError, split_records

__all__ = [
    "ENCODINGS",
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "SPLITS",
    "ParsedIndex",
    "RecordError",
    "Shard",
    "ShardIndexError",
    "file_sha256",
    "parse_example",
    "parse_index",
    "read_index",
    "split_records",
]
