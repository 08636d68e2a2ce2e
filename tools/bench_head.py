"""Latency of the float32, float16 and int8 heads in LiteRT on one thread, side by side.

  tfsplit-bench-head --export_dir=/tmp/tfsplit/deprune/export
  tfsplit-bench-head --export_dir=... --runs=1000 --num_threads=4

Needs only numpy, absl-py and ai-edge-litert, so it runs on the device too. Each head runs on one
image per call after --warmup untimed calls; prints file_bytes (the .tflite's size) and
p50/p95/mean milliseconds, and writes bench_head.json into --out (default the export directory).
"""

import json
import os
import platform
import sys

from absl import app, flags

from tfsplit import device
from tfsplit_tools import cli

RESULT_FILE = "bench_head.json"

_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Directory with head_<dtype>.tflite + .json.", required=True
)
_OUT = flags.DEFINE_string("out", None, "Where to write bench_head.json; default --export_dir.")
_DTYPES = flags.DEFINE_list("dtypes", list(device.HEAD_DTYPES), "Head dtypes to time.")
_RUNS = flags.DEFINE_integer("runs", 200, "Timed calls per head.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed calls first.", lower_bound=0)
_NUM_THREADS = flags.DEFINE_integer("num_threads", 1, "Interpreter threads.", lower_bound=1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    rows = device.bench_heads(
        _EXPORT_DIR.value, _DTYPES.value, _RUNS.value, _WARMUP.value, _NUM_THREADS.value
    )
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"{_RUNS.value} runs per head after {_WARMUP.value} warm-up, {machine}")
    print(device.format_bench_table(rows))
    out_dir = _OUT.value or _EXPORT_DIR.value
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULT_FILE)
    with open(path, "w") as f:
        json.dump({"machine": machine, "cpu_count": os.cpu_count(), "rows": rows}, f, indent=2)
    print(f"Wrote {path}")


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
