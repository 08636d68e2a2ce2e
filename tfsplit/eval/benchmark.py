"""Training throughput of a `SplitModel` against the same network trained unsplit.

The split model's `fit` adds what split learning costs in process: the top-k channel selection,
wire quantization both ways, the budget loss and the byte metrics. The unsplit model is a plain
functional `keras.Model` of the very same head and tail layers, compiled with the same SGD. Both
`fit` the same cached batches in one process, in interleaved passes after a warm-up that traces
both, and the fastest pass of each counts (the ratio target is >= 0.95).
"""

import time

import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit import budget as budget_lib
from tfsplit.train import trainer


def _cached_batches(dataset, count):
    """The first `count` full batches of `dataset`, stacked into one in-memory pipeline."""
    batches = list(dataset.take(count))
    sizes = {int(labels.shape[0]) for _, labels in batches}
    if len(batches) < count or len(sizes) != 1:
        raise ValueError(
            f"The benchmark needs {count} full batches; the training set gives {len(batches)} "
            f"of sizes {sorted(sizes)}. Lower steps or raise data.train_size."
        )
    images = tf.concat([images for images, _ in batches], axis=0)
    labels = tf.concat([labels for _, labels in batches], axis=0)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(sizes.pop())


def build_unsplit_model(split, config, learning_rate):
    """`tail(head(x))` as one functional model, compiled with the split model's SGD settings."""
    inputs = keras.Input(split.head.input.shape[1:], name="image")
    unsplit = keras.Model(inputs, split.tail(split.head(inputs)), name="unsplit")
    unsplit.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate,
            momentum=config.optimizer.momentum,
            weight_decay=config.optimizer.weight_decay or None,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return unsplit


def _timed_fit(model, dataset):
    start = time.perf_counter()
    history = model.fit(dataset, epochs=1, verbose=0)
    return time.perf_counter() - start, history.history


def first_phase_model(config, info):
    """The config's compiled `SplitModel`, set to its first phase's budget and learning rate.

    Returns:
      (split_model, budget, learning_rate).
    """
    split = trainer.build_split_model(config, info)
    phase = budget_lib.build_phases(
        [dict(p) for p in config.phases], split.channels, split.encoder is not None
    )[0]
    budget, learning_rate = phase.effective_budget(split.channels), phase.learning_rate_at(0)
    # As in the phase's first epoch: nested budgets start once the gates have settled.
    split.set_budget(budget, masking=phase.budget != 0, nesting=False)
    keras.backend.set_value(split.optimizer.learning_rate, learning_rate)
    return split, budget, learning_rate


def benchmark_training(config, steps=50, repeats=3):
    """Samples per second of `fit` on the split model and on the unsplit network, and their ratio.

    Args:
      config: a training config; the split model trains at its first phase's budget.
      steps: batches per timed pass.
      repeats: interleaved timed passes for each side; the fastest pass of each is compared.

    Returns:
      dict with split_samples_per_second, unsplit_samples_per_second, ratio (split / unsplit),
      batch_size, steps, budget, payload_bytes_up_per_step, payload_bytes_down_per_step.
    """
    for name, value in (("steps", steps), ("repeats", repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    keras.utils.set_random_seed(config.seed)
    train_ds, _, info = trainer.build_data(config)
    split, budget, learning_rate = first_phase_model(config, info)
    unsplit = build_unsplit_model(split, config, learning_rate)
    dataset = _cached_batches(train_ds, steps)
    batch_size = int(next(iter(dataset))[1].shape[0])
    for model in (split, unsplit):  # warm-up: trace and compile both steps.
        _timed_fit(model, dataset.take(2))
    # Interleaved passes, so both sides see the same background load; the fastest pass counts.
    split_seconds, unsplit_seconds = [], []
    for _ in range(repeats):
        seconds, logs = _timed_fit(split, dataset)
        split_seconds.append(seconds)
        unsplit_seconds.append(_timed_fit(unsplit, dataset)[0])
    samples = steps * batch_size
    result = dict(
        split_samples_per_second=samples / min(split_seconds),
        unsplit_samples_per_second=samples / min(unsplit_seconds),
        ratio=min(unsplit_seconds) / min(split_seconds),
        batch_size=batch_size,
        steps=steps,
        budget=budget,
        payload_bytes_up_per_step=logs["payload_bytes_up"][-1] / steps,
        payload_bytes_down_per_step=logs["payload_bytes_down"][-1] / steps,
    )
    logging.info("benchmark: %s", result)
    return result
