"""The one wire format for everything that crosses the cut between device and server.

Activations go upstream (training and inference), gradients downstream (training). Both travel as
a *payload*: the k selected channels of a (N, H, W, C') bottleneck tensor, their channel indices,
optionally the training labels, and the values in a wire dtype (float32, float16 or int8). Every
byte count the project reports is `len(encode(...))`, or `payload_nbytes(...)`, which a test proves
equal to it for every shape, dtype and kind.

Layout (little-endian, no padding, no compression, no pickle):

    offset  size  field
    0       4     magic b"TFSP"
    4       1     format version (u8), currently 1
    5       1     kind (u8): 1 activations, 2 gradients
    6       1     dtype (u8): 1 float32, 2 float16, 3 int8
    7       1     flags (u8): bit0 = labels present, bit1 = all channels (k == C', no indices);
                  all other bits must be 0
    8       4     N, batch size (u32)
    12      2     H (u16)
    14      2     W (u16)
    16      2     channels C', total bottleneck width (u16)
    18      2     k, selected channel count (u16)
    20      4     scale (f32)        -- int8 only
    24      4     zero_point (i32)   -- int8 only
    then    2k    indices (u16 x k), in the order given by the sender; absent when bit1 is set
    then    4N    labels (i32 x N), only when flag bit0 is set
    then          values (N*H*W*k elements of the wire dtype, C order, channels last)

So a payload is 20 bytes of header (28 for int8) + 2k + 4N (with labels) + N*H*W*k*itemsize,
without the 2k when every channel is sent (k == C'): then the values are put in channel order and
the indices are implied, so plain split learning pays for no index list it does not need.
Codes start at 1 so that a zeroed buffer never decodes as a valid payload.

int8 is asymmetric affine quantization with one scale and zero point per payload:
`real = scale * (q - zero_point)`, `q in [-128, 127]`. With `lo = min(min(x), 0)` and
`hi = max(max(x), 0)` (the range always holds 0, so 0 is sent exactly):

    scale = float32((hi - lo) / 255)                      computed in float64
    scale = 1.0 if scale < 2 * float32_tiny               degenerate range, e.g. all zeros
    zero_point = clip(round(-128 - lo / scale), -128, 127)   computed in float64
    q = clip(round(x / scale) + zero_point, -128, 127)       computed in float32

`round` is round-half-to-even in numpy and TensorFlow alike. Subnormal float32 inputs are flushed
to zero first, because TensorFlow's CPU kernels flush them anyway; with that and the scale floor,
`fake_quantize` (TensorFlow, used inside the compiled training step) and the numpy path agree bit
for bit, and every value comes back within scale / 2.
"""

import collections
import dataclasses
import struct

import numpy as np
import tensorflow as tf

WIRE_DTYPES = ("float32", "float16", "int8")
KINDS = ("activations", "gradients")

MAGIC = b"TFSP"
FORMAT_VERSION = 1
FLAG_LABELS = 0x01
FLAG_ALL_CHANNELS = 0x02

_HEADER = struct.Struct("<4sBBBBIHHHH")
_INT8_PARAMS = struct.Struct("<fi")
HEADER_NBYTES = _HEADER.size
INT8_PARAMS_NBYTES = _INT8_PARAMS.size

_KIND_CODES = {"activations": 1, "gradients": 2}
_DTYPE_CODES = {"float32": 1, "float16": 2, "int8": 3}
_KIND_NAMES = {code: name for name, code in _KIND_CODES.items()}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}
_WIRE_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
_INDEX_WIRE = np.dtype("<u2")
_LABEL_WIRE = np.dtype("<i4")

_U16_MAX = 2**16 - 1
_U32_MAX = 2**32 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT8_MIN, _INT8_MAX = -128, 127
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT32_TINY = np.finfo(np.float32).tiny
# Keeps scale / 2 a normal float32 no smaller than any flushed subnormal, so the scale / 2 error
# bound holds and TensorFlow's flush-to-zero arithmetic cannot disagree with numpy.
_MIN_INT8_SCALE = np.float32(2 * _FLOAT32_TINY)


