"""What a tail model accepts, and the checks every request passes before the model runs.

A tail SavedModel's `serving_default` signature takes `values` (N, h, w, k) in the export dtype,
`indices` (k,) int32, `scale` () float32 and `zero_point` () int32, and returns `probabilities`.
Its TensorSpecs fix dtypes, ranks, h and w, but not the bottleneck width C nor the largest budget:
the export writes those to `assets.extra/tfsplit_tail.json`. A TailSpec joins both sources.

TensorFlow would reject some bad requests itself, but with messages about graph internals, and it
would silently accept others (an out-of-range index scatters nowhere through a one-hot, a
duplicate index adds a channel twice). So the server checks everything here first and answers
with what was wrong and what was expected.
"""

import dataclasses
import http
import json
import os

import grpc
import numpy as np
import tensorflow as tf

from tfsplit import codec
from tfsplit.codec import layout as codec_layout

INPUT_NAMES = ("values", "indices", "scale", "zero_point")
OUTPUT_NAME = "probabilities"
SPEC_FILE = os.path.join("assets.extra", "tfsplit_tail.json")
DEFAULT_SIGNATURE = "serving_default"

# The longest refusal message, as a JSON string: a REST error body stays under 1 KB.
MESSAGE_BYTES = 900

_SPEC_KEYS = ("dtype", "channels", "height", "width", "max_budget", "num_classes", "signature")
_FIXED_INPUTS = {"indices": (tf.int32, 1), "scale": (tf.float32, 0), "zero_point": (tf.int32, 0)}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: http.HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: http.HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: http.HTTPStatus.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: http.HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNIMPLEMENTED: http.HTTPStatus.NOT_IMPLEMENTED,
}


class TailModelError(ValueError):
    """The tail SavedModel or its tfsplit_tail.json is not what the server can serve."""


class RequestError(ValueError):
    """A request the server refuses, with its gRPC status `code` and REST `http_status`.

    `http_status` follows from the code unless given (REST-only refusals: routes, body size).
    """

    def __init__(self, code, message, http_status=None):
        super().__init__(message)
        self.code = code
        self.http_status = http_status or _HTTP_STATUS.get(
            code, http.HTTPStatus.INTERNAL_SERVER_ERROR
        )


def invalid(message):
    """The INVALID_ARGUMENT (HTTP 400) refusal of a malformed request."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass(frozen=True)
class TailSpec:
    """What one tail signature accepts.

    Attributes:
      signature_name: the served signature key.
      dtype: wire dtype of `values`, one of codec.WIRE_DTYPES.
      height, width: spatial size of `values`; None if the signature leaves it open.
      channels: bottleneck width C (indices must be below it); None if unknown, in which case
        only the model itself can reject an index that is too large.
      max_budget: the largest k accepted; None when C is unknown.
      num_classes: width of `probabilities`; None if unknown.
      output_names: the signature's output keys.
      output: the tail's answer: `probabilities`, or what the spec file names (a U-shaped
        split's middle answers its output, `middle`).
    """

    signature_name: str
    dtype: str
    height: int | None
    width: int | None
    channels: int | None
    max_budget: int | None
    num_classes: int | None
    output_names: tuple
    output: str = OUTPUT_NAME


def _static(dim):
    return None if dim is None else int(dim)


def _signature_specs(signature):
    """The input TensorSpecs of a concrete signature function, checked to be a tail's."""
    _, inputs = signature.structured_input_signature
    if set(inputs) != set(INPUT_NAMES):
        raise TailModelError(
            f"A tail signature takes exactly the inputs {sorted(INPUT_NAMES)}. "
            f"Received: {sorted(inputs)}"
        )
    for name, (dtype, rank) in _FIXED_INPUTS.items():
        spec = inputs[name]
        if spec.dtype != dtype or spec.shape.rank != rank:
            raise TailModelError(
                f"Tail input {name!r} must be {dtype.name} of rank {rank}. "
                f"Received: dtype={spec.dtype.name}, shape={spec.shape}"
            )
    values = inputs["values"]
    if values.dtype.name not in codec.WIRE_DTYPES or values.shape.rank != 4:
        raise TailModelError(
            f"Tail input 'values' must be rank 4 (N, h, w, k) of a wire dtype {codec.WIRE_DTYPES}. "
            f"Received: dtype={values.dtype.name}, shape={values.shape}"
        )
    return inputs


