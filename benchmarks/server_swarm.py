"""How the split training server scales with its devices: N simulated devices against one
`tfsplit-train-server`, in sequential and parallel mode.

Each run is a load test (`benchmarks/load_server.py`): the tiny ResNet-18 run's server in a child
process on 127.0.0.1, per-device tokens, and N device threads with no model, each with its own
gRPC channel, token, device id and step ids, replaying codec payloads of the run's wire at its
budget. Every reply is checked. With `server_cpu` the server runs on that one core (`taskset`);
tfsplit-bench-server puts the devices on another, so that the figures are the server's own.

Besides the load test's figures (steps/s, p50 and p99 step latency, RSS, the devices' steps per
tail update: the batch parallel mode forms; the RSS's peak, which grows with that batch, is
reported and not held flat here) a run measures:
- how busy the server's process was: its CPU seconds over the load's seconds (1.0: its core
  was never idle, so the server set the pace);
- the server's memory per idle device: what its RSS grew by from the first device's Hello (which
  opens the run) to the last one's, over the N - 1 devices after the first;
- in parallel mode, one SplitFed round: every device sends a head of its own (random weights
  of the run's head shapes, its batch as samples); every reply must hold the weighted average of
  all N heads, so that the heads agree.
"""

import os
import tempfile
import threading
import time

import grpc
import numpy as np

from benchmarks import fuzz_servers, load_server
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.training.messages import weights_from_protos, weights_to_protos
from tfsplit.training.server import averaging

_AVERAGE = fuzz_servers._TRAINING_SERVICE + "AverageHeads"


class SwarmTest(load_server.LoadTest):
    """A `LoadTest` that also measures the idle devices' memory and, in parallel mode, averages
    every device's head once (`average`)."""

    def __init__(self, workdir, devices, steps, mode, average=True, **options):
        # The round waits for every head, as tfsplit-train-server's default round does. The
        # load test's flatness check is for leaks at a fixed load; here parallel mode's joined
        # batch grows with N, and so does the memory its steps need: reported, not checked.
        options.setdefault("average_timeout_s", 120.0)
        options.setdefault("check_memory", False)
        super().__init__(workdir, devices, steps, mode, **options)
        self.average = average and mode == "parallel"
        self.idle_rss = None  # the server's RSS once every device said Hello
        self.cpu_at_start = None  # (time, the server's CPU seconds) when the load starts
        self.averaging = None

    def _devices(self, port, model):
        devices = super()._devices(port, model)
        self.idle_rss = self.server.rss()
        self.cpu_at_start = (time.monotonic(), _cpu_seconds(self.server.pid))
        return devices

    def _summary(self, model, devices, startup_s, seconds, final):
        began, cpu = self.cpu_at_start
        # The share of the load's time the server's process spent on a CPU: 1.0 on the one core
        # it is pinned to means the server, not the devices, sets the pace.
        busy = (_cpu_seconds(self.server.pid) - cpu) / (time.monotonic() - began)
        if self.average:
            self.averaging = _average_round(devices, model)
        summary = super()._summary(model, devices, startup_s, seconds, final)
        # What each device after the first (which opened the run) added by its Hello.
        summary["idle_bytes_per_device"] = (
            round((self.idle_rss - self.opened_rss) / (len(devices) - 1))
            if len(devices) > 1
            else None
        )
        updates = summary["updates"] or {}
        summary["mean_batch_formed"] = (
            None
            if updates.get("steps_per_update") is None
            else round(updates["steps_per_update"] * summary["batch"], 1)
        )
        summary["samples_per_s"] = round(summary["steps_per_s"] * summary["batch"], 1)
        summary["server_cpu_busy"] = round(busy, 3)
        summary["averaging"] = self.averaging
        if self.averaging is not None and self.averaging["problem"]:
            summary["problems"].append("averaging: " + self.averaging["problem"])
        return summary


def _cpu_seconds(pid):
    """User and system CPU seconds of process `pid` so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _average_round(devices, model):
    """Every device sends its head to round 0 at once; returns the round's time and whether every
    reply is the weighted average of all the heads."""
    rng = np.random.default_rng(len(devices))
    shapes = [(tuple(shape), np.dtype(dtype)) for shape, dtype in model["head_weights"]]
    heads = [[rng.normal(size=s).astype(d) for s, d in shapes] for _ in devices]
    samples = [device.batch for device in devices]
    expected = averaging.weighted_average(list(zip(heads, samples)))
    replies = [None] * len(devices)

    def send(index):
        device = devices[index]
        request = pb.AverageHeadsRequest(
            model_digest=model["digest"],
            device_id=device.device_id,
            round=0,
            samples=samples[index],
            weights=weights_to_protos(heads[index]),
        )
        replies[index] = device.call(_AVERAGE, request)

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(devices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    problem, averaged = "", 0
    for result in replies:
        if result.code != grpc.StatusCode.OK.name:
            problem = f"{result.code}: {result.details}"[:300]
            break
        reply = pb.AverageHeadsReply.FromString(result.reply)
        averaged = reply.devices
        weights = weights_from_protos(reply.weights, heads[0], "head")
        if reply.devices != len(devices):
            problem = f"a round averaged {reply.devices} of {len(devices)} heads"
            break
        if any(not np.allclose(w, e, rtol=1e-5, atol=1e-6) for w, e in zip(weights, expected)):
            problem = "a reply is not the weighted average of every head"
            break
    return dict(seconds=round(seconds, 2), devices_averaged=averaged, problem=problem)


def run(devices, steps, mode, **options):
    """One swarm run in a temporary directory (`SwarmTest`'s arguments); returns its summary."""
    with tempfile.TemporaryDirectory(prefix=f"swarm-{mode}-") as workdir:
        return SwarmTest(workdir, devices, steps, mode, **options).run()


def table(rows):
    """The Markdown table of swarm summaries, one row each (tfsplit-bench-server prints it)."""
    lines = [
        "| N | mode | steps/s | samples/s | p50 ms | p99 ms | server busy | idle KiB / device "
        "| mean batch | peak MiB | averaging s | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        latency, averaging = row["latency_ms"], row["averaging"]
        lines.append(
            f"| {row['devices']} | {row['mode']} | {row['steps_per_s']} | {row['samples_per_s']} "
            f"| {latency['p50']} | {latency['p99']} | {row['server_cpu_busy']:.0%} "
            f"| {_kib(row['idle_bytes_per_device'])} "
            f"| {row['mean_batch_formed']} | {row['memory']['peak_mib']} "
            f"| {averaging['seconds'] if averaging else '-'} "
            f"| {row['failed']} |"
        )
    return "\n".join(lines)


def _kib(size):
    return "-" if size is None else f"{size / 1024:.1f}"
