"""Where the LiteRT training step spends its time, op by op: a sampled native profile (Linux
`perf`, DWARF call stacks) of `forward` + `train` of a trainable head, each sample charged to the
innermost LiteRT builtin kernel on its stack, or to the XNNPACK delegate with its kind of kernel.

  tfsplit-export --config=configs/deprune.py --trainable --out=/tmp/head
  python -m benchmarks.litert_step_profile --model_dir=/tmp/head \
      --out=results/device_training/step_profile.json

Ops that XNNPACK takes (matmuls, elementwise arithmetic, pads, pools, reductions) lose their
LiteRT name inside the delegate, so they are grouped by the delegate's kernels instead.
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_WORKLOAD = """
import sys
from tfsplit.device.training.bench import bench_trainable
print(bench_trainable(sys.argv[1], batch_sizes=(int(sys.argv[2]),), runs=int(sys.argv[3]),
                      warmup=3, num_threads=int(sys.argv[4])))
"""
_BUILTIN = re.compile(r"tflite::ops::builtin::(\w+)::")
_CONTROL_FLOW = ("call_once_kernel", "while_kernel", "if_kernel", "BuiltinOpResolver")
_KERNEL_OPS = {  # kernel namespaces whose op is named otherwise
    "conv": "CONV_2D",
    "depthwise_conv": "DEPTHWISE_CONV_2D",
    "unsorted_segment": "UNSORTED_SEGMENT_SUM",
    "comparisons": "comparisons (EQUAL, LESS, ...)",
}
_XNNPACK_KERNELS = (  # (kind, pattern of the leaf symbol), first match wins
    ("matmul (gemm)", re.compile(r"gemm|packw")),
    ("transpose", re.compile(r"transpose")),
    ("elementwise", re.compile(r"_v(add|sub|mul|div|max|min|sqr|rsqrt|sqrt)|vmulc|vaddc|vbinary")),
    ("pad", re.compile(r"pad")),
    ("pooling", re.compile(r"pool")),
    ("reduction", re.compile(r"rsum|rdsum|rmax|reduce")),
    ("copies", re.compile(r"memcpy|memset|memmove|clear_page")),
)


def _symbol(frame):
    """The function name of one `perf script` stack line: `address symbol (object)`."""
    parts = frame.split(None, 1)
    return parts[1].rsplit(" (", 1)[0] if len(parts) == 2 else ""


def charge(frames):
    """The op that one sample's stack (leaf first) is charged to, or None outside LiteRT."""
    if not any("tflite" in f or "xnn" in f for f in frames):
        return None
    for frame in frames:
        symbol = _symbol(frame)
        match = _BUILTIN.search(symbol)
        if match and match.group(1) not in _CONTROL_FLOW:
            return _KERNEL_OPS.get(match.group(1), match.group(1).upper())
        if "xnnpack" in symbol.lower() or symbol.startswith("xnn_"):
            leaf = _symbol(frames[0])
            for kind, pattern in _XNNPACK_KERNELS:
                if pattern.search(leaf):
                    return f"XNNPACK {kind}"
            return "XNNPACK other"
    return "LiteRT other (interpreter, allocation)"


def profile(perf_script_text):
    """{op: share of the samples inside LiteRT}, largest first, and that sample count."""
    counts = collections.Counter()
    for block in perf_script_text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        op = charge(lines[1:])
        if op is not None:
            counts[op] += 1
    total = sum(counts.values())
    return {op: n / total for op, n in counts.most_common()}, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="a `tfsplit-export --trainable` dir")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--frequency", type=int, default=1999, help="samples per second")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("This profile needs Linux `perf` (linux-tools) on the PATH; it was not found.")
    with tempfile.TemporaryDirectory() as scratch:
        data = os.path.join(scratch, "perf.data")
        workload = [sys.executable, "-c", _WORKLOAD, args.model_dir, str(args.batch)]
        workload += [str(args.steps), str(args.num_threads)]
        record = ["perf", "record", "-q", "-F", str(args.frequency), "--call-graph"]
        record += ["dwarf,16384", "-o", data, "--", *workload]
        timing = subprocess.run(record, check=True, capture_output=True, text=True).stdout
        script = subprocess.run(
            ["perf", "script", "-i", data, "-F", "comm,ip,sym,dso"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    shares, samples = profile(script)
    report = dict(
        command=" ".join(["python -m benchmarks.litert_step_profile", *sys.argv[1:]]),
        batch=args.batch,
        steps=args.steps,
        num_threads=args.num_threads,
        timing=timing.strip().splitlines()[-1],
        samples_in_litert=samples,
        share_by_op={op: round(share, 4) for op, share in shares.items()},
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(report["timing"])
    for op, share in shares.items():
        print(f"{100 * share:6.1f}%  {op}")


if __name__ == "__main__":
    main()
