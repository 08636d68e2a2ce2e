"""The loader benchmark: every source tfsplit trains from, measured side by side in one process.

Sources (each holds the config's training set): the in-memory arrays, an image folder of PNG
files decoded while training, local TFRecord shards, the same shards in an S3 bucket served by a
local S3-compatible server on loopback (optionally behind a rate-limited link), and Grain, a
loader library of its own, reading the local shards.

For each source it measures the loader alone (samples/s over one epoch after its first batch,
time from building the pipeline to its first batch, and the process's CPU use meanwhile) and
`fit` of the config's split model fed by it. The training passes of all sources are interleaved
after a warm-up, so every source sees the same background load; the fastest pass counts.
"""

import dataclasses
import os
import shutil
import statistics
import time

import numpy as np
import tensorflow as tf
from absl import logging

from benchmarks.train_benchmark import first_phase_model
from tfsplit.data import shards
from tfsplit.training import trainer

ROW_KEYS = (
    "source",
    "samples_per_second",
    "time_to_first_batch_s",
    "cpu_percent",
    "train_samples_per_second",
)
_NUM_SHARDS = 8
# Grain's per-record work holds Python's lock: on 2 cores 2 threads beat 8 (measured).
GRAIN_THREADS = 2


@dataclasses.dataclass
class Source:
    """A named source: `epoch()` builds a fresh pipeline and returns one epoch of batches."""

    name: str
    epoch: object
    tf_dataset: bool = True  # False: a Python iterable, fed to `fit` through from_generator.


def _with_data(config, **data):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.update(data)
    return config


def _tf_source(name, config):
    return Source(name, lambda: trainer.build_data(config).train)


