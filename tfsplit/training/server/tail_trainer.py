"""The server half of split training: the decoder, the tail and their optimizer.

`tfsplit.training.server.service` puts a `TailTrainer` behind the gRPC service; `tfsplit.training.server.state` keeps what
it needs to restart.

One `TailTrainer` holds one run. The device opens it with Hello (its model's digest, the shapes,
and for a new run its tail weights, so both halves start from one model), then sends one Step per
batch. A training step decodes the activations payload, runs the tail forward and backward,
updates the tail with SGD at the learning rate the device's schedule sent, and answers with the
activations' gradient as a codec payload: what `SplitModel.train_step` computes in one process.

Step ids make retries idempotent: the step after the last one is trained, the last one is
answered again from its kept reply (a retry after a lost answer) if it is the same request (a
digest of it), anything else is refused. A step is atomic: the tail's gradient, the loss and
the reply are computed and checked (finite, and within the wire dtype's range) and the step is
logged before the update is applied; a step that fails changes nothing.

Several devices share the tail in one of two modes. Sequential (SplitNN's round robin): each step
trains the tail as it arrives. Parallel: the steps that devices send at the same time are trained
as one batch (the trainer waits up to `gather_timeout_s` for every active device), each device's
gradient being that of its own batch's mean loss, and the devices average their heads after every
epoch (`AverageHeads`, SplitFed).

A U-shaped split's tail is the middle; `tfsplit.training.server.ushaped` says how its steps
differ.

Every request is validated; a bad one gets INVALID_ARGUMENT or FAILED_PRECONDITION and changes
nothing, and the server keeps serving. What a device can make the server hold is bounded: the
samples per step (`max_batch_size`), the devices (`max_devices`; a device silent for
`device_timeout_s` gives its slot to a new one), the learning rate (`max_learning_rate`) and the
step log (`max_log_bytes`, past which the server checkpoints itself).
"""

import threading
import time

import grpc
import tensorflow as tf
from absl import logging

from tfsplit.engine import randomness
from tfsplit.layers import batch_norm
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol.framing import logits_reply
from tfsplit.serving import validation
from tfsplit.training.messages import (
    decode_activations,
    model_digest,
    shown,
    weights_from_protos,
    weights_to_protos,
)
from tfsplit.training.server import distributed, ushaped
from tfsplit.training.server.averaging import AveragingRounds
from tfsplit.training.server.batching import Gather, PendingStep
from tfsplit.training.server.calibration import calibration_pass
from tfsplit.training.server.checks import check_device_id, check_digest, check_shapes
from tfsplit.training.server.compiled_tail import CompiledTail
from tfsplit.training.server.resume import replay_to
from tfsplit.training.server.slots import slot_to_free
from tfsplit.training.server.state import MAX_LOG_BYTES, DeviceState, ServerState
from tfsplit.training.server.training_steps import StepTraining

# The devices a run admits unless told (`max_devices`): a bound on what devices can make the
# server hold, which an idle device's state keeps small (tfsplit-bench-server measures it).
MAX_DEVICES = 1024
# Parallel mode: the most samples one joined batch trains; more steps at once train as several.
# Without it, N devices at once make the server hold a batch of N times their steps' samples.
MAX_JOINED_BATCH = 4096
# Without a config to say otherwise: the most samples one step carries (an evaluation batch of
# the configs' default size fits), the largest SGD rate accepted (well above any rate the
# configs' phases use), and how long a device may stay silent before a new device may take its
# slot (a restarting device comes back well within it).
MAX_BATCH_SIZE = 1024
MAX_LEARNING_RATE = 10.0
DEVICE_TIMEOUT_S = 600.0
_TRAIN, _EVALUATE, _CALIBRATE, _FORWARD = (
    pb.StepRequest.TRAIN,
    pb.StepRequest.EVALUATE,
    pb.StepRequest.CALIBRATE,
    pb.StepRequest.FORWARD,
)


