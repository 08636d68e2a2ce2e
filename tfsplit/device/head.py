"""The exported head on the device: its JSON checked field by field, and the LiteRT interpreter.

`tfsplit.export.export_head` writes `head_<dtype>.tflite` and, beside it, `head_<dtype>.json`:
input shape and dtype, normalization, output quantization, wire dtype, budget and channel indices.
`HeadSpec` reads that JSON and refuses anything missing or inconsistent, naming the field;
`HeadRunner` then checks the model itself against the JSON, so a JSON copied beside the wrong
model fails at load time, not as a wrong prediction later.

Only numpy, the standard library and `ai_edge_litert` are used: this runs on a device without
TensorFlow.
"""

import dataclasses
import json
import os

import numpy as np
from absl import logging
from ai_edge_litert.interpreter import Interpreter

FORMAT = "tfsplit-head/1"
HEAD_DTYPES = ("float32", "float16", "int8")
_TENSOR_DTYPES = ("float32", "int8")  # What the interpreter's input and output can be.
_INT8_MIN, _INT8_MAX = -128, 127


class DeviceError(ValueError):
    """Bad device-side input (model, JSON, image, flag value); says what and what was expected."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def _count(record, key):
    return _field(record, key, "", lambda v: _is_int(v) and v >= 1, "an integer >= 1")


def _quantization(record, where):
    """(scale, zero_point) of an int8 tensor record, None for a float one."""
    dtype = _field(
        record, "dtype", where, lambda v: v in _TENSOR_DTYPES, f"one of {_TENSOR_DTYPES}"
    )
    if dtype != "int8":
        return None
    scale = _field(record, "scale", where, lambda v: _is_number(v) and v > 0, "a number > 0")
    zero_point = _field(
        record,
        "zero_point",
        where,
        lambda v: _is_int(v) and _INT8_MIN <= v <= _INT8_MAX,
        "an integer in [-128, 127]",
    )
    return float(scale), int(zero_point)


def _shape(record, where, rank):
    return tuple(
        _field(
            record,
            "shape",
            where,
            lambda v: isinstance(v, list)
            and len(v) == rank
            and all(_is_int(s) and s >= 1 for s in v),
            f"a list of {rank} positive integers",
        )
    )


def _floats(record, key, where, length, positive):
    values = _field(
        record,
        key,
        where,
        lambda v: isinstance(v, list)
        and len(v) == length
        and all(_is_number(x) and (x > 0 or not positive) for x in v),
        f"a list of {length} numbers" + (" > 0" if positive else ""),
    )
    return np.asarray(values, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadSpec:
    """What a device needs to know about a head besides the model file.

    Attributes:
      path: the JSON file it was read from.
      model_file: the .tflite file name, relative to the JSON's directory.
      dtype: the head's flavour, one of HEAD_DTYPES.
      image_shape: (H, W, C) of one input image.
      input_quantization: (scale, zero_point) of an int8 input, else None.
      mean, std: per-channel normalization, (pixel / 255 - mean) / std.
      output_shape: (h, w, k) of one head output.
      output_quantization: (scale, zero_point) of an int8 output, else None.
      wire_dtype: dtype of the values sent, one of HEAD_DTYPES.
      wire_scale, wire_zero_point: int8 quantization sent with the values (1.0, 0 for floats).
      indices: (k,) int32 channel indices of the sent values, in order.
      channels: bottleneck width C; every index is below it.
      num_classes: width of the tail's probabilities.
      dataset: name of the training dataset ("" if the JSON has none).
      source_workdir: the training workdir that made the head ("" if the JSON has none).
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
    wire_dtype: str
    wire_scale: float
    wire_zero_point: int
    indices: np.ndarray
    channels: int
    num_classes: int
    dataset: str
    source_workdir: str

    @property
    def budget(self):
        """k, the channels sent per image."""
        return len(self.indices)


