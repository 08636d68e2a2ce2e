"""The split trainer: SL, CA-SL, deprune and prune are phase schedules of this one loop.

Each epoch: train at the phase's budget (gate reset on entering a phase), evaluate test accuracy at
that budget, append a line to `metrics.jsonl`, write TensorBoard scalars, checkpoint. Re-running on
the same workdir resumes after the last checkpointed epoch.
"""

import json
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit import budget as budget_lib
from tfsplit import codec, data, models
from tfsplit.train.ledger import ByteLedger
from tfsplit.train.steps import STEPS

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


def build_split_model(config, info):
    """The backbone of `config.model`, cut and (optionally) given the masked bottleneck."""
    backbone = models.build_backbone(
        config.model.backbone,
        num_classes=info.num_classes,
        input_shape=info.image_shape,
        width_multiplier=config.model.width_multiplier,
        classifier=config.model.classifier,
    )
    bottleneck = config.model.bottleneck
    if bottleneck.enabled:
        bottleneck = dict(
            feature_compression=bottleneck.feature_compression,
            resolution_compression=bottleneck.resolution_compression,
            gate_init_max=bottleneck.gate_init_max,
        )
    else:
        bottleneck = None
    cut = models.resolve_cut(config.model.backbone, config.model.cut)
    return models.split_model(backbone, cut, bottleneck=bottleneck)


def data_arguments(config):
    """What identifies a run's data, shared by training and by everything that reloads a run."""
    return dict(
        path=config.data.path or None,
        seed=config.seed,
        train_size=config.data.train_size or None,
        test_size=config.data.test_size or None,
        image_size=config.data.image_size or None,
        channels=config.data.channels or None,
    )


def build_data(config):
    return data.build_datasets(
        config.data.name,
        batch_size=config.data.batch_size,
        eval_batch_size=config.data.eval_batch_size,
        augment=config.data.augment,
        **data_arguments(config),
    )


def _check_wire(config):
    for key in ("activation_dtype", "gradient_dtype"):
        value = config.wire[key]
        if value not in codec.WIRE_DTYPES:
            raise ValueError(f"config.wire.{key} must be one of {codec.WIRE_DTYPES}. "
                             f"Received: {value!r}")
    if config.wire.transport not in STEPS:
        raise ValueError(f"config.wire.transport must be one of {tuple(STEPS)}. "
                         f"Received: {config.wire.transport!r}")


GATE_OPTIMIZERS = ("shared", "adam")


def build_gate_optimizer(config):
    """None (gates share the main SGD, as in the reference) or Adam for the gate logits alone.

    The budget loss (eps=1000) can move a gate logit by tens of units in one SGD step, far past
    the sigmoid's slope; Adam's steps are bounded by its learning rate whatever eps is, so gates
    settle where the penalty and the task loss balance instead of collapsing.
    """
    kind = config.optimizer.gate_optimizer
    if kind not in GATE_OPTIMIZERS:
        raise ValueError(f"config.optimizer.gate_optimizer must be one of {GATE_OPTIMIZERS}. "
                         f"Received: {kind!r}")
    if kind == "shared":
        return None
    if not config.optimizer.gate_learning_rate > 0:
        raise ValueError("config.optimizer.gate_learning_rate must be > 0. Received: "
                         f"{config.optimizer.gate_learning_rate!r}")
    return keras.optimizers.Adam(config.optimizer.gate_learning_rate)


def restore_weights(split, source_workdir):
    """Load head and tail weights from the latest checkpoint of another run (prune's start)."""
    latest = tf.train.latest_checkpoint(os.path.join(source_workdir, CHECKPOINT_DIR))
    if latest is None:
        raise FileNotFoundError(
            f"init_from={source_workdir!r} has no checkpoint in its {CHECKPOINT_DIR}/ folder; "
            "expected the workdir of a finished tfsplit-train run with the same model config."
        )
    status = tf.train.Checkpoint(head=split.head, tail=split.tail).read(latest)
    status.expect_partial().assert_existing_objects_matched()
    logging.info("Initialised weights from %s", latest)
    return latest


