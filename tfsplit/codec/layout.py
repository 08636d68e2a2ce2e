"""The payload's bytes: `encode`, `decode` and `payload_nbytes`, numpy only.

A payload carries the k selected channels of an (N, H, W, C') bottleneck tensor in a wire dtype
(`tfsplit.codec.values`), their channel indices and, on training activations, the labels.
Little-endian, no padding, no compression, no pickle:

    offset  size  field
    0       4     magic b"TFSP"
    4       1     format version (u8), currently 1
    5       1     kind (u8): 1 activations, 2 gradients
    6       1     dtype (u8): 1 float32, 2 float16, 3 int8
    7       1     flags (u8): bit0 labels present, bit1 all channels (k == C'); other bits 0
    8       12    N (u32), H, W, C', k (u16 each)
    20      8     int8 only: scale (f32), zero_point (i32)
    then    2k    indices (u16 x k) in the sender's order; absent when bit1 is set
    then    4N    labels (i32 x N), only when bit0 is set
    then          values (N*H*W*k of the wire dtype, C order, channels last)

Codes start at 1 so that a zeroed buffer never decodes. When every channel is sent the values go
in channel order and the indices are implied, so plain split learning pays for no index list.
"""

import collections
import dataclasses
import struct

import numpy as np

from tfsplit.codec import values as values_lib
from tfsplit.codec.values import WIRE_DTYPES, PayloadError

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
        return values_lib.dequantize(self.values, self.scale, self.zero_point)

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


def check_unique_indices(indices, what):
    """Refuses a repeated channel: it would be scattered twice (or added twice by a one-hot).

    Raises:
      PayloadError: naming `what` and the first repeated channel.
    """
    unique, counts = np.unique(indices, return_counts=True)
    if unique.size != np.size(indices):
        raise PayloadError(
            f"{what} must be distinct; channel {int(unique[counts > 1][0])} appears more than "
            f"once. Received: indices={values_lib.summary(indices)}"
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
            f"`indices` must lie in [0, channels={channels}). "
            f"Received: indices={values_lib.summary(array)}"
        )
    check_unique_indices(array, "`indices`")
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
        raise PayloadError(
            f"`labels` must fit in int32. Received: labels={values_lib.summary(array)}"
        )
    return array


def _nbytes(batch, height, width, k, dtype, with_labels, index_count):
    """The one size formula; plain arithmetic, so ints and int64 tensors both go through it."""
    params = INT8_PARAMS_NBYTES if dtype == "int8" else 0
    indices = index_count * _INDEX_WIRE.itemsize
    labels = batch * _LABEL_WIRE.itemsize if with_labels else 0
    values = batch * height * width * k * _WIRE_NUMPY[dtype].itemsize
    return HEADER_NBYTES + params + indices + labels + values


def payload_nbytes(batch, height, width, k, dtype, with_labels, channels=None):
    """Exact length of `encode(...)` for these shapes, without encoding: the payload_bytes.

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
    batch = values_lib.check_count("batch", batch, _U32_MAX)
    height = values_lib.check_count("height", height, _U16_MAX)
    width = values_lib.check_count("width", width, _U16_MAX)
    k = values_lib.check_count("k", k, _U16_MAX)
    values_lib.check_choice("dtype", dtype, WIRE_DTYPES)
    if not isinstance(with_labels, (bool, np.bool_)):
        raise PayloadError(f"`with_labels` must be a bool. Received: with_labels={with_labels!r}")
    if channels is not None:
        channels = values_lib.check_count("channels", channels, _U16_MAX)
        if k > channels:
            raise PayloadError(f"`k` must be <= channels. Received: k={k}, channels={channels}")
    return _nbytes(batch, height, width, k, dtype, bool(with_labels), 0 if k == channels else k)


def encode(
    values, indices, channels, dtype, kind="activations", labels=None, scale=None, zero_point=None
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
      The payload bytes; their length is what the project counts as payload_bytes.

    Raises:
      PayloadError: any argument that the layout cannot carry faithfully (see the checks).
    """
    values_lib.check_choice("kind", kind, KINDS)
    values_lib.check_choice("dtype", dtype, WIRE_DTYPES)
    channels = values_lib.check_count("channels", channels, _U16_MAX)
    values = np.asarray(values)
    _check_values_shape(values.shape)
    batch, height, width, k = values.shape
    indices = _check_indices(indices, channels, k)
    labels = _check_labels(labels, kind, batch)
    wire, scale, zero_point = values_lib.wire_values(values, dtype, scale, zero_point)
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
    labels, all_channels = bool(flags & FLAG_LABELS), bool(flags & FLAG_ALL_CHANNELS)
    return _Header(kind, dtype, labels, all_channels, *sizes, scale, zero_point, offset)


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
        if not values_lib.INT8_MIN <= header.zero_point <= values_lib.INT8_MAX:
            raise PayloadError(
                f"Bad int8 zero point: expected in [{values_lib.INT8_MIN}, "
                f"{values_lib.INT8_MAX}], found {header.zero_point}."
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
    check_unique_indices(indices, "Payload indices")
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
        values_lib.check_choice("expect_kind", expect_kind, KINDS)
    if expect_dtype is not None:
        values_lib.check_choice("expect_dtype", expect_dtype, WIRE_DTYPES)
    if max_channels is not None:
        values_lib.check_count("max_channels", max_channels, _U16_MAX)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"`data` must be bytes. Received: type={type(data).__name__}")
    data = bytes(data)
    header = _read_header(data)
    _check_header(header, expect_kind, expect_dtype, max_channels)
    index_count = 0 if header.all_channels else header.k
    shape = header.batch, header.height, header.width, header.k
    expected = _nbytes(*shape, header.dtype, header.has_labels, index_count)
    if len(data) < expected:
        raise PayloadError(f"Truncated payload: expected {expected} bytes, found {len(data)}.")
    if len(data) > expected:
        raise PayloadError(f"Trailing bytes: expected {expected} bytes, found {len(data)}.")
    indices, labels, values = _read_body(data, header)
    scale, zero_point = float(header.scale), int(header.zero_point)
    return Payload(
        header.kind, header.dtype, header.channels, indices, values, scale, zero_point, labels
    )
