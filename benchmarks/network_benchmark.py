"""Networked split training over emulated links: how long each method takes, and to what accuracy.

For each link and method a `tfsplit-train-server` and a `tfsplit-train --server` device run as
separate processes on either side of the link (`benchmarks.links`); the device's process time
(start to exit), its run's own training time (`summary.json`), the time to a target accuracy (its
`metrics.jsonl`) and the payload bytes are collected into one row. Prune fine-tunes over the link
from a start model trained once in this process beforehand: its rows time the fine-tuning only.

The runs are the method configs shrunk by `Sizes` (passed as `--config.` overrides, so each run's
config.json says what ran); `estimate_traffic` says from the codec's byte counts what each run will
send, so sizes can be chosen to fit a time budget before anything is trained.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

from absl import logging

import tfsplit
from benchmarks import links as links_lib
from tfsplit import callbacks, codec
from tfsplit.eval import reproduce
from tfsplit.training import trainer
from tfsplit.training.config import load_config_file

METHODS = ("sl", "casl", "deprune", "prune")
PRUNE_NOTE = "fine-tuning only; its start model trained in process, not over the link"
_SERVER_START_TIMEOUT_S = 180
_STOP_TIMEOUT_S = 15
_LOG_TAIL_BYTES = 3000
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tfsplit.__file__)))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How every method's config is shrunk for the benchmark.

    Args:
      variant: config variant given to every method file (e.g. "hard", "smoke"; "" = default).
      train_size: training samples (0 keeps the config's).
      test_size: test samples, evaluated over the link each epoch (0 keeps the config's).
      epochs_scale: each phase's epochs times this, rounded, at least 1 (1.0 keeps them).
    """

    variant: str = ""
    train_size: int = 0
    test_size: int = 0
    epochs_scale: float = 1.0

    def __post_init__(self):
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0. Received: {name}={value!r}")
        if not isinstance(self.epochs_scale, (int, float)) or not self.epochs_scale > 0:
            raise ValueError(f"`epochs_scale` must be > 0. Received: {self.epochs_scale!r}")
        if not isinstance(self.variant, str):
            raise ValueError(f"`variant` must be a string. Received: {self.variant!r}")


@dataclasses.dataclass
class MethodRun:
    """One method's config as loaded here, and the same as flags for the tools."""

    method: str
    config: object
    flags: list


def _variant(*names):
    return ",".join(name for name in names if name)


def shrink(config, sizes):
    """Applies `sizes` to `config` in place; returns the `--config.` overrides that do the same."""
    changes = []  # (the ConfigDict changed, its field, the override's key, the new value)
    for key in ("train_size", "test_size"):
        if getattr(sizes, key):
            changes.append((config.data, key, f"data.{key}", getattr(sizes, key)))
    for i, entry in enumerate(config.phases):
        epochs = max(1, round(entry.epochs * sizes.epochs_scale))
        scaled = dict(
            epochs=epochs,
            boost_epochs=min(entry.boost_epochs, epochs),
            anneal_epochs=min(round(entry.anneal_epochs * sizes.epochs_scale), epochs),
        )
        changes += [(entry, k, f"phases[{i}].{k}", v) for k, v in scaled.items() if entry[k] != v]
    for section, field, _, value in changes:
        section[field] = value
    return [f"--config.{key}={value}" for _, _, key, value in changes]


def method_runs(config_dir, methods, sizes, prune_start_dir):
    """The `MethodRun` of each method; prune starts from `prune_start_dir` (its `:finetune`)."""
    runs = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; expected some of {METHODS}.")
        path = os.path.join(config_dir, f"{method}.py")
        variant = _variant("finetune" if method == "prune" else "", sizes.variant)
        config = load_config_file(path, variant)
        flags = [f"--config={path}" + (f":{variant}" if variant else ""), *shrink(config, sizes)]
        if method == "prune":
            config.init_from = prune_start_dir
            flags.append(f"--config.init_from={prune_start_dir}")
        runs[method] = MethodRun(method, config, flags)
    return runs


