"""What both halves put in and take out of the service's messages, besides codec payloads.

The model digest they must agree on, tail weights as TensorProtos, logits as float32 bytes.
"""

import hashlib
import json

import numpy as np
import tensorflow as tf

from tfsplit.net import split_training_pb2 as pb
from tfsplit.serve import validation

MAX_MESSAGE_BYTES = 64 << 20  # A payload of 64 MiB is a 16M-value float32 batch: plenty.


def model_digest(split):
    """sha256 of what both halves must agree on: every weight's shape and dtype in order, the
    wire dtypes and the bottleneck's width."""
    description = dict(
        weights=[(w.shape.as_list(), w.dtype.name) for w in split.weights],
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
