"""Training throughput of a `SplitModel` against the same network trained unsplit.

The split model's `fit` adds what split learning costs in process: the top-k channel selection,
wire quantization both ways, the budget loss and the byte metrics. The unsplit model is a plain
functional `keras.Model` of the very same head and tail layers, compiled with the same SGD. Both
`fit` the same cached batches in one process, in interleaved passes after a warm-up that traces
both, and the fastest pass of each counts (the ratio target is >= 0.95).
"""

import itertools
import multiprocessing
import time
import types

import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit.device.training.channel import TrainingClient
from tfsplit.engine import budget as budget_lib
from tfsplit.training import trainer
from tfsplit.training.server import service as service_lib


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


def first_phase_model(config, info, remote=False):
    """The config's compiled `SplitModel` (the device half with `remote`), set to its first
    phase's budget and learning rate.

    Returns:
      (split_model, budget, learning_rate).
    """
    split = trainer.build_split_model(config, info, remote=remote)
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
    train_ds, _, _, info = trainer.build_data(config)
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


def _serve_config(config, ports, parallel=False):
    """A training server for `config` until killed (the body of the server process)."""
    service_lib.one_inter_op_thread()  # as tfsplit-train-server

    def build_split(image_shape, num_classes):
        shapes = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
        return trainer.build_split_model(config, shapes)

    server, port = service_lib.serve(service_lib.TrainingServicer(build_split, parallel=parallel))
    ports.put(port)
    server.wait_for_termination()


def benchmark_networked(config, steps=50, repeats=3):
    """Samples per second of `fit` in process against the same step over gRPC on loopback.

    The server runs in a process of its own on 127.0.0.1 (as a device and an edge server on one
    machine would, they share the CPUs); the device half is a `RemoteSplitModel` with the same
    weights, budget and batches. Interleaved passes after a warm-up; the fastest pass of each
    counts.

    Returns:
      dict with in_process_samples_per_second, networked_samples_per_second, ratio
      (networked / in process), wire_bytes_per_step (gRPC messages up and down) and
      payload_bytes_per_step.
    """
    keras.utils.set_random_seed(config.seed)
    train_ds, _, _, info = trainer.build_data(config)
    split, budget, _ = first_phase_model(config, info)
    remote = trainer.build_split_model(config, info, remote=True)
    for part in ("head", "tail"):
        getattr(remote, part).set_weights(getattr(split, part).get_weights())
    remote.set_budget(budget, masking=split.encoder is not None, nesting=False)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter, not a forked TF
    ports = context.Queue()
    process = context.Process(target=_serve_config, args=(config, ports), daemon=True)
    process.start()
    try:
        remote.connect(TrainingClient(f"127.0.0.1:{ports.get(timeout=120)}"))
        dataset = _cached_batches(train_ds, steps)
        batch_size = int(next(iter(dataset))[1].shape[0])
        for model in (split, remote):  # warm-up: trace both steps, open the connection.
            _timed_fit(model, dataset.take(2))
        seconds = {"in_process": [], "networked": []}
        for _ in range(repeats):
            seconds["in_process"].append(_timed_fit(split, dataset)[0])
            elapsed, logs = _timed_fit(remote, dataset)
            seconds["networked"].append(elapsed)
    finally:
        process.kill()
        process.join(30)
    samples = steps * batch_size
    result = dict(
        in_process_samples_per_second=samples / min(seconds["in_process"]),
        networked_samples_per_second=samples / min(seconds["networked"]),
        ratio=min(seconds["in_process"]) / min(seconds["networked"]),
        batch_size=batch_size,
        steps=steps,
        budget=budget,
        payload_bytes_per_step=[logs[f"payload_bytes_{d}"][-1] / steps for d in ("up", "down")],
        wire_bytes_per_step=[logs[f"wire_bytes_{d}"][-1] / steps for d in ("up", "down")],
    )
    logging.info("networked benchmark: %s", result)
    return result


def _device_worker(config, port, shard_index, num_shards, steps, ready, start, results):
    """One device process of `benchmark_devices`: its shard, its head, `steps` timed steps."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.shard_index, config.data.num_shards = shard_index, num_shards
    keras.utils.set_random_seed(config.seed + shard_index)
    train_ds, _, _, info = trainer.build_data(config)
    remote, budget, _ = first_phase_model(config, info, remote=True)
    remote.connect(TrainingClient(f"127.0.0.1:{port}"), device_id=f"device-{shard_index}")
    batch_size = config.data.batch_size  # Full batches, the shard's as often as needed.
    full = train_ds.filter(lambda images, labels: tf.shape(labels)[0] == batch_size)
    dataset = _cached_batches(full.repeat(), steps)
    _timed_fit(remote, dataset.take(2))  # warm-up
    ready.put(shard_index)
    start.wait()
    seconds, _ = _timed_fit(remote, dataset)
    results.put((steps * batch_size, seconds))


def benchmark_devices(config, device_counts=(1, 2, 4, 8), steps=30, modes=("sequential",)):
    """Samples per second of N device processes training one tail over gRPC on loopback.

    For each mode and N, a server process and N device processes (device i reads every N-th
    sample of the training set and trains its own head); they warm up, start together, and the
    figure is all their samples over the time from the start to the last device's end. In
    parallel mode the server trains the devices' concurrent steps as one batch (the heads'
    averaging after each epoch is not part of these steps).

    Returns:
      A list of dicts: mode, devices, samples_per_second, seconds.
    """
    context = multiprocessing.get_context("spawn")
    rows = []
    for mode, count in itertools.product(modes, device_counts):
        ports, ready, results = context.Queue(), context.Queue(), context.Queue()
        start = context.Event()
        server = context.Process(
            target=_serve_config, args=(config, ports, mode == "parallel"), daemon=True
        )
        server.start()
        devices = []
        try:
            port = ports.get(timeout=120)
            for i in range(count):
                args = (config, port, i, count, steps, ready, start, results)
                devices.append(context.Process(target=_device_worker, args=args, daemon=True))
                devices[-1].start()
            for _ in range(count):
                ready.get(timeout=600)
            began = time.perf_counter()
            start.set()
            samples = sum(results.get(timeout=600)[0] for _ in range(count))
            seconds = time.perf_counter() - began
        finally:
            for process in devices + [server]:
                process.kill()
                process.join(30)
        rows.append(
            dict(mode=mode, devices=count, samples_per_second=samples / seconds, seconds=seconds)
        )
        logging.info("devices benchmark: %s", rows[-1])
    return rows