def prune_start_config(config_dir, sizes):
    """Prune's unmasked first phase as a run of its own, shrunk like the others."""
    config = load_config_file(os.path.join(config_dir, "prune.py"), sizes.variant)
    shrink(config, sizes)
    return reproduce.split_prune_config(config)[0]


def estimate_traffic(config):
    """Bytes up and down and calls a networked run of `config` makes, from the codec's sizes.

    Counts training steps (activations and labels up; gradients and logits down), each epoch's
    evaluation of the test set and, with a bottleneck, each epoch's batch norm calibration (up to
    `calibration_batches` training batches). A U-shaped run sends no labels and makes two calls a
    training step: the middle's output comes down instead of logits, and the top's gradient goes
    up. gRPC framing (a few dozen bytes a call) is left out.

    Returns:
      dict with bytes_up, bytes_down, calls and wire_shape.
    """
    _, _, info = trainer.load_run_arrays(config)
    split = trainer.build_split_model(config, info)
    height, width, channels = split.wire_shape
    ushaped, data = hasattr(split, "top"), config.data
    train, test = info.train_size, info.test_size

    def nbytes(samples, k, dtype, labels=False):
        return codec.payload_nbytes(samples, height, width, k, dtype, labels, channels)

    def answer(samples, dtype):
        """What a forward pass sends back: the logits, or the middle's output."""
        if not ushaped:
            return 4 * info.num_classes * samples
        top = (split.top_height, split.top_width, split.top_channels)
        return codec.payload_nbytes(samples, *top, dtype, False, split.top_channels)

    top_down, top_up = (
        (config.wire.top_activation_dtype, config.wire.top_gradient_dtype)
        if ushaped
        else ("float32", "float32")
    )
    up = down = calls = 0
    steps = math.ceil(train / data.batch_size)
    for entry in config.phases:
        k = entry.budget or channels
        epoch_up = nbytes(train, k, config.wire.activation_dtype, labels=not ushaped)
        epoch_down = nbytes(train, k, config.wire.gradient_dtype) + answer(train, top_down)
        if ushaped:
            epoch_up += answer(train, top_up)  # the top's gradient, the same shape
        epoch_up += nbytes(test, k, config.wire.activation_dtype)  # evaluation
        epoch_down += answer(test, top_down)
        epoch_calls = steps * (2 if ushaped else 1) + math.ceil(test / data.eval_batch_size)
        if split.encoder is not None and config.calibration_batches:
            batches = min(config.calibration_batches, steps)
            samples = min(train, batches * data.batch_size)
            epoch_up += nbytes(samples, k, config.wire.activation_dtype)
            epoch_down += answer(samples, top_down)
            epoch_calls += batches
        up, down, calls = (
            up + entry.epochs * epoch_up,
            down + entry.epochs * epoch_down,
            calls + entry.epochs * epoch_calls,
        )
    return dict(bytes_up=up, bytes_down=down, calls=calls, wire_shape=[height, width, channels])


def link_seconds(traffic, link):
    """Seconds `traffic` spends on `link`: each call's bytes go up, then come down, one RTT."""
    bytes_total = traffic["bytes_up"] + traffic["bytes_down"]
    return bytes_total * 8 / (link.rate_mbit * 1e6) + traffic["calls"] * link.rtt_ms / 1000


def estimate_runs(links, config_dir, sizes, methods=METHODS):
    """`estimate_traffic` of each method's run, with its seconds on each link (`link_seconds`)."""
    estimates = {}
    for method, run in method_runs(config_dir, methods, sizes, "").items():
        estimate = estimate_traffic(run.config)
        estimate["link_seconds"] = {link.name: link_seconds(estimate, link) for link in links}
        estimates[method] = estimate
    return estimates


