"""TF Serving's REST API as JSON: routes, request bodies read into checked arrays, answers.

Routes, as TF Serving has them:

    GET  /v1/models/<name>[/versions/<v>]            model status
    GET  /v1/models/<name>[/versions/<v>]/metadata   signature def
    POST /v1/models/<name>[/versions/<v>]:predict    {"inputs": {...}} -> {"outputs": ...}
                                                     {"instances": [...]} -> {"predictions": [...]}

Numbers travel as plain JSON numbers for every dtype; the signature decides how they are read. In
the row ("instances") format TF Serving would stack every input along a new batch dimension, which
`indices`, `scale` and `zero_point` do not have; here every instance must carry the same three and
only `values` is stacked, so the row format stays usable by hand (curl). Clients use the columnar
format, which a real TF Serving answers identically.

A body is bounded before it is parsed: its size by what a full batch of the largest budget takes
as JSON (`max_json_body_bytes`), and the values parsing would build by counting its '[', ',' and
':' (`max_json_values`). Each input's shape is then read from its nested lists and checked against
the spec before numpy builds an array.
"""

import http
import json
import re

import grpc
from google.protobuf import json_format

from tfsplit.serving import tensors, validation

_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>:predict|/metadata)?$"
)
_BODY_KEYS = {"signature_name", "inputs", "instances"}
_SHARED_INPUTS = ("indices", "scale", "zero_point")
# The REST body a request the spec accepts may take: every JSON number within the longest float
# repr ("-1.2345678901234567e-308") and its ", " separator, with room for brackets; per instance,
# the row format's repeated keys, scale and zero point; per body, keys and whitespace.
JSON_NUMBER_BYTES = 32
JSON_INSTANCE_BYTES = 256
JSON_FIXED_BYTES = 64 << 10
JSON_INSTANCE_VALUES = 16
JSON_FIXED_VALUES = 64


def http_error(status, message):
    """A refusal that only REST has (a route, a method, a body size)."""
    return validation.RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, http_status=status)


def route(path):
    """(name, version or None, label or None, suffix or "") of a TF Serving REST path."""
    match = _ROUTE.match(path)
    if match is None:
        raise http_error(
            http.HTTPStatus.NOT_FOUND,
            f"Malformed request: {path!r}. Expected /v1/models/<name>[/versions/<v>] followed by "
            "nothing (status), /metadata or :predict.",
        )
    version = match["version"]
    return match["name"], None if version is None else int(version), match["label"], match["suffix"]


def _arrays(served, inputs):
    """The inputs (name -> parsed JSON) as numpy arrays; every shape is read from the nested lists
    and checked against the spec before any array is built."""
    spec, shapes = served.spec, {}
    for name in validation.INPUT_NAMES:
        try:
            shapes[name] = tensors.json_shape(inputs[name])
        except tensors.TensorDecodeError as error:
            raise validation.invalid(f"Input {name!r}: {error}") from None
    validation.check_shapes(spec, shapes, served.max_batch_size)
    arrays = {}
    for name in validation.INPUT_NAMES:
        try:
            arrays[name] = tensors.from_json(inputs[name], validation.input_dtype(spec, name))
        except tensors.TensorDecodeError as error:
            raise validation.invalid(f"Input {name!r}: {error}") from None
    return arrays


def _columnar_arrays(served, inputs):
    if not isinstance(inputs, dict):
        raise validation.invalid(
            f"'inputs' must be an object mapping the input names {list(validation.INPUT_NAMES)} "
            f"to values. Received: {type(inputs).__name__}"
        )
    validation.check_input_names(served.spec, inputs)
    return _arrays(served, inputs)


def _row_arrays(served, instances):
    """Stacks the instances' `values`; the batch-less inputs must be equal in every instance."""
    if not isinstance(instances, list) or not instances:
        raise validation.invalid("'instances' must be a non-empty list of objects.")
    if len(instances) > served.max_batch_size:
        raise validation.invalid(
            f"Too many instances: at most {served.max_batch_size} accepted. "
            f"Received: {len(instances)}"
        )
    for row in instances:
        if not isinstance(row, dict):
            raise validation.invalid(
                f"Every instance must be an object. Received: {type(row).__name__}"
            )
        validation.check_input_names(served.spec, row)
    for name in _SHARED_INPUTS:
        if any(row[name] != instances[0][name] for row in instances[1:]):
            raise validation.invalid(
                f"In the row format every instance must carry the same {name!r}: it has no batch "
                "dimension. Send instances that share it, or use the columnar 'inputs' format."
            )
    inputs = {name: instances[0][name] for name in _SHARED_INPUTS}
    inputs["values"] = [row["values"] for row in instances]
    return _arrays(served, inputs)


