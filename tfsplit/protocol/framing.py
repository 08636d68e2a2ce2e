"""What frames the split training service's messages, in numpy: both halves' limits, the
logits a reply carries and the batch size a payload declares.

The device that trains without TensorFlow uses these as the server does.
"""

import struct

import numpy as np

from tfsplit.protocol import split_training_pb2 as pb

MAX_MESSAGE_BYTES = 64 << 20  # A payload of 64 MiB is a 16M-value float32 batch: plenty.
GRPC_PREFIX_BYTES = 5  # gRPC frames every message: a compressed flag and a 4-byte length.
# A payload's batch size N: the u32 after the magic, version, kind, dtype and flags bytes
# (tfsplit/codec/layout.py's table), read before anything is decoded.
_PAYLOAD_BATCH = struct.Struct("<I")
_PAYLOAD_BATCH_OFFSET = 8


def logits_reply(step, logits):
    logits = np.asarray(logits, np.float32)
    return pb.StepReply(
        step=step, logits=logits.astype("<f4").tobytes(), num_classes=logits.shape[-1]
    )


def reply_logits(reply):
    """The (batch, classes) float32 logits a StepReply carries."""
    return np.frombuffer(reply.logits, "<f4").reshape(-1, reply.num_classes)


def payload_batch(payload):
    """The batch size N an encoded payload declares (None if too short to hold it)."""
    if len(payload) < _PAYLOAD_BATCH_OFFSET + _PAYLOAD_BATCH.size:
        return None
    return _PAYLOAD_BATCH.unpack_from(payload, _PAYLOAD_BATCH_OFFSET)[0]
