"""Benchmarks every data source tfsplit trains from, side by side in one run.

  tfsplit-bench-data --config=configs/deprune.py --workdir=/tmp/tfsplit/bench-data
  tfsplit-bench-data ... --s3_link_mbit=100   # the S3 rows over a link shaped to 100 Mbit/s

Writes the config's training data as an image folder (PNG files), local TFRecord shards and the
same shards in a bucket of a local S3-compatible server (moto, started on 127.0.0.1 and stopped
by this tool), then measures each source and Grain on the local shards: loader samples/s, time to
first batch, CPU use, and `fit` samples/s of the config's split model fed by it. Prints one table
and writes bench_data.json (a list of rows) into --workdir. Runs from a clone of tfsplit: the
benchmark programs (benchmarks/) are not installed.
"""

import contextlib
import json
import os
import platform
import sys

import boto3
from absl import app, flags
from ml_collections import config_flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.data import object_store
from tfsplit_tools import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the sources are written.", required=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Measured epochs per source.", lower_bound=1)
_S3 = flags.DEFINE_bool("s3", True, "Include S3 shards on a local moto server.")
_S3_LINK_MBIT = flags.DEFINE_float(
    "s3_link_mbit",
    0,
    "Shape the S3 server's link to this rate (0 = loopback speed).",
    lower_bound=0,
)
_GRAIN = flags.DEFINE_bool("grain", True, "Include Grain reading the local shards.")
_BUCKET = "tfsplit-bench"
flags.mark_flags_as_required(["config"])


@contextlib.contextmanager
def _local_bucket(local_s3, link_mbit):
    """A moto server on 127.0.0.1 (behind a shaped link when asked), with this process's boto3
    pointed at it; yields the bucket's s3:// URL and the rows' name."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(local_s3.MotoServer())
        endpoint, name = server.endpoint, "S3 shards (loopback)"
        if link_mbit:
            endpoint = stack.enter_context(
                local_s3.FaultProxy(server.port, rate_mbit=link_mbit)
            ).endpoint
            name = f"S3 shards ({link_mbit:g} Mbit/s link)"
        settings, foreign = local_s3.client_environment(endpoint)
        saved = dict(os.environ)
        for variable in foreign:
            os.environ.pop(variable, None)
        os.environ.update(settings)
        object_store.clear_s3_filesystems()
        try:
            boto3.session.Session().client("s3").create_bucket(Bucket=_BUCKET)
            yield f"s3://{_BUCKET}/shards", name
        finally:
            os.environ.clear()
            os.environ.update(saved)
            object_store.clear_s3_filesystems()


def _table(rows):
    lines = [
        f"{'source':<38} {'samples/s':>10} {'first batch':>12} {'CPU %':>6} "
        f"{'train samples/s':>16} {'vs memory':>10}"
    ]
    for row in rows:
        lines.append(
            f"{row['source']:<38} {row['samples_per_second']:>10,.0f} "
            f"{row['time_to_first_batch_s']:>11.2f}s {row['cpu_percent']:>6.0f} "
            f"{row['train_samples_per_second']:>16,.0f} {row['train_ratio_to_memory']:>9.3f}x"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # benchmarks/ is not installed: imported from the clone, once its root is on sys.path.
    data_benchmark = cli.import_benchmark("data_benchmark")
    with contextlib.ExitStack() as stack:
        s3_url, s3_name = None, None
        if _S3.value:
            local_s3 = cli.import_benchmark("local_s3")
            s3_url, s3_name = stack.enter_context(_local_bucket(local_s3, _S3_LINK_MBIT.value))
        rows = data_benchmark.benchmark_data(
            _CONFIG.value,
            _WORKDIR.value,
            repeats=_REPEATS.value,
            s3_url=s3_url,
            s3_name=s3_name,
            grain=_GRAIN.value,
        )
    print(_table(rows))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores")
    with open(os.path.join(_WORKDIR.value, "bench_data.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