class PayloadError(ValueError):
    """A payload (or the arguments to build one) is malformed; says what was expected and found."""


@dataclasses.dataclass(frozen=True, eq=False)
class Payload:
    """One decoded payload, values still in their wire dtype.

    Attributes:
      kind: "activations" or "gradients".
      dtype: wire dtype, one of WIRE_DTYPES.
      channels: total channel count C' of the bottleneck; every index is below it.
      indices: (k,) int32 selected channel indices, in the order the sender gave them.
      values: (N, H, W, k) values as on the wire: float32, float16 or int8.
      scale: int8 scale (1.0 for float dtypes).
      zero_point: int8 zero point (0 for float dtypes).
      labels: (N,) int32 labels of a training activations payload, else None.
    """

    kind: str
    dtype: str
    channels: int
    indices: np.ndarray
    values: np.ndarray
    scale: float = 1.0
    zero_point: int = 0
    labels: np.ndarray | None = None

    def dequantized(self):
        """Returns the (N, H, W, k) values as float32, what the receiver computes with."""
        return dequantize(self.values, self.scale, self.zero_point)

    def scatter(self):
        """Returns (N, H, W, channels) float32: the k channels at their indices, zeros elsewhere.

        This is the tensor the server's decoder (or the device's head, for gradients) consumes.
        """
        batch, height, width, _ = self.values.shape
        full = np.zeros((batch, height, width, self.channels), np.float32)
        full[..., self.indices] = self.dequantized()
        return full


_Header = collections.namedtuple(
    "_Header",
    "kind dtype has_labels all_channels batch height width channels k scale zero_point offset",
)


def _summary(array):
    return np.array2string(np.asarray(array), threshold=8, edgeitems=3)


def _check_choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise PayloadError(f"`{name}` must be one of {allowed}. Received: {name}={value!r}")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_count(name, value, maximum):
    """Checks a size field: an integer in [1, maximum] (the header field's range)."""
    if not _is_int(value) or not 1 <= value <= maximum:
        raise PayloadError(
            f"`{name}` must be an integer in [1, {maximum}]. Received: {name}={value!r}"
        )
    return int(value)


def _check_scale(scale):
    """Returns the int8 scale as the float32 the wire carries; it must be finite and > 0."""
    try:
        with np.errstate(over="ignore"):
            scale32 = np.float32(scale)
    except (TypeError, ValueError) as error:
        raise PayloadError(f"`scale` must be a number. Received: scale={scale!r}") from error
    if not np.isfinite(scale32) or scale32 <= 0:
        raise PayloadError(
            f"int8 `scale` must be finite and > 0 as a float32. Received: scale={scale!r}"
        )
    return scale32


def _check_zero_point(zero_point):
    if not _is_int(zero_point) or not _INT8_MIN <= zero_point <= _INT8_MAX:
        raise PayloadError(
            f"int8 `zero_point` must be an integer in [{_INT8_MIN}, {_INT8_MAX}]. "
            f"Received: zero_point={zero_point!r}"
        )
    return int(zero_point)


def _finite_float32(values):
    """Casts to float32, refusing non-numeric input and NaN/inf (a NaN must never be sent)."""
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise PayloadError(
            f"`values` must be a real numeric array. Received: values.dtype={array.dtype}"
        )
    if array.size == 0:
        raise PayloadError(f"`values` must not be empty. Received: values.shape={array.shape}")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        raise PayloadError(
            f"`values` must be finite float32 numbers; found {array.size - finite.sum()} NaN/inf "
            f"(or beyond float32 range). Received: values={_summary(array)}"
        )
    return array


