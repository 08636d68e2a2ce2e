"""How `TailTrainer` trains: a training step alone (sequential, and every U-shaped step) or with
the other devices' steps sent at the same time (parallel), and the atomic update.

A step's replies are made and checked (finite, within the wire dtype's range) and the step is
logged before the update is applied, so a step that fails leaves the tail and every device's state
as they were. A retry of the last step gets its kept reply; a retry of a step still waiting for
its group gets that group's reply.
"""

import time

import grpc
import tensorflow as tf
from absl import logging

from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.serving import validation
from tfsplit.training.server.batching import joined_inputs, split_replies
from tfsplit.training.server.checks import check_learning_rate, check_retry


class StepTraining:
    """The training steps of `TailTrainer`, which holds the state they share: the lock, the
    devices, the pending steps and the compiled tail."""

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
            waiting = [p for p in self._pending if p.request.device_id == request.device_id]
            if waiting and waiting[0].request.step == request.step:
                check_retry(step, waiting[0].digest)
                step, lead = waiting[0], False  # the same step, sent again while it waits
            elif request.step != device.next_step or waiting:
                raise validation.RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Expected training step {device.next_step}. Received: step {request.step}",
                )
            elif not self.parallel or self.ushaped:  # a U-shaped step trains as its FORWARD ran
                self._train_together([step])
                return step.result()
            else:
                lead = not self._gathering
                self._pending.append(step)
                self._idle.discard(request.device_id)
                self._gathering = True
                self._lock.notify_all()
        if lead:
            self._gather_and_train()
        return step.result()

    def _gather_and_train(self):
        """Waits until every active device has a step pending (at most `gather_timeout_s`),
        then trains them; a device that did not send in time is not waited for again until its
        next step arrives (it may be evaluating, averaging, finished or gone)."""
        deadline = time.monotonic() + self.gather_timeout_s
        with self._lock:
            while True:
                sent = {p.request.device_id for p in self._pending}
                missing = set(self.devices) - self._idle - self._rounds.waiting - sent
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    break
                self._lock.wait(remaining)
            self._idle |= missing
            steps, self._pending, self._gathering = self._pending, [], False
            by_kind = {}  # Steps train together when their budget, rate and nesting agree.
            for step in steps:
                key = (len(step.payload.indices), step.request.learning_rate, step.request.nesting)
                by_kind.setdefault(key, []).append(step)
            for together in by_kind.values():
                self._train_together(together)

    def _train_together(self, steps, log=True):
        """One update of the tail from `steps` (one per device) as one batch (`joined_inputs`),
        or none; each step gets its reply (or the error) in `steps`."""
        try:
            self._train_or_refuse(steps, log)
        except Exception as error:  # noqa: BLE001  (each waiting request gets it)
            for step in steps:
                step.error = error
        finally:
            for step in steps:
                step.done.set()

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
