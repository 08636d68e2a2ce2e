"""`tf.train.Example` parsed from its protobuf wire format.

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      (entries: key = 1, value = 2)
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                       Int64List int64_list = 3; } }
    *List    { repeated value = 1; }                    (floats and ints packed or not)
"""

import struct

import numpy as np

from tfsplit.records.tfrecord import RecordError

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(data, offset):
    value, shift = 0, 0
    while True:
        if offset >= len(data):
            raise RecordError("An Example record ends inside a varint.")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise RecordError("An Example record holds a varint longer than 10 bytes.")


def _fields(data):
    """(field number, wire type, value) of each field of one message: an int for a varint,
    bytes for the other wire types."""
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, offset = _varint(data, offset)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            value, offset = data[offset : offset + size], offset + size
        elif wire == _BYTES:
            size, offset = _varint(data, offset)
            value, offset = data[offset : offset + size], offset + size
        else:
            raise RecordError(f"An Example record holds wire type {wire} (field {number}).")
        if offset > len(data):
            raise RecordError(f"An Example record ends inside field {number}.")
        yield number, wire, value


def _signed(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def _values(kind, data):
    """The values of one BytesList (1), FloatList (2) or Int64List (3) message."""
    items = []
    for number, wire, value in _fields(data):
        if number != 1:
            continue
        if kind == 1:
            items.append(bytes(value))
        elif kind == 2 and wire == _BYTES:
            if len(value) % 4:
                raise RecordError("A packed FloatList's size is not a multiple of 4 bytes.")
            items.extend(struct.unpack(f"<{len(value) // 4}f", value))
        elif kind == 2 and wire == _FIXED32:
            items.append(struct.unpack("<f", value)[0])
        elif kind == 3 and wire == _BYTES:
            offset = 0
            while offset < len(value):
                item, offset = _varint(value, offset)
                items.append(_signed(item))
        elif kind == 3 and wire == _VARINT:
            items.append(_signed(value))
        else:
            raise RecordError(f"A feature list of kind {kind} holds wire type {wire}.")
    if kind == 2:
        return np.asarray(items, np.float32)
    if kind == 3:
        return np.asarray(items, np.int64)
    return items


def parse_example(record):
    """{feature name: its values} of one serialized `tf.train.Example`: a list of bytes for a
    BytesList, a float32 array for a FloatList, an int64 array for an Int64List."""
    features = {}
    for number, wire, value in _fields(record):
        if number != 1 or wire != _BYTES:
            continue
        for entry_number, entry_wire, entry in _fields(value):
            if entry_number != 1 or entry_wire != _BYTES:
                continue
            name, feature = None, b""
            for field, field_wire, item in _fields(entry):
                if field == 1 and field_wire == _BYTES:
                    name = bytes(item).decode("utf-8")
                elif field == 2 and field_wire == _BYTES:
                    feature = item
            if name is None:
                raise RecordError("An Example record has a feature without a name.")
            kinds = [(n, v) for n, w, v in _fields(feature) if n in (1, 2, 3) and w == _BYTES]
            features[name] = _values(*kinds[-1]) if kinds else []
    return features