def write_image_folder(images, labels, out_dir, split):
    """Writes `images` as PNG files `out_dir/split/class_XXX/NNNNNN.png` (once; reused)."""
    done = os.path.join(out_dir, f".{split}-{len(labels)}-complete")
    if os.path.exists(done):
        return
    for label in np.unique(labels):
        os.makedirs(os.path.join(out_dir, split, f"class_{label:03d}"), exist_ok=True)
    encoded = tf.data.Dataset.from_tensor_slices(images).map(
        tf.io.encode_png, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    for i, (png, label) in enumerate(zip(encoded.as_numpy_iterator(), labels)):
        with open(os.path.join(out_dir, split, f"class_{label:03d}", f"{i:06d}.png"), "wb") as f:
            f.write(png)
    open(done, "w").close()


def _write_shards_once(arrays, info, out_dir):
    try:
        index = shards.load_index(out_dir)
        if index.info == info and len(index.train) == _NUM_SHARDS:
            return
    except ValueError:
        pass
    shards.write_array_shards(*arrays, info, out_dir, num_shards=_NUM_SHARDS, overwrite=True)


def prepare_sources(config, workdir, s3_url=None, s3_name="S3 shards", grain=True):
    """Writes the config's data as each source needs it under `workdir`; returns the sources.

    Args:
      config: a training config whose data is an in-memory dataset (the embedded sets, CIFAR...).
      workdir: where the image folder and the shards are written (kept and reused), and the S3
        sources' local cache.
      s3_url: `s3://bucket/prefix` to write the shards to as well (where the AWS settings
        point); None leaves S3 out. Read streamed, and through a local cache.
      s3_name: the S3 rows' name (what the link is).
      grain: add Grain reading the local shards.
    """
    train, test, info = trainer.load_run_arrays(config)
    folder = os.path.join(workdir, "image_folder")
    for split, (images, labels) in (("train", train), ("val", test)):
        write_image_folder(images, labels, folder, split)
    local = os.path.join(workdir, "shards")
    _write_shards_once((train, test), info, local)
    whole = dict(train_size=0, test_size=0)  # The written files fix the sizes.
    sources = [
        _tf_source("in-memory", config),
        _tf_source(
            "image folder (PNG files)",
            _with_data(
                config, name="image_folder", path=folder, image_size=info.image_shape[0], **whole
            ),
        ),
        _tf_source("local shards", _with_data(config, name="shards", path=local, **whole)),
    ]
    if s3_url:
        shards.write_array_shards(train, test, info, s3_url, num_shards=_NUM_SHARDS, overwrite=True)
        cache = os.path.join(workdir, "s3_cache")
        shutil.rmtree(cache, ignore_errors=True)  # The first epoch reads the bucket.
        s3 = _with_data(config, name="shards", path=s3_url, **whole)
        sources += [
            _tf_source(s3_name, s3),
            _tf_source(f"{s3_name}, local cache", _with_data(s3, local_cache_dir=cache)),
        ]
    if grain:
        from benchmarks.grain_loader import GrainShardLoader  # optional: grain (the test extra)

        data = config.data
        sources.append(
            Source(
                f"Grain (local shards, {GRAIN_THREADS} threads)",
                lambda: GrainShardLoader(
                    local, data.batch_size, config.seed, data.augment, num_threads=GRAIN_THREADS
                ),
                tf_dataset=False,
            )
        )
    return sources


def measure_loader(source):
    """Loader-only figures of one epoch of `source`: samples/s after the first batch, time to
    the first batch (building the pipeline included) and CPU use (100 = one core busy)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = iter(source.epoch())
    _, labels = next(batches)
    first = time.perf_counter()
    samples = 0
    for _, labels in batches:
        samples += len(labels)
    seconds = time.perf_counter() - first
    return dict(
        samples_per_second=samples / seconds,
        time_to_first_batch_s=first - start,
        cpu_percent=100 * (time.process_time() - cpu_start) / (time.perf_counter() - start),
    )


def _fit_input(source, info):
    if source.tf_dataset:
        return source.epoch()
    spec = (
        tf.TensorSpec((None, *info.image_shape), tf.float32),
        tf.TensorSpec((None,), tf.int32),
    )
    return tf.data.Dataset.from_generator(source.epoch, output_signature=spec)


def measure_training(config, sources, repeats):
    """samples/s of `fit` of the config's split model over one whole epoch fed by each source
    (the fastest of `repeats` passes), as training runs it: a new pipeline every epoch."""
    info = trainer.build_data(config).info
    model, _, _ = first_phase_model(config, info)
    seconds = {source.name: [] for source in sources}
    for round_ in range(repeats + 1):  # Round 0 warms up: traces the step, fills caches.
        for source in sources:
            data = _fit_input(source, info)
            start = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=2 if round_ == 0 else None, verbose=0)
            if round_:
                seconds[source.name].append(time.perf_counter() - start)
    return {name: info.train_size / min(times) for name, times in seconds.items()}


def benchmark_data(config, workdir, repeats=3, s3_url=None, s3_name="S3 shards", grain=True):
    """Rows of `ROW_KEYS` plus train_ratio_to_memory, one per source (see module doc and
    `prepare_sources` for the arguments)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive integer. Received: repeats={repeats!r}")
    os.makedirs(workdir, exist_ok=True)
    # Every source reads the whole training set, as the shards written here hold it (no
    # validation split: this measures reading, not a model).
    config = _with_data(config, validation_fraction=0.0)
    sources = prepare_sources(config, workdir, s3_url, s3_name, grain)
    loader = {source.name: [] for source in sources}
    for _ in range(repeats):
        for source in sources:
            loader[source.name].append(measure_loader(source))
            logging.info("%s: %s", source.name, loader[source.name][-1])
    train = measure_training(config, sources, repeats)
    rows = []
    for source in sources:
        runs = loader[source.name]
        rows.append(
            dict(
                source=source.name,
                samples_per_second=max(r["samples_per_second"] for r in runs),
                time_to_first_batch_s=statistics.median(r["time_to_first_batch_s"] for r in runs),
                cpu_percent=statistics.median(r["cpu_percent"] for r in runs),
                train_samples_per_second=train[source.name],
                train_ratio_to_memory=train[source.name] / train["in-memory"],
            )
        )
    return rows