def _int8_params(lo, hi):
    """Scale and zero point for the range [lo, hi] (lo <= 0 <= hi); see the module docstring."""
    lo64 = np.float64(lo)
    scale = np.float32((np.float64(hi) - lo64) / 255.0)
    if scale < _MIN_INT8_SCALE:
        scale = np.float32(1.0)
    zero_point = np.clip(np.rint(-128.0 - lo64 / np.float64(scale)), _INT8_MIN, _INT8_MAX)
    return scale, int(zero_point)


def _quantize_int8(x):
    x = np.where(np.abs(x) < _FLOAT32_TINY, np.float32(0.0), x)
    scale, zero_point = _int8_params(min(x.min(), 0.0), max(x.max(), 0.0))
    q = np.clip(np.rint(x / scale) + np.float32(zero_point), _INT8_MIN, _INT8_MAX)
    return q.astype(np.int8), float(scale), zero_point


def quantize(values, dtype):
    """Converts real values to a wire dtype.

    Args:
      values: real array of any shape, not empty, all finite.
      dtype: one of WIRE_DTYPES. float32/float16 are casts; int8 is the per-payload affine scheme
        of the module docstring.

    Returns:
      (wire_values, scale, zero_point): the array in the wire dtype, a Python float scale (exactly
      a float32) and a Python int zero point; (1.0, 0) for float dtypes.

    Raises:
      PayloadError: unknown dtype, non-numeric or empty values, NaN/inf, or values that overflow
        float16.
    """
    _check_choice("dtype", dtype, WIRE_DTYPES)
    x = _finite_float32(values)
    if dtype == "float32":
        return x, 1.0, 0
    if dtype == "int8":
        return _quantize_int8(x)
    with np.errstate(over="ignore"):
        wire = x.astype(np.float16)
    if not np.isfinite(wire).all():
        raise PayloadError(
            f"`values` must lie within float16 range (|x| <= {_FLOAT16_MAX}) to be sent as "
            f"float16. Received: max |value|={float(np.abs(x).max())!r}"
        )
    return wire, 1.0, 0


def dequantize(wire_values, scale, zero_point):
    """Returns the float32 values a wire array stands for: scale * (q - zero_point) for int8.

    Args:
      wire_values: float32, float16 or int8 array.
      scale: int8 scale (finite, > 0); must be 1.0 for float arrays.
      zero_point: int8 zero point in [-128, 127]; must be 0 for float arrays.

    Raises:
      PayloadError: unsupported array dtype or quantization parameters that do not fit it.
    """
    wire = np.asarray(wire_values)
    if wire.dtype == np.int8:
        scale32 = _check_scale(scale)
        return (wire.astype(np.float32) - np.float32(_check_zero_point(zero_point))) * scale32
    if wire.dtype not in (np.float32, np.float16):
        raise PayloadError(
            f"`wire_values` must be float32, float16 or int8. Received: dtype={wire.dtype}"
        )
    if scale != 1.0 or zero_point != 0:
        raise PayloadError(
            "Float wire values carry no quantization: expected scale=1.0 and zero_point=0. "
            f"Received: scale={scale!r}, zero_point={zero_point!r}"
        )
    return wire.astype(np.float32)


def _check_values_shape(shape):
    if len(shape) != 4:
        raise PayloadError(
            f"`values` must have rank 4 (N, H, W, k). Received: values.shape={shape}"
        )
    for name, size, maximum in zip("NHWk", shape, (_U32_MAX, _U16_MAX, _U16_MAX, _U16_MAX)):
        if not 1 <= size <= maximum:
            raise PayloadError(
                f"`values` dimension {name} must be in [1, {maximum}]. "
                f"Received: values.shape={shape}"
            )


def _check_unique_indices(indices, what):
    unique, counts = np.unique(indices, return_counts=True)
    if unique.size != indices.size:
        raise PayloadError(
            f"{what} must be distinct; channel {int(unique[counts > 1][0])} appears more than "
            f"once. Received: indices={_summary(indices)}"
        )


