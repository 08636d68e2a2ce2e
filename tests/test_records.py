"""tfsplit.records: TFRecord files and tf.train.Example records read without TensorFlow give what
TensorFlow's own reader and parser give, and malformed input fails with a clear message."""

import numpy as np
import pytest
import tensorflow as tf

from tfsplit import records


def _example(rng):
    feature = {
        "image": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[rng.bytes(int(rng.integers(0, 300)))])
        ),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(rng.integers(10))])),
        "ints": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[-(2**63), -1, 0, 2**40, 2**63 - 1])
        ),
        "floats": tf.train.Feature(
            float_list=tf.train.FloatList(value=rng.normal(size=7).astype(np.float32))
        ),
        "names": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a", b"", b"\xff" * 3])),
        "empty": tf.train.Feature(),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def test_records_and_examples_read_as_tensorflow_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "shard.tfrecord")
    examples = [_example(rng) for _ in range(20)]
    with tf.io.TFRecordWriter(path) as writer:
        for example in examples:
            writer.write(example.SerializeToString())
    with open(path, "rb") as f:
        got = records.split_records(f.read(), path)
    want = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    assert got == want
    for record, example in zip(got, examples):
        parsed = records.parse_example(record)
        assert set(parsed) == set(example.features.feature)
        for name, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            values = list(getattr(feature, kind).value) if kind else []
            if kind == "float_list":
                np.testing.assert_array_equal(parsed[name], np.asarray(values, np.float32))
                assert parsed[name].dtype == np.float32
            elif kind == "int64_list":
                np.testing.assert_array_equal(parsed[name], np.asarray(values, np.int64))
            else:
                assert list(parsed[name]) == values, name


def test_unpacked_lists_parse_too():
    # Protobuf writers may send repeated scalars unpacked: one field per value.
    ints = b"".join(b"\x08" + bytes([v]) for v in (1, 2, 3))  # field 1, varint
    floats = b"".join(b"\x0d" + np.float32(v).tobytes() for v in (0.5, -2.0))  # field 1, fixed32

    def feature(kind, body):
        return bytes([kind << 3 | 2, len(body)]) + body

    def entry(name, body):
        key = b"\x0a" + bytes([len(name)]) + name
        value = b"\x12" + bytes([len(body)]) + body
        return b"\x0a" + bytes([len(key + value)]) + key + value

    features = entry(b"i", feature(3, ints)) + entry(b"f", feature(2, floats))
    record = b"\x0a" + bytes([len(features)]) + features
    parsed = records.parse_example(record)
    np.testing.assert_array_equal(parsed["i"], [1, 2, 3])
    np.testing.assert_array_equal(parsed["f"], [0.5, -2.0])
    reference = tf.train.Example.FromString(record)
    assert list(reference.features.feature["i"].int64_list.value) == [1, 2, 3]


def test_truncated_files_and_records_fail_clearly(tmp_path):
    path = str(tmp_path / "shard.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(_example(np.random.default_rng(1)).SerializeToString())
    data = open(path, "rb").read()
    with pytest.raises(records.RecordError, match=r"shard.tfrecord: a record of \d+ bytes"):
        records.split_records(data[:-1], path)
    with pytest.raises(records.RecordError, match="inside a record header"):
        records.split_records(data + b"\x00" * 5, path)
    (record,) = records.split_records(data, path)
    with pytest.raises(records.RecordError, match="ends inside"):
        records.parse_example(record[:-3])
    with pytest.raises(records.RecordError, match="wire type 7"):
        records.parse_example(b"\x0f")
