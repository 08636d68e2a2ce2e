"""Callbacks that drive and record a split-training run: the phase schedule and the run's files.

SL, CA-SL, deprune and prune are one mechanism: a list of phases that `PhaseSchedule` walks
through epoch by epoch. `RunRecords` writes what a run leaves in its workdir (`metrics.jsonl`, one
line per epoch, and `summary.json`), so the tfsplit_tools and the reproduce table read one format.
"""

import json
import math
import os
import time

import numpy as np
import tf_keras as keras
from absl import logging

from tfsplit import codec
from tfsplit.engine import budget as budget_lib
from tfsplit.layers.bottleneck import GATE_LOGIT_OPEN

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


# Logit distance a gate may have to cover in a masked phase: from fully open to undecided.
GATE_TRAVEL = GATE_LOGIT_OPEN


class PhaseSchedule(keras.callbacks.Callback):
    """Sets each epoch's budget and learning rate, and resets the gates on entering a phase.

    Args:
      phases: `tfsplit.Phase`s, or dicts / ConfigDicts with its fields, in order; budget 0 sends
        every channel without the budget loss.
      seed: seeds the gate resets, so a resumed run redraws the same logits.
      gate_travel_fraction: when > 0 and the model has a gate optimizer, its learning rate in a
        masked phase is set so that a gate can cross `GATE_TRAVEL` logits within this fraction of
        the phase's steps: the gates then move at a pace set in epochs, whatever the dataset's
        size (a fixed per-step rate takes most of a short phase on a small dataset).

    Use `epochs` as `fit`'s epochs. Each epoch's logs gain `phase`, `budget`, `learning_rate`,
    `soft_channels`, `gate_separation` (masked phases) and, on a reset, `gates_open_at_reset`.
    """

    def __init__(self, phases, seed=0, gate_travel_fraction=0.0):
        super().__init__()
        if not 0.0 <= gate_travel_fraction <= 1.0:
            raise ValueError(
                f"`gate_travel_fraction` must be in [0, 1]. Received: {gate_travel_fraction!r}"
            )
        self.phase_configs = list(phases)
        self.seed = seed
        self.gate_travel_fraction = gate_travel_fraction
        self.phases = None
        self.epochs = sum(int(dict(p)["epochs"]) for p in map(_as_dict, self.phase_configs))
        self._current = None

    def set_model(self, model):
        super().set_model(model)
        self.phases = budget_lib.build_phases(
            [_as_dict(p) for p in self.phase_configs], model.channels, model.encoder is not None
        )

    def locate(self, epoch):
        """(phase number from 1, its Phase, epoch within the phase) of a 0-based `epoch`."""
        start = 0
        for number, phase in enumerate(self.phases, start=1):
            if epoch < start + phase.epochs:
                return number, phase, epoch - start
            start += phase.epochs
        raise ValueError(
            f"The schedule has {self.epochs} epochs; fit asked for epoch {epoch + 1}. Pass "
            "epochs=schedule.epochs to fit."
        )

    def on_epoch_begin(self, epoch, logs=None):
        number, phase, epoch_in_phase = self.locate(epoch)
        model = self.model
        reset = {}
        if int(model.phase.numpy()) != number:
            reset = self._enter(number, phase)
            model.phase.assign(number)
        k = phase.effective_budget(model.channels)
        model.set_budget(
            k, masking=phase.budget != 0, nesting=self._nesting(number, epoch_in_phase)
        )
        learning_rate = phase.learning_rate_at(epoch_in_phase)
        keras.backend.set_value(model.optimizer.learning_rate, learning_rate)
        self._current = dict(phase=number, budget=k, learning_rate=learning_rate, **reset)
        if self.gate_travel_fraction and model.gate_optimizer is not None and phase.budget:
            steps = phase.epochs * self.params["steps"] * self.gate_travel_fraction
            gate_rate = GATE_TRAVEL / steps
            keras.backend.set_value(model.gate_optimizer.learning_rate, gate_rate)
            self._current["gate_learning_rate"] = gate_rate

    def _nesting(self, number, epoch_in_phase):
        """Nested budgets serve the deployed budget, once its channels are chosen.

        Only in the final phase, after its boost epochs and the gates' travel: while the selection
        still moves, its prefixes are not the ones inference will send. On 1,500 samples deprune
        nested from the start of its final phase ended at 63.0%; with this rule at 82.1%.
        """
        phase = self.phases[number - 1]
        settled = max(phase.boost_epochs, math.ceil(self.gate_travel_fraction * phase.epochs))
        return number == len(self.phases) and epoch_in_phase >= settled

    def _enter(self, number, phase):
        encoder = self.model.encoder
        if encoder is None or phase.reset == "none":
            return {}
        before = encoder.gate_logits.numpy()
        sent = self.model.channel_indices().numpy()  # at the budget of the phase that ends
        rng = np.random.default_rng([self.seed, number])
        encoder.gate_logits.assign(phase.apply_reset(before, sent, rng))
        if phase.reset == "deprune":
            encoder.seniority.assign(budget_lib.promote(encoder.seniority.numpy(), sent))
        open_count = int(np.sum(before >= phase.reset_threshold))
        logging.info(
            "Phase %d: %s reset after sending %d channels; %d of %d gates were open (logit >= %g)",
            number,
            phase.reset,
            sent.size,
            open_count,
            before.size,
            phase.reset_threshold,
        )
        return dict(gates_open_at_reset=open_count)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            logs.update(self._current, soft_channels=self.model.soft_channels())
            if self.model.encoder is not None and self._current["budget"] < self.model.channels:
                logs["gate_separation"] = budget_lib.gate_separation(
                    self.model.encoder.gate_logits, self._current["budget"]
                )