def _check_indices(indices, channels, k):
    array = np.asarray(indices)
    if array.ndim != 1 or array.shape[0] != k or not np.issubdtype(array.dtype, np.integer):
        raise PayloadError(
            f"`indices` must be a 1-D integer array of length k={k} (the last dim of values). "
            f"Received: indices.shape={array.shape}, indices.dtype={array.dtype}"
        )
    if array.min() < 0 or array.max() >= channels:
        raise PayloadError(
            f"`indices` must lie in [0, channels={channels}). Received: indices={_summary(array)}"
        )
    _check_unique_indices(array, "`indices`")
    return array


def _check_labels(labels, kind, batch):
    if labels is None:
        return None
    if kind != "activations":
        raise PayloadError(f"Only activations payloads carry labels. Received: kind={kind!r}")
    array = np.asarray(labels)
    if array.shape != (batch,) or not np.issubdtype(array.dtype, np.integer):
        raise PayloadError(
            f"`labels` must be a 1-D integer array of length N={batch}. "
            f"Received: labels.shape={array.shape}, labels.dtype={array.dtype}"
        )
    if array.min() < _INT32_MIN or array.max() > _INT32_MAX:
        raise PayloadError(f"`labels` must fit in int32. Received: labels={_summary(array)}")
    return array


def _wire_values(values, dtype, scale, zero_point):
    """Quantizes float values, or passes through int8 values already quantized by the sender."""
    given = scale is not None, zero_point is not None
    if values.dtype == np.int8 or any(given):
        if dtype != "int8" or values.dtype != np.int8 or not all(given):
            raise PayloadError(
                "Pre-quantized values must be an int8 array sent with dtype='int8' and both "
                f"`scale` and `zero_point`. Received: values.dtype={values.dtype}, "
                f"dtype={dtype!r}, scale={scale!r}, zero_point={zero_point!r}"
            )
        return values, float(_check_scale(scale)), _check_zero_point(zero_point)
    return quantize(values, dtype)


def _nbytes(batch, height, width, k, dtype, with_labels, index_count):
    """The size formula; plain arithmetic, so ints and int64 tensors both go through it."""
    params = INT8_PARAMS_NBYTES if dtype == "int8" else 0
    indices = index_count * _INDEX_WIRE.itemsize
    labels = batch * _LABEL_WIRE.itemsize if with_labels else 0
    values = batch * height * width * k * _WIRE_NUMPY[dtype].itemsize
    return HEADER_NBYTES + params + indices + labels + values


def payload_nbytes(batch, height, width, k, dtype, with_labels, channels=None):
    """Exact length of `encode(...)` for these shapes, without encoding.

    The trainer's byte ledger calls this on the hot path; tests prove it equals the encoded length.

    Args:
      batch, height, width, k: the (N, H, W, k) shape of the sent values.
      dtype: wire dtype, one of WIRE_DTYPES.
      with_labels: whether the payload carries labels (training activations).
      channels: the bottleneck width C'; when k == channels no index list is sent. None means
        k < C' (a selection, indices sent).

    Raises:
      PayloadError: a size outside its header field's range, unknown dtype, non-bool with_labels.
    """
    batch = _check_count("batch", batch, _U32_MAX)
    height = _check_count("height", height, _U16_MAX)
    width = _check_count("width", width, _U16_MAX)
    k = _check_count("k", k, _U16_MAX)
    _check_choice("dtype", dtype, WIRE_DTYPES)
    if not isinstance(with_labels, (bool, np.bool_)):
        raise PayloadError(f"`with_labels` must be a bool. Received: with_labels={with_labels!r}")
    if channels is not None:
        channels = _check_count("channels", channels, _U16_MAX)
        if k > channels:
            raise PayloadError(f"`k` must be <= channels. Received: k={k}, channels={channels}")
    return _nbytes(batch, height, width, k, dtype, bool(with_labels), 0 if k == channels else k)


