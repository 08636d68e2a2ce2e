"""What both halves put in and take out of the service's messages, besides codec payloads.

The model digest they must agree on, weights as TensorProtos, logits as float32 bytes, and the
checks of a received activations payload.
"""

import hashlib
import json

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from tfsplit import codec
from tfsplit.codec import second_cut
from tfsplit.protocol.framing import MAX_MESSAGE_BYTES, payload_batch  # noqa: F401
from tfsplit.serving import validation

# The most of a client's string (or list) that a log line or an error repeats: a device id or a
# shape fits; a megabyte-long one cannot make an error too long to send back.
MAX_SHOWN_CHARS = 64
# Where a TensorProto keeps its values when it has no `tensor_content`, and how many per element.
_VALUE_FIELDS = {
    tf.float32: ("float_val", 1),
    tf.float64: ("double_val", 1),
    tf.float16: ("half_val", 1),
    tf.bfloat16: ("half_val", 1),
    tf.int8: ("int_val", 1),
    tf.int16: ("int_val", 1),
    tf.int32: ("int_val", 1),
    tf.uint8: ("int_val", 1),
    tf.uint16: ("int_val", 1),
    tf.int64: ("int64_val", 1),
    tf.uint32: ("uint32_val", 1),
    tf.uint64: ("uint64_val", 1),
    tf.bool: ("bool_val", 1),
    tf.complex64: ("scomplex_val", 2),
    tf.complex128: ("dcomplex_val", 2),
}


def shown(value, limit=MAX_SHOWN_CHARS):
    """A client's string or repeated field as logs and errors echo it: its repr, cut to about
    `limit` characters, with its full length when cut."""
    if isinstance(value, (str, bytes)):
        text, length, unit = repr(value[:limit]), len(value), "characters"
    else:
        text, length, unit = repr(list(value[:limit])), len(value), "values"
    if len(text) <= limit and length <= limit:
        return text
    return f"{text[:limit]}... ({length} {unit})"


