"""The wire dtypes and how real values become them: the value half of the codec, numpy only.

float32 and float16 are casts. int8 is asymmetric affine quantization with one scale and zero
point per payload, `real = scale * (q - zero_point)`, `q in [-128, 127]`. With
`lo = min(min(x), 0)` and `hi = max(max(x), 0)` (the range holds 0, so 0 is sent exactly):

    scale = float32((hi - lo) / 255)                         in float64; 1.0 if < 2 * float32 tiny
    zero_point = clip(round(-128 - lo / scale), -128, 127)   in float64
    q = clip(round(x / scale) + zero_point, -128, 127)       in float32

`round` is half-to-even in numpy and TensorFlow alike, and subnormal inputs are flushed to zero
first, as TensorFlow's CPU kernels do; so `codec.fake_quantize` (TensorFlow) and `quantize` agree
bit for bit, and every value comes back within scale / 2, up to float32 rounding (of x / scale and
of the product, half an ulp of the value each). No TensorFlow here, so a device can check and
count payloads too.
"""

import numpy as np

WIRE_DTYPES = ("float32", "float16", "int8")

INT8_MIN, INT8_MAX = -128, 127
FLOAT32_TINY = np.finfo(np.float32).tiny
# Keeps scale / 2 a normal float32 no smaller than any flushed subnormal, so the scale / 2 error
# bound holds and TensorFlow's flush-to-zero arithmetic cannot disagree with numpy.
MIN_INT8_SCALE = np.float32(2 * FLOAT32_TINY)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class PayloadError(ValueError):
    """A payload (or the arguments to build one) is malformed; says what was expected and found."""


def summary(array):
    """A short text of an array for error messages."""
    return np.array2string(np.asarray(array), threshold=8, edgeitems=3)


def check_choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise PayloadError(f"`{name}` must be one of {allowed}. Received: {name}={value!r}")


def is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_count(name, value, maximum):
    """Checks a size field: an integer in [1, maximum] (the header field's range)."""
    if not is_int(value) or not 1 <= value <= maximum:
        raise PayloadError(
            f"`{name}` must be an integer in [1, {maximum}]. Received: {name}={value!r}"
        )
    return int(value)


def check_scale(scale):
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


def check_zero_point(zero_point):
    if not is_int(zero_point) or not INT8_MIN <= zero_point <= INT8_MAX:
        raise PayloadError(
            f"int8 `zero_point` must be an integer in [{INT8_MIN}, {INT8_MAX}]. "
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
            f"(or beyond float32 range). Received: values={summary(array)}"
        )
    return array


def _quantize_int8(x):
    """(q, scale, zero_point) of the per-payload affine scheme in the module docstring."""
    x = np.where(np.abs(x) < FLOAT32_TINY, np.float32(0.0), x)
    lo, hi = np.float64(min(x.min(), 0.0)), np.float64(max(x.max(), 0.0))
    scale = np.float32((hi - lo) / 255.0)
    if scale < MIN_INT8_SCALE:
        scale = np.float32(1.0)
    zero_point = int(np.clip(np.rint(-128.0 - lo / np.float64(scale)), INT8_MIN, INT8_MAX))
    q = np.clip(np.rint(x / scale) + np.float32(zero_point), INT8_MIN, INT8_MAX)
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
    check_choice("dtype", dtype, WIRE_DTYPES)
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
        scale32 = check_scale(scale)
        return (wire.astype(np.float32) - np.float32(check_zero_point(zero_point))) * scale32
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


def wire_values(values, dtype, scale, zero_point):
    """Quantizes float values, or passes through int8 values already quantized by the sender."""
    given = scale is not None, zero_point is not None
    if values.dtype == np.int8 or any(given):
        if dtype != "int8" or values.dtype != np.int8 or not all(given):
            raise PayloadError(
                "Pre-quantized values must be an int8 array sent with dtype='int8' and both "
                f"`scale` and `zero_point`. Received: values.dtype={values.dtype}, "
                f"dtype={dtype!r}, scale={scale!r}, zero_point={zero_point!r}"
            )
        return values, float(check_scale(scale)), check_zero_point(zero_point)
    return quantize(values, dtype)
