"""`RunRecords`: what a run leaves in its workdir, one format for the tools and the reproduce table.

`metrics.jsonl` holds one line per epoch and `summary.json` the run's outcome; `read_records` and
`write_summary` read and write them.
"""

import json
import os
import time

import tf_keras as keras
from absl import logging

from tfsplit import codec

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


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
            payload_bytes_up=up,
            payload_bytes_down=down,
            total_payload_bytes_up=total_up,
            total_payload_bytes_down=total_down,
            soft_channels=float(logs.get("soft_channels", self.model.soft_channels())),
            samples_per_second=self.train_samples / wall_seconds,
            wall_seconds=wall_seconds,
            elapsed_seconds=previous.get("elapsed_seconds", 0.0) + wall_seconds,
        )
        top_ledger = getattr(self.model, "sent_top_payload_bytes", None)  # U-shaped: cut 2
        if top_ledger is not None:
            for key, total in zip(("top_payload_bytes_down", "top_payload_bytes_up"), top_ledger):
                record[key] = int(total) - previous.get(f"total_{key}", 0)
                record[f"total_{key}"] = int(total)
        if "val_accuracy" in logs:  # the validation split's; a run without one has none
            record.update(
                val_accuracy=float(logs["val_accuracy"]), val_loss=float(logs["val_loss"])
            )
        record.update((k, float(v)) for k, v in logs.items() if k.startswith("leakage_"))
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
            "epoch %d (budget %s): validation accuracy %s, %.2f MB up, %.2f MB down, %.1f s",
            record["epoch"],
            record.get("budget"),
            f"{record['val_accuracy']:.4f}" if "val_accuracy" in record else "(no split)",
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
    """summary.json from a run's records: final validation accuracy and budget, bytes, time (the
    test accuracy is added once it is evaluated: `add_test_result`)."""
    last = records[-1]
    budget = int(last.get("budget", model.channels))
    summary = dict(
        fixed,
        final_val_accuracy=last.get("val_accuracy"),
        final_budget=budget,
        channels=model.channels,
        train_payload_bytes_up=last["total_payload_bytes_up"],
        train_payload_bytes_down=last["total_payload_bytes_down"],
        **{
            f"train_{key}": last[f"total_{key}"]
            for key in ("top_payload_bytes_down", "top_payload_bytes_up")
            if f"total_{key}" in last
        },
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


def add_test_result(workdir, logs):
    """Adds the test set's evaluation (`evaluate`'s logs, made once at the end of the run) to
    the summary.json in `workdir`; returns the summary."""
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(path) as f:
        summary = json.load(f)
    summary.update(final_test_accuracy=float(logs["accuracy"]), final_test_loss=float(logs["loss"]))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)
    return summary


def read_records(workdir):
    """The epoch records of `metrics.jsonl` in `workdir` ([] when there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_epoch_change(records):
    """How settled a run ended: the points its last epoch moved validation accuracy (None
    before two validated epochs)."""
    if len(records) < 2 or "val_accuracy" not in records[-1]:
        return None
    return 100 * (records[-1]["val_accuracy"] - records[-2]["val_accuracy"])


def _write_lines(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)