def payload_nbytes_tensor(batch, k, height, width, dtype, with_labels, channels):
    """`payload_nbytes` as int64 tensor ops, for a compiled step whose batch and k are tensors.

    No checks: the caller's shapes come from a built model, and the eager `payload_nbytes` is the
    one that validates.
    """
    batch, k = tf.cast(batch, tf.int64), tf.cast(k, tf.int64)
    index_count = tf.where(k == channels, tf.constant(0, tf.int64), k)
    return _nbytes(batch, height, width, k, dtype, with_labels, index_count)


def encode(
    values,
    indices,
    channels,
    dtype,
    kind="activations",
    labels=None,
    scale=None,
    zero_point=None,
):
    """Serialises the selected channels of a bottleneck tensor into one payload.

    Args:
      values: (N, H, W, k) real array, quantized here to `dtype`; or an int8 array already
        quantized (a TFLite int8 head's output), sent as is with the given scale and zero_point.
      indices: (k,) distinct channel indices in [0, channels), values[..., i] is channel
        indices[i]. Their order is kept.
      channels: total bottleneck width C', in [1, 65535].
      dtype: wire dtype, one of WIRE_DTYPES.
      kind: "activations" or "gradients".
      labels: optional (N,) integer labels (activations only), sent as int32.
      scale, zero_point: quantization of pre-quantized int8 values; both or neither.

    Returns:
      The payload bytes; their length is what the project counts as sent.

    Raises:
      PayloadError: any argument that the layout cannot carry faithfully (see the checks).
    """
    _check_choice("kind", kind, KINDS)
    _check_choice("dtype", dtype, WIRE_DTYPES)
    channels = _check_count("channels", channels, _U16_MAX)
    values = np.asarray(values)
    _check_values_shape(values.shape)
    batch, height, width, k = values.shape
    indices = _check_indices(indices, channels, k)
    labels = _check_labels(labels, kind, batch)
    wire, scale, zero_point = _wire_values(values, dtype, scale, zero_point)
    all_channels = k == channels
    if all_channels:  # channel order, so the indices need not be sent.
        wire = wire[..., np.argsort(indices)]
    flags = (FLAG_LABELS if labels is not None else 0) | (FLAG_ALL_CHANNELS if all_channels else 0)
    codes = FORMAT_VERSION, _KIND_CODES[kind], _DTYPE_CODES[dtype], flags
    parts = [_HEADER.pack(MAGIC, *codes, batch, height, width, channels, k)]
    if dtype == "int8":
        parts.append(_INT8_PARAMS.pack(scale, zero_point))
    if not all_channels:
        parts.append(indices.astype(_INDEX_WIRE).tobytes())
    if labels is not None:
        parts.append(labels.astype(_LABEL_WIRE).tobytes())
    parts.append(wire.astype(_WIRE_NUMPY[dtype], copy=False).tobytes())
    return b"".join(parts)


def _read_code(name, code, names):
    if code not in names:
        raise PayloadError(f"Unknown {name} code: expected one of {sorted(names)}, found {code}.")
    return names[code]