def _outputs_json(outputs, rows):
    """Columnar, or one object per instance; TF Serving omits the name of a single output."""
    first = next(iter(outputs.values()))
    if len(outputs) == 1:
        return tensors.to_json(first)
    if not rows:
        return {name: tensors.to_json(array) for name, array in outputs.items()}
    return [{name: tensors.to_json(a[i]) for name, a in outputs.items()} for i in range(len(first))]


def _parse_body(body, max_values):
    if max_values is not None:
        values = body.count(b"[") + body.count(b",") + body.count(b":")
        if values > max_values:
            raise validation.invalid(
                f"The body holds up to {values} JSON values (counting '[', ',' and ':'); a "
                f"request this model accepts holds at most {max_values}."
            )
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise validation.invalid(f"Malformed JSON in the request body: {error}") from None
    except RecursionError:
        raise validation.invalid("Malformed JSON in the request body: nested too deeply.") from None
    if not isinstance(request, dict):
        raise validation.invalid(
            f"The body must be a JSON object. Received: {type(request).__name__}"
        )
    unknown = sorted(set(request) - _BODY_KEYS)
    if unknown or ("inputs" in request) == ("instances" in request):
        raise validation.invalid(
            "The body must hold exactly one of 'inputs' (columnar) or 'instances' (row), and "
            f"optionally 'signature_name'. Received keys: {sorted(request)}"
        )
    signature_name = request.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise validation.invalid(f"'signature_name' must be a string. Received: {signature_name!r}")
    return request, signature_name


def predict_json(served, target, body):
    """Answers one :predict body; returns the response object. Raises RequestError.

    Args:
      served: the ServedTail.
      target: (model name, version or None, label or None) from the path.
      body: the request body, bytes.
    """
    max_values = max_json_values(served.spec, served.max_batch_size)
    request, signature_name = _parse_body(body, max_values)
    name, version, label = target
    served.check_target(name, version, label, signature_name)
    if "inputs" in request:
        arrays = _columnar_arrays(served, request["inputs"])
        return {"outputs": _outputs_json(served.predict(arrays), rows=False)}
    try:
        arrays = _row_arrays(served, request["instances"])
    except RecursionError:  # comparing the instances' deeply nested lists
        raise validation.invalid("The instances nest too deeply.") from None
    return {"predictions": _outputs_json(served.predict(arrays), rows=True)}


def status_json(served):
    status = {"error_code": "OK", "error_message": ""}
    version = {"version": str(served.version), "state": "AVAILABLE", "status": status}
    return {"model_version_status": [version]}


def metadata_json(served):
    signature_defs = json_format.MessageToDict(
        served.signature_def_map(), preserving_proto_field_name=True
    )
    return {
        "model_spec": {"name": served.name, "signature_name": "", "version": str(served.version)},
        "metadata": {"signature_def": signature_defs},
    }


def body_limit(served, max_request_bytes):
    """(The largest :predict body accepted, why): what the served tail accepts as JSON
    (`max_json_body_bytes`), within `max_request_bytes`."""
    spec, batch = served.spec, served.max_batch_size
    from_spec = max_json_body_bytes(spec, batch)
    if from_spec is None or from_spec > max_request_bytes:
        return max_request_bytes, "the server's request limit"
    shape = f"({batch}, {spec.height}, {spec.width}, {spec.max_budget})"
    return from_spec, f"enough for 'values' of shape up to {shape} as JSON"


def max_json_body_bytes(spec, max_batch_size):
    """The largest REST :predict body that a request the spec accepts needs (a full batch of the
    largest budget, in either format, with whitespace), or None when the spec leaves h, w or k
    open."""
    if spec.height is None or spec.width is None or spec.max_budget is None:
        return None
    numbers = spec.height * spec.width * spec.max_budget + spec.max_budget  # values, indices
    return JSON_FIXED_BYTES + max_batch_size * (numbers * JSON_NUMBER_BYTES + JSON_INSTANCE_BYTES)


def max_json_values(spec, max_batch_size):
    """The most JSON values (numbers, lists, objects, keys) a :predict body that the spec accepts
    holds, in either format, or None when the spec leaves h, w or k open. Every value but the
    outermost follows a '[', ',' or ':', so counting those bytes bounds what parsing would build,
    before it does."""
    if spec.height is None or spec.width is None or spec.max_budget is None:
        return None
    pixels, k = spec.height * spec.width, spec.max_budget
    # Per instance: its numbers, one list per pixel and row (at most two per pixel), its indices,
    # and the row format's own object, keys and scalars.
    return JSON_FIXED_VALUES + max_batch_size * (pixels * (k + 2) + k + JSON_INSTANCE_VALUES)