def _output_names(signature, name):
    outputs = signature.structured_outputs
    if not isinstance(outputs, dict) or name not in outputs:
        raise TailModelError(
            f"A tail signature must return a dict with {name!r}. Received: {outputs!r}"
        )
    return tuple(sorted(outputs)), outputs[name].shape


def read_spec_file(path):
    """Reads and checks tfsplit_tail.json (written by the export beside the SavedModel).

    Raises:
      TailModelError: unreadable JSON, missing keys, or values of the wrong type or range.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise TailModelError(f"Cannot read the tail spec {path}: {error}") from error
    missing = [key for key in _SPEC_KEYS if not isinstance(data, dict) or key not in data]
    if missing:
        raise TailModelError(f"The tail spec {path} lacks the keys {missing}.")
    if data["dtype"] not in codec.WIRE_DTYPES or not isinstance(data["signature"], str):
        raise TailModelError(
            f"The tail spec {path} needs dtype in {codec.WIRE_DTYPES} and a signature name. "
            f"Received: dtype={data['dtype']!r}, signature={data['signature']!r}"
        )
    sizes = {key: data[key] for key in ("channels", "height", "width", "max_budget", "num_classes")}
    if not all(type(size) is int and size >= 1 for size in sizes.values()):
        raise TailModelError(
            f"The tail spec {path} needs positive integer sizes. Received: {sizes}"
        )
    if sizes["max_budget"] > sizes["channels"]:
        raise TailModelError(
            f"The tail spec {path} needs max_budget <= channels. Received: {sizes}"
        )
    output, shape = data.get("output", OUTPUT_NAME), data.get("output_shape", [])
    if not (isinstance(output, str) and output) or not (
        isinstance(shape, list) and all(type(d) is int and d >= 1 for d in shape)
    ):
        raise TailModelError(
            f"The tail spec {path} needs an output name and a list of positive output sizes. "
            f"Received: output={output!r}, output_shape={shape!r}"
        )
    return data


def _agree(name, from_file, from_signature):
    if from_signature is not None and from_file != from_signature:
        raise TailModelError(
            f"tfsplit_tail.json and the signature disagree on {name}: the file says "
            f"{from_file!r}, the signature {from_signature!r}."
        )


def build_tail_spec(signature, signature_name, spec_file=None, channels=None):
    """Joins a signature's TensorSpecs with the export's JSON spec (or a given channel count).

    Args:
      signature: the concrete function of the served signature.
      signature_name: its key in the SavedModel.
      spec_file: the parsed tfsplit_tail.json, or None when the export wrote none.
      channels: bottleneck width C to use when there is no spec file; max_budget is then C.

    Returns:
      A TailSpec.

    Raises:
      TailModelError: the signature is not a tail's, or the file and signature disagree.
    """
    inputs = _signature_specs(signature)
    output = OUTPUT_NAME if spec_file is None else spec_file.get("output", OUTPUT_NAME)
    output_names, output_shape = _output_names(signature, output)
    _, height, width, _ = (_static(dim) for dim in inputs["values"].shape)
    probabilities = output == OUTPUT_NAME and output_shape.rank == 2
    num_classes = _static(output_shape[-1]) if probabilities else None
    dtype = inputs["values"].dtype.name
    if spec_file is None:
        if channels is not None and (type(channels) is not int or channels < 1):
            raise TailModelError(f"`channels` must be a positive int. Received: {channels!r}")
        return TailSpec(
            signature_name, dtype, height, width, channels, channels, num_classes, output_names
        )
    given = dict(dtype=dtype, height=height, width=width, num_classes=num_classes)
    for name, value in dict(given, signature=signature_name, channels=channels).items():
        _agree(name, spec_file[name], value)  # None (open or not given) agrees with anything.
    sizes = (spec_file[key] for key in ("height", "width", "channels", "max_budget", "num_classes"))
    return TailSpec(signature_name, dtype, *sizes, output_names, output)


def check_target(spec, served_name, served_version, name, version, label, signature_name):
    """Checks that a request addresses the served model, version and signature.

    Args:
      spec: the served TailSpec.
      served_name, served_version: what this server serves.
      name: requested model name.
      version: requested version (int) or None for the latest.
      label: requested version label or None (labels are not supported: one version is served).
      signature_name: requested signature key; "" means serving_default, as in TF Serving.

    Raises:
      RequestError: NOT_FOUND for another model, version or any label; INVALID_ARGUMENT for an
        unknown signature.
    """
    if name != served_name:
        raise RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found: model {name!r} is not served here; this server serves "
            f"model {served_name!r}.",
        )
    if label:
        raise RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"Version label {label!r} of model {name!r} not found: this server assigns no labels; "
            f"request version {served_version} or the latest.",
        )
    if version is not None and version != served_version:
        raise RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"Version {version} of model {name!r} not found: this server serves version "
            f"{served_version}.",
        )
    if (signature_name or DEFAULT_SIGNATURE) != spec.signature_name:
        raise invalid(
            f"Serving signature name {signature_name!r} not found in the signature def; "
            f"available: [{spec.signature_name!r}]."
        )


def check_input_names(spec, names):
    """The request must name exactly the signature's four inputs."""
    names = set(names)
    missing = sorted(set(INPUT_NAMES) - names)
    extra = sorted(names - set(INPUT_NAMES))
    if missing or extra:
        raise invalid(
            f"Signature {spec.signature_name!r} takes exactly the inputs {sorted(INPUT_NAMES)}. "
            f"Missing: {missing}; unexpected: {extra}."
        )