class BatchNormCalibration(keras.callbacks.Callback):
    """Recomputes batch norm statistics before an evaluation when the sent channels changed.

    Without it a model whose gates moved during the epoch is evaluated with moving averages of
    selections it no longer sends, and test accuracy trails train accuracy for that reason alone.
    Calibrates when the set of sent channels or any of their gates changed since the last time.

    Args:
      dataset: training batches (images, labels).
      batches: how many of them each calibration averages over.
    """

    def __init__(self, dataset, batches=20):
        super().__init__()
        if not isinstance(batches, int) or batches < 1:
            raise ValueError(f"`batches` must be a positive integer. Received: {batches!r}")
        self.dataset, self.batches = dataset, batches
        self._calibrated_for = None

    def on_test_begin(self, logs=None):
        model = self.model
        if model.encoder is None:
            return
        sent = model.channel_indices().numpy()
        state = (tuple(sent), tuple(np.round(model.encoder.gate_logits.numpy()[sent], 3)))
        if state != self._calibrated_for:
            model.calibrate_batch_norm(self.dataset, self.batches)
            self._calibrated_for = state


def _as_dict(phase):
    if isinstance(phase, budget_lib.Phase):
        return vars(phase)
    return dict(phase)


class RunRecords(keras.callbacks.Callback):
    """Writes `metrics.jsonl` (a line per epoch) and `summary.json` into a workdir.

    A resumed run keeps the lines of the epochs before the one it resumes in, so byte totals and
    elapsed time carry over. Put it after `PhaseSchedule` and before `BackupAndRestore`: a record
    is on disk before the backup that follows it, and the final model is saved before the backup
    is deleted.

    Args:
      workdir: the run's directory.
      train_samples: samples per training epoch (for samples per second).
      summary: fixed entries of summary.json (mode, dataset, model).
      model_path: where the trained model is saved at the end (None: not saved).
    """

    def __init__(self, workdir, train_samples, summary=None, model_path=None):
        super().__init__()
        self.workdir = workdir
        self.train_samples = train_samples
        self.fixed_summary = dict(summary or {})
        self.model_path = model_path
        self.records = []
        self._start = None

    @property
    def metrics_path(self):
        return os.path.join(self.workdir, METRICS_FILE)

    def on_train_begin(self, logs=None):
        self.records = read_records(self.workdir)

    def on_epoch_begin(self, epoch, logs=None):
        if len(self.records) > epoch:
            self.records = self.records[:epoch]
            _write_lines(self.metrics_path, self.records)
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        wall_seconds = time.perf_counter() - self._start
        previous = self.records[-1] if self.records else {}
        # Epoch counts from the backed-up running totals, so a resumed epoch still counts whole.
        total_up, total_down = (int(v) for v in self.model.sent_payload_bytes.numpy())
        up = total_up - previous.get("total_payload_bytes_up", 0)
        down = total_down - previous.get("total_payload_bytes_down", 0)
        record = dict(
            epoch=epoch + 1,
            **{
                key: logs[key]
                for key in ("phase", "budget", "learning_rate", "gate_learning_rate")
                if key in logs
            },
            train_cross_entropy=float(logs["loss"]),
            train_budget_loss=float(logs["budget_loss"]),
            train_accuracy=float(logs["accuracy"]),
            test_accuracy=float(logs["val_accuracy"]),
            payload_bytes_up=up,
            payload_bytes_down=down,
            total_payload_bytes_up=total_up,
            total_payload_bytes_down=total_down,
            soft_channels=float(logs.get("soft_channels", self.model.soft_channels())),
            samples_per_second=self.train_samples / wall_seconds,
            wall_seconds=wall_seconds,
            elapsed_seconds=previous.get("elapsed_seconds", 0.0) + wall_seconds,
        )
        if "local_loss" in logs:
            record["train_local_loss"] = float(logs["local_loss"])
        if "gates_open_at_reset" in logs:
            record["gates_open_at_reset"] = int(logs["gates_open_at_reset"])
        if "gate_separation" in logs:
            record["gate_separation"] = float(logs["gate_separation"])
        for key in ("wire_bytes_up", "wire_bytes_down"):  # networked training: gRPC messages
            if key in logs:
                record[key] = int(logs[key])
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        logs.update(
            samples_per_second=record["samples_per_second"],
            total_payload_megabytes_up=record["total_payload_bytes_up"] / 1e6,
            total_payload_megabytes_down=record["total_payload_bytes_down"] / 1e6,
        )
        logging.info(
            "epoch %d (budget %s): test accuracy %.4f, %.2f MB up, %.2f MB down, %.1f s",
            record["epoch"],
            record.get("budget"),
            record["test_accuracy"],
            up / 1e6,
            down / 1e6,
            wall_seconds,
        )

    def on_train_end(self, logs=None):
        if self.model_path:
            os.makedirs(os.path.dirname(self.model_path), exist_ok=True)
            self.model.save(self.model_path)
        if self.records:
            write_summary(self.workdir, self.records, self.model, self.fixed_summary)


def write_summary(workdir, records, model, fixed):
    """summary.json from a run's records: final accuracy and budget, bytes, time."""
    last = records[-1]
    budget = int(last.get("budget", model.channels))
    summary = dict(
        fixed,
        final_test_accuracy=last["test_accuracy"],
        final_budget=budget,
        channels=model.channels,
        train_payload_bytes_up=last["total_payload_bytes_up"],
        train_payload_bytes_down=last["total_payload_bytes_down"],
        inference_payload_bytes_per_sample=codec.payload_nbytes(
            1,
            model.height,
            model.width,
            budget,
            model.activation_dtype,
            with_labels=False,
            channels=model.channels,
        ),
        wall_seconds=last["elapsed_seconds"],
        epochs=len(records),
    )
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def read_records(workdir):
    """The epoch records of `metrics.jsonl` in `workdir` ([] when there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_lines(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)