def model_digest(split):
    """sha256 of what both halves must agree on: the shape and dtype of every weight both hold
    (not the device's own local classifier), in order, the wire dtypes and the bottleneck's
    width."""
    # The head's and the tail's own weights: not the variables a trainer adds to the model (the
    # budget, the device's step id), which differ between a Keras device and the server's model.
    weights = split.head.weights + split.tail.weights
    shared = [w for w in weights if all(w is not v for v in split.device_only_weights)]
    description = dict(
        weights=[(w.shape.as_list(), w.dtype.name) for w in shared],
        wire=[split.activation_dtype, split.gradient_dtype, split.channels],
        wire_shape=list(split.wire_shape),
        classes=split.num_classes,
    )
    if hasattr(split, "top"):  # U-shaped: the second cut's wire too
        description["top"] = [
            split.top_activation_dtype,
            split.top_gradient_dtype,
            list(split.tail.output.shape[1:]),
        ]
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def request_digest(request):
    """sha256 of a request's every field, payload included: tells a retry (the same request)
    from another request that reuses its step id."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


def weights_to_protos(weights):
    return [tf.make_tensor_proto(np.asarray(w)).SerializeToString() for w in weights]


def weights_from_protos(blobs, like, part="tail"):
    """Arrays of serialized TensorProtos, checked against the shapes and dtypes of `like` (the
    weights of the model's `part`).

    Each proto's declared dtype, shape and number of values are checked before it becomes an
    array: `tf.make_ndarray` would pad a one-value proto out to whatever shape it declares.
    """
    if len(blobs) != len(like):
        raise validation.invalid(f"Expected {len(like)} {part} weights. Received: {len(blobs)}")
    return [
        _checked_array(blob, reference, f"{part} weight {i}")
        for i, (blob, reference) in enumerate(zip(blobs, like))
    ]


def _checked_array(blob, reference, what):
    """The array of one serialized TensorProto that must match `reference` (a numpy array)."""
    try:
        proto = tensor_pb2.TensorProto.FromString(blob)
    except Exception:  # noqa: BLE001  (any malformed bytes)
        raise validation.invalid(f"{what} is not a serialized TensorProto.") from None
    dtype = tf.as_dtype(reference.dtype)
    dims = [d.size for d in proto.tensor_shape.dim]
    if (
        proto.dtype != dtype.as_datatype_enum
        or proto.tensor_shape.unknown_rank
        or dims != list(reference.shape)
    ):
        declared = "unknown" if proto.tensor_shape.unknown_rank else shown(dims)
        raise validation.invalid(
            f"{what} must be {dtype.name} of shape {list(reference.shape)}. Received: "
            f"{_dtype_name(proto.dtype)} of shape {declared}"
        )
    if proto.tensor_content:
        expected, received, unit = reference.nbytes, len(proto.tensor_content), "bytes"
    elif dtype in _VALUE_FIELDS:
        field, per_element = _VALUE_FIELDS[dtype]
        expected, received = reference.size * per_element, len(getattr(proto, field))
        unit = f"values in {field}"
    else:
        expected, received, unit = reference.nbytes, 0, "bytes"
    if received != expected:
        raise validation.invalid(
            f"{what} must carry exactly {expected} {unit} for its shape "
            f"{list(reference.shape)}. Received: {received}"
        )
    return tf.make_ndarray(proto)


def _dtype_name(enum):
    try:
        return tf.as_dtype(enum).name
    except TypeError:
        return f"dtype enum {enum}"


def decode_activations(payload, split, with_labels, max_batch_size=None):
    """The activations payload a device sent, checked against `split`'s wire (dtype, channels,
    positions) and, for a training step, its labels against the classes. A U-shaped split's
    payloads must carry no labels at all.

    `max_batch_size` is checked on the header first: the tail places the k channels sent among
    all C, so a small payload of many one-channel samples would take C/k times its size.
    """
    batch = payload_batch(payload)
    if max_batch_size is not None and batch is not None and batch > max_batch_size:
        raise validation.invalid(
            f"A step carries at most {max_batch_size} samples on this server. Received: {batch}"
        )
    try:
        decoded = codec.decode(payload, expect_kind="activations", max_channels=split.channels)
    except codec.PayloadError as error:
        raise validation.invalid(f"Bad activations payload: {error}") from None
    if decoded.dtype != split.activation_dtype or decoded.channels != split.channels:
        raise validation.invalid(
            f"The payload must carry {split.activation_dtype} values of a {split.channels}-"
            f"channel bottleneck. Received: {decoded.dtype}, {decoded.channels} channels"
        )
    spatial = (decoded.values.shape[1], decoded.values.shape[2])
    if spatial != (split.height, split.width):
        raise validation.invalid(
            f"The payload's positions must be {split.height}x{split.width}. Received: "
            f"{spatial[0]}x{spatial[1]}"
        )
    if hasattr(split, "top") and decoded.labels is not None:
        raise validation.invalid(
            "This server trains a U-shaped split: the labels stay on the device, and a payload "
            "must carry none."
        )
    if with_labels:
        if decoded.labels is None:
            raise validation.invalid("A training payload must carry the batch's labels.")
        classes = split.num_classes
        if decoded.labels.min() < 0 or decoded.labels.max() >= classes:
            raise validation.invalid(f"Labels must be in 0..{classes - 1}.")
    return decoded


def encode_second_cut(values, split, dtype, kind):
    """A U-shaped split's second-cut tensor as a codec payload (`codec.second_cut`)."""
    return second_cut.encode_second_cut(values, split.top_shape, dtype, kind)


def decode_second_cut(payload, split, dtype, kind, batch=None):
    """The float32 tensor, shaped as the middle's output, of a second-cut payload, checked as
    `codec.second_cut.decode_second_cut` checks it; a bad one is an invalid request."""
    try:
        return second_cut.decode_second_cut(payload, split.top_shape, dtype, kind, batch)
    except codec.PayloadError as error:
        raise validation.invalid(str(error)) from None
