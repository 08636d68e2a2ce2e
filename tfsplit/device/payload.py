"""What the device sends: the head output in the wire dtype, with its indices and quantization.

The four parts are exactly the tail signature's inputs (`values`, `indices`, `scale`,
`zero_point`), so both protocols carry them unchanged. The head JSON's `wire` section says how the
head output becomes the values: float32 as is, float16 cast on the device (a float16 head still
computes and returns float32), int8 the output tensor itself with the output's scale and zero
point. `payload_bytes` is what the codec's encoding of the same selection weighs; what a request
weighs on the wire (`request_bytes`) depends on the protocol and is the client's to measure.
"""

import dataclasses

import numpy as np

from tfsplit.codec import layout as codec_layout
from tfsplit.device.spec import DeviceError

_WIRE_NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
_HEAD_OUTPUT = {"float32": np.float32, "float16": np.float32, "int8": np.int8}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclasses.dataclass(frozen=True, eq=False)
class WirePayload:
    """One request's payload, in the tail signature's dtypes.

    Attributes:
      values: (N, h, w, k) in the wire dtype.
      indices: (k,) int32 channel of each value slice.
      scale: float32 int8 scale (1.0 for float wires).
      zero_point: int32 int8 zero point (0 for float wires).
      channels: the bottleneck width C, or None when unknown (then k < C is assumed).
    """

    values: np.ndarray
    indices: np.ndarray
    scale: np.float32
    zero_point: np.int32
    channels: int | None = None

    @property
    def payload_bytes(self):
        """`codec.payload_nbytes` of these values: the codec's encoding of what crosses the cut."""
        shape, dtype = self.values.shape, self.values.dtype.name
        return codec_layout.payload_nbytes(*shape, dtype, False, self.channels)

    def inputs(self):
        """The signature's inputs by name, in the order TF Serving clients send them."""
        return {
            "values": self.values,
            "indices": self.indices,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def wire_payload(values, indices, scale=1.0, zero_point=0, channels=None):
    """A `WirePayload` of arrays given by hand, in the dtypes the tail signature declares.

    Values are sent in the dtype they have: quantizing is the codec's job (`codec.quantize`), and
    a silent cast here would send something other than what the caller measured. What the tail
    itself refuses (an index out of range, a repeated one) is left for the server to say.

    Raises:
      DeviceError: values not a rank-4 float32/float16/int8 array, indices not 1-D integers
        within int32, scale not a number, zero_point not an integer within int32.
    """
    values = np.asarray(values)
    if values.dtype.name not in _WIRE_NUMPY or values.ndim != 4:
        raise DeviceError(
            "`values` must be a rank-4 (N, h, w, k) array of the export's wire dtype: float32, "
            "float16 or int8 (see tfsplit.codec.quantize). "
            f"Received: dtype={values.dtype}, shape={values.shape}"
        )
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise DeviceError(
            f"`indices` must be a 1-D integer array. Received: dtype={indices.dtype}, "
            f"shape={indices.shape}"
        )
    if indices.size and (indices.min() < _INT32_MIN or indices.max() > _INT32_MAX):
        raise DeviceError(f"`indices` must fit in int32. Received: indices={indices}")
    if not isinstance(scale, (float, np.floating)) and not _is_int(scale):
        raise DeviceError(f"`scale` must be a number. Received: scale={scale!r}")
    if not _is_int(zero_point) or not _INT32_MIN <= zero_point <= _INT32_MAX:
        raise DeviceError(
            f"`zero_point` must be an int32 integer. Received: zero_point={zero_point!r}"
        )
    return WirePayload(
        values, indices.astype(np.int32), np.float32(scale), np.int32(zero_point), channels
    )


def build_payload(output, spec):
    """Head output -> the payload the JSON's wire section describes.

    Args:
      output: (N, h, w, k) head output from the interpreter.
      spec: the head's `HeadSpec`.

    Returns:
      A `WirePayload`.

    Raises:
      DeviceError: an output of the wrong dtype or shape for this head, or float values that are
        not finite in the wire dtype (float16 overflows above 65504).
    """
    output = np.asarray(output)
    expected = np.dtype(_HEAD_OUTPUT[spec.dtype])
    if output.dtype != expected or output.ndim != 4 or output.shape[1:] != spec.output_shape:
        raise DeviceError(
            f"A {spec.dtype} head's output must be {expected.name} of shape (N, "
            f"{', '.join(map(str, spec.output_shape))}). Received: dtype={output.dtype}, "
            f"shape={output.shape}"
        )
    with np.errstate(over="ignore"):
        values = output.astype(_WIRE_NUMPY[spec.wire_dtype])
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DeviceError(
            f"The head output is not finite in {spec.wire_dtype} (NaN, inf or overflow); the "
            "tail would refuse it."
        )
    return wire_payload(values, spec.indices, spec.wire_scale, spec.wire_zero_point, spec.channels)