@contextlib.contextmanager
def _process(argv, log_path, env):
    """A child process writing to `log_path`; terminated (then killed) when the block ends."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, cwd=_REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _log_tail(path):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _LOG_TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _wait_for_port(process, log_path, timeout_s):
    """The port from the server's "listening on HOST:PORT" line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            for line in f.read().decode("utf-8", "replace").splitlines():
                if line.startswith("listening on "):
                    return int(line.rpartition(":")[2])
        if process.poll() is not None:
            raise RuntimeError(
                f"The training server exited with {process.returncode}:\n{_log_tail(log_path)}"
            )
        time.sleep(0.2)
    raise RuntimeError(f"The training server did not listen within {timeout_s} s.")


def _child_environment(emulated):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    no_proxy = f"127.0.0.1,localhost,{emulated.server_host}"  # gRPC honours http_proxy.
    env["no_proxy"] = env["NO_PROXY"] = no_proxy
    return env


def run_method(emulated, run, run_dir, timeout_s):
    """Trains `run` with its server and device on either side of `emulated`; returns its row."""
    shutil.rmtree(run_dir, ignore_errors=True)  # A finished run would not train again.
    os.makedirs(run_dir)
    env = _child_environment(emulated)
    server_argv = [sys.executable, "-m", "tfsplit_tools.train_server", *run.flags, "--port=0"]
    server_argv += [f"--workdir={run_dir}/server", f"--host={emulated.server_host}"]
    if not emulated.server_host.startswith("127."):
        # The veth pair joins two namespaces the benchmark made: no one else is on that network,
        # and no token crosses it.
        server_argv.append("--insecure")
    server_log, device_log = (os.path.join(run_dir, f"{side}.log") for side in ("server", "device"))
    device_dir = os.path.join(run_dir, "device")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            _process(emulated.server_command(server_argv), server_log, env)
        )
        port = _wait_for_port(server, server_log, _SERVER_START_TIMEOUT_S)
        address = stack.enter_context(emulated.reach(port))
        device_argv = [
            sys.executable,
            "-m",
            "tfsplit_tools.train",
            *run.flags,
            f"--server={address}",
        ]
        device_argv.append(f"--workdir={device_dir}")
        start = time.monotonic()
        device = stack.enter_context(
            _process(emulated.device_command(device_argv), device_log, env)
        )
        try:
            returncode = device.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"{run.method} on {emulated.link.name} did not finish within {timeout_s} s "
                f"(log: {device_log})."
            ) from None
        process_seconds = time.monotonic() - start
    if returncode != 0:
        raise RuntimeError(
            f"{run.method} on {emulated.link.name}: the device exited with {returncode} "
            f"(log: {device_log}):\n"
            f"{_log_tail(device_log)}"
        )
    with open(os.path.join(device_dir, callbacks.SUMMARY_FILE)) as f:
        summary = json.load(f)
    records = callbacks.read_records(device_dir)
    return dict(
        method=run.method,
        process_seconds=process_seconds,
        fit_seconds=summary["wall_seconds"],
        final_val_accuracy=summary["final_val_accuracy"],
        final_test_accuracy=summary["final_test_accuracy"],
        **payload_megabytes(summary),
        epochs=summary["epochs"],
        records=[{k: r[k] for k in ("epoch", "elapsed_seconds", "val_accuracy")} for r in records],
        note=PRUNE_NOTE if run.method == "prune" else "",
    )


def payload_megabytes(summary):
    """A run's training payload each way in MB: both cuts' of a U-shaped run."""
    return {
        f"payload_mb_{way}": (
            summary[f"train_payload_bytes_{way}"] + summary.get(f"train_top_payload_bytes_{way}", 0)
        )
        / 1e6
        for way in ("up", "down")
    }


def choose_target(rows, links, target_accuracy, target_fraction):
    """The validation accuracy that times to target count to, and how it was chosen.

    Default: `target_fraction` of SL's final validation accuracy on the fastest link (or of the
    best there, without SL).
    """
    if target_accuracy is not None:
        return target_accuracy, "given"
    fastest = max(links, key=lambda link: link.rate_mbit).name
    finished = [r for r in rows if r["link"] == fastest and "error" not in r]
    sl = [r for r in finished if r["method"] == "sl"]
    reference = sl or finished
    if not reference:
        return None, f"no finished run on {fastest} to take it from"
    accuracy = max(r["final_val_accuracy"] for r in reference)
    who = "SL" if sl else "the best method"
    return (
        target_fraction * accuracy,
        f"{target_fraction:g} x {who}'s final validation accuracy on {fastest}",
    )


