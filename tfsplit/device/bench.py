"""Latency of the exported heads in the LiteRT interpreter, as the device would run them.

Each head runs on one image per call (a device classifies what its camera gives it), on a fixed
number of interpreter threads (1 by default: a small device core), after a warm-up that lets the
interpreter allocate and the caches fill. Only the model is timed (`set_tensor`, `invoke`,
`get_tensor`); normalizing the image is the same for every dtype. Needs only numpy and LiteRT, so
the same benchmark runs on the device itself.
"""

import os
import time

import numpy as np
from absl import logging

from tfsplit.device import stats
from tfsplit.device.head import HeadRunner
from tfsplit.device.spec import HEAD_DTYPES, DeviceError, check_count, check_head_dtypes

TABLE_COLUMNS = (
    *((key, key) for key in ("dtype", "file", "file_bytes", "threads")),
    *stats.latency_columns(stats=("p50", "p95", "mean")),
)


def find_heads(export_dir, dtypes=HEAD_DTYPES):
    """dtype -> path of `head_<dtype>.tflite` in an export directory.

    Raises:
      DeviceError: an unknown dtype, or a head that is not there.
    """
    dtypes = check_head_dtypes(dtypes)
    paths = {dtype: os.path.join(os.fspath(export_dir), f"head_{dtype}.tflite") for dtype in dtypes}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise DeviceError(f"No head model at {missing}: run tfsplit-export, or pick other dtypes.")
    return paths


def bench_head(model_path, runs=200, warmup=20, num_threads=1, seed=0):
    """Times one head on single images.

    Args:
      model_path: a head .tflite (its JSON beside it).
      runs: timed calls.
      warmup: untimed calls first.
      num_threads: interpreter threads.
      seed: seed of the random test image.

    Returns:
      dict: dtype, file, file_bytes (the .tflite's size), threads, runs, p50_ms, p95_ms, mean_ms.

    Raises:
      DeviceError: bad arguments, a missing model or a bad JSON.
    """
    check_count("runs", runs)
    check_count("warmup", warmup, minimum=0)
    head = HeadRunner(model_path, num_threads=num_threads)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (1, *head.spec.image_shape), dtype=np.uint8)
    model_input = head.model_input(image)
    for _ in range(warmup):
        head.invoke(model_input)
    seconds = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        head.invoke(model_input)
        seconds[i] = time.perf_counter() - start
    row = {
        "dtype": head.spec.dtype,
        "file": os.path.basename(model_path),
        "file_bytes": os.path.getsize(model_path),
        "threads": num_threads,
        "runs": runs,
        **stats.latency_summary(seconds),
    }
    logging.info("Benchmarked %s: %s", model_path, row)
    return row


def bench_heads(export_dir, dtypes=HEAD_DTYPES, runs=200, warmup=20, num_threads=1):
    """`bench_head` for every head_<dtype>.tflite of an export directory; one row per dtype."""
    paths = find_heads(export_dir, dtypes).values()
    return [bench_head(path, runs, warmup, num_threads) for path in paths]


def format_bench_table(rows):
    """The rows of `bench_heads` side by side as a plain-text table."""
    return stats.format_table(rows, TABLE_COLUMNS)