class TailTrainer(StepTraining):
    """The tail of `split` (a compiled `SplitModel` built from the run's config), trained by
    the steps its devices send (thread-safe).

    Args:
      split: the run's model; the server uses its tail (and its head's shapes, to average heads).
      state_dir: where the run's state is kept to restart (None: nowhere).
      max_devices: how many devices may be in the run at once.
      max_batch_size: the most samples one step (of any kind) may carry.
      max_learning_rate: the largest learning rate a training step may ask for.
      device_timeout_s: a device that made no call for this long gives its slot to a new device
        when the run is full (a restarted server counts its saved devices again).
      max_log_bytes: the step log's size past which the server saves a checkpoint of its own; a
        device resuming from a backup older than that checkpoint is then refused, as one
        resuming before the first checkpoint.
      parallel: train concurrent devices' steps as one batch (a U-shaped split's FORWARDs too)
        and average their heads.
      gather_timeout_s: parallel: how long a step waits for the other active devices' steps.
      max_joined_batch: parallel: the most samples one joined batch trains; the steps gathered
        beyond it train as further batches, in the order they arrived.
      average_timeout_s: parallel: how long an averaging round waits for its last devices.
      warm_up: run the tail's steps once at every batch size up to `max_batch_size` before
        serving (`CompiledTail.warm_up`), so that the server's memory reaches its level at the
        start and stays there, whatever sizes devices send.
      strategy: a `tf.distribute` strategy whose replicas split each training step's batch
        (`tfsplit.training.server.distributed`); `split` was built in its scope. None: one
        device.
    """

    def __init__(
        self,
        split,
        state_dir=None,
        max_devices=MAX_DEVICES,
        max_batch_size=MAX_BATCH_SIZE,
        max_learning_rate=MAX_LEARNING_RATE,
        device_timeout_s=DEVICE_TIMEOUT_S,
        max_log_bytes=MAX_LOG_BYTES,
        parallel=False,
        gather_timeout_s=0.2,
        max_joined_batch=MAX_JOINED_BATCH,
        average_timeout_s=120.0,
        warm_up=False,
        strategy=None,
    ):
        if not gather_timeout_s > 0:
            raise ValueError(f"`gather_timeout_s` must be > 0. Received: {gather_timeout_s!r}")
        for name, value in dict(
            max_devices=max_devices,
            max_batch_size=max_batch_size,
            max_log_bytes=max_log_bytes,
            max_joined_batch=max_joined_batch,
        ).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}")
        for name, value in dict(
            max_learning_rate=max_learning_rate, device_timeout_s=device_timeout_s
        ).items():
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"`{name}` must be a finite number > 0. Received: {value!r}")
        self.ushaped = hasattr(split, "top")
        if self.ushaped:
            split.check_networkable()
        if strategy is not None:
            distributed.check_distributable(split)
        self.split = split
        self.digest = model_digest(split)
        self.devices = {}
        self.max_devices, self.max_batch_size = max_devices, max_batch_size
        self.max_learning_rate, self.device_timeout_s = float(max_learning_rate), device_timeout_s
        self.max_log_bytes = max_log_bytes
        self._started = False  # Whether the tail left its initial state (a device joined).
        self.parallel, self.gather_timeout_s = bool(parallel), gather_timeout_s
        self.max_joined = max_joined_batch
        self._lock = threading.Condition()
        self._gathers = {_TRAIN: Gather(), _FORWARD: Gather()}  # Parallel: steps waiting.
        self._idle = set()  # Devices whose steps missed a gather: not waited for until they step.
        self._rounds = AveragingRounds(self._lock, average_timeout_s)
        # The tail's dropout draws are saved with it, so that a run that goes back to its
        # checkpoint (a restart, a device resuming from its backup) draws the same masks again.
        with distributed.scope(strategy):
            draws = randomness.checkpointed_draws(split.tail, split.seed)
            self._state = None if state_dir is None else ServerState(state_dir, split, draws)
            self._tail = CompiledTail(split, draws, strategy)
        self._norms = batch_norm.norms_of(split.tail)
        if warm_up:
            self._tail.warm_up(max_batch_size)

    @property
    def next_step(self):
        """The next step of the only device (for a one-device run)."""
        (device,) = self.devices.values()
        return device.next_step

    # ------------------------------------------------------------------------------- requests
    def hello(self, request):
        check_digest(request.model_digest, self.digest)
        check_device_id(request.device_id)
        check_shapes(request, self.split)
        with self._lock:
            if request.device_id not in self.devices:
                self._make_room()
                if not self._started and request.tail_weights:  # the run starts here
                    self.split.tail.set_weights(
                        weights_from_protos(request.tail_weights, self.split.tail.get_weights())
                    )
                self.devices[request.device_id] = DeviceState()
                self._started = True
                logging.info("Device %r joined the run.", request.device_id)
            device = self._device(request.device_id)
            if request.resume and request.resume_step != device.next_step:
                self._resume(request.device_id, request.resume_step)
            next_step = self.devices[request.device_id].next_step  # after a resume: the new one
            return pb.HelloReply(
                model_digest=self.digest, next_step=next_step, parallel=self.parallel
            )

    def leave_request(self, request):
        check_digest(request.model_digest, self.digest)
        return pb.LeaveReply(left=self.leave(request.device_id))

    def leave(self, device_id):
        """Device `device_id` leaves the run: its slot is free for another device, and its step
        ids are forgotten (back, it joins as a new device). Returns whether it was in the run."""
        with self._lock:
            if device_id not in self.devices:
                return False
            if device_id in self._busy():
                raise validation.RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Device {shown(device_id)} has a step or a head averaging in progress; it "
                    "can leave once that is answered.",
                )
            self._remove(device_id)
            logging.info("Device %r left the run.", device_id)
            return True

    def _busy(self):
        waiting = [p for gather in self._gathers.values() for p in gather.steps]
        return {p.request.device_id for p in waiting} | self._rounds.waiting

    def _make_room(self):
        """Frees a slot for a new device when the run is full (`slot_to_free`)."""
        if len(self.devices) >= self.max_devices:
            self._remove(slot_to_free(self.devices, self._busy(), self.device_timeout_s))

    def _remove(self, device_id):
        del self.devices[device_id]
        self._idle.discard(device_id)
        self._rounds.absent.discard(device_id)

    def checkpoint(self, request):
        """Saves the tail, its optimizer and every device's step ids (the device backed up)."""
        check_digest(request.model_digest, self.digest)
        with self._lock:
            device = self._device(request.device_id)
            if request.step != device.next_step:
                raise validation.RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Checkpoint at step {request.step} of device {shown(request.device_id)}, "
                    f"whose next step here is {device.next_step}.",
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
            self._started = True
            logging.info(
                "Restored the run: next steps %s.",
                {d: v.next_step for d, v in self.devices.items()},
            )
        return True

    def _apply_logged(self, group):
        """Trains a logged StepGroup again, as it was trained (one batch)."""
        steps = []
        for request in group.requests:
            self.devices.setdefault(request.device_id, DeviceState())
            steps.append(self._pending_step(request))
        self._train_together(steps, log=False)
        for step in steps:
            step.result()  # a step that fails again stops the replay
            if self.ushaped:  # a retry of its TRAIN finds the FORWARD it came after
                request = step.request
                self.devices[request.device_id].forward = (request.step, request.payload)

    def _resume(self, device_id, step):
        """Device `device_id` restarted from its backup at `step`: the only device's run goes
        back there (the saved state, then the logged steps before `step`); with other devices
        the shared tail cannot go back, and the device continues from the server's step."""
        logged = replay_to(self._state, self.devices, device_id, step)
        if logged is None:
            logging.warning(
                "Device %r resumes at step %d; the server is at %d and keeps the tail.",
                device_id,
                step,
                self.devices[device_id].next_step,
            )
            return
        self.devices = self._state.load()
        self._state.truncate_log()
        for group in logged:
            self._apply_logged(group)
            self._state.log(group)
        logging.info("Device %r resumed: the run went back to step %d.", device_id, step)

    def step(self, request):
        check_digest(request.model_digest, self.digest)
        kinds = (_TRAIN, _EVALUATE, _CALIBRATE) + ((_FORWARD,) if self.ushaped else ())
        if request.kind not in kinds:
            raise validation.invalid(f"Unknown step kind {request.kind} on this server.")
        if request.top_gradient:
            raise validation.invalid("top_gradient is kept in the server's step log; never sent.")
        if self.ushaped and request.nesting:
            raise validation.invalid("A U-shaped split trains without nested budgets.")
        if request.kind == _TRAIN:
            if not self.ushaped:
                return self._train_request(self._pending_step(request))
            with self._lock:
                device = self._device(request.device_id)
                forward, group = device.forward, device.forward_group
            step = self._pending_step(ushaped.with_forward(request, forward))
            step.forward_group = group
            return self._train_request(step)
        if request.kind == _FORWARD:
            return self._forward_request(self._pending_step(request))
        payload = decode_activations(
            request.payload, self.split, with_labels=False, max_batch_size=self.max_batch_size
        )
        values = tf.constant(payload.dequantized(), tf.float32)
        indices = tf.constant(payload.indices, tf.int32)
        with self._lock:
            device = self._device(request.device_id)
            if request.kind == _CALIBRATE:
                return calibration_pass(
                    self._norms,
                    self._tail.forward,
                    self._answer_forward,
                    device,
                    request,
                    values,
                    indices,
                )
            return self._answer_forward(request.step, self._tail.forward(values, indices, False))

    def _answer_forward(self, step, outputs):
        if self.ushaped:
            return ushaped.middle_reply(self.split, step, outputs)
        return logits_reply(step, outputs)

    def _pending_step(self, request):
        """A (logged) training request, or a FORWARD, decoded and checked, ready to run."""
        payload = decode_activations(
            request.payload,
            self.split,
            with_labels=not self.ushaped,
            max_batch_size=self.max_batch_size,
        )
        if not self.ushaped or request.kind == _FORWARD:
            return PendingStep(request, payload)
        return PendingStep(request, payload, ushaped.top_gradient(self.split, request, payload))

    def average_heads(self, request):
        """Parallel mode: the device's head joins its round; returns the round's average."""
        check_digest(request.model_digest, self.digest)
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
        with self._lock:  # the sender first: only a device of the run has its head read
            self._device(request.device_id)
        weights = weights_from_protos(request.weights, self.split.head.get_weights(), "head")
        with self._lock:
            self._device(request.device_id)
            average, devices = self._rounds.join(
                request.device_id, request.round, weights, request.samples, self.devices.keys
            )
        return pb.AverageHeadsReply(weights=weights_to_protos(average), devices=devices)

    def tail_weights(self, request):
        check_digest(request.model_digest, self.digest)
        with self._lock:
            return pb.TailWeightsReply(weights=weights_to_protos(self.split.tail.get_weights()))

    # -------------------------------------------------------------------------------- steps
    def _device(self, device_id):
        """The state of `device_id`, which has just made a call."""
        device = self.devices.get(device_id)
        if device is None:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Device {shown(device_id)} is not in the run (it has not opened it, or left "
                "it); call Hello first.",
            )
        device.last_seen = time.monotonic()
        return device