def _read_header(data):
    """Parses and checks the fixed-size header (and int8 parameters) of a payload."""
    if len(data) < HEADER_NBYTES:
        raise PayloadError(
            f"Payload too short for its header: expected at least {HEADER_NBYTES} bytes, "
            f"found {len(data)}."
        )
    magic, version, kind, dtype, flags, *sizes = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"Bad magic: expected {MAGIC!r}, found {magic!r}.")
    if version != FORMAT_VERSION:
        raise PayloadError(f"Unknown format version: expected {FORMAT_VERSION}, found {version}.")
    kind = _read_code("kind", kind, _KIND_NAMES)
    dtype = _read_code("dtype", dtype, _DTYPE_NAMES)
    if flags & ~(FLAG_LABELS | FLAG_ALL_CHANNELS):
        raise PayloadError(
            f"Unknown flag bits: expected only bit0 (labels) and bit1 (all channels), "
            f"found {flags:#04x}."
        )
    scale, zero_point, offset = 1.0, 0, HEADER_NBYTES
    if dtype == "int8":
        if len(data) < HEADER_NBYTES + INT8_PARAMS_NBYTES:
            raise PayloadError(
                f"Truncated int8 payload: expected at least {HEADER_NBYTES + INT8_PARAMS_NBYTES} "
                f"bytes for header and quantization, found {len(data)}."
            )
        scale, zero_point = _INT8_PARAMS.unpack_from(data, HEADER_NBYTES)
        offset += INT8_PARAMS_NBYTES
    return _Header(kind, dtype, bool(flags & FLAG_LABELS), bool(flags & FLAG_ALL_CHANNELS), *sizes,
                   scale, zero_point, offset)


def _check_header(header, expect_kind, expect_dtype, max_channels):
    """Checks header fields against each other and against what the receiver expects."""
    if expect_kind is not None and header.kind != expect_kind:
        raise PayloadError(f"Unexpected kind: expected {expect_kind!r}, found {header.kind!r}.")
    if expect_dtype is not None and header.dtype != expect_dtype:
        raise PayloadError(f"Unexpected dtype: expected {expect_dtype!r}, found {header.dtype!r}.")
    for name in ("batch", "height", "width", "channels"):
        if getattr(header, name) == 0:
            raise PayloadError(f"Empty payload: expected {name} >= 1, found 0.")
    if not 1 <= header.k <= header.channels:
        raise PayloadError(
            f"Bad channel count: expected 1 <= k <= channels={header.channels}, found k={header.k}."
        )
    if max_channels is not None and header.channels > max_channels:
        raise PayloadError(
            f"Too many channels: expected at most {max_channels}, found {header.channels}."
        )
    if header.all_channels != (header.k == header.channels):
        raise PayloadError(
            f"Inconsistent all-channels flag: expected it set exactly when k == channels, found "
            f"flag={header.all_channels} with k={header.k}, channels={header.channels}."
        )
    if header.has_labels and header.kind != "activations":
        raise PayloadError(f"Labels are only allowed on activations, found them on {header.kind}.")
    if header.dtype == "int8":
        if not np.isfinite(header.scale) or header.scale <= 0:
            raise PayloadError(f"Bad int8 scale: expected finite and > 0, found {header.scale}.")
        if not _INT8_MIN <= header.zero_point <= _INT8_MAX:
            raise PayloadError(
                f"Bad int8 zero point: expected in [{_INT8_MIN}, {_INT8_MAX}], "
                f"found {header.zero_point}."
            )


def _read_body(data, header):
    """Reads indices, labels and values; the total length was already checked."""
    offset = header.offset
    if header.all_channels:
        indices = np.arange(header.channels, dtype=np.int32)
    else:
        indices = np.frombuffer(data, _INDEX_WIRE, header.k, offset).astype(np.int32)
        offset += indices.size * _INDEX_WIRE.itemsize
    if indices.max() >= header.channels:
        raise PayloadError(
            f"Index out of range: expected every index < channels={header.channels}, "
            f"found {int(indices.max())}."
        )
    _check_unique_indices(indices, "Payload indices")
    labels = None
    if header.has_labels:
        labels = np.frombuffer(data, _LABEL_WIRE, header.batch, offset).astype(np.int32)
        offset += labels.size * _LABEL_WIRE.itemsize
    shape = (header.batch, header.height, header.width, header.k)
    wire = _WIRE_NUMPY[header.dtype]
    values = np.frombuffer(data, wire, int(np.prod(shape)), offset).reshape(shape)
    values = values.astype(wire.newbyteorder("="), copy=False)
    if header.dtype != "int8" and not np.isfinite(values).all():
        raise PayloadError(f"Non-finite values: expected finite {header.dtype}, found NaN/inf.")
    return indices, labels, values


