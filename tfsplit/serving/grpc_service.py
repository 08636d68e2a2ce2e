"""TF Serving's gRPC PredictionService (Predict, GetModelMetadata) in front of a ServedTail."""

import grpc
from absl import logging
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from tfsplit.serving import tensors, validation

_SIGNATURE_DEF_FIELD = "signature_def"


def _target(model_spec):
    """(name, version or None, label or None, signature) of a request's ModelSpec."""
    version = model_spec.version.value if model_spec.HasField("version") else None
    return model_spec.name, version, model_spec.version_label or None, model_spec.signature_name


def answer_or_abort(context, method, handler):
    """Runs a handler; a refused request becomes its gRPC status, the server keeps serving."""
    try:
        return handler()
    except validation.RequestError as error:
        logging.warning("Rejected %s (%s): %s", method, error.code.name, error)
        context.abort(error.code, str(error))
    except Exception as error:  # noqa: BLE001  (one bad request must not take the server down)
        logging.exception("Internal error in %s", method)
        context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {type(error).__name__}: {error}")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata for one tail; Classify, Regress, MultiInference: UNIMPLEMENTED.

    Args:
      served: the ServedTail.
      max_elements: the largest element count accepted in one input tensor.
    """

    def __init__(self, served, max_elements):
        self._served = served
        self._max_elements = max_elements

    def _decode(self, name, proto):
        validation.check_dtype(self._served.spec, name, tensors.dtype_name(proto.dtype))
        try:
            return tensors.from_tensor_proto(proto, self._max_elements)
        except tensors.TensorDecodeError as error:
            raise validation.invalid(f"Input {name!r}: {error}") from None

    def _predict(self, request):
        self._served.check_target(*_target(request.model_spec))
        validation.check_input_names(self._served.spec, request.inputs)
        arrays = {name: self._decode(name, proto) for name, proto in request.inputs.items()}
        outputs = self._served.predict(arrays, tuple(request.output_filter))
        response = predict_pb2.PredictResponse()
        self._fill_model_spec(response.model_spec)
        for name, array in outputs.items():
            response.outputs[name].CopyFrom(tensors.to_tensor_proto(array))
        return response

    def _fill_model_spec(self, model_spec):
        model_spec.name = self._served.name
        model_spec.version.value = self._served.version
        model_spec.signature_name = self._served.spec.signature_name

    def _metadata(self, request):
        name, version, label, _ = _target(request.model_spec)
        self._served.check_target(name, version, label, "")
        if list(request.metadata_field) != [_SIGNATURE_DEF_FIELD]:
            raise validation.invalid(
                f"GetModelMetadata supports exactly metadata_field=[{_SIGNATURE_DEF_FIELD!r}]. "
                f"Received: {list(request.metadata_field)}"
            )
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        self._fill_model_spec(response.model_spec)
        response.model_spec.signature_name = ""
        response.metadata[_SIGNATURE_DEF_FIELD].Pack(self._served.signature_def_map())
        return response

    def Predict(self, request, context):  # noqa: N802  (the gRPC method name)
        return answer_or_abort(context, "Predict", lambda: self._predict(request))

    def GetModelMetadata(self, request, context):  # noqa: N802  (the gRPC method name)
        return answer_or_abort(context, "GetModelMetadata", lambda: self._metadata(request))