def _check_indices(meta, channels):
    indices = _field(
        meta,
        "indices",
        "",
        lambda v: isinstance(v, list) and v and all(_is_int(i) and 0 <= i < channels for i in v),
        f"a non-empty list of channel indices in [0, {channels})",
    )
    if len(set(indices)) != len(indices) or len(indices) != meta.get("budget"):
        raise DeviceError(
            f"The head JSON's `indices` must be {meta.get('budget')!r} (`budget`) distinct "
            f"channels. Received: indices={indices}"
        )
    return np.asarray(indices, np.int32)


def _check_wire(meta, dtype, output_quantization):
    wire = _field(meta, "wire", "", lambda v: isinstance(v, dict), "an object")
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


def spec_from_json(meta, path):
    """Checks a parsed head JSON and returns its `HeadSpec`.

    Args:
      meta: the JSON object, as `export_head` writes it.
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
    channels, height, width = (_count(meta, key) for key in ("channels", "height", "width"))
    num_classes, budget = _count(meta, "num_classes"), _count(meta, "budget")
    record = _field(meta, "input", "", lambda v: isinstance(v, dict), "an object")
    image_shape = _shape(record, "input.", 4)[1:]
    input_quantization = _quantization(record, "input.")
    normalization = _field(meta, "normalization", "", lambda v: isinstance(v, dict), "an object")
    mean = _floats(normalization, "mean", "normalization.", image_shape[-1], positive=False)
    std = _floats(normalization, "std", "normalization.", image_shape[-1], positive=True)
    record = _field(meta, "output", "", lambda v: isinstance(v, dict), "an object")
    output_shape = _shape(record, "output.", 4)[1:]
    output_quantization = _quantization(record, "output.")
    if output_shape != (height, width, budget):
        raise DeviceError(
            f"The head JSON's `output.shape` must be [1, height, width, budget] = "
            f"[1, {height}, {width}, {budget}]. Received: {[1, *output_shape]}"
        )
    if (output_quantization is None) == (dtype == "int8"):
        raise DeviceError(
            f"A {dtype} head must have an {'int8' if dtype == 'int8' else 'float32'} output "
            f"(`output.dtype`). Received: {record['dtype']!r}"
        )
    wire_scale, wire_zero_point = _check_wire(meta, dtype, output_quantization)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    return HeadSpec(
        path=os.fspath(path),
        model_file=model_file,
        dtype=dtype,
        image_shape=image_shape,
        input_quantization=input_quantization,
        mean=mean,
        std=std,
        output_shape=output_shape,
        output_quantization=output_quantization,
        wire_dtype=dtype,
        wire_scale=wire_scale,
        wire_zero_point=wire_zero_point,
        indices=_check_indices(meta, channels),
        channels=channels,
        num_classes=num_classes,
        dataset=str(meta.get("dataset", "")),
        source_workdir=str(source.get("workdir", "")),
    )


def load_spec(path):
    """Reads and checks a head JSON file (see `spec_from_json`).

    Raises:
      DeviceError: the file is missing, is not JSON, or fails the checks.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise DeviceError(
            f"No head JSON at {path!r}: expected the head_<dtype>.json that tfsplit-export "
            "writes beside each .tflite head."
        )
    with open(path) as f:
        try:
            meta = json.load(f)
        except ValueError as error:
            raise DeviceError(f"{path} is not valid JSON: {error}") from None
    return spec_from_json(meta, path)


