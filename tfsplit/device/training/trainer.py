"""The device half of split training without TensorFlow: the LiteRT head against a
`tfsplit-train-server`, step for step as the Keras device (`tfsplit.training.client`) trains.

Each training batch: the head's `forward` gives the k channels at the epoch's budget; they go to
the server as a codec payload (`Step(TRAIN)`); the gradient that comes back drives the head's
`train` signature. Each epoch follows `plan.epoch_plan` (gate resets through the weight vector)
and ends with an evaluation on the validation split; the test set is evaluated once, after the
last epoch. Before an evaluation whose sent channels changed, batch norm is recalibrated
(`calibration`). The
state is saved every `checkpoint_every_steps` steps (`state`) and the server saves its own
(`Checkpoint`): a device killed and restarted loses at most the steps since.
"""

import json
import os
import time

import numpy as np
from absl import logging

from tfsplit import codec
from tfsplit import schedule as schedule_lib
from tfsplit.device.spec import DeviceError
from tfsplit.device.training.bench import peak_memory_mib
from tfsplit.device.training.calibration import calibrate_head
from tfsplit.device.training.messages import LEDGER_KEYS, StepMessages
from tfsplit.device.training.plan import build_phases, epoch_plan
from tfsplit.device.training.state import load_state, save_state
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol.framing import reply_logits

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"


