"""The server half of split training: the decoder, the tail and their optimizer.

`tfsplit.training.server.service` puts a `TailTrainer` behind the gRPC service; `tfsplit.training.server.state` keeps what
it needs to restart.

One `TailTrainer` holds one run. The device opens it with Hello (its model's digest, the shapes,
and for a new run its tail weights, so both halves start from one model), then sends one Step per
batch. A training step decodes the activations payload, runs the tail forward and backward,
updates the tail with SGD at the learning rate the device's schedule sent, and answers with the
activations' gradient as a codec payload: what `SplitModel.train_step` computes in one process.

Step ids make retries idempotent: the step after the last one is trained, the last one is
answered again from its kept reply (a retry after a lost answer), anything else is refused.

Several devices share the tail in one of two modes. Sequential (SplitNN's round robin): each step
trains the tail as it arrives. Parallel: the steps that devices send at the same time are trained
as one batch (the trainer waits up to `gather_timeout_s` for every active device), each device's
gradient being that of its own batch's mean loss, and the devices average their heads after every
epoch (`AverageHeads`, SplitFed).

Every request is validated; a bad one gets INVALID_ARGUMENT or FAILED_PRECONDITION and changes
nothing, and the server keeps serving.
"""

import re
import threading
import time

import grpc
import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit import codec
from tfsplit.serving import validation
from tfsplit.training import split_training_pb2 as pb
from tfsplit.training.messages import (
    decode_activations,
    logits_reply,
    model_digest,
    weights_from_protos,
    weights_to_protos,
)
from tfsplit.training.server.averaging import AveragingRounds
from tfsplit.training.server.batching import PendingStep, joined_inputs
from tfsplit.training.server.calibration import calibration_pass
from tfsplit.training.server.state import DeviceState, ServerState

MAX_DEVICES = 64
_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TRAIN, _EVALUATE, _CALIBRATE = (
    pb.StepRequest.TRAIN,
    pb.StepRequest.EVALUATE,
    pb.StepRequest.CALIBRATE,
)