class Trainer:
    """Runs a phase schedule on one workdir.

    Args:
      config: a ConfigDict as produced by the files in configs/.
      workdir: where metrics, summary, checkpoints and TensorBoard logs go.
    """

    def __init__(self, config, workdir):
        _check_wire(config)
        self.config = config
        self.workdir = workdir
        write_config(config, workdir)
        keras.utils.set_random_seed(config.seed)
        self.train_ds, self.test_ds, self.info = build_data(config)
        self.split = build_split_model(config, self.info)
        self.phases = budget_lib.build_phases(
            config.phases, self.split.channels, self.split.encoder is not None
        )
        self.optimizer = keras.optimizers.SGD(
            learning_rate=self.phases[0].learning_rate,
            momentum=config.optimizer.momentum,
            weight_decay=config.optimizer.weight_decay or None,
        )
        self.steps = STEPS[config.wire.transport](
            self.split, self.optimizer,
            activation_dtype=config.wire.activation_dtype,
            gradient_dtype=config.wire.gradient_dtype,
            budget_eps=config.budget_loss.eps,
            budget_delta=config.budget_loss.delta,
            gate_optimizer=build_gate_optimizer(config),
            sampling_probability=config.budget_sampling.probability,
            min_budget=config.budget_sampling.min_budget,
            seed=config.seed,
        )
        self.epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
        checkpoint = tf.train.Checkpoint(
            head=self.split.head, tail=self.split.tail, optimizer=self.optimizer,
            epochs_done=self.epochs_done, budget_draws=self.steps.budget_draws,
        )
        if self.steps.gate_optimizer is not None:
            checkpoint.gate_optimizer = self.steps.gate_optimizer
        self.manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=2
        )
        self.ledger = ByteLedger()
        self.records = []
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))

    # ----------------------------------------------------------------------------------------
    def _resume_or_init(self):
        if self.manager.latest_checkpoint:
            self.manager.checkpoint.restore(self.manager.latest_checkpoint).assert_consumed()
            done = int(self.epochs_done.numpy())
            self.records = _read_metrics(os.path.join(self.workdir, METRICS_FILE))[:done]
            if len(self.records) != done:
                raise ValueError(
                    f"{self.workdir}/{METRICS_FILE} has {len(self.records)} epochs but the "
                    f"checkpoint has {done}; expected one metrics line per checkpointed epoch."
                )
            self.ledger = ByteLedger(total_up=sum(r["bytes_up"] for r in self.records),
                                     total_down=sum(r["bytes_down"] for r in self.records))
            logging.info("Resuming %s after epoch %d", self.workdir, done)
        elif self.config.init_from:
            restore_weights(self.split, self.config.init_from)
        _write_metrics(os.path.join(self.workdir, METRICS_FILE), self.records)

    def _enter_phase(self, number, phase, reset):
        """Sets the phase's budget; on a fresh entry (not a mid-phase resume) resets the gates."""
        encoder = self.split.encoder
        if reset and encoder is not None and phase.reset != "none":
            rng = np.random.default_rng([self.config.seed, number])
            before = encoder.gate_logits.numpy()
            encoder.gate_logits.assign(phase.apply_reset(before, rng))
            logging.info("Phase %d: %s reset; %d of %d gates were open (logit >= %g)", number,
                         phase.reset, int(np.sum(before >= phase.reset_threshold)), before.size,
                         phase.reset_threshold)
        k = phase.effective_budget(self.split.channels)
        self.steps.set_budget(k, masking=phase.budget != 0)
        return k

    def run(self):
        """Trains every remaining epoch of the schedule; returns the run's summary dict."""
        self._resume_or_init()
        epoch, entered = 0, None
        for number, phase in enumerate(self.phases, start=1):
            for epoch_in_phase in range(phase.epochs):
                epoch += 1
                if epoch <= len(self.records):
                    continue
                if entered != number:
                    k = self._enter_phase(number, phase, reset=epoch_in_phase == 0)
                    entered = number
                learning_rate = phase.learning_rate_at(epoch_in_phase)
                self.optimizer.learning_rate.assign(learning_rate)
                self._finish_epoch(self._run_epoch(number, epoch, k, learning_rate))
        return self._write_summary()

    def _run_epoch(self, phase_number, epoch, k, learning_rate):
        self.ledger.start_epoch()
        totals = dict(cross_entropy=0.0, budget_loss=0.0, correct=0, samples=0)
        start = time.perf_counter()
        log_every = self.config.log_every_steps
        for step, (images, labels) in enumerate(self.train_ds, start=1):
            result = self.steps.train_step(images, labels)
            self.ledger.record(result.bytes_up, result.bytes_down)
            totals["cross_entropy"] += result.cross_entropy * result.batch_size
            totals["budget_loss"] += result.budget_loss * result.batch_size
            totals["correct"] += result.correct
            totals["samples"] += result.batch_size
            if log_every and step % log_every == 0:
                seconds = time.perf_counter() - start
                logging.info(
                    "phase %d epoch %d step %d: loss %.4f acc %.3f | %.0f samples/s | "
                    "sent %.2f MB up, %.2f MB down", phase_number, epoch, step,
                    totals["cross_entropy"] / totals["samples"],
                    totals["correct"] / totals["samples"], totals["samples"] / seconds,
                    self.ledger.total_up / 1e6, self.ledger.total_down / 1e6,
                )
        train_seconds = time.perf_counter() - start
        test_accuracy = self.steps.evaluate(self.test_ds)
        wall_seconds = time.perf_counter() - start
        samples = max(totals["samples"], 1)
        soft_channels = (
            float(tf.reduce_sum(budget_lib.channel_importance(self.split.encoder.gate_logits)))
            if self.split.encoder is not None else float(self.split.channels)
        )
        return dict(
            phase=phase_number, epoch=epoch, budget=k, learning_rate=learning_rate,
            train_cross_entropy=totals["cross_entropy"] / samples,
            train_budget_loss=totals["budget_loss"] / samples,
            train_accuracy=totals["correct"] / samples,
            test_accuracy=test_accuracy,
            bytes_up=self.ledger.epoch_up, bytes_down=self.ledger.epoch_down,
            total_bytes_up=self.ledger.total_up, total_bytes_down=self.ledger.total_down,
            soft_channels=soft_channels,
            samples_per_second=totals["samples"] / train_seconds,
            wall_seconds=wall_seconds,
            elapsed_seconds=wall_seconds + sum(r["wall_seconds"] for r in self.records),
        )

    def _finish_epoch(self, record):
        self.records.append(record)
        with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
        with self.writer.as_default(step=record["epoch"]):
            for key in ("test_accuracy", "train_accuracy", "train_cross_entropy",
                        "train_budget_loss", "budget", "soft_channels", "learning_rate",
                        "samples_per_second"):
                tf.summary.scalar(key, record[key])
            tf.summary.scalar("megabytes_up", record["total_bytes_up"] / 1e6)
            tf.summary.scalar("megabytes_down", record["total_bytes_down"] / 1e6)
        self.writer.flush()
        self.epochs_done.assign(record["epoch"])
        self.manager.save(checkpoint_number=record["epoch"])
        logging.info(
            "epoch %d (phase %d, budget %d): test accuracy %.4f, %.2f MB up, %.2f MB down, %.1f s",
            record["epoch"], record["phase"], record["budget"], record["test_accuracy"],
            record["bytes_up"] / 1e6, record["bytes_down"] / 1e6, record["wall_seconds"],
        )

    def _write_summary(self):
        if not self.records:
            raise ValueError("The schedule ran no epoch; expected at least one.")
        last = self.records[-1]
        height, width, _ = self.split.wire_shape
        summary = dict(
            mode=self.config.mode,
            dataset=self.info.name,
            model=f"{self.config.model.backbone}@{self.config.model.cut}",
            final_test_accuracy=last["test_accuracy"],
            final_budget=last["budget"],
            channels=self.split.channels,
            train_bytes_up=self.ledger.total_up,
            train_bytes_down=self.ledger.total_down,
            inference_bytes_per_sample=codec.payload_nbytes(
                1, height, width, last["budget"], self.config.wire.activation_dtype,
                with_labels=False, channels=self.split.channels,
            ),
            wall_seconds=last["elapsed_seconds"],
            epochs=len(self.records),
        )
        with open(os.path.join(self.workdir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        return summary


def write_config(config, workdir):
    """Records the resolved config; refuses to resume a workdir that holds a different one."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != json.loads(text):
                raise ValueError(
                    f"{workdir} holds a run with a different config ({path}); resume it with the "
                    "same config and overrides, or train into a new workdir."
                )
        return
    with open(path, "w") as f:
        f.write(text)


def _read_metrics(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_metrics(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def train(config, workdir):
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the summary."""
    return Trainer(config, workdir).run()
