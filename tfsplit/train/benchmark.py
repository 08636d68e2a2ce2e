"""Throughput of the split training step against `model.fit` on the same network.

The split step adds channel selection, wire quantization both ways, the budget loss and the byte
ledger; this measures what that costs. Both sides train the same head + bottleneck + tail on the
same cached batches, one after the other in one process, after a warm-up that compiles them.
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


def _time_split_steps(steps, batches, ledger):
    start = time.perf_counter()
    for images, labels in batches:
        result = steps.train_step(images, labels)
        ledger.record(result.bytes_up, result.bytes_down)
    return time.perf_counter() - start


def _time_fit(model, batches, repeats):
    images = tf.concat([b[0] for b in batches], 0)
    labels = tf.concat([b[1] for b in batches], 0)
    batch_size = int(batches[0][1].shape[0])
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size).cache()
    model.fit(dataset, epochs=1, verbose=0)  # warm-up: trace and compile.
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0)
        timings.append(time.perf_counter() - start)
    return min(timings)


def benchmark_training(config, workdir, steps=50, repeats=3):
    """Samples per second of the split step and of `fit`, and their ratio.

    Args:
      config: a training config (its first phase's budget is used).
      workdir: scratch directory for the trainer's files.
      steps: batches per timed pass.
      repeats: timed passes for each side; the fastest pass of each is compared.

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

    ledger = ByteLedger()
    _time_split_steps(trainer.steps, batches[:2], ledger)  # warm-up: trace and compile.
    split_seconds = min(_time_split_steps(trainer.steps, batches, ledger) for _ in range(repeats))

    model = trainer.split.full_model()
    model.compile(
        optimizer=keras.optimizers.SGD(phase.learning_rate, momentum=config.optimizer.momentum,
                                       weight_decay=config.optimizer.weight_decay or None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    fit_seconds = _time_fit(model, batches, repeats)
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