def input_dtype(spec, name):
    """The numpy dtype the signature requires for input `name`."""
    if name == "values":
        return np.dtype(spec.dtype)
    return np.dtype(_FIXED_INPUTS[name][0].as_numpy_dtype)


def check_dtype(spec, name, dtype):
    """Input `name` must arrive in the signature's dtype (a name such as "float16"): no casts."""
    expected = input_dtype(spec, name)
    if dtype != expected.name:
        role = " (the exported wire dtype)" if name == "values" else ""
        raise invalid(f"Input {name!r} must be {expected.name}{role}. Received: dtype={dtype}")


def _dim_fits(size, expected):
    return size >= 1 and (expected is None or size == expected)


def _check_values_shape(spec, shape, max_batch_size):
    height = "h" if spec.height is None else spec.height
    width = "w" if spec.width is None else spec.width
    if not (
        len(shape) == 4
        and 1 <= shape[0] <= max_batch_size
        and _dim_fits(shape[1], spec.height)
        and _dim_fits(shape[2], spec.width)
    ):
        raise invalid(
            f"Input 'values' must have shape (N, {height}, {width}, k) with "
            f"1 <= N <= {max_batch_size}. Received: shape={shape}"
        )
    k = shape[3]
    upper = "C" if spec.max_budget is None else spec.max_budget
    if k < 1 or (spec.max_budget is not None and k > spec.max_budget):
        raise invalid(
            f"Budget k={k} (the last dimension of 'values') must be in [1, {upper}]: the tail was "
            f"exported for at most {upper} channels. Received: values.shape={shape}"
        )


