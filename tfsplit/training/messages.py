"""What both halves put in and take out of the service's messages, besides codec payloads.

The model digest they must agree on, weights as TensorProtos, logits as float32 bytes, and the
checks of a received activations payload.
"""

import hashlib
import json

import numpy as np
import tensorflow as tf

from tfsplit import codec
from tfsplit.serving import validation
from tfsplit.training import split_training_pb2 as pb

MAX_MESSAGE_BYTES = 64 << 20  # A payload of 64 MiB is a 16M-value float32 batch: plenty.


def model_digest(split):
    """sha256 of what both halves must agree on: the shape and dtype of every weight both hold
    (not the device's own local classifier), in order, the wire dtypes and the bottleneck's
    width."""
    shared = [w for w in split.weights if all(w is not v for v in split.device_only_weights)]
    description = dict(
        weights=[(w.shape.as_list(), w.dtype.name) for w in shared],
        wire=[split.activation_dtype, split.gradient_dtype, split.channels],
        wire_shape=list(split.wire_shape),
    )
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def weights_to_protos(weights):
    return [tf.make_tensor_proto(np.asarray(w)).SerializeToString() for w in weights]


def weights_from_protos(blobs, like, part="tail"):
    """Arrays of serialized TensorProtos, checked against the shapes and dtypes of `like` (the
    weights of the model's `part`)."""
    if len(blobs) != len(like):
        raise validation.invalid(f"Expected {len(like)} {part} weights. Received: {len(blobs)}")
    weights = []
    for i, (blob, reference) in enumerate(zip(blobs, like)):
        try:
            array = tf.make_ndarray(tf.make_tensor_proto(0).FromString(blob))
        except Exception as error:  # noqa: BLE001  (any malformed bytes)
            raise validation.invalid(f"{part} weight {i} is not a TensorProto: {error}") from None
        if array.shape != reference.shape or array.dtype != reference.dtype:
            raise validation.invalid(
                f"{part} weight {i} must be {reference.dtype} {reference.shape}. "
                f"Received: {array.dtype} {array.shape}"
            )
        weights.append(array)
    return weights


def logits_reply(step, logits):
    logits = np.asarray(logits, np.float32)
    return pb.StepReply(
        step=step, logits=logits.astype("<f4").tobytes(), num_classes=logits.shape[-1]
    )


def reply_logits(reply):
    """The (batch, classes) float32 logits a StepReply carries."""
    return np.frombuffer(reply.logits, "<f4").reshape(-1, reply.num_classes)


def decode_activations(payload, split, with_labels):
    """The activations payload a device sent, checked against `split`'s wire (dtype, channels,
    positions) and, for a training step, its labels against the classes."""
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
    if with_labels:
        if decoded.labels is None:
            raise validation.invalid("A training payload must carry the batch's labels.")
        classes = split.tail.output.shape[-1]
        if decoded.labels.min() < 0 or decoded.labels.max() >= classes:
            raise validation.invalid(f"Labels must be in 0..{classes - 1}.")
    return decoded
