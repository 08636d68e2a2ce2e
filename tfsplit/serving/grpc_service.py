"""TF Serving's gRPC PredictionService (Predict, GetModelMetadata) in front of a ServedTail."""

import grpc
from absl import logging
from google.protobuf import message as protobuf_message
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tfsplit.serving import tensors, validation

_SIGNATURE_DEF_FIELD = "signature_def"


def _target(model_spec):
    """(name, version or None, label or None, signature) of a request's ModelSpec."""
    version = model_spec.version.value if model_spec.HasField("version") else None
    return model_spec.name, version, model_spec.version_label or None, model_spec.signature_name


# The longest status message sent back or logged for one refusal: whatever a request carried, its
# refusal stays one short line.
MAX_DETAILS_CHARS = 1000


def _bounded(text):
    text = " ".join(str(text).split())  # one line, whatever the message held
    if len(text) <= MAX_DETAILS_CHARS:
        return text
    return text[: MAX_DETAILS_CHARS - 20] + f"... ({len(text)} chars)"


class Undecodable:
    """What a servicer receives for bytes that are not its request message, so that it refuses
    them with one INVALID_ARGUMENT line (gRPC itself would log a traceback and answer INTERNAL)."""

    def __init__(self, name, size):
        self.name, self.size = name, size


def _lenient_parser(message_class):
    def parse(data):
        try:
            return message_class.FromString(data)
        except protobuf_message.DecodeError:
            return Undecodable(message_class.DESCRIPTOR.name, len(data))

    return parse


def parsed(request):
    """`request`, or INVALID_ARGUMENT where its bytes did not decode."""
    if isinstance(request, Undecodable):
        raise validation.invalid(
            f"The request ({request.size} bytes) is not a serialized {request.name}."
        )
    return request


def add_servicer(servicer, server, service_name, methods):
    """Registers `servicer`'s unary methods, {name: (request class, reply class)}, with parsers
    that hand undecodable bytes to the servicer (see `parsed`) instead of failing inside gRPC."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=_lenient_parser(request_class),
            response_serializer=reply_class.SerializeToString,
        )
        for name, (request_class, reply_class) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)


def answer_or_abort(context, method, handler):
    """Runs a handler; a refused request becomes its gRPC status, the server keeps serving.

    Each failure logs one line (a client can send thousands); an unexpected one keeps its
    traceback at verbosity 1 and up, and its status names the exception's type only (its
    message may hold a path or other server detail).
    """
    try:
        return handler()
    except validation.RequestError as error:
        details = _bounded(error)
        logging.warning("Rejected %s (%s): %s", method, error.code.name, details)
        context.abort(error.code, details)
    except Exception as error:  # noqa: BLE001  (one bad request must not take the server down)
        if logging.get_verbosity() >= 1:
            logging.exception("Internal error in %s", method)
        else:
            logging.error(
                "Internal error in %s: %s: %s", method, type(error).__name__, _bounded(error)
            )
        context.abort(
            grpc.StatusCode.INTERNAL,
            f"Internal error ({type(error).__name__}); the server's log has the details.",
        )


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
        return answer_or_abort(context, "Predict", lambda: self._predict(parsed(request)))

    def GetModelMetadata(self, request, context):  # noqa: N802  (the gRPC method name)
        return answer_or_abort(context, "GetModelMetadata", lambda: self._metadata(parsed(request)))

    def _unimplemented(self, method, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served: a tail answers Predict."
        )

    def Classify(self, request, context):  # noqa: N802  (the gRPC method name)
        self._unimplemented("Classify", context)

    def Regress(self, request, context):  # noqa: N802  (the gRPC method name)
        self._unimplemented("Regress", context)

    def MultiInference(self, request, context):  # noqa: N802  (the gRPC method name)
        self._unimplemented("MultiInference", context)


SERVICE_NAME = "tensorflow.serving.PredictionService"
# TF Serving's PredictionService: method -> (request, reply) message classes.
METHODS = {
    "Predict": (predict_pb2.PredictRequest, predict_pb2.PredictResponse),
    "GetModelMetadata": (
        get_model_metadata_pb2.GetModelMetadataRequest,
        get_model_metadata_pb2.GetModelMetadataResponse,
    ),
    "Classify": (
        classification_pb2.ClassificationRequest,
        classification_pb2.ClassificationResponse,
    ),
    "Regress": (regression_pb2.RegressionRequest, regression_pb2.RegressionResponse),
    "MultiInference": (inference_pb2.MultiInferenceRequest, inference_pb2.MultiInferenceResponse),
}
