"""How a U-shaped split's steps differ on the server, whose tail is then the middle.

The device holds the top and the labels, and trains a step in two calls. FORWARD sends the step's
activations without labels and gets the middle's output, changing nothing. TRAIN sends the top's
gradient at that output: the server runs the middle's forward pass again on the FORWARD's
activations (so the middle must draw nothing at random) and trains it on that gradient. The step
log keeps both in one request, which a restarted server trains again as it was trained. In
parallel mode the FORWARDs that devices send at the same time run as one batch, and their TRAINs
train together in the same order (`training_steps`); the devices average their heads after every
epoch.
"""

import grpc
import numpy as np

from tfsplit import codec
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.serving import validation
from tfsplit.training.messages import decode_second_cut, encode_second_cut


def middle_reply(split, step, outputs):
    """The StepReply of a forward pass: the middle's output (an array) as the second cut's
    payload."""
    try:
        payload = encode_second_cut(
            np.asarray(outputs), split, split.top_activation_dtype, "activations"
        )
    except codec.PayloadError as error:
        raise validation.invalid(
            f"The middle's output cannot be sent as {split.top_activation_dtype}: {error}"
        ) from None
    return pb.StepReply(step=step, payload=payload)


def with_forward(request, forward):
    """A TRAIN as the step log keeps it: the activations of the device's FORWARD of that step
    (`forward`: its (step, payload), or None), with the top's gradient that the TRAIN sent."""
    if forward is None or forward[0] != request.step:
        raise validation.RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Training step {request.step} of a U-shaped split comes after its FORWARD; this "
            f"server holds {'none' if forward is None else f'that of step {forward[0]}'}.",
        )
    logged = pb.StepRequest()
    logged.CopyFrom(request)
    logged.payload, logged.top_gradient = forward[1], request.payload
    return logged


def top_gradient(split, request, payload):
    """The top's gradient of a logged TRAIN, checked against its activations' batch."""
    return decode_second_cut(
        request.top_gradient,
        split,
        split.top_gradient_dtype,
        "gradients",
        batch=payload.values.shape[0],
    )
