"""What training costs a device: the LiteRT head's training step at several batch sizes, and
what a device must install, measured on the device itself (numpy and LiteRT only)."""

import importlib.metadata
import multiprocessing
import os
import re
import resource
import time

import numpy as np

from tfsplit.device import stats
from tfsplit.device.spec import check_count
from tfsplit.device.training.head import TrainableHead

BATCH_SIZES = (1, 8, 32)
# What each device trainer needs installed (its own package aside): the runtime's dependency
# closure is summed from the installed distributions' file lists.
LITERT_DEVICE = ("numpy", "absl-py", "ai-edge-litert", "grpcio", "protobuf")
KERAS_DEVICE = (
    "tensorflow",
    "tf-keras",
    "tensorflow-model-optimization",
    "ml-collections",
    "grpcio",
    "absl-py",
    "numpy",
)


def bench_trainable(model_dir, batch_sizes=BATCH_SIZES, runs=20, warmup=3, num_threads=None):
    """p50 milliseconds of `forward`, `train` and the two together (one training step) per batch
    size, and the step per sample; random images and gradients at the run's largest budget."""
    check_count("runs", runs)
    check_count("warmup", warmup, minimum=0)
    head = TrainableHead(model_dir, num_threads)
    budget, rng, rows = head.run["channels"], np.random.default_rng(0), []
    for batch in batch_sizes:
        check_count("batch size", batch)
        images = rng.normal(size=(batch, *head.image_shape)).astype(np.float32)
        labels = rng.integers(0, head.run["num_classes"], batch).astype(np.int32)
        times = {"forward": [], "train": []}
        for i in range(warmup + runs):
            start = time.perf_counter()
            values, _, _ = head.forward(images, budget)
            middle = time.perf_counter()
            head.train(images, labels, np.zeros_like(values), budget, (0.0, 0.0), 0.0)
            end = time.perf_counter()
            if i >= warmup:
                times["forward"].append(middle - start)
                times["train"].append(end - middle)
        step = np.add(times["forward"], times["train"])
        rows.append(
            dict(
                batch=batch,
                forward_ms=1e3 * float(np.median(times["forward"])),
                train_ms=1e3 * float(np.median(times["train"])),
                step_ms=1e3 * float(np.median(step)),
                step_ms_per_sample=1e3 * float(np.median(step)) / batch,
            )
        )
    return rows


def peak_memory_mib():
    """This process's peak resident memory: Linux's VmHWM, which (unlike `ru_maxrss`) does not
    carry over the high-water mark of the process it was started from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bench_with_peak(args):
    return bench_trainable(*args), peak_memory_mib()


def bench_trainable_in_fresh_process(*args):
    """`bench_trainable` in a new interpreter (whatever this one has loaded, TensorFlow
    included, stays out): (its rows, that process's peak memory in MiB)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_bench_with_peak, (args,))


def install_size_mib(distributions):
    """MiB of the installed files of `distributions` and everything they require (not extras);
    distributions that are not installed count nothing."""
    seen = {}

    def visit(name):
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            return
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return
        seen[key] = dist
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                visit(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])

    for name in distributions:
        visit(name)
    total = 0
    for dist in seen.values():
        for file in dist.files or []:
            path = dist.locate_file(file)
            if os.path.isfile(path):
                total += os.path.getsize(path)
    return total / 2**20


def format_rows(rows, columns):
    return stats.format_table(rows, [(key, key) for key in columns])