def check_shapes(spec, shapes, max_batch_size):
    """Checks the inputs' shapes against the spec, before their values are read: a request that
    declares more than the model accepts is refused before anything is allocated for it.

    Args:
      spec: the served TailSpec.
      shapes: dict from each of INPUT_NAMES to its shape, a tuple of ints.
      max_batch_size: the largest N accepted.

    Raises:
      RequestError: INVALID_ARGUMENT: 'values' not (N, h, w, k) within the batch limit and the
        budget, 'indices' not (k,), or 'scale' and 'zero_point' not scalars.
    """
    values = tuple(shapes["values"])
    _check_values_shape(spec, values, max_batch_size)
    k = values[3]
    if tuple(shapes["indices"]) != (k,):
        raise invalid(
            f"Input 'indices' must have shape (k,) = ({k},), one index per channel in the last "
            f"dimension of 'values'. Received: shape={tuple(shapes['indices'])}"
        )
    if tuple(shapes["scale"]) != () or tuple(shapes["zero_point"]) != ():
        raise invalid(
            "Inputs 'scale' and 'zero_point' must be scalars (shape ()). "
            f"Received: scale.shape={tuple(shapes['scale'])}, "
            f"zero_point.shape={tuple(shapes['zero_point'])}"
        )


def _check_indices(spec, indices):
    upper = "C" if spec.channels is None else spec.channels
    if indices.min() < 0 or (spec.channels is not None and indices.max() >= spec.channels):
        raise invalid(
            f"Input 'indices' must lie in [0, {upper}), the bottleneck's channels. "
            f"Received: indices={np.array2string(indices, threshold=16)}"
        )
    try:
        codec_layout.check_unique_indices(indices, "Input 'indices'")
    except codec.PayloadError as error:
        raise invalid(str(error)) from None


def _check_quantization(spec, scale, zero_point):
    scale, zero_point = float(scale), int(zero_point)
    if spec.dtype == "int8":
        if not np.isfinite(scale) or scale <= 0 or not -128 <= zero_point <= 127:
            raise invalid(
                "int8 values need a finite scale > 0 and a zero_point in [-128, 127] "
                f"(real = scale * (q - zero_point)). Received: scale={scale!r}, "
                f"zero_point={zero_point}"
            )
    elif scale != 1.0 or zero_point != 0:
        raise invalid(
            f"{spec.dtype} values carry no quantization: expected scale=1.0 and zero_point=0. "
            f"Received: scale={scale!r}, zero_point={zero_point}"
        )


def validate_inputs(spec, arrays, max_batch_size):
    """Checks decoded request tensors against the spec; nothing reaches the model otherwise.

    Args:
      spec: the served TailSpec.
      arrays: dict from input name to numpy array, exactly INPUT_NAMES.
      max_batch_size: the largest N accepted.

    Raises:
      RequestError: INVALID_ARGUMENT naming the first thing wrong and what was expected: names,
        dtypes, shapes (h, w, k = len(indices), batch limit), budget, index range and
        distinctness, quantization parameters, non-finite float values.
    """
    check_input_names(spec, arrays)
    for name in INPUT_NAMES:
        check_dtype(spec, name, arrays[name].dtype.name)
    check_shapes(spec, {name: array.shape for name, array in arrays.items()}, max_batch_size)
    values = arrays["values"]
    _check_indices(spec, arrays["indices"])
    _check_quantization(spec, arrays["scale"], arrays["zero_point"])
    if spec.dtype != "int8" and not np.isfinite(values).all():
        raise invalid(f"Input 'values' must be finite {spec.dtype} numbers; found NaN or inf.")


def clip_message(text, limit=MESSAGE_BYTES):
    """`text` cut, with "...", so that it stays within `limit` bytes as a JSON string: a refusal
    that echoes what a client sent stays short however much it sent."""
    if len(json.dumps(text)) <= limit:
        return text
    used, end = len('"..."'), 0
    for end, char in enumerate(text):
        used += len(json.dumps(char)) - 2
        if used > limit:
            break
    return text[:end] + "..."
