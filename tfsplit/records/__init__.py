"""TFRecord files and `tf.train.Example` records, read without TensorFlow.

The dataset shards are written by TensorFlow (`tfsplit.data`), and a device that trains without
TensorFlow reads the same files: the record framing (`tfrecord`) and the Example protobuf
(`example`) are small enough to parse here, in plain Python.
"""

from tfsplit.records.example import parse_example
from tfsplit.records.tfrecord import RecordError, split_records

__all__ = ["RecordError", "parse_example", "split_records"]
