"""The head JSON, declared once: what travels beside each .tflite head, written and read here.

`tfsplit.export.head` writes `head_<dtype>.json` beside `head_<dtype>.tflite` with `head_json`; a
device reads it with `load_spec`. Both go through `spec_from_json`, which refuses anything missing
or inconsistent and names the field, so the export cannot write a file the device would refuse.
Standard library and numpy only: this runs on a device without TensorFlow.
"""

import dataclasses
import json
import os

import numpy as np

FORMAT = "tfsplit-head/1"
HEAD_DTYPES = ("float32", "float16", "int8")
_TENSOR_DTYPES = ("float32", "int8")  # What the interpreter's input and output can be.
INT8_MIN, INT8_MAX = -128, 127
_NORMALIZATION = "(pixel / 255 - mean) / std, per channel, NHWC"
_HOW = {
    "float32": "send the float32 output as is",
    "float16": "cast the float32 output to float16 before sending",
    "int8": "send the int8 output tensor as is, with its scale and zero point",
}


class DeviceError(ValueError):
    """Bad device-side input (model, JSON, image, flag value); says what and what was expected."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_count(name, value, minimum=1):
    """Refuses anything but an integer >= minimum (a bool is no count)."""
    if not _is_int(value) or value < minimum:
        raise DeviceError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")


def check_head_dtypes(dtypes):
    """`dtypes` as a tuple of distinct HEAD_DTYPES names; a single name is accepted."""
    dtypes = (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
    unknown = [dtype for dtype in dtypes if dtype not in HEAD_DTYPES]
    if not dtypes or unknown or len(set(dtypes)) != len(dtypes):
        raise DeviceError(
            f"`dtypes` must be distinct names from {HEAD_DTYPES}, at least one. "
            f"Received: dtypes={dtypes!r}"
        )
    return dtypes


def _field(record, key, where, check, expected):
    """record[key] after `check(value)` passes; a DeviceError naming `where.key` otherwise."""
    if not isinstance(record, dict) or key not in record:
        raise DeviceError(f"The head JSON lacks `{where}{key}` ({expected}).")
    value = record[key]
    if not check(value):
        raise DeviceError(
            f"The head JSON's `{where}{key}` must be {expected}. Received: {key}={value!r}"
        )
    return value


def _object(record, key):
    return _field(record, key, "", lambda v: isinstance(v, dict), "an object")


def _positive_int(value):
    return _is_int(value) and value >= 1


def _int8(value):
    return _is_int(value) and INT8_MIN <= value <= INT8_MAX


def _count(record, key):
    return _field(record, key, "", _positive_int, "an integer >= 1")


def _quantization(record, where):
    """(scale, zero_point) of an int8 tensor record, None for a float one."""
    dtype = _field(
        record, "dtype", where, lambda v: v in _TENSOR_DTYPES, f"one of {_TENSOR_DTYPES}"
    )
    if dtype != "int8":
        return None
    scale = _field(record, "scale", where, lambda v: _is_number(v) and v > 0, "a number > 0")
    zero_point = _field(record, "zero_point", where, _int8, "an integer in [-128, 127]")
    return float(scale), int(zero_point)


def _list(record, key, where, length, item, expected):
    """A list of `length` items that each pass `item`, as a tuple."""

    def check(value):
        return isinstance(value, list) and len(value) == length and all(map(item, value))

    return tuple(_field(record, key, where, check, expected))


def _shape(record, where):
    """(H, W, C) of a [1, H, W, C] tensor record."""
    return _list(record, "shape", where, 4, _positive_int, "a list of 4 positive integers")[1:]


def _floats(record, key, length, positive):
    def item(value):
        return _is_number(value) and (value > 0 or not positive)

    expected = f"a list of {length} numbers" + (" > 0" if positive else "")
    return np.asarray(_list(record, key, "normalization.", length, item, expected), np.float32)


@dataclasses.dataclass(frozen=True)
class TopSpec:
    """A U-shaped split's top, which the device runs on the middle's answer.

    Attributes:
      model_file: the top's .tflite file name, relative to the head JSON's directory.
      output: the name of the middle's output in the server's answer.
      shape: the shape of one answer (the middle's output without its batch).
    """

    model_file: str
    output: str
    shape: tuple


def _top(meta):
    """The `TopSpec` of a head JSON's optional `top` object (None without one)."""
    if "top" not in meta:
        return None
    record = _object(meta, "top")
    name = lambda v: isinstance(v, str) and v  # noqa: E731
    shape = _field(
        record,
        "shape",
        "top.",
        lambda v: isinstance(v, list) and 1 <= len(v) <= 3 and all(map(_positive_int, v)),
        "a list of 1 to 3 positive integers",
    )
    return TopSpec(
        model_file=_field(record, "model", "top.", name, "a file name"),
        output=_field(record, "output", "top.", name, "an output name"),
        shape=tuple(shape),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class HeadSpec:
    """What a device needs to know about a head besides the model file.

    Attributes:
      path: the JSON file it was read from.
      model_file: the .tflite file name, relative to the JSON's directory.
      dtype: the head's flavour, one of HEAD_DTYPES; also the dtype of the values sent.
      image_shape: (H, W, C) of one input image.
      input_quantization: (scale, zero_point) of an int8 input, else None.
      mean, std: per-channel normalization, (pixel / 255 - mean) / std.
      output_shape: (h, w, k) of one head output.
      output_quantization: (scale, zero_point) of an int8 output, else None.
      wire_scale, wire_zero_point: int8 quantization sent with the values (1.0, 0 for floats).
      indices: (k,) int32 channel indices of the sent values, in order.
      channels: bottleneck width C; every index is below it.
      num_classes: width of the tail's probabilities (of the top's, for a U-shaped split).
      dataset: name of the training dataset ("" if the JSON has none).
      source_workdir: the training workdir that made the head ("" if the JSON has none).
      top: a U-shaped split's `TopSpec`: the server answers the middle's output, which the
        device's top turns into probabilities; None for a plain split.
    """

    path: str
    model_file: str
    dtype: str
    image_shape: tuple
    input_quantization: tuple | None
    mean: np.ndarray
    std: np.ndarray
    output_shape: tuple
    output_quantization: tuple | None
    wire_scale: float
    wire_zero_point: int
    indices: np.ndarray
    channels: int
    num_classes: int
    dataset: str
    source_workdir: str
    top: TopSpec | None = None

    @property
    def budget(self):
        """k, the channels sent per image."""
        return len(self.indices)

    @property
    def wire_dtype(self):
        """The dtype of the values sent: the head's own (a float16 head's output is cast)."""
        return self.dtype


def _check_indices(meta, channels, budget):
    indices = _field(
        meta,
        "indices",
        "",
        lambda v: isinstance(v, list) and v and all(_is_int(i) and 0 <= i < channels for i in v),
        f"a non-empty list of channel indices in [0, {channels})",
    )
    if len(set(indices)) != len(indices) or len(indices) != budget:
        raise DeviceError(
            f"The head JSON's `indices` must be {budget} (`budget`) distinct channels. "
            f"Received: indices={indices}"
        )
    return np.asarray(indices, np.int32)


def _check_wire(meta, dtype, output_quantization):
    wire = _object(meta, "wire")
    _field(wire, "dtype", "wire.", lambda v: v == dtype, f"the head's dtype {dtype!r}")
    scale = _field(wire, "scale", "wire.", lambda v: _is_number(v) and v > 0, "a number > 0")
    zero_point = _field(wire, "zero_point", "wire.", _is_int, "an integer")
    expected = output_quantization or (1.0, 0)
    if (float(scale), zero_point) != expected:
        raise DeviceError(
            f"The head JSON's `wire` scale and zero point must be the output's {expected} (the "
            f"int8 output is sent as is; floats carry 1.0, 0). Received: {(scale, zero_point)}"
        )
    return float(scale), int(zero_point)


def _check_output(record, dtype, shape, quantization, expected_shape):
    if shape != expected_shape:
        raise DeviceError(
            f"The head JSON's `output.shape` must be [1, height, width, budget] = "
            f"{[1, *expected_shape]}. Received: {[1, *shape]}"
        )
    if (quantization is None) == (dtype == "int8"):
        raise DeviceError(
            f"A {dtype} head must have an {'int8' if dtype == 'int8' else 'float32'} output "
            f"(`output.dtype`). Received: {record['dtype']!r}"
        )


def spec_from_json(meta, path):
    """Checks a parsed head JSON and returns its `HeadSpec`.

    Args:
      meta: the JSON object, as `head_json` makes it.
      path: where it was read from (model files are looked up beside it).

    Raises:
      DeviceError: a missing field, a wrong type, or fields that contradict one another
        (output shape vs height/width/budget, wire vs output quantization, float16 head with a
        non-float32 output, ...), naming the field and what was expected.
    """
    if not isinstance(meta, dict):
        raise DeviceError(f"The head JSON must be an object. Received: {type(meta).__name__}")
    _field(meta, "format", "", lambda v: v == FORMAT, f"{FORMAT!r} (written by tfsplit-export)")
    dtype = _field(meta, "dtype", "", lambda v: v in HEAD_DTYPES, f"one of {HEAD_DTYPES}")
    model_file = _field(meta, "model", "", lambda v: isinstance(v, str) and v, "a file name")
    channels, height, width, num_classes, budget = (
        _count(meta, key) for key in ("channels", "height", "width", "num_classes", "budget")
    )
    image_shape = _shape(_object(meta, "input"), "input.")
    normalization = _object(meta, "normalization")
    output = _object(meta, "output")
    output_shape, output_quantization = _shape(output, "output."), _quantization(output, "output.")
    _check_output(output, dtype, output_shape, output_quantization, (height, width, budget))
    wire_scale, wire_zero_point = _check_wire(meta, dtype, output_quantization)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    return HeadSpec(
        path=os.fspath(path),
        model_file=model_file,
        dtype=dtype,
        image_shape=image_shape,
        input_quantization=_quantization(meta["input"], "input."),
        mean=_floats(normalization, "mean", image_shape[-1], positive=False),
        std=_floats(normalization, "std", image_shape[-1], positive=True),
        output_shape=output_shape,
        output_quantization=output_quantization,
        wire_scale=wire_scale,
        wire_zero_point=wire_zero_point,
        indices=_check_indices(meta, channels, budget),
        channels=channels,
        num_classes=num_classes,
        dataset=str(meta.get("dataset", "")),
        source_workdir=str(source.get("workdir", "")),
        top=_top(meta),
    )


def read_json(path, missing):
    """The parsed JSON at `path`; a DeviceError if it is not JSON, or saying `missing` if absent."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise DeviceError(missing)
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as error:
            raise DeviceError(f"{path} is not valid JSON: {error}") from None


def load_spec(path):
    """The `HeadSpec` of a head JSON file; a DeviceError if it is missing, not JSON or invalid."""
    missing = (
        f"No head JSON at {path!r}: expected the head_<dtype>.json that tfsplit-export writes "
        "beside each .tflite head."
    )
    return spec_from_json(read_json(path, missing), path)


def tensor_quantization(detail):
    """(scale, zero_point) of an int8 interpreter tensor (`get_input_details()[i]`), else None."""
    if detail["dtype"] != np.int8:
        return None
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


def _tensor_record(detail):
    scale, zero_point = tensor_quantization(detail) or (None, None)
    return {
        "name": detail["name"],
        "shape": [int(size) for size in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "scale": scale,
        "zero_point": zero_point,
    }


def head_json(
    model_file,
    dtype,
    input_detail,
    output_detail,
    mean,
    std,
    indices,
    wire_shape,
    num_classes,
    **provenance,
):
    """The head JSON of a converted model, checked by the reader's rules before it is written.

    Args:
      model_file: the .tflite file name; the JSON goes beside it.
      dtype: the head's flavour, one of HEAD_DTYPES.
      input_detail, output_detail: the interpreter's details of the model's input and output.
      mean, std: per-channel normalization of the training images.
      indices: the k channels of the output, in order.
      wire_shape: (height, width, channels) of the bottleneck.
      num_classes: width of the tail's probabilities.
      **provenance: recorded as given (dataset, source, versions, parity, conversion).

    Raises:
      DeviceError: parts that contradict one another, e.g. a model that is not this head.
    """
    height, width, channels = (int(size) for size in wire_shape)
    output_quantization = tensor_quantization(output_detail)
    scale, zero_point = output_quantization or (1.0, 0)
    meta = {
        "format": FORMAT,
        "model": model_file,
        "dtype": dtype,
        "input": _tensor_record(input_detail),
        "normalization": {
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "formula": _NORMALIZATION,
        },
        "output": _tensor_record(output_detail),
        "wire": {"dtype": dtype, "scale": scale, "zero_point": zero_point, "how": _HOW.get(dtype)},
        "budget": len(indices),
        "indices": [int(i) for i in indices],
        "channels": channels,
        "height": height,
        "width": width,
        "num_classes": int(num_classes),
        **provenance,
    }
    spec_from_json(meta, model_file)
    return meta