class DeviceTrainer(StepMessages):
    """Trains `head` (a `TrainableHead`) against the server `client` (a `TrainingClient`).

    Args:
      head: the trainable head, with its run description.
      client: the channel to the server.
      workdir: where the state, `metrics.jsonl` and `summary.json` go (None: nowhere; no resume).
      device_id: this device's id in the run (its token's, with per-device tokens).
    """

    top = None  # a U-shaped split's top, which then calibrates on the middle's answers

    def __init__(self, head, client, workdir=None, device_id="device-0"):
        self.head, self.client, self.workdir, self.device_id = head, client, workdir, device_id
        self.run = head.run
        self.phases = build_phases(self.run)
        self.epochs = sum(phase.epochs for phase in self.phases)
        self.digest = self.run["model_digest"]
        self.parallel = False  # the server's mode, from its Hello reply
        self.ledger = dict.fromkeys(LEDGER_KEYS, 0)
        self.remote_step, self.phase, self.budget = 0, 0, self.run["channels"]
        self.epoch, self.position = 0, 0  # where training resumes: epoch, batches done in it
        self._calibrated_for = None
        self._epoch_start = dict(self.ledger)  # the ledger when this epoch began
        if workdir is not None:
            os.makedirs(workdir, exist_ok=True)

    # -------------------------------------------------------------------------- the run
    def connect(self):
        """Joins the run (a new one starts from the exported tail), then returns the server to
        this device's saved step, as the Keras device's `connect` and `resume` do."""
        tail = self.head.starting_tail()
        reply = self.client.call("Hello", self._hello(tail_weights=tail))
        self.parallel = reply.parallel
        if self.parallel:
            raise DeviceError(
                "The server trains devices in parallel (head averaging), which the device "
                "without TensorFlow does not join yet; run the server in sequential mode."
            )
        self.remote_step = reply.next_step
        self._restore()
        reply = self.client.call("Hello", self._hello(resume=True, resume_step=self.remote_step))
        self.remote_step = reply.next_step
        logging.info("Connected to %s; next step %d.", self.client.address, self.remote_step)

    def _hello(self, **fields):
        return pb.HelloRequest(
            model_digest=self.digest,
            image_shape=self.run["image_shape"],
            num_classes=self.run["num_classes"],
            device_id=self.device_id,
            **fields,
        )

    def fit(
        self,
        train_batches,
        steps_per_epoch,
        validation_batches=None,
        calibration_batches=None,
        epochs=None,
        test_batches=None,
    ):
        """Trains every epoch of the schedule from where the state left off.

        Args:
          train_batches: callable(epoch) -> iterable of (images float32, labels int) batches, the
            same batches for the same epoch (a resumed epoch skips those already trained).
          steps_per_epoch: how many batches `train_batches` yields per epoch.
          validation_batches: callable() -> iterable of the batches each epoch is evaluated on
            (None: no evaluation per epoch).
          test_batches: callable() -> iterable of the test batches, evaluated once, after the
            schedule's last epoch (None: not evaluated).
          calibration_batches: callable(epoch) -> iterable of training batches for batch norm
            calibration (None: `train_batches`; it takes the run's `calibration_batches` first).
          epochs: stop after this many epochs of the schedule (None: all of them).

        Returns:
          The run's summary (also written to `summary.json`).
        """
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be >= 1. Received: {steps_per_epoch!r}")
        calibration_batches = calibration_batches or train_batches
        fit_started = time.monotonic()
        history, last = [], self.epochs if epochs is None else min(epochs, self.epochs)
        while self.epoch < last:
            epoch = self.epoch
            plan = epoch_plan(self.run, self.phases, epoch, steps_per_epoch)
            self._enter(plan)
            started, totals = time.monotonic(), dict(loss=0.0, correct=0, samples=0, steps=0)
            if self.position == 0:  # else resumed inside the epoch: its bytes so far count too
                self._epoch_start = dict(self.ledger)
            before = self._epoch_start
            for i, (images, labels) in enumerate(train_batches(epoch)):
                if i < self.position:
                    continue  # trained before the restart
                self._train_step(images, labels, plan, totals)
                self.position = i + 1
                if self.workdir and self.remote_step % self.run["checkpoint_every_steps"] == 0:
                    self.save()
            logs = dict(
                epoch=epoch + 1,
                phase=plan["phase"],
                budget=plan["budget"],
                learning_rate=plan["learning_rate"],
                loss=totals["loss"] / max(totals["steps"], 1),
                accuracy=totals["correct"] / max(totals["samples"], 1),
                **{key: self.ledger[key] - before[key] for key in self.ledger},
            )
            if validation_batches is not None:
                self._calibrate(plan, calibration_batches(epoch))
                logs.update(self.evaluate(validation_batches(), plan["budget"], "val"))
            logs["seconds"] = time.monotonic() - started
            self.epoch, self.position = epoch + 1, 0
            history.append(logs)
            self._record(logs)
            if self.workdir:
                self.save()
            logging.info("Epoch %d/%d: %s", epoch + 1, self.epochs, _shown(logs))
        summary_path = os.path.join(self.workdir, SUMMARY_FILE) if self.workdir else None
        if not history and summary_path and os.path.exists(summary_path):
            logging.info("The run had trained all its epochs before; its summary is kept.")
            with open(summary_path) as f:
                return json.load(f)
        last_logs = history[-1] if history else self._last_record()
        summary = {f"final_{k}": v for k, v in last_logs.items()}
        if test_batches is not None and self.epoch == self.epochs:  # once, at the very end
            plan = epoch_plan(self.run, self.phases, self.epochs - 1, steps_per_epoch)
            self._calibrate(plan, calibration_batches(self.epochs - 1))
            tested = self.evaluate(test_batches(), self.budget, "test")
            summary.update(final_test_accuracy=tested["test_accuracy"])
            summary.update(final_test_loss=tested["test_loss"])
        summary.update(  # the keys of the Keras trainer's summary.json, where it has them
            epochs=self.epoch,
            final_budget=self.budget,
            train_payload_bytes_up=self.ledger["payload_bytes_up"],
            train_payload_bytes_down=self.ledger["payload_bytes_down"],
            **{f"train_{k}": v for k, v in self.ledger.items() if k.startswith("top_")},
            wall_seconds=time.monotonic() - fit_started,
            peak_rss_mib=peak_memory_mib(),
        )
        if summary_path:
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=1)
        return summary

    def leave(self):
        reply = self.client.call(
            "Leave", pb.LeaveRequest(model_digest=self.digest, device_id=self.device_id)
        )
        return reply.left

    # --------------------------------------------------------------------- the schedule
    def _enter(self, plan):
        """A gate reset on entering a phase (not on resuming inside one), then the budget."""
        number = plan["phase"]
        if number != self.phase:
            phase = self.phases[number - 1]
            if self.run["masked"] and phase.reset != "none":
                self._reset_gates(number, phase)
            self.phase = number
        self.budget = plan["budget"]

    def _reset_gates(self, number, phase):
        weights = self.head.get_weights()
        gates = self.head.view(weights, "gates")
        sent = self._sent_channels(self.budget)  # at the budget of the phase that ends
        rng = np.random.default_rng([self.run["seed"], number])
        open_count = int(np.sum(gates >= phase.reset_threshold))
        gates[:] = phase.apply_reset(gates.copy(), sent, rng)
        if phase.reset == "deprune":
            seniority = self.head.view(weights, "seniority")
            seniority[:] = schedule_lib.promote(seniority.copy(), sent)
        self.head.set_weights(weights)
        logging.info(
            "Phase %d: %s reset after sending %d channels; %d of %d gates were open",
            number,
            phase.reset,
            sent.size,
            open_count,
            gates.size,
        )

    def _sent_channels(self, budget):
        """The channels the head sends at `budget` (its own top-k, on any one image)."""
        _, indices = self.head.infer(np.zeros((1,) + self.head.image_shape, np.float32), budget)
        return np.asarray(indices)

    # ------------------------------------------------------------------------ the steps
    def _train_step(self, images, labels, plan, totals):
        labels = np.asarray(labels, np.int32)
        values, indices, _ = self.head.forward(images, plan["budget"])
        payload = self._payload(values, indices, labels)
        step = self.remote_step
        reply = self._exchange(
            self._request(
                pb.StepRequest.TRAIN,
                payload,
                step,
                learning_rate=plan["learning_rate"],
                nesting=plan["nesting"],
            ),
            self._payload_bytes(len(labels), len(indices), training=True),
            self.ledger,
        )
        if reply.step != step:
            raise RuntimeError(f"The server answered step {reply.step} to step {step}.")
        self.remote_step = step + 1
        returned = codec.decode(reply.payload, expect_kind="gradients")
        gradient = returned.scatter()[..., indices]
        self.head.train(
            images,
            labels,
            gradient,
            plan["budget"],
            (plan["learning_rate"], plan["gate_learning_rate"]),
            plan["penalty_weight"],
        )
        logits = reply_logits(reply)
        totals["loss"] += reply.loss
        totals["steps"] += 1
        totals["correct"] += int(np.sum(np.argmax(logits, -1) == labels))
        totals["samples"] += len(labels)

    def evaluate(self, batches, budget, split="test"):
        """Accuracy and loss of the whole model at `budget` over `batches` (the server's tail
        with its moving statistics), and the bytes it took, as `<split>_<key>`."""
        correct, samples, loss = 0, 0, 0.0
        ledger = dict.fromkeys(self.ledger, 0)  # apart from training's
        for images, labels in batches:
            labels = np.asarray(labels, np.int32)
            values, indices = self.head.infer(images, budget)
            reply = self._exchange(
                self._request(pb.StepRequest.EVALUATE, self._payload(values, indices)),
                self._payload_bytes(len(labels), len(indices), training=False),
                ledger,
            )
            logits = self._answer_logits(reply, len(labels), ledger)
            correct += int(np.sum(np.argmax(logits, -1) == labels))
            loss += float(_cross_entropy(logits, labels).sum())
            samples += len(labels)
        if not samples:
            raise ValueError("Evaluation needs at least one batch; none was given.")
        return {
            f"{split}_accuracy": correct / samples,
            f"{split}_loss": loss / samples,
            **{f"{split}_{key}": value for key, value in ledger.items()},
        }

    def _answer_logits(self, reply, batch, ledger):
        """The logits of an EVALUATE's reply (the server's tail computed them)."""
        return reply_logits(reply)

    def _calibrate(self, plan, batches):
        """Batch norm statistics for the channels now sent, on both halves, when they changed
        since the last calibration (`BatchNormCalibration`'s rule)."""
        count = self.run["calibration_batches"]
        if not count or not self.run["masked"]:
            return
        sent = self._sent_channels(plan["budget"])
        gates = self.head.view(self.head.get_weights(), "gates")
        state = (tuple(sent), tuple(np.round(gates[sent], 3)))
        if state == self._calibrated_for:
            return
        self._calibrate_passes(plan, batches, count)
        self._calibrated_for = state

    def _calibrate_passes(self, plan, batches, count):
        def send_pass(values, indices, begin, finish):
            request = self._request(
                pb.StepRequest.CALIBRATE,
                self._payload(values, indices),
                calibration_begin=begin,
                calibration_finish=finish,
            )
            reply = self.client.call("Step", request)
            return None if self.top is None else self._middle(reply, len(values))

        calibrate_head(self.head, plan["budget"], batches, count, send_pass, self.top)

    # -------------------------------------------------------------------- saved state
    def _saved_weights(self):
        """What the state file keeps of the models: the head's weight vector."""
        return self.head.get_weights()

    def _restore_weights(self, weights):
        self.head.set_weights(weights)

    def save(self):
        """Saves the device's state, then has the server save its own at the same step."""
        state = dict(
            remote_step=self.remote_step,
            phase=self.phase,
            budget=self.budget,
            epoch=self.epoch,
            position=self.position,
            ledger=self.ledger,
            epoch_start_ledger=self._epoch_start,
            model_digest=self.digest,
        )
        save_state(self.workdir, self._saved_weights(), state)
        self.client.call(
            "Checkpoint",
            pb.CheckpointRequest(
                model_digest=self.digest, device_id=self.device_id, step=self.remote_step
            ),
        )

    def _restore(self):
        saved = load_state(self.workdir, self.digest) if self.workdir else None
        if saved is None:
            return
        weights, state = saved
        self._restore_weights(weights)
        self.remote_step, self.phase, self.budget = (
            state["remote_step"],
            state["phase"],
            state["budget"],
        )
        self.epoch, self.position, self.ledger = state["epoch"], state["position"], state["ledger"]
        self._epoch_start = state["epoch_start_ledger"]
        logging.info(
            "Resumed from %s: epoch %d, batch %d, step %d.",
            self.workdir,
            self.epoch + 1,
            self.position,
            self.remote_step,
        )

    def _last_record(self):
        """The last epoch's logs in `metrics.jsonl` ({} when there is none)."""
        path = self.workdir and os.path.join(self.workdir, METRICS_FILE)
        if not path or not os.path.exists(path):
            return {}
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1]) if lines else {}

    def _record(self, logs):
        if self.workdir:
            with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
                f.write(json.dumps(logs) + "\n")


def _cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(-1))
    return log_sum - shifted[np.arange(len(labels)), labels]


def _shown(logs):
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
    )
