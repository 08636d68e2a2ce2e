"""What the device sends: the head output in the wire dtype, with its indices and quantization.

The four parts are exactly the tail signature's inputs (`values`, `indices`, `scale`,
`zero_point`), so both protocols carry them unchanged. The head JSON's `wire` section says how the
head output becomes the values: float32 as is, float16 cast on the device (a float16 head still
computes and returns float32), int8 the output tensor itself with the output's scale and zero
point.
"""

import dataclasses

import numpy as np

from tfsplit.device.head import DeviceError

_WIRE_NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
_HEAD_OUTPUT = {"float32": np.float32, "float16": np.float32, "int8": np.int8}
SCALE_NBYTES = 4  # float32
ZERO_POINT_NBYTES = 4  # int32


@dataclasses.dataclass(frozen=True, eq=False)
class WirePayload:
    """One request's payload, in the tail signature's dtypes.

    Attributes:
      values: (N, h, w, k) in the wire dtype.
      indices: (k,) int32 channel of each value slice.
      scale: float32 int8 scale (1.0 for float wires).
      zero_point: int32 int8 zero point (0 for float wires).
    """

    values: np.ndarray
    indices: np.ndarray
    scale: np.float32
    zero_point: np.int32

    @property
    def raw_nbytes(self):
        """Bytes of the payload itself: values + int32 indices + float32 scale + int32 zero point.

        What any protocol must carry at least; the request adds the protocol's own framing (JSON
        text, protobuf tags) on top.
        """
        return self.values.nbytes + self.indices.nbytes + SCALE_NBYTES + ZERO_POINT_NBYTES

    def inputs(self):
        """The signature's inputs by name, in the order TF Serving clients send them."""
        return {
            "values": self.values,
            "indices": self.indices,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


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
    return WirePayload(
        values=values,
        indices=spec.indices.astype(np.int32),
        scale=np.float32(spec.wire_scale),
        zero_point=np.int32(spec.wire_zero_point),
    )
