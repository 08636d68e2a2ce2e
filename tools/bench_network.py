"""Trains SL, CA-SL, deprune and prune over emulated links and compares their wall-clock times.

  tfsplit-bench-network --workdir=/tmp/tfsplit/bench-network
  tfsplit-bench-network --workdir=... --links=wifi,dsl=16/30 --methods=sl,deprune

Links are wifi (100 Mbit/s, 5 ms RTT), 4g (10 Mbit/s, 40 ms) and poor (2 Mbit/s, 100 ms), or
"name=rate_mbit/rtt_ms"; the default is wifi and 4g. Each run is a tfsplit-train-server and a
tfsplit-train device process on either side of the link: as root, in two network namespaces joined
by a veth pair shaped with tc; elsewhere through a proxy on loopback that shapes the rate and adds
the delay (the table says which). The configs are shrunk (--train_size, --test_size,
--epochs_scale, --variant) so that the default table runs on 2 CPU cores in about an hour, with
every run's last epoch moving validation accuracy by less than a point (docs/results.md); the
expected bytes and link time of each run are printed first (--plan_only prints them alone). Prints
one Markdown table and writes bench_network.json into --workdir (and --results_dir, from which
tfsplit-results-pages draws a section of docs/results.md and its plot of accuracy against time).
Wall time is the device process's, start to exit; time to target is the run's own training time
(metrics.jsonl) until its first epoch at the target accuracy (default: 0.9 x SL's final validation
accuracy on the fastest link). Prune fine-tunes over the link from a start model trained in this
process first, not over the link; its rows time the fine-tuning.
Runs from a clone of tfsplit: the benchmark programs (benchmarks/) are not installed.
"""

import json
import os
import platform
import shlex
import signal
import sys

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.eval import link_report, reproduce
from tfsplit_tools import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and results go.", required=True)
_LINKS = flags.DEFINE_list("links", ["wifi", "4g"], "Links: names or name=Mbit/RTT_ms.")
_METHODS = flags.DEFINE_list("methods", list(reproduce.METHODS), "Methods to train.")
_CONFIG_DIR = flags.DEFINE_string(
    "config_dir",
    cli.clone_path("configs"),
    "Directory of sl.py, casl.py, deprune.py and prune.py.",
)
_VARIANT = flags.DEFINE_string("variant", "", "Config variant for every method (e.g. hard).")
_TRAIN_SIZE = flags.DEFINE_integer("train_size", 4000, "Training samples (0: the config's).", 0)
_TEST_SIZE = flags.DEFINE_integer("test_size", 400, "Test samples (0: the config's).", 0)
_EPOCHS_SCALE = flags.DEFINE_float("epochs_scale", 1.0, "Every phase's epochs times this.", 0.01)
_TARGET = flags.DEFINE_float("target_accuracy", None, "Accuracy that time to target counts to.")
_TARGET_FRACTION = flags.DEFINE_float(
    "target_fraction",
    0.9,
    "Without --target_accuracy: this x SL's final accuracy on the fastest link.",
)
_TIMEOUT = flags.DEFINE_integer("timeout_s", 1800, "Kill a device that trains longer.", 1)
_NAMESPACES = flags.DEFINE_bool("namespaces", True, "Try network namespaces and tc first.")
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir",
    None,
    f"Also write {link_report.RESULTS_FILE} here (e.g. results/links/<name>), which "
    "tfsplit-results-pages draws a section of docs/results.md from.",
)
_PLAN_ONLY = flags.DEFINE_bool("plan_only", False, "Print the sizes and estimates; train nothing.")


def _print_plan(sizes, estimates, links):
    print(
        f"sizes: variant {sizes.variant or '(default)'}, {sizes.train_size or 'config'} training "
        f"and {sizes.test_size or 'config'} test samples, epochs x {sizes.epochs_scale:g}"
    )
    for method, estimate in estimates.items():
        seconds = ", ".join(f"{name} {s:,.0f} s" for name, s in estimate["link_seconds"].items())
        print(
            f"  {method:8s} wire {'x'.join(map(str, estimate['wire_shape']))}: "
            f"~{estimate['bytes_up'] / 1e6:,.1f} MB up, {estimate['bytes_down'] / 1e6:,.1f} MB "
            f"down, {estimate['calls']:,} calls; on the link alone: {seconds}"
        )
    total = sum(sum(e["link_seconds"].values()) for e in estimates.values())
    print(f"  link time of all {len(estimates) * len(links)} runs: ~{total / 60:.1f} min + compute")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # benchmarks/ is not installed: imported from the clone, once its root is on sys.path.
    links_lib = cli.import_benchmark("links")
    network_benchmark = cli.import_benchmark("network_benchmark")
    # A plain `kill` unwinds like Ctrl-C: child processes stopped, namespaces deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    links = [links_lib.parse_link(spec) for spec in _LINKS.value]
    sizes = network_benchmark.Sizes(
        _VARIANT.value, _TRAIN_SIZE.value, _TEST_SIZE.value, _EPOCHS_SCALE.value
    )
    estimates = network_benchmark.estimate_runs(
        links, _CONFIG_DIR.value, sizes, methods=_METHODS.value
    )
    _print_plan(sizes, estimates, links)
    if _PLAN_ONLY.value:
        return
    os.makedirs(_WORKDIR.value, exist_ok=True)
    result = network_benchmark.benchmark_network(
        links,
        _CONFIG_DIR.value,
        _WORKDIR.value,
        sizes,
        methods=_METHODS.value,
        target_accuracy=_TARGET.value,
        target_fraction=_TARGET_FRACTION.value,
        timeout_s=_TIMEOUT.value,
        namespaces=_NAMESPACES.value,
    )
    result["estimates"] = estimates
    print(link_report.markdown_table(result))
    print()
    for entry in result["links"]:
        note = f" ({entry['note']})" if entry["note"] else ""
        print(f"{entry['name']}: shaped by {entry['shaping']}{note}")
    target = result["target_accuracy"]
    target = "none" if target is None else f"{100 * target:.2f}%"
    print(f"target accuracy: {target} ({result['target_source']})")
    if result["prune_start"]:
        start = result["prune_start"]
        print(
            f"* prune: {network_benchmark.PRUNE_NOTE} ({start['seconds']:.1f} s, "
            f"{100 * start['final_val_accuracy']:.2f}% validation accuracy)"
        )
    for line in link_report.speedups(result):
        print(line)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    result["command"] = shlex.join(["tfsplit-bench-network", *sys.argv[1:]])
    for directory in filter(None, (_WORKDIR.value, _RESULTS_DIR.value)):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, link_report.RESULTS_FILE), "w") as f:
            json.dump(result, f, indent=2)
    failed = [f"{row['method']} on {row['link']}" for row in result["rows"] if "error" in row]
    if failed:
        raise SystemExit(f"{len(failed)} runs failed ({', '.join(failed)}); see their logs.")


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
