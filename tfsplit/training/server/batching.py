"""Training steps on their way through a `TailTrainer`: several devices' steps as one batch, and
that batch's outputs as each step's reply."""

import threading

import numpy as np

from tfsplit import codec
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol.framing import logits_reply
from tfsplit.serving import validation
from tfsplit.training.messages import request_digest


class PendingStep:
    """A training step waiting to be trained: the request, its digest (a retry must match it),
    its decoded payload, its targets (the labels; a U-shaped split's top gradient), and the reply
    or error once trained (`result` waits for them). A U-shaped split's step also names the
    FORWARDs that ran with its own (`forward_group`), and trains with them; a FORWARD waits here
    too."""

    def __init__(self, request, payload, targets=None, forward_group=None):
        self.request, self.payload, self.forward_group = request, payload, forward_group
        self.targets = payload.labels if targets is None else targets
        self.digest = request_digest(request)
        self.batch = payload.values.shape[0]
        self.reply, self.error = None, None
        self.done = threading.Event()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.reply


class Gather:
    """Parallel mode: the steps of one kind (TRAIN, or a U-shaped split's FORWARD) waiting to run
    as one batch, and whether a request thread is gathering them."""

    def __init__(self):
        self.steps, self.gathering = [], False


def joined_values(steps):
    """(values, indices) of `steps` as one batch: one step keeps its (k,) selection, several get
    a (N, k) selection per sample."""
    if len(steps) == 1:
        indices = steps[0].payload.indices
    else:
        indices = np.concatenate([np.tile(s.payload.indices, (s.batch, 1)) for s in steps])
    return np.concatenate([s.payload.dequantized() for s in steps]), indices


def joined_inputs(steps):
    """(values, indices, targets, gradient scale) of `steps` as one batch.

    The scale (total / the sample's step's batch) makes each device's gradient that of its own
    batch's mean loss, so that a head learns at the same pace alone or batched with others.
    """
    batches = [s.batch for s in steps]
    total = sum(batches)
    return (
        *joined_values(steps),
        np.concatenate([s.targets for s in steps]),
        np.repeat([total / b for b in batches], batches).astype(np.float32),
    )


def split_replies(steps, gradient, logits, loss, split):
    """Each step's StepReply from the joined batch's outputs: its logits (None: none, for a
    U-shaped split) and its part of the gradient, encoded as `split` sends gradients."""
    replies, start = [], 0
    for step in steps:
        end = start + step.batch
        if logits is None:
            reply = pb.StepReply(step=step.request.step)
        else:
            reply = logits_reply(step.request.step, logits[start:end])
        reply.loss = loss
        try:
            reply.payload = codec.encode(
                gradient[start:end],
                step.payload.indices,
                split.channels,
                split.gradient_dtype,
                kind="gradients",
            )
        except codec.PayloadError as error:
            raise validation.invalid(
                f"The gradient of training step {step.request.step} cannot be sent as "
                f"{split.gradient_dtype}: {error} The tail keeps its weights."
            ) from None
        replies.append(reply)
        start = end
    return replies