class TailTrainer:
    """The tail of `split` (a compiled `SplitModel` built from the run's config), trained by
    the steps its devices send (thread-safe).

    Args:
      split: the run's model; the server uses its tail (and its head's shapes, to average heads).
      state_dir: where the run's state is kept to restart (None: nowhere).
      max_devices: how many devices may join.
      parallel: train concurrent devices' steps as one batch and average their heads.
      gather_timeout_s: parallel: how long a step waits for the other active devices' steps.
      average_timeout_s: parallel: how long an averaging round waits for its last devices.
    """

    def __init__(
        self,
        split,
        state_dir=None,
        max_devices=MAX_DEVICES,
        parallel=False,
        gather_timeout_s=0.2,
        average_timeout_s=120.0,
    ):
        if not gather_timeout_s > 0:
            raise ValueError(f"`gather_timeout_s` must be > 0. Received: {gather_timeout_s!r}")
        self.split = split
        self.digest = model_digest(split)
        self.devices = {}
        self.max_devices = max_devices
        self.parallel, self.gather_timeout_s = bool(parallel), gather_timeout_s
        self._lock = threading.Condition()
        self._pending = []  # Parallel: training steps waiting to be trained together.
        self._gathering = False  # Whether a request thread is gathering `_pending`.
        self._idle = set()  # Devices whose steps missed a gather: not waited for until they step.
        self._rounds = AveragingRounds(self._lock, average_timeout_s)
        self._state = None if state_dir is None else ServerState(state_dir, split)
        self._norms = [
            m for m in split.tail.submodules if isinstance(m, keras.layers.BatchNormalization)
        ]
        variables = split.tail.trainable_variables

        def train(values, indices, labels, gradient_scale, learning_rate, nesting):
            split.optimizer.learning_rate.assign(learning_rate)
            split.step_nesting.assign(nesting)
            with tf.GradientTape() as tape:
                tape.watch(values)
                loss, logits = split.server_loss(None, labels, values, indices)
            tail_gradients, value_gradient = tape.gradient(loss, [variables, values])
            split.optimizer.apply_gradients(zip(tail_gradients, variables))
            return value_gradient * gradient_scale[:, None, None, None], logits, loss

        # One trace for a device's step (its selection), one for devices' steps batched (a
        # selection per sample): the rank of the indices picks the placement.
        self._train_traces = {rank: tf.function(train, reduce_retracing=True) for rank in (1, 2)}

        @tf.function(reduce_retracing=True)
        def forward(values, indices, training):
            return split.receive(values, indices, training=training)

        self._forward = forward

    @property
    def next_step(self):
        """The next step of the only device (for a one-device run)."""
        (device,) = self.devices.values()
        return device.next_step

    # ------------------------------------------------------------------------------- requests
    def _check_digest(self, digest):
        if digest != self.digest:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"The device's model (digest {digest[:12]}) differs from this server's "
                f"({self.digest[:12]}); start both with the same config.",
            )

    def hello(self, request):
        self._check_digest(request.model_digest)
        _check_device_id(request.device_id)
        expected = list(self.split.head.input.shape[1:])
        if list(request.image_shape) != expected:
            raise validation.invalid(
                f"image_shape must be {expected}. Received: {list(request.image_shape)}"
            )
        with self._lock:
            if request.device_id not in self.devices:
                if len(self.devices) >= self.max_devices:
                    raise validation.RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"This run already has {self.max_devices} devices.",
                    )
                if not self.devices and request.tail_weights:  # the run starts here
                    self.split.tail.set_weights(
                        weights_from_protos(request.tail_weights, self.split.tail.get_weights())
                    )
                self.devices[request.device_id] = DeviceState()
                logging.info("Device %r joined the run.", request.device_id)
            if request.resume and request.resume_step != self.devices[request.device_id].next_step:
                self._resume(request.device_id, request.resume_step)
            next_step = self.devices[request.device_id].next_step  # after a resume: the new one
            return pb.HelloReply(
                model_digest=self.digest, next_step=next_step, parallel=self.parallel
            )

    def checkpoint(self, request):
        """Saves the tail, its optimizer and every device's step ids (the device backed up)."""
        self._check_digest(request.model_digest)
        with self._lock:
            device = self.devices.get(request.device_id)
            if device is None or request.step != device.next_step:
                raise validation.RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Checkpoint at step {request.step} of device {request.device_id!r}, whose "
                    f"next step here is {getattr(device, 'next_step', None)}.",
                )
            if self._state is not None:
                self._state.save(self.devices)
            return pb.CheckpointReply(step=request.step)

    def restore(self):
        """Returns to the saved state, then replays the logged steps (a restarted server)."""
        if self._state is None or not self._state.exists():
            return False
        with self._lock:
            self.devices = self._state.load()
            for group in self._state.logged_steps():
                self._apply_logged(group)
            logging.info(
                "Restored the run: next steps %s.",
                {d: v.next_step for d, v in self.devices.items()},
            )
        return True

    def _apply_logged(self, group):
        """Trains a logged StepGroup again, as it was trained (one batch)."""
        steps = []
        for request in group.requests:
            payload = codec.decode(request.payload, expect_kind="activations")
            self.devices.setdefault(request.device_id, DeviceState())
            steps.append(PendingStep(request, payload))
        self._train_together(steps, log=False)
        for step in steps:
            step.result()  # a step that fails again stops the replay

    def _resume(self, device_id, step):
        """Device `device_id` restarted from its backup at `step`: the only device's run goes
        back there (the saved state, then the logged steps before `step`); with other devices
        the shared tail cannot go back, and the device continues from the server's step."""
        device = self.devices[device_id]
        if len(self.devices) > 1 or self._state is None:
            logging.warning(
                "Device %r resumes at step %d; the server is at %d and keeps the tail.",
                device_id,
                step,
                device.next_step,
            )
            return
        saved = self._state.load()
        if device_id not in saved or saved[device_id].next_step > step:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Device {device_id!r} resumes at step {step}, before the server's saved state "
                f"(step {saved.get(device_id, DeviceState()).next_step}).",
            )
        # The run's only device: one request per logged group.
        logged = [g for g in self._state.logged_steps() if g.requests[0].step < step]
        if saved[device_id].next_step + len(logged) != step:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Device {device_id!r} resumes at step {step}, which the server's log does not "
                "reach.",
            )
        self.devices = saved
        self._state.truncate_log()
        for group in logged:
            self._apply_logged(group)
            self._state.log(group)
        logging.info("Device %r resumed: the run went back to step %d.", device_id, step)

    def step(self, request):
        self._check_digest(request.model_digest)
        if request.kind not in (_TRAIN, _EVALUATE, _CALIBRATE):
            raise validation.invalid(f"Unknown step kind {request.kind}.")
        payload = decode_activations(
            request.payload, self.split, with_labels=request.kind == _TRAIN
        )
        if request.kind == _TRAIN:
            return self._train_request(request, payload)
        values = tf.constant(payload.dequantized(), tf.float32)
        indices = tf.constant(payload.indices, tf.int32)
        with self._lock:
            device = self._device(request.device_id)
            if request.kind == _CALIBRATE:
                return calibration_pass(
                    self._norms, self._forward, device, request, values, indices
                )
            logits = self._forward(values, indices, False)
            return logits_reply(request.step, logits)

    def average_heads(self, request):
        """Parallel mode: the device's head joins its round; returns the round's average."""
        self._check_digest(request.model_digest)
        if not self.parallel:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "This server trains devices sequentially; heads are averaged in parallel mode "
                "(tfsplit-train-server --mode=parallel).",
            )
        if request.samples < 1 or request.round < 0:
            raise validation.invalid(
                f"samples must be >= 1 and round >= 0. Received: samples={request.samples}, "
                f"round={request.round}"
            )
        weights = weights_from_protos(request.weights, self.split.head.get_weights(), "head")
        with self._lock:
            self._device(request.device_id)
            average, devices = self._rounds.join(
                request.device_id, request.round, weights, request.samples, self.devices.keys
            )
        return pb.AverageHeadsReply(weights=weights_to_protos(average), devices=devices)

    def tail_weights(self, request):
        self._check_digest(request.model_digest)
        with self._lock:
            return pb.TailWeightsReply(weights=weights_to_protos(self.split.tail.get_weights()))

    # -------------------------------------------------------------------------------- steps
    def _device(self, device_id):
        device = self.devices.get(device_id)
        if device is None:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Device {device_id!r} has not opened the run; call Hello first.",
            )
        return device

    def _train_request(self, request, payload):
        """Trains the step alone (sequential) or with the other devices' (parallel); a retry of
        the last step gets its kept reply, a retry of a step still waiting gets its reply."""
        if not np.isfinite(request.learning_rate) or request.learning_rate < 0:
            raise validation.invalid(
                f"learning_rate must be finite and >= 0. Received: {request.learning_rate}"
            )
        with self._lock:
            device = self._device(request.device_id)
            if request.step == device.next_step - 1 and device.last_reply is not None:
                logging.info("Step %d again (a retry): answered from the kept reply.", request.step)
                return device.last_reply
            waiting = [p for p in self._pending if p.request.device_id == request.device_id]
            if waiting and waiting[0].request.step == request.step:
                step, lead = waiting[0], False  # the same step, sent again while it waits
            elif request.step != device.next_step or waiting:
                raise validation.RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Expected training step {device.next_step}. Received: step {request.step}",
                )
            elif not self.parallel:
                step = PendingStep(request, payload)
                self._train_together([step])
                return step.result()
            else:
                step, lead = PendingStep(request, payload), not self._gathering
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
        """One update of the tail from `steps` (one per device) as one batch (`joined_inputs`);
        each step gets its reply (or the error) in `steps`."""
        try:
            first = steps[0]
            values, indices, labels, scale = joined_inputs(steps)
            gradient, logits, loss = self._train_traces[indices.ndim](
                tf.constant(values, tf.float32),
                tf.constant(indices, tf.int32),
                tf.constant(labels),
                tf.constant(scale),
                tf.constant(first.request.learning_rate, tf.float32),
                tf.constant(first.request.nesting),
            )
            gradient, logits, start = gradient.numpy(), logits.numpy(), 0
            for step in steps:
                end = start + step.batch
                reply = logits_reply(step.request.step, logits[start:end])
                reply.loss = float(loss)
                reply.payload = codec.encode(
                    gradient[start:end],
                    step.payload.indices,
                    self.split.channels,
                    self.split.gradient_dtype,
                    kind="gradients",
                )
                device = self.devices[step.request.device_id]
                device.last_reply, device.next_step, step.reply = reply, device.next_step + 1, reply
                start = end
            if log and self._state is not None:
                self._state.log(pb.StepGroup(requests=[s.request for s in steps]))
        except Exception as error:  # noqa: BLE001  (each waiting request gets it)
            for step in steps:
                step.error = error
        finally:
            for step in steps:
                step.done.set()


def _check_device_id(device_id):
    if not _DEVICE_ID.fullmatch(device_id):
        raise validation.invalid(
            "device_id must be 1 to 64 letters, digits, '.', '_' or '-'. "
            f"Received: {device_id[:80]!r}"
        )