def normalize_images(images, spec):
    """uint8 (N, H, W, C) pixels -> float32 (pixel / 255 - mean) / std, as in training.

    Raises:
      DeviceError: not an integer array of images of the head's shape, or pixels outside 0..255.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != spec.image_shape or not len(images):
        raise DeviceError(
            f"Images must be a batch (N, H, W, C) = (N, {', '.join(map(str, spec.image_shape))}) "
            f"for this head. Received: shape={images.shape}"
        )
    if images.dtype.kind not in "iu" or images.min() < 0 or images.max() > 255:
        raise DeviceError(
            f"Images must hold integer pixels in 0..255 (e.g. uint8). Received: dtype="
            f"{images.dtype}, range [{images.min()}, {images.max()}]"
        )
    return (images.astype(np.float32) / np.float32(255.0) - spec.mean) / spec.std


def quantize_input(normalized, quantization):
    """Normalized float32 images -> the int8 input of an int8 head: round(x / s) + zp, clipped.

    Same arithmetic as `tfsplit.export.head.quantize_images`, which calibrated the export's parity.
    """
    scale, zero_point = quantization
    q = np.rint(np.asarray(normalized, np.float32) / np.float32(scale)) + np.float32(zero_point)
    return np.clip(q, _INT8_MIN, _INT8_MAX).astype(np.int8)


def _detail_quantization(detail):
    if detail["dtype"] != np.int8:
        return None
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


class HeadRunner:
    """A head .tflite in the LiteRT interpreter, checked against its JSON.

    Args:
      model_path: the head .tflite file.
      metadata_path: its JSON; by default the file beside it with the .json extension.
      num_threads: interpreter threads (1: what a small device core gives a model).

    Attributes:
      spec: the `HeadSpec`.

    Raises:
      DeviceError: a missing or unreadable model, a bad JSON, or a model whose input/output
        shapes, dtypes or int8 quantization differ from the JSON's.
    """

    def __init__(self, model_path, metadata_path=None, num_threads=1):
        if not isinstance(model_path, (str, os.PathLike)) or not os.path.isfile(model_path):
            raise DeviceError(f"No head model at {model_path!r}: expected a .tflite file.")
        if not _is_int(num_threads) or num_threads < 1:
            raise DeviceError(f"`num_threads` must be an integer >= 1. Received: {num_threads!r}")
        if metadata_path is None:
            metadata_path = os.path.splitext(os.fspath(model_path))[0] + ".json"
        self.spec = load_spec(metadata_path)
        self.model_path = os.fspath(model_path)
        self.num_threads = num_threads
        try:
            self._interpreter = Interpreter(model_path=self.model_path, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise DeviceError(f"{model_path} is not a loadable TFLite model: {error}") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._check_against_spec()
        self._batch = int(self._input["shape"][0])
        logging.info("Loaded %s head %s on %d thread(s)", self.spec.dtype, model_path, num_threads)

    def _check_against_spec(self):
        spec = self.spec
        found = {
            "input shape": (tuple(int(s) for s in self._input["shape"][1:]), spec.image_shape),
            "input quantization": (_detail_quantization(self._input), spec.input_quantization),
            "output shape": (tuple(int(s) for s in self._output["shape"][1:]), spec.output_shape),
            "output quantization": (_detail_quantization(self._output), spec.output_quantization),
        }
        wrong = {name: pair for name, pair in found.items() if pair[0] != pair[1]}
        if wrong:
            details = "; ".join(f"{name}: model {m}, JSON {j}" for name, (m, j) in wrong.items())
            raise DeviceError(
                f"{self.model_path} does not match {spec.path}: {details}. Keep each "
                "head_<dtype>.tflite with the head_<dtype>.json exported with it."
            )

    def model_input(self, images):
        """uint8 (N, H, W, C) images -> the interpreter's input (normalized, int8 if quantized)."""
        normalized = normalize_images(images, self.spec)
        if self.spec.input_quantization is None:
            return normalized
        return quantize_input(normalized, self.spec.input_quantization)

    def invoke(self, model_input):
        """Runs the interpreter on a prepared input batch; returns a copy of its output."""
        if len(model_input) != self._batch:
            self._interpreter.resize_tensor_input(
                self._input["index"], model_input.shape, strict=True
            )
            self._interpreter.allocate_tensors()
            self._batch = len(model_input)
        self._interpreter.set_tensor(self._input["index"], model_input)
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._output["index"]))

    def __call__(self, images):
        """uint8 (N, H, W, C) images -> the head output (float32, or int8 for int8 heads)."""
        return self.invoke(self.model_input(images))