def decode(data, expect_kind=None, expect_dtype=None, max_channels=None):
    """Parses and validates one payload.

    Args:
      data: the payload bytes (bytes, bytearray or memoryview).
      expect_kind: if given, the kind the receiver accepts.
      expect_dtype: if given, the wire dtype the receiver accepts.
      max_channels: if given, the largest bottleneck width the receiver accepts.

    Returns:
      A Payload; its `values` are a read-only view of the bytes, not a copy.

    Raises:
      PayloadError: the bytes are not a well-formed payload or not the one expected; the message
        says what was expected and what was found.
    """
    if expect_kind is not None:
        _check_choice("expect_kind", expect_kind, KINDS)
    if expect_dtype is not None:
        _check_choice("expect_dtype", expect_dtype, WIRE_DTYPES)
    if max_channels is not None:
        _check_count("max_channels", max_channels, _U16_MAX)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"`data` must be bytes. Received: type={type(data).__name__}")
    data = bytes(data)
    header = _read_header(data)
    _check_header(header, expect_kind, expect_dtype, max_channels)
    expected = _nbytes(header.batch, header.height, header.width, header.k, header.dtype,
                       header.has_labels, 0 if header.all_channels else header.k)
    if len(data) < expected:
        raise PayloadError(f"Truncated payload: expected {expected} bytes, found {len(data)}.")
    if len(data) > expected:
        raise PayloadError(f"Trailing bytes: expected {expected} bytes, found {len(data)}.")
    indices, labels, values = _read_body(data, header)
    return Payload(
        kind=header.kind,
        dtype=header.dtype,
        channels=header.channels,
        indices=indices,
        values=values,
        scale=float(header.scale),
        zero_point=int(header.zero_point),
        labels=labels,
    )


def _fake_quantize_int8(x):
    """TensorFlow mirror of `_quantize_int8` then `dequantize`, op for op."""
    x = tf.where(tf.abs(x) < _FLOAT32_TINY, tf.zeros_like(x), x)
    lo = tf.cast(tf.minimum(tf.reduce_min(x), 0.0), tf.float64)
    hi = tf.cast(tf.maximum(tf.reduce_max(x), 0.0), tf.float64)
    scale = tf.cast((hi - lo) / 255.0, tf.float32)
    scale = tf.where(scale < _MIN_INT8_SCALE, tf.constant(1.0, tf.float32), scale)
    zero_point = tf.round(-128.0 - lo / tf.cast(scale, tf.float64))
    zero_point = tf.cast(tf.clip_by_value(zero_point, _INT8_MIN, _INT8_MAX), tf.float32)
    q = tf.clip_by_value(tf.round(x / scale) + zero_point, _INT8_MIN, _INT8_MAX)
    return (q - zero_point) * scale


def fake_quantize(x, dtype):
    """The float32 values `decode(encode(x))` would give, as TensorFlow ops.

    Lets a compiled training step see exactly what the receiver will see without leaving the
    graph. Only the forward op: it has no useful gradient, so a caller that trains through it wraps
    it in a straight-through estimator. It does not check values for NaN/inf (that would need a
    graph assert on the hot path); `encode` does.

    Args:
      x: floating tensor of any shape (one payload: int8 statistics cover the whole tensor).
      dtype: wire dtype, a Python string from WIRE_DTYPES.

    Returns:
      float32 tensor shaped like x.

    Raises:
      PayloadError: unknown dtype or a non-floating x.
    """
    _check_choice("dtype", dtype, WIRE_DTYPES)
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise PayloadError(f"`x` must be a floating tensor. Received: x.dtype={x.dtype.name}")
    x = tf.cast(x, tf.float32)
    if dtype == "float16":
        return tf.cast(tf.cast(x, tf.float16), tf.float32)
    if dtype == "int8":
        return _fake_quantize_int8(x)
    return x
