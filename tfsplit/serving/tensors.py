"""TensorProto and JSON <-> numpy conversions, strict, for both ends of TF Serving's protocols.

A TensorProto holds its elements either as raw little-endian bytes (`tensor_content`) or in a
typed repeated field (`float_val`; `half_val` holding float16 bit patterns as ints; `int_val` for
int8 and int32). TF Serving and `tf.make_tensor_proto` use both, so a reader must handle both; a
server must also refuse content that does not match the declared shape, which `tf.make_ndarray`
would either pad silently or fail on with an unhelpful reshape error.

REST JSON carries plain numbers for every numeric dtype (base64 is for strings only), so the
receiver decides the dtype from the signature and checks that the numbers fit it.
"""

import math

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

# The dtypes a tail signature uses (the three wire dtypes and int32 for indices and zero point),
# each with its numpy dtype and the typed field a TensorProto keeps its values in.
_NUMPY_DTYPES = {
    tf.float32.as_datatype_enum: (np.dtype("<f4"), "float_val"),
    tf.float16.as_datatype_enum: (np.dtype("<f2"), "half_val"),
    tf.int8.as_datatype_enum: (np.dtype("i1"), "int_val"),
    tf.int32.as_datatype_enum: (np.dtype("<i4"), "int_val"),
}
_INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.int32): (-(2**31), 2**31 - 1)}
_TYPED_FIELDS = ("float_val", "half_val", "int_val", "double_val", "int64_val", "string_val")


class TensorDecodeError(ValueError):
    """A TensorProto or JSON value cannot be read as the tensor it claims (or is required) to be."""


def dtype_name(enum):
    """Readable name of a DataType enum (e.g. 'float16') for error messages."""
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"DataType enum {enum}"


