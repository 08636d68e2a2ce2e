"""Split inference end to end over loopback: LiteRT heads -> tail servers, against Keras.

  tfsplit-infer --workdir=/tmp/tfsplit/deprune --protocols=rest,grpc
  tfsplit-infer --export_dir=/tmp/deploy --max_samples=200 --dtypes=int8

Exports the heads and tails first if the export directory (default <workdir>/export) lacks them,
serves each dtype's tail on 127.0.0.1 in this process, sends the run's test images through the
device runner one per request (--batch_size for more), and prints per dtype and protocol: top-1,
the Keras split model's top-1 on the same images, their agreement, request_bytes (what a request
weighs on the wire) and payload_bytes (the codec's encoding of the same selection) per sample, and
p50/p95 latency per stage. Writes infer.json and infer.csv into --out (default the workdir).
"""

import sys

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import device
from tfsplit.eval import deployment
from tfsplit.export import HEAD_DTYPES
from tfsplit_tools import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (default: the export's source).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Export directory; default <workdir>/export.")
_OUT = flags.DEFINE_string("out", None, "Where to write infer.json/csv; default the workdir.")
_DTYPES = flags.DEFINE_list("dtypes", list(HEAD_DTYPES), f"Head dtypes, from {HEAD_DTYPES}.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["rest"], f"From {list(device.PROTOCOLS)}.")
_MAX_SAMPLES = flags.DEFINE_integer(
    "max_samples", None, "First N test images; default all.", lower_bound=1
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Images per request.", lower_bound=1)
_NUM_THREADS = flags.DEFINE_integer("num_threads", 1, "Head interpreter threads.", lower_bound=1)
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds", 300.0, "Time limit of each (dtype, protocol) pass.", lower_bound=0.001
)
_QAT = flags.DEFINE_bool(
    "qat", None, "If heads are exported here: --qat/--noqat force quantization-aware int8."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None and _EXPORT_DIR.value is None:
        raise app.UsageError("Pass --workdir, --export_dir, or both.")
    try:
        result = deployment.run_split_inference(
            _WORKDIR.value,
            _EXPORT_DIR.value,
            dtypes=_DTYPES.value,
            protocols=_PROTOCOLS.value,
            max_samples=_MAX_SAMPLES.value,
            batch_size=_BATCH_SIZE.value,
            num_threads=_NUM_THREADS.value,
            max_seconds=_MAX_SECONDS.value,
            qat="auto" if _QAT.value is None else _QAT.value,
        )
    except device.ServingError as error:  # the ValueErrors reach run_tool as they are.
        raise app.UsageError(str(error)) from None
    settings = result.settings
    print(
        f"Split inference of {result.workdir} ({result.export_dir}), {settings['max_samples']} "
        f"test images, batch {settings['batch_size']}, {settings['num_threads']} head thread(s), "
        f"{settings['machine']} x{settings['cpu_count']}; latencies in ms, bytes per sample"
    )
    print(deployment.format_table(result.rows))
    if not all(row["complete"] for row in result.rows):
        print("Some passes hit --max_seconds; their 'samples' column says how far they got.")
    paths = deployment.write_results(result, _OUT.value or result.workdir)
    print("Wrote " + " and ".join(paths))


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
