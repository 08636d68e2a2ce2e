"""Throughput of the split training step against `model.fit` on the same network.

The split step adds channel selection, wire quantization both ways, the budget loss and the byte
ledger; this measures what that costs. Both sides train the same head + bottleneck + tail on the
same cached batches in one process, in interleaved passes after a warm-up that compiles both.
"""

import time

import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit.train.ledger import ByteLedger
from tfsplit.train.trainer import Trainer


def _cached_batches(dataset, count):
    batches = list(dataset.take(count))
    if len(batches) < count:
        raise ValueError(f"The training set gives {len(batches)} batches; the benchmark needs "
                         f"{count}. Lower steps or raise data.train_size.")
    return batches


def _time_split_pass(steps, batches, ledger):
    start = time.perf_counter()
    for images, labels in batches:
        result = steps.train_step(images, labels)
        ledger.record(result.bytes_up, result.bytes_down)
    return time.perf_counter() - start


def _time_fit_pass(model, dataset):
    start = time.perf_counter()
    model.fit(dataset, epochs=1, verbose=0)
    return time.perf_counter() - start


def benchmark_training(config, workdir, steps=50, repeats=3):
    """Samples per second of the split step and of `fit`, and their ratio.

    Args:
      config: a training config (its first phase's budget is used).
      workdir: scratch directory for the trainer's files.
      steps: batches per timed pass.
      repeats: interleaved timed passes for each side; the fastest pass of each is compared.

    Returns:
      dict with split_samples_per_second, fit_samples_per_second, ratio (split / fit),
      batch_size, steps, budget, bytes_up_per_step, bytes_down_per_step.
    """
    trainer = Trainer(config, workdir)
    phase = trainer.phases[0]
    k = phase.effective_budget(trainer.split.channels)
    trainer.steps.set_budget(k, masking=phase.budget != 0)
    batches = _cached_batches(trainer.train_ds, steps)
    samples = sum(int(b[1].shape[0]) for b in batches)

    model = trainer.split.full_model()
    model.compile(
        optimizer=keras.optimizers.SGD(phase.learning_rate, momentum=config.optimizer.momentum,
                                       weight_decay=config.optimizer.weight_decay or None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    dataset = tf.data.Dataset.from_tensor_slices((
        tf.concat([b[0] for b in batches], 0), tf.concat([b[1] for b in batches], 0)
    )).batch(int(batches[0][1].shape[0])).cache()

    ledger = ByteLedger()
    _time_split_pass(trainer.steps, batches[:2], ledger)  # warm-up: trace and compile.
    _time_fit_pass(model, dataset)
    # Interleaved passes, so both sides see the same background load; the fastest pass counts.
    split_seconds, fit_seconds = [], []
    for _ in range(repeats):
        split_seconds.append(_time_split_pass(trainer.steps, batches, ledger))
        fit_seconds.append(_time_fit_pass(model, dataset))
    split_seconds, fit_seconds = min(split_seconds), min(fit_seconds)
    result = dict(
        split_samples_per_second=samples / split_seconds,
        fit_samples_per_second=samples / fit_seconds,
        ratio=fit_seconds / split_seconds,
        batch_size=int(batches[0][1].shape[0]),
        steps=steps,
        budget=k,
        bytes_up_per_step=ledger.last_step_up,
        bytes_down_per_step=ledger.last_step_down,
    )
    logging.info("benchmark: %s", result)
    return result