def to_tensor_proto(array):
    """Packs a float32/float16/int8/int32 array as a TensorProto with raw `tensor_content`.

    Raw little-endian bytes are what TF Serving reads most cheaply and the most compact encoding
    for all of these dtypes (a typed field costs a varint or more per element).
    """
    array = np.asarray(array)
    try:
        enum = tf.dtypes.as_dtype(array.dtype).as_datatype_enum
    except TypeError:
        enum = None
    if enum not in _NUMPY_DTYPES:
        raise TensorDecodeError(
            "Unsupported dtype: expected float32, float16, int8 or int32. "
            f"Received: dtype={array.dtype}"
        )
    proto = tensor_pb2.TensorProto(dtype=enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_content = np.ascontiguousarray(array, _NUMPY_DTYPES[enum][0]).tobytes()
    return proto


def _typed_values(proto, dtype):
    """The elements held in this dtype's typed repeated field, as a numpy array."""
    if dtype == np.float32:
        return np.asarray(proto.float_val, np.float32)
    if dtype == np.float16:
        bits = np.asarray(proto.half_val, np.int64)
        if bits.size and (bits.min() < 0 or bits.max() > 0xFFFF):
            raise TensorDecodeError("`half_val` must hold 16-bit patterns in [0, 65535].")
        return bits.astype(np.uint16).view(np.float16)
    values = np.asarray(proto.int_val, np.int64)
    low, high = _INT_RANGES[np.dtype(dtype.type)]
    if values.size and (values.min() < low or values.max() > high):
        raise TensorDecodeError(
            f"`int_val` holds numbers outside the {dtype.name} range [{low}, {high}]."
        )
    return values.astype(dtype)


def _from_content(content, dtype, shape, count):
    expected = count * dtype.itemsize
    if len(content) != expected:
        raise TensorDecodeError(
            f"`tensor_content` has {len(content)} bytes, expected {expected} for shape {shape} of "
            f"{dtype.name} (truncated or padded content)."
        )
    return np.frombuffer(content, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def from_tensor_proto(proto, max_elements=None):
    """Reads a TensorProto of a supported dtype into a numpy array, checking its element count.

    Args:
      proto: a `tensorflow.TensorProto`.
      max_elements: if given, refuse larger tensors before allocating them.

    Returns:
      A numpy array of the declared shape and dtype, in native byte order.

    Raises:
      TensorDecodeError: unsupported dtype, unknown or negative shape, `tensor_content` whose
        length is not elements x itemsize, a typed field whose count is not the element count, or
        elements in a field that does not belong to the dtype.
    """
    if proto.dtype not in _NUMPY_DTYPES:
        raise TensorDecodeError(
            f"Unsupported tensor dtype {dtype_name(proto.dtype)}: expected float32, float16, int8 "
            "or int32."
        )
    dtype, own = _NUMPY_DTYPES[proto.dtype]
    if proto.tensor_shape.unknown_rank:
        raise TensorDecodeError("The tensor declares an unknown rank; expected a known shape.")
    shape = tuple(int(dim.size) for dim in proto.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise TensorDecodeError(
            f"The tensor declares a negative dimension. Received: shape={shape}"
        )
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise TensorDecodeError(
            f"The tensor is too large: {count} elements, at most {max_elements} accepted. "
            f"Received: shape={shape}"
        )
    filled = [name for name in _TYPED_FIELDS if len(getattr(proto, name))]
    if proto.tensor_content:
        if filled:
            raise TensorDecodeError(f"A tensor must not carry both `tensor_content` and {filled}.")
        return _from_content(proto.tensor_content, dtype, shape, count)
    if set(filled) - {own}:
        raise TensorDecodeError(f"A {dtype.name} tensor keeps its values in `{own}`, not {filled}.")
    values = _typed_values(proto, dtype)
    if values.size != count:
        raise TensorDecodeError(
            f"The tensor declares shape {shape} ({count} elements) but carries {values.size} "
            f"values in `{own}`."
        )
    return values.reshape(shape)


def _number_expected(value, dtype_name=None):
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    target = "" if dtype_name is None else f" for {dtype_name}"
    return TensorDecodeError(
        f"Expected JSON numbers (a number or nested lists of numbers){target}. Received: {text}"
    )


def json_shape(value):
    """The shape of a JSON number or nested list of numbers, read without building an array, so
    that it can be checked before any memory is taken for the values.

    Only the first element of the innermost lists is looked at; numpy checks the others when the
    array is built (`from_json`).

    Returns:
      The shape, as a tuple; () for a number.

    Raises:
      TensorDecodeError: lists of one level that differ in length or mix lists and numbers, or
        something other than a number where the numbers start.
    """
    shape, level = [], [value]
    while type(level[0]) is list:
        size = len(level[0])
        if any(type(item) is not list or len(item) != size for item in level):
            raise TensorDecodeError(
                f"Expected a rectangular nested list of numbers: the lists at depth {len(shape)} "
                "differ in length or mix lists and numbers."
            )
        shape.append(size)
        if size == 0:
            return tuple(shape)
        if type(level[0][0]) is not list:  # the numbers: not copied into one more list
            level = level[0]
            break
        level = [item for items in level for item in items]
    if type(level[0]) not in (int, float):
        raise _number_expected(level[0])
    return tuple(shape)


def from_json(value, dtype, max_elements=None):
    """Reads a JSON number or nested list as an array of `dtype`, refusing what does not fit.

    Integer dtypes take only integral JSON numbers within range; float dtypes take any number that
    stays finite in the dtype (float16 overflow is an error, not an inf).

    Raises:
      TensorDecodeError: strings, objects, booleans, ragged lists, too many elements, or numbers
        that do not fit.
    """
    dtype = np.dtype(dtype)
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise TensorDecodeError(f"Expected a rectangular nested list of numbers: {error}") from None
    if max_elements is not None and array.size > max_elements:
        raise TensorDecodeError(
            f"The tensor is too large: {array.size} elements, at most {max_elements} accepted."
        )
    if array.size == 0:
        return array.astype(dtype)
    if array.dtype.kind not in "iuf":
        raise _number_expected(value, dtype.name)
    if dtype.kind == "i":
        if array.dtype.kind == "f":
            raise TensorDecodeError(f"Expected JSON integers for {dtype.name}; found non-integers.")
        low, high = _INT_RANGES[dtype]
        if array.min() < low or array.max() > high:
            raise TensorDecodeError(
                f"Expected integers in {dtype.name} range [{low}, {high}]. "
                f"Received: min={array.min()}, max={array.max()}"
            )
        return array.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype)
    if not np.isfinite(converted).all():
        raise TensorDecodeError(
            f"Expected finite numbers within {dtype.name} range; found NaN, inf or overflow."
        )
    return converted


def to_json(array):
    """A numpy array as JSON-ready plain numbers (nested lists, or a scalar for rank 0).

    `tolist()` gives Python floats equal to the float16/float32 elements, whose repr parses back to
    the same element exactly, so float16 and float32 values survive the JSON trip bit for bit.
    """
    return np.asarray(array).tolist()