def benchmark_network(
    links,
    config_dir,
    workdir,
    sizes,
    methods=METHODS,
    target_accuracy=None,
    target_fraction=0.9,
    timeout_s=1800,
    namespaces=True,
):
    """Trains every method over every link; returns the rows and how they were measured.

    Args:
      links: `links.Link`s.
      config_dir: the directory holding sl.py, casl.py, deprune.py and prune.py.
      workdir: runs go to workdir/runs/<link>/<method> (replaced), prune's start model to
        workdir/prune_start.
      sizes: `Sizes` applied to every method.
      methods: some of METHODS.
      target_accuracy: validation accuracy for "time to target"; None: `target_fraction` of
        SL's final validation accuracy on the fastest link.
      timeout_s: a device that trains longer is killed and its row records the error.
      namespaces: try network namespaces and tc (else the proxy emulates each link).

    Returns:
      dict with rows (one per link and method; a failed run has "error"), links (with their
      shaping), target_accuracy, target_source, prune_start and sizes.
    """
    links, methods = list(links), list(methods)
    if not links or not all(isinstance(link, links_lib.Link) for link in links):
        raise ValueError(f"`links` must be a non-empty list of Links. Received: {links!r}")
    if len({link.name for link in links}) != len(links):
        raise ValueError(f"Link names must be unique. Received: {[link.name for link in links]}")
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"`methods` must be distinct names from {METHODS}. Received: {methods}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"`target_fraction` must be in (0, 1]. Received: {target_fraction!r}")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"`timeout_s` must be > 0. Received: {timeout_s!r}")
    start_dir = os.path.join(workdir, "prune_start")
    runs = method_runs(config_dir, methods, sizes, start_dir)
    prune_start = None
    if "prune" in runs:
        prune_start = _train_prune_start(prune_start_config(config_dir, sizes), start_dir)
    rows, shaping = [], {}
    for link in links:
        with links_lib.emulate(link, namespaces=namespaces) as emulated:
            shaping[link.name] = dict(
                dataclasses.asdict(link), shaping=emulated.shaping, note=emulated.note
            )
            for method in methods:
                logging.info(
                    "network benchmark: %s on %s (%s)", method, link.name, emulated.shaping
                )
                row = dict(link=link.name, shaping=emulated.shaping)
                try:
                    run_dir = os.path.join(workdir, "runs", link.name, method)
                    row.update(run_method(emulated, runs[method], run_dir, timeout_s))
                except RuntimeError as error:
                    logging.error("%s", error)
                    row.update(method=method, error=str(error).splitlines()[0])
                rows.append(row)
    target, source = choose_target(rows, links, target_accuracy, target_fraction)
    for row in rows:
        reached = reproduce.time_to_target(row.get("records", []), target)[0] if target else None
        row["seconds_to_target"] = reached
    return dict(
        rows=rows,
        links=list(shaping.values()),
        target_accuracy=target,
        target_source=source,
        prune_start=prune_start,
        sizes=dataclasses.asdict(sizes),
    )


def _train_prune_start(config, workdir):
    """Trains (or keeps, when already trained with this config) prune's start model here."""
    start = time.monotonic()
    try:
        summary = trainer.train(copy.deepcopy(config), workdir, verbose=0)
    except ValueError as error:
        if "different config" not in str(error):
            raise
        logging.info("Replacing %s: it holds a start model of other sizes.", workdir)
        shutil.rmtree(workdir)
        summary = trainer.train(copy.deepcopy(config), workdir, verbose=0)
    return dict(
        workdir=workdir,
        fit_seconds=summary["wall_seconds"],
        seconds=time.monotonic() - start,
        final_val_accuracy=summary["final_val_accuracy"],
        final_test_accuracy=summary["final_test_accuracy"],
    )
