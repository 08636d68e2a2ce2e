"""PredictRequest / PredictResponse of TF Serving in protobuf wire format, without TensorFlow.

`tensorflow_serving.apis.predict_pb2` imports `tensorflow.core.framework.tensor_pb2`, and importing
anything under `tensorflow.` runs TensorFlow's own `__init__`: the whole framework. A device that
has only `grpcio` writes the few messages it needs by hand instead. Field numbers, from
tensorflow_serving/apis/{predict,model}.proto and tensorflow/core/framework/{tensor,
tensor_shape,types}.proto:

    PredictRequest   1 model_spec (ModelSpec)   2 inputs (map<string, TensorProto>)
    PredictResponse  1 outputs (map<string, TensorProto>)   2 model_spec
    ModelSpec        1 name   2 version (google.protobuf.Int64Value, field 1)   3 signature_name
    TensorProto      1 dtype (enum)   2 tensor_shape   4 tensor_content   5 float_val
    TensorShapeProto 2 dim (repeated Dim)   Dim: 1 size
    map entry        1 key   2 value

Tensors are sent as raw little-endian `tensor_content`, as `tfsplit.serving` sends them; answers
are read from `tensor_content` or `float_val` (TF Serving uses either).
"""

import numpy as np

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
DATA_TYPES = {"float32": 1, "int32": 3, "int8": 6, "float16": 19}  # numpy name -> DataType enum
_NUMPY = {enum: np.dtype(name).newbyteorder("<") for name, enum in DATA_TYPES.items()}


class ProtoError(ValueError):
    """A message that cannot be read as the PredictResponse it should be."""


def _varint(value):
    """Base-128 varint; negative int64 values take ten bytes, as in protobuf."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field, wire_type):
    return _varint(field << 3 | wire_type)


def _length_field(field, data):
    return _tag(field, _LENGTH) + _varint(len(data)) + data


def _varint_field(field, value):
    return _tag(field, _VARINT) + _varint(value) if value else b""


def tensor_proto(array):
    """A TensorProto of a float32/float16/int8/int32 array, its elements as `tensor_content`."""
    array = np.asarray(array)
    if array.dtype.name not in DATA_TYPES:
        raise ProtoError(
            f"Unsupported dtype: expected one of {sorted(DATA_TYPES)}. Received: {array.dtype}"
        )
    dtype = DATA_TYPES[array.dtype.name]
    dims = b"".join(_length_field(2, _varint_field(1, size)) for size in array.shape)
    content = np.ascontiguousarray(array, _NUMPY[dtype]).tobytes()
    shape = _length_field(2, dims) if array.ndim else b""
    return _varint_field(1, dtype) + shape + (_length_field(4, content) if content else b"")


def predict_request(model_name, inputs, signature="serving_default", version=None):
    """Serialized PredictRequest; map entries sorted by key, like deterministic serialization.

    Args:
      model_name: the served model.
      inputs: dict input name -> numpy array.
      signature: the signature key.
      version: a model version, or None for the latest.
    """
    spec = _length_field(1, model_name.encode())
    if version is not None:
        spec += _length_field(2, _varint_field(1, int(version)))
    spec += _length_field(3, signature.encode())
    entries = b"".join(
        _length_field(2, _length_field(1, name.encode()) + _length_field(2, tensor_proto(array)))
        for name, array in sorted(inputs.items())
    )
    return _length_field(1, spec) + entries


def _read_varint(data, offset):
    value, shift = 0, 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ProtoError("Truncated or overlong varint.")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def _packed_varints(data):
    values, offset = [], 0
    while offset < len(data):
        value, offset = _read_varint(data, offset)
        values.append(value)
    return values


def fields(data):
    """Yields (field number, wire type, value) of a message: ints, or bytes for lengths/fixed."""
    offset, sizes = 0, {_FIXED64: 8, _FIXED32: 4}
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, offset = _read_varint(data, offset)
        elif wire_type in sizes or wire_type == _LENGTH:
            size = sizes.get(wire_type)
            if size is None:
                size, offset = _read_varint(data, offset)
            if offset + size > len(data):
                raise ProtoError(f"Field {field} runs past the end of the message.")
            value, offset = bytes(data[offset : offset + size]), offset + size
        else:
            raise ProtoError(f"Unsupported wire type {wire_type} in field {field}.")
        yield field, wire_type, value


def _shape(data):
    shape = []
    for field, _, dim in fields(data):
        if field == 2:
            sizes = [value for number, _, value in fields(dim) if number == 1]
            shape.append(sizes[-1] if sizes else 0)
    return tuple(shape)


def read_tensor(data):
    """A serialized TensorProto -> numpy array (dtypes of DATA_TYPES; content, float_val or
    half_val)."""
    dtype, shape, content, floats, halves = None, (), None, [], []
    for field, wire_type, value in fields(data):
        if field == 1:
            dtype = value
        elif field == 2:
            shape = _shape(value)
        elif field == 4:
            content = value
        elif field == 5:  # float_val: packed (length) or one fixed32 per element
            floats.append(np.frombuffer(value, "<f4"))
        elif field == 13:  # half_val: float16 bit patterns as varints, packed or one each
            halves += [value] if wire_type == _VARINT else _packed_varints(value)
    if dtype not in _NUMPY:
        raise ProtoError(f"Unsupported tensor DataType {dtype}; expected {sorted(DATA_TYPES)}.")
    count = int(np.prod(shape, dtype=np.int64))
    if content is not None:
        array = np.frombuffer(content, _NUMPY[dtype])
    elif dtype == DATA_TYPES["float32"]:
        array = np.concatenate(floats) if floats else np.zeros(0, np.float32)
    elif dtype == DATA_TYPES["float16"]:  # TF Serving answers float16 in half_val
        array = np.asarray(halves, np.uint16).view(np.float16)
    else:
        raise ProtoError(f"A DataType {dtype} tensor must carry tensor_content.")
    if array.size != count:
        raise ProtoError(f"The tensor declares shape {shape} but holds {array.size} elements.")
    return array.reshape(shape).astype(_NUMPY[dtype].newbyteorder("="))


def read_outputs(data):
    """A serialized PredictResponse -> dict output name -> numpy array."""
    outputs = {}
    for field, _, entry in fields(data):
        if field != 1:
            continue
        parts = {number: value for number, _, value in fields(entry)}
        outputs[parts.get(1, b"").decode()] = read_tensor(parts.get(2, b""))
    return outputs
