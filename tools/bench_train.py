"""Benchmarks the split training step against plain `model.fit` of the same network.

  tfsplit-bench-train --config=configs/deprune.py --workdir=/tmp/tfsplit/bench

Prints samples/s of both and the ratio (split step / fit; 1.0 = as fast as fit) and writes
bench_train.json into --workdir.
"""

import json
import os
import platform

from absl import app, flags
from ml_collections import config_flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.train import benchmark

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory.", required=True)
_STEPS = flags.DEFINE_integer("steps", 50, "Batches per timed pass.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per side.", lower_bound=1)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    result = benchmark.benchmark_training(_CONFIG.value, _WORKDIR.value, _STEPS.value,
                                          _REPEATS.value)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    print(f"split step : {result['split_samples_per_second']:9.1f} samples/s "
          f"(budget {result['budget']}, {result['bytes_up_per_step']} B up / "
          f"{result['bytes_down_per_step']} B down per step)")
    print(f"model.fit  : {result['fit_samples_per_second']:9.1f} samples/s")
    print(f"ratio      : {result['ratio']:.3f} (split step / fit)")
    with open(os.path.join(_WORKDIR.value, "bench_train.json"), "w") as f:
        json.dump(result, f, indent=2)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
