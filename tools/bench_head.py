"""Latency of the float32, float16 and int8 heads in LiteRT on one thread, side by side.

  tfsplit-bench-head --export_dir=/tmp/tfsplit/deprune/export
  tfsplit-bench-head --export_dir=... --runs=1000 --num_threads=4
  tfsplit-bench-head --trainable --export_dir=/tmp/head [--config=configs/deprune.py]

Needs only numpy, absl-py and ai-edge-litert, so it runs on the device too. Each head runs on one
image per call after --warmup untimed calls; prints file_bytes (the .tflite's size) and
p50/p95/mean milliseconds, and writes bench_head.json into --out (default the export directory).

--trainable times the trainable head (head_train.tflite) instead: one training step (`forward`
then `train`) at batch 1, 8 and 32, per sample; with --config (a development machine with
TensorFlow) beside the Keras device's compiled step for the same model; then the size of what
each device must install, and the peak memory of a process that runs each step (the LiteRT steps
run in a fresh interpreter).
"""

import json
import os
import platform
import sys

from absl import app, flags
from ml_collections import config_flags

from tfsplit import device
from tfsplit.device.training import bench as train_bench
from tfsplit_tools import cli

RESULT_FILE = "bench_head.json"
TRAINABLE_RESULT_FILE = "bench_head_trainable.json"

_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Directory with head_<dtype>.tflite + .json.", required=True
)
_OUT = flags.DEFINE_string(
    "out",
    None,
    f"Where to write {RESULT_FILE} ({TRAINABLE_RESULT_FILE} with --trainable); default "
    "--export_dir.",
)
_DTYPES = flags.DEFINE_list("dtypes", list(device.HEAD_DTYPES), "Head dtypes to time.")
_RUNS = flags.DEFINE_integer("runs", 200, "Timed calls per head.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed calls first.", lower_bound=0)
_NUM_THREADS = flags.DEFINE_integer("num_threads", 1, "Interpreter threads.", lower_bound=1)
_TRAINABLE = flags.DEFINE_bool(
    "trainable", False, "Time the trainable head's training step (head_train.tflite)."
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "--trainable: the run's config, to time the Keras device's step beside it."
)


def _bench_trainable():
    batches = train_bench.BATCH_SIZES
    rows, litert_peak = train_bench.bench_trainable_in_fresh_process(
        _EXPORT_DIR.value, batches, _RUNS.value, _WARMUP.value, _NUM_THREADS.value
    )
    memory = {"litert_process_peak_mib": litert_peak}
    columns = ["batch", "forward_ms", "train_ms", "step_ms", "step_ms_per_sample"]
    if _CONFIG.value is not None:
        try:  # optional: TensorFlow, for the Keras device's step (a development machine)
            from tfsplit.eval.device_step import keras_device_step_ms
            from tfsplit.training import trainer  # optional: TensorFlow, as the line above
        except ImportError as error:
            raise app.UsageError(f"--config needs TensorFlow ({error}).") from None
        config = _CONFIG.value
        info = trainer.build_data(config).info
        split = trainer.build_split_model(config, info)
        keras_rows = keras_device_step_ms(split, batches, _RUNS.value, _WARMUP.value)
        for row, keras in zip(rows, keras_rows):
            row["keras_step_ms"] = keras["keras_step_ms"]
            row["keras_step_ms_per_sample"] = keras["keras_step_ms"] / row["batch"]
            row["litert_over_keras"] = row["step_ms"] / keras["keras_step_ms"]
        columns += ["keras_step_ms", "keras_step_ms_per_sample", "litert_over_keras"]
        memory["keras_process_peak_mib"] = train_bench.peak_memory_mib()
    install = {
        "litert_device_mib": train_bench.install_size_mib(train_bench.LITERT_DEVICE),
        "keras_device_mib": train_bench.install_size_mib(train_bench.KERAS_DEVICE),
    }
    print(f"trainable head {_EXPORT_DIR.value}, {_RUNS.value} steps per batch size (p50)")
    print(
        train_bench.format_rows(
            [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
            columns,
        )
    )
    print(
        f"install: LiteRT device {install['litert_device_mib']:.0f} MiB, Keras device "
        f"{install['keras_device_mib']:.0f} MiB (the dependencies each needs, installed here)"
    )
    print("peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    return dict(trainable=True, rows=rows, install=install, memory=memory)


def _write(name, result):
    """`result` as JSON in --out (default --export_dir), made if missing."""
    out_dir = _OUT.value or _EXPORT_DIR.value
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"Wrote {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _TRAINABLE.value:
        _write(TRAINABLE_RESULT_FILE, dict(_bench_trainable(), cpu_count=os.cpu_count()))
        return
    rows = device.bench_heads(
        _EXPORT_DIR.value, _DTYPES.value, _RUNS.value, _WARMUP.value, _NUM_THREADS.value
    )
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"{_RUNS.value} runs per head after {_WARMUP.value} warm-up, {machine}")
    print(device.format_bench_table(rows))
    _write(RESULT_FILE, {"machine": machine, "cpu_count": os.cpu_count(), "rows": rows})


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
