"""How one split training server scales with its devices: a swarm of simulated devices.

  tfsplit-bench-server --devices=1,10,100,1000 --out=results/server_scale/bench_server.json

For each device count N and each mode (--modes), starts the tiny ResNet-18 run's
tfsplit-train-server (per-device tokens, N slots) and N device threads with no model: each with its
own gRPC channel, token and step ids, replaying codec payloads of the run's wire at its budget
(--batch samples a step), every reply checked. The devices send max(--min_steps,
--steps_per_device x N) training steps in all. On a machine with two or more cores the server
runs on one core (--server_cpu) and the devices on another (--swarm_cpu), so that the figures are
the server's own. In parallel mode every device then sends its head to one SplitFed round, and
every reply must be the weighted average of all N heads.

Prints one Markdown table: steps/s and samples/s, p50 and p99 step latency, how busy the server
was (its CPU seconds over the load's seconds: 100% means the server set the pace), its memory
per idle device (what its RSS grew by over the N - 1 Hellos after the one that opened the run),
the mean batch the tail trained (parallel mode joins concurrent steps), its peak memory and the
averaging round's time. Writes every summary to --out as JSON. Exits 1 when a step or the averaging failed. Runs from a clone of tfsplit: the
benchmark programs (benchmarks/) are not installed.
"""

import json
import os
import platform
import sys

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit_tools import cli

_DEVICES = flags.DEFINE_list("devices", ["1", "10", "100", "1000"], "Device counts N.")
_MODES = flags.DEFINE_list("modes", ["sequential", "parallel"], "Server modes.")
_STEPS_PER_DEVICE = flags.DEFINE_integer(
    "steps_per_device", 10, "Training steps per device (with --min_steps).", lower_bound=1
)
_MIN_STEPS = flags.DEFINE_integer("min_steps", 1000, "At least this many steps a run.", 1)
_BATCH = flags.DEFINE_integer("batch", 8, "Samples a device's step carries.", lower_bound=1)
_DEADLINE_S = flags.DEFINE_float("deadline_s", 300.0, "Each call's deadline.", lower_bound=1.0)
_SERVER_CPU = flags.DEFINE_integer("server_cpu", 0, "The server's core (-1: any).", -1)
_SWARM_CPU = flags.DEFINE_integer("swarm_cpu", 1, "The devices' core (-1: any).", -1)
_OUT = flags.DEFINE_string("out", None, "Write the summaries here (JSON).")


def _pin(cpu):
    """This process (the devices) on `cpu`, where the machine has it; returns the cpu or None."""
    if cpu < 0 or cpu not in os.sched_getaffinity(0) or os.cpu_count() < 2:
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        counts = [int(n) for n in _DEVICES.value]
    except ValueError:
        raise app.UsageError(f"--devices takes whole numbers. Received: {_DEVICES.value}")
    if not counts or min(counts) < 1:
        raise app.UsageError(f"--devices takes counts >= 1. Received: {_DEVICES.value}")
    server_swarm = cli.import_benchmark("server_swarm")
    for mode in _MODES.value:
        if mode not in server_swarm.load_server.MODES:
            raise app.UsageError(f"--modes: {mode!r} is not one of sequential, parallel.")
    swarm_cpu = _pin(_SWARM_CPU.value)
    server_cpu = _SERVER_CPU.value if swarm_cpu is not None and _SERVER_CPU.value >= 0 else None
    rows = []
    for devices in counts:
        for mode in _MODES.value:
            steps = max(_MIN_STEPS.value, _STEPS_PER_DEVICE.value * devices)
            print(f"N={devices} {mode}: {steps} steps ...", flush=True)
            rows.append(
                server_swarm.run(
                    devices,
                    steps,
                    mode,
                    batch=_BATCH.value,
                    deadline_s=_DEADLINE_S.value,
                    server_cpu=server_cpu,
                )
            )
            print(server_swarm.table(rows[-1:]).splitlines()[-1], flush=True)
    print(server_swarm.table(rows))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        machine = dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine())
        pinned = dict(server_cpu=server_cpu, swarm_cpu=swarm_cpu)
        with open(_OUT.value, "w") as f:
            json.dump(dict(machine=machine, pinned=pinned, runs=rows), f, indent=1)
            f.write("\n")
    problems = [f"N={r['devices']} {r['mode']}: {p}" for r in rows for p in r["problems"]]
    for problem in problems:
        print("problem:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
