"""Benchmarks `fit` of a SplitModel against `fit` of the same network unsplit.

  tfsplit-bench-train --config=configs/deprune.py --workdir=/tmp/tfsplit/bench

Prints samples/s of both and the ratio (split / unsplit; 1.0 = split learning costs nothing in
process, the target is >= 0.95) and writes bench_train.json into --workdir. With --networked it
also times the same step over gRPC on loopback (a training server in this process) against the
in-process step (the target is >= 0.7) and adds those figures under "networked"; --devices=1,2,4
times that many device processes (each its own data shard and head) training one tail, with
the server in each of --modes (sequential: each step in turn; parallel: concurrent steps as one
batch). Runs from a clone of tfsplit: the benchmark programs (benchmarks/) are not installed.
"""

import json
import os
import platform
import sys

from absl import app, flags
from ml_collections import config_flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit_tools import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory.", required=True)
_STEPS = flags.DEFINE_integer("steps", 50, "Batches per timed pass.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per side.", lower_bound=1)
_NETWORKED = flags.DEFINE_bool("networked", False, "Also time the step over gRPC on loopback.")
_DEVICES = flags.DEFINE_list(
    "devices", [], "Also time N device processes sharing one server, for each N listed."
)
_MODES = flags.DEFINE_multi_enum(
    "modes",
    ["sequential", "parallel"],
    ["sequential", "parallel"],
    "--devices: the server's modes to time (steps in turn, or concurrent steps as one batch).",
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # benchmarks/ is not installed: imported from the clone, once its root is on sys.path.
    benchmark = cli.import_benchmark("train_benchmark")
    result = benchmark.benchmark_training(_CONFIG.value, _STEPS.value, _REPEATS.value)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    print(
        f"split fit   : {result['split_samples_per_second']:9.1f} samples/s "
        f"(budget {result['budget']}, {result['payload_bytes_up_per_step']:,.0f} payload bytes "
        f"up / {result['payload_bytes_down_per_step']:,.0f} down per step)"
    )
    print(f"unsplit fit : {result['unsplit_samples_per_second']:9.1f} samples/s")
    print(f"ratio       : {result['ratio']:.3f} (split / unsplit)")
    if _NETWORKED.value:
        networked = benchmark.benchmark_networked(_CONFIG.value, _STEPS.value, _REPEATS.value)
        result["networked"] = networked
        up, down = networked["wire_bytes_per_step"]
        print(
            f"in process  : {networked['in_process_samples_per_second']:9.1f} samples/s\n"
            f"over gRPC   : {networked['networked_samples_per_second']:9.1f} samples/s "
            f"({up:,.0f} bytes up / {down:,.0f} down per step in gRPC messages)\n"
            f"ratio       : {networked['ratio']:.3f} (networked / in process, loopback)"
        )
    if _DEVICES.value:
        try:
            counts = [int(n) for n in _DEVICES.value]
        except ValueError:
            raise app.UsageError(
                f"--devices must list integers. Received: {_DEVICES.value}"
            ) from None
        if not all(1 <= n <= 64 for n in counts):
            raise app.UsageError(f"--devices must be in 1..64. Received: {counts}")
        result["devices"] = benchmark.benchmark_devices(
            _CONFIG.value, counts, _STEPS.value, modes=_MODES.value
        )
        print("mode        devices  samples/s (all devices, one server, loopback)")
        for row in result["devices"]:
            print(f"{row['mode']:10s}  {row['devices']:7d}  {row['samples_per_second']:9.1f}")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "bench_train.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
