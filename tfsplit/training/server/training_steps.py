"""How `TailTrainer` trains: a training step alone (sequential) or with the other devices' steps
sent at the same time (parallel), a U-shaped split's FORWARD likewise, and the atomic update.

A step's replies are made and checked (finite, within the wire dtype's range) and the step is
logged before the update is applied, so a step that fails leaves the tail and every device's state
as they were. A retry of the last step gets its kept reply; a retry of a step still waiting for
its group gets that group's reply. In parallel mode a U-shaped split's FORWARDs are joined too,
and each TRAIN trains with those whose FORWARDs ran with its own, in the same order: the middle's
batch norm then computes in the TRAIN the statistics that its FORWARD's output was made with.
"""

import time

import grpc
import tensorflow as tf
from absl import logging

from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.serving import validation
from tfsplit.training.server import ushaped
from tfsplit.training.server.batching import joined_inputs, joined_values, split_replies
from tfsplit.training.server.checks import check_learning_rate, check_retry

TRAIN, FORWARD = pb.StepRequest.TRAIN, pb.StepRequest.FORWARD


class StepTraining:
    """The training steps of `TailTrainer`, which holds the state they share: the lock, the
    devices, the steps gathered for parallel mode (`_gathers`, by kind) and the compiled tail."""

    def _train_request(self, step):
        """Trains the step alone (sequential) or with the other devices' (parallel); a retry of
        the last step gets its kept reply, a retry of a step still waiting gets its reply."""
        request = step.request
        check_learning_rate(request.learning_rate, self.max_learning_rate)
        with self._lock:
            device = self._device(request.device_id)
            if request.step == device.next_step - 1 and device.last_reply is not None:
                check_retry(step, device.last_digest)
                logging.info("Step %d again (a retry): answered from the kept reply.", request.step)
                return device.last_reply
            waiting = self._waiting(TRAIN, request.device_id)
            if waiting and waiting[0].request.step == request.step:
                check_retry(step, waiting[0].digest)
            step, lead = self._queue(TRAIN, step, "training step")
        return self._finish(TRAIN, step, lead)

    def _forward_request(self, step):
        """A U-shaped split's FORWARD: the middle's output for the step's activations, changing
        nothing; alone (sequential) or joined with the other devices' FORWARDs (parallel), as
        their TRAINs will train together."""
        with self._lock:
            step, lead = self._queue(FORWARD, step, "the FORWARD of training step")
        return self._finish(FORWARD, step, lead)

    def _queue(self, kind, step, expected):
        """Holding the lock: runs `step` at once (sequential), or puts it with the other
        devices' steps of its kind (parallel); the same step sent again while it waits becomes
        the waiting one. Returns (the step to wait for, whether this thread gathers them)."""
        request = step.request
        device = self._device(request.device_id)
        waiting = self._waiting(kind, request.device_id)
        if waiting and waiting[0].request.step == request.step:
            return waiting[0], False
        if request.step != device.next_step or waiting:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Expected {expected} {device.next_step}. Received: step {request.step}",
            )
        if self.parallel:
            return step, self._join(kind, step)
        (self._forward_together if kind == FORWARD else self._train_together)([step])
        return step, False

    def _finish(self, kind, step, lead):
        """The step's reply, once it ran (the thread that leads a gather runs it first)."""
        if lead:
            self._gather_and_run(kind)
        return step.result()

    def _waiting(self, kind, device_id):
        return [p for p in self._gathers[kind].steps if p.request.device_id == device_id]

    def _join(self, kind, step):
        """Parallel: `step` waits with the others of its kind; returns whether its thread
        gathers them (the first to arrive does)."""
        gather = self._gathers[kind]
        lead = not gather.gathering
        gather.steps.append(step)
        self._idle.discard(step.request.device_id)
        gather.gathering = True
        self._lock.notify_all()
        return lead

    def _gather_and_run(self, kind):
        """Waits until every active device has a step of `kind` waiting (at most
        `gather_timeout_s`), then runs them, one batch per group that can be joined; a device
        that did not send in time is not waited for again until its next step arrives (it may
        be evaluating, averaging, finished or gone)."""
        deadline = time.monotonic() + self.gather_timeout_s
        gather = self._gathers[kind]
        with self._lock:
            while self._some_missing(gather):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            self._idle |= self._missing(gather)
            steps, gather.steps, gather.gathering = gather.steps, [], False
            groups = {}
            for step in steps:
                groups.setdefault(self._group_key(kind, step), []).append(step)
            batches = [b for group in groups.values() for b in _bounded(group, self.max_joined)]
            for together in batches:
                if kind == FORWARD:
                    self._forward_together(together)
                else:
                    if self.ushaped and len(together) > 1:  # in the order their FORWARDs ran
                        together.sort(key=lambda s: s.forward_group.index(_step_id(s)))
                    self._train_together(together)

    def _some_missing(self, gather):
        """Whether an active device has no step in `gather` yet. Each arriving step wakes the
        gatherer: the sizes tell in O(1) that some must still be missing, so that a gather of N
        devices costs O(N) rather than O(N^2)."""
        accounted = len(gather.steps) + len(self._idle) + len(self._rounds.waiting)
        return accounted < len(self.devices) or bool(self._missing(gather))

    def _missing(self, gather):
        """The active devices (not idle, not averaging) without a step in `gather`."""
        sent = {p.request.device_id for p in gather.steps}
        return set(self.devices) - self._idle - self._rounds.waiting - sent

    def _group_key(self, kind, step):
        """What steps that run as one batch share: for a FORWARD, its number of channels; for a
        U-shaped TRAIN, the FORWARDs its own ran with; for a plain TRAIN, the budget. And the
        learning rate and nesting of a TRAIN."""
        request = step.request
        if kind == FORWARD:
            return step.payload.values.shape[-1]
        if self.ushaped:
            return step.forward_group or (_step_id(step),), request.learning_rate
        return len(step.payload.indices), request.learning_rate, request.nesting

    def _forward_together(self, steps):
        """The middle's output for `steps` as one batch (its batch norm's statistics those of
        the joined batch, as their TRAINs will compute them), each step's part as its reply; or
        the error for each."""
        _answer_each(steps, lambda: self._forward_or_refuse(steps))

    def _forward_or_refuse(self, steps):
        values, indices = joined_values(steps)
        outputs = self._tail.forward_unchanged[indices.ndim](
            tf.constant(values, tf.float32), tf.constant(indices, tf.int32)
        ).numpy()
        replies, start, group = [], 0, tuple(_step_id(s) for s in steps)
        for step in steps:
            end = start + step.batch
            replies.append(ushaped.middle_reply(self.split, step.request.step, outputs[start:end]))
            start = end
        for step, reply in zip(steps, replies):
            device = self.devices[step.request.device_id]
            device.forward = (step.request.step, step.request.payload)
            device.forward_group, step.reply = group, reply

    def _train_together(self, steps, log=True):
        """One update of the tail from `steps` (one per device) as one batch (`joined_inputs`),
        or none; each step gets its reply (or the error) in `steps`."""
        _answer_each(steps, lambda: self._train_or_refuse(steps, log))

    def _train_or_refuse(self, steps, log):
        """The step's replies are made and checked, and the step logged, before the update is
        applied: a step that fails leaves the tail and every device's state as they were."""
        first = steps[0]
        values, indices, targets, scale = joined_inputs(steps)
        learning_rate = tf.constant(first.request.learning_rate, tf.float32)
        tail_gradients, gradient, outputs, loss, finite = self._tail.compute[indices.ndim](
            tf.constant(values, tf.float32),
            tf.constant(indices, tf.int32),
            tf.constant(targets),
            tf.constant(scale),
            learning_rate,
            tf.constant(first.request.nesting),
        )
        try:
            if not bool(finite):
                raise validation.invalid(
                    f"Training step {first.request.step} gives a non-finite loss or tail "
                    f"gradient at learning rate {first.request.learning_rate:g}; the tail keeps "
                    "its weights."
                )
            logits = None if self.ushaped else outputs.numpy()
            replies = split_replies(steps, gradient.numpy(), logits, float(loss), self.split)
            if log and self._state is not None:
                self._state.log(pb.StepGroup(requests=[s.request for s in steps]))
        except BaseException:
            self._tail.put_back()
            raise
        self._tail.apply(tail_gradients, learning_rate)
        for step, reply in zip(steps, replies):
            device = self.devices[step.request.device_id]
            device.last_reply, device.last_digest, step.reply = reply, step.digest, reply
            device.next_step += 1
        if log and self._state is not None and self._state.log_bytes > self.max_log_bytes:
            logging.info(
                "The step log passed %d bytes: the server saves its state before the device "
                "asks, which empties the log.",
                self.max_log_bytes,
            )
            self._state.save(self.devices)


def _answer_each(steps, run):
    """Calls `run`; then each of `steps` has its reply or the error, and its waiting request
    goes on."""
    try:
        run()
    except Exception as error:  # noqa: BLE001  (each waiting request gets it)
        for step in steps:
            step.error = error
    finally:
        for step in steps:
            step.done.set()


def _bounded(steps, max_samples):
    """`steps` in arrival order as consecutive batches of at most `max_samples` samples (a step
    larger than that alone), so that what many devices send at once is trained in parts."""
    batches, samples = [[]], 0
    for step in steps:
        if batches[-1] and samples + step.batch > max_samples:
            batches.append([])
            samples = 0
        batches[-1].append(step)
        samples += step.batch
    return batches


def _step_id(step):
    return step.request.device_id, step.request.step
