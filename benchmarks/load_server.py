"""A load test of the split training server's memory (issue 25): it must stay flat under load.

The server is the fuzzer's (`benchmarks/fuzz_servers.py`): the tiny ResNet-18 run behind one
`TrainingServicer` in a child process, on 127.0.0.1, with the bounds `tfsplit-train-server` derives
from the config and per-device tokens (a tokens file with one line per device; the server derives
each call's device from its token). `--mode=sequential` trains each step in turn; in
`--mode=parallel` the server joins the concurrent devices' steps into one batch.

The clients are `--devices` device threads, each with its own gRPC channel, token and device id,
opened by its own Hello (the real model digest), and its own step ids from the Hello's next step.
They send TRAIN steps until `--steps` steps in all are answered OK: each a good request as the
fuzzer builds it (encoded activations of the run's wire and shape with labels; a device's batch is
the config's, its budget one of the phases' budgets, by device). Every reply is checked (OK, the
reply of that step, a gradient payload that decodes to the shape and channels sent, finite
gradient, logits and loss). A failed step is counted, and its device learns its next step from a
Hello again; past `max_failures` failures the run stops.

Memory: the server process's RSS (VmRSS of /proc/<pid>/status) every `sample_interval_s` and
after every 100 steps. Its warm-up level is the RSS when the first `warmup_steps(steps)` steps
were answered (10% of them, at most 500 and at least 100); the load must keep every later sample
within 10% of it (`max_ratio` <= 1.10). The summary also gives the final RSS, the steps per second,
each step's latency (p50, p99, max) and the failed steps, and `problems` lists what failed (the
program exits 1 when any).

    python -m benchmarks.load_server --devices=16 --steps=10000 --mode=sequential --out=FILE.json
    python -m benchmarks.load_server --devices=16 --steps=10000 --mode=parallel --out=FILE.json

tests/test_server_load.py runs a bounded share.
"""

import argparse
import contextlib
import os
import secrets
import struct
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from benchmarks import fuzz_servers
from tfsplit import codec
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.training.server.tail_trainer import MAX_DEVICES

MEMORY_TOLERANCE = 0.10  # every RSS sample after the warm-up within 10% of the warm-up level
SAMPLE_EVERY_STEPS = 100
MODES = ("sequential", "parallel")
_STEP = fuzz_servers._TRAINING_SERVICE + "Step"
_HELLO = fuzz_servers._TRAINING_SERVICE + "Hello"


def warmup_steps(steps):
    """The steps after which the server's RSS is its warm-up level: 10% of `steps`, at most 500,
    at least 100 (never more than `steps`)."""
    return min(steps, max(SAMPLE_EVERY_STEPS, min(steps // 10, 500)))


def _percentiles(seconds):
    if not seconds:
        return dict(p50=None, p99=None, max=None)
    ms = np.asarray(seconds) * 1000.0
    return dict(
        p50=round(float(np.percentile(ms, 50)), 2),
        p99=round(float(np.percentile(ms, 99)), 2),
        max=round(float(ms.max()), 2),
    )


class Device:
    """One simulated device: its id, token, channel, budget, seeded stream and next step."""

    # The fuzzer's good Hello and Step requests and its check of a trained step's reply: they
    # read only `self.model` (what the server's ready file says of the run) and `self.rng`.
    _hello = fuzz_servers.TrainingFuzzer._hello
    _payload = fuzz_servers.TrainingFuzzer._payload
    _step = fuzz_servers.TrainingFuzzer._step
    _check_train_reply = fuzz_servers.TrainingFuzzer._check_train_reply

    def __init__(self, device_id, token, port, model, batch, k, seed, deadline_s):
        self.device_id, self.token, self.model = device_id, token, model
        self.batch, self.k, self.deadline_s = batch, k, deadline_s
        self.rng = np.random.default_rng(seed)
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options)
        self.next_step = None

    def call(self, path, request):
        return fuzz_servers._unary(self.channel, path, request, self.token, self.deadline_s)

    def hello(self):
        """Opens the run (or learns the device's next step again); '' or what went wrong."""
        result = self.call(_HELLO, self._hello(device=self.device_id))
        if result.code != "OK":
            return f"Hello: {result.code}: {result.details}"[:300]
        self.next_step = pb.HelloReply.FromString(result.reply).next_step
        return ""

    def train_step(self):
        """Sends the device's next TRAIN step; returns (seconds, '' or what went wrong)."""
        payload = self._payload(batch=self.batch, k=self.k)
        request = self._step(None, step=self.next_step, payload=payload, device_id=self.device_id)
        result = self.call(_STEP, request)
        if result.code != "OK":
            return result.seconds, f"{result.code}: {result.details}"[:300]
        problem = self._check_train_reply(request, result.reply)
        if not problem:
            gradient = codec.decode(pb.StepReply.FromString(result.reply).payload)
            if not np.isfinite(gradient.values).all():
                problem = "a non-finite gradient"
        if not problem:
            self.next_step += 1
        return result.seconds, problem

    def close(self):
        self.channel.close()


class LoadTest:
    """`devices` device threads sending `steps` TRAIN steps in all to a training server (child
    process) in `mode`, while the server's RSS is sampled (see the module docstring)."""

    def __init__(
        self,
        workdir,
        devices=16,
        steps=10000,
        mode="sequential",
        seed=0,
        batch=None,
        deadline_s=60.0,
        sample_interval_s=0.5,
        max_failures=20,
        mmap_threshold=None,
        server_cpu=None,
        average_timeout_s=5.0,
        check_memory=True,
    ):
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: {mode!r}")
        if devices < 1:
            raise ValueError(f"`devices` must be >= 1. Received: {devices}")
        if steps < 1:
            raise ValueError(f"`steps` must be >= 1. Received: {steps}")
        self.workdir, self.devices_count, self.steps, self.mode = workdir, devices, steps, mode
        self.seed, self.batch, self.deadline_s = seed, batch, deadline_s
        self.sample_interval_s, self.max_failures = sample_interval_s, max_failures
        # glibc's MALLOC_MMAP_THRESHOLD_ for the server, as the fuzzer's option.
        self.server_env = (
            {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
        )
        self.server_cpu, self.average_timeout_s = server_cpu, average_timeout_s
        self.check_memory = check_memory
        self.warmup_steps = warmup_steps(steps)
        self.tokens = {f"device-{i}": secrets.token_urlsafe(24) for i in range(devices)}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.claimed = self.ok = 0
        self.latencies = []  # seconds of each step answered OK, in order
        self.failures = []  # (device, step, what went wrong)
        # (seconds since the first step, steps answered OK, RSS bytes, "timer" or "steps")
        self.samples = []
        self.warmup = None  # the sample at the warm-up level
        self.server = None
        self.opened_rss = None  # the server's RSS once the first device opened the run
        self.began = None

    # ------------------------------------------------------------------------------ the server
    def _start_server(self):
        counts = ["--sequential=1", "--parallel=0"]
        if self.mode == "parallel":
            counts = ["--sequential=0", "--parallel=1"]
        tokens = "".join(f"{device} {token}\n" for device, token in self.tokens.items())
        slots = [f"--max_devices={self.devices_count}"] if self.devices_count > MAX_DEVICES else []
        self.server = fuzz_servers.ServerProcess(
            "training",
            os.path.join(self.workdir, "server"),
            {"tokens": tokens},
            counts
            + slots
            + ["--identity=devices", f"--average_timeout_s={self.average_timeout_s}"],
            self.server_env,
            cpu=self.server_cpu,
        )
        ready = self.server.wait_ready()
        return ready["ports"][self.mode][0], ready["model"]

    def _devices(self, port, model):
        """The devices, each opened by its Hello (in turn: the first one opens the run)."""
        budgets = [int(p.budget) for p in fuzz_servers.tiny_config().phases]
        batch = model["batch_size"] if self.batch is None else self.batch
        devices = []
        for i, (device_id, token) in enumerate(self.tokens.items()):
            device = Device(
                device_id,
                token,
                port,
                model,
                batch,
                budgets[i % len(budgets)],
                seed=self.seed * 1000 + i,
                deadline_s=self.deadline_s,
            )
            devices.append(device)
            problem = device.hello()
            if problem:
                raise RuntimeError(f"{device_id} could not open the run: {problem}")
            if device.next_step != 0:
                raise RuntimeError(f"{device_id} joined at step {device.next_step}, not 0")
            if i == 0:  # the run is open: its model built, its tail warmed up
                self.opened_rss = self.server.rss()
        return devices

    # ------------------------------------------------------------------------------ memory
    def _sample(self, source):
        """Records the server's RSS now, with the steps answered so far; returns the sample
        (None once the server is gone)."""
        rss = self.server.rss()
        if rss is None:
            return None
        with self._lock:
            sample = (time.monotonic() - self.began, self.ok, rss, source)
            self.samples.append(sample)
        return sample

    def _sampler(self):
        while not self._stop.wait(self.sample_interval_s):
            if self._sample("timer") is None:  # the server is gone
                self._stop.set()

    # ------------------------------------------------------------------------------ the load
    def _claim(self):
        with self._lock:
            if self._stop.is_set() or self.claimed >= self.steps:
                return False
            self.claimed += 1
            return True

    def _answered(self, seconds):
        with self._lock:
            self.ok += 1
            self.latencies.append(seconds)
            done = self.ok
        if done % SAMPLE_EVERY_STEPS == 0 or done == self.warmup_steps:
            sample = self._sample("steps")
            if done == self.warmup_steps:
                self.warmup = sample

    def _failed(self, device, problem):
        """Counts a failed call; the device then learns its next step again from a Hello (until
        one answers, or the run stops: the server gone, or over `max_failures` failures)."""
        while problem:
            with self._lock:
                self.failures.append((device.device_id, device.next_step, problem))
                if len(self.failures) > self.max_failures:
                    self._stop.set()
            if not self.server.alive():
                self._stop.set()
            if self._stop.is_set():
                return
            problem = device.hello()
            if problem:
                time.sleep(0.5)

    def _run_device(self, device):
        try:
            while self._claim():
                seconds, problem = device.train_step()
                if problem:
                    with self._lock:
                        self.claimed -= 1  # sent again: `steps` in all are answered OK
                    self._failed(device, problem)
                else:
                    self._answered(seconds)
        except Exception as error:  # noqa: BLE001  (a client bug fails the run, not a thread)
            with self._lock:
                self.failures.append((device.device_id, device.next_step, repr(error)[:300]))
            self._stop.set()

    def run(self):
        """Starts the server, sends the load; returns the summary."""
        started = time.monotonic()
        devices = []
        try:
            port, model = self._start_server()
            devices = self._devices(port, model)
            startup_s = time.monotonic() - started
            self.began = time.monotonic()
            self._sample("steps")
            sampler = threading.Thread(target=self._sampler, name="load-rss", daemon=True)
            sampler.start()
            threads = [
                threading.Thread(target=self._run_device, args=(d,), name=d.device_id)
                for d in devices
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - self.began
            self._stop.set()
            sampler.join()
            final = self._sample("final")
            return self._summary(model, devices, startup_s, seconds, final)
        finally:
            self._stop.set()
            for device in devices:
                device.close()
            if self.server is not None:
                self.server.stop()

    # ------------------------------------------------------------------------------ summary
    def _updates(self):
        """How the server trained the steps, from its step log: the tail's updates and the
        devices' steps per update (parallel mode joins concurrent steps; sequential, one each).
        A checkpoint empties the log (the server saves one when it passes 1 GiB): then these are
        the steps since."""
        path = os.path.join(self.server.workdir, f"state-{self.mode}-0", "steps.log")
        if not os.path.exists(path):
            return None
        counts = _logged_groups(path)
        return dict(
            logged_steps=sum(counts),
            updates=len(counts),
            steps_per_update=round(sum(counts) / len(counts), 2) if counts else None,
            max_steps_per_update=max(counts, default=None),
        )

    def _summary(self, model, devices, startup_s, seconds, final):
        mib = fuzz_servers._mib
        warmup = self.warmup
        after = [s for s in self.samples if warmup is not None and s[0] >= warmup[0]]
        worst = max(after, key=lambda s: s[2], default=None)
        ratio = None if worst is None else worst[2] / warmup[2]
        steady = self.latencies[self.warmup_steps :]
        steady_s = None if warmup is None else seconds - warmup[0]
        by_steps = [s for s in self.samples if s[3] == "steps"]
        thin = max(1, len(by_steps) // 50)
        last = by_steps[-1:] if (len(by_steps) - 1) % thin else []
        log = self.server.log_since(0, 1 << 24) if self.server is not None else b""
        summary = dict(
            mode=self.mode,
            devices=self.devices_count,
            steps=self.steps,
            answered_ok=self.ok,
            failed=len(self.failures),
            failures=[dict(device=d, step=s, problem=p) for d, s, p in self.failures[:20]],
            batch=devices[0].batch if devices else None,
            budgets=sorted({d.k for d in devices}),
            model=dict((k, model[k]) for k in ("channels", "height", "width", "activation_dtype")),
            startup_seconds=round(startup_s, 1),
            seconds=round(seconds, 1),
            steps_per_s=round(self.ok / seconds, 2) if seconds > 0 else None,
            steady_steps_per_s=(
                round(len(steady) / steady_s, 2) if steady_s and steady_s > 0 else None
            ),
            latency_ms=_percentiles(self.latencies),
            steady_latency_ms=_percentiles(steady),
            memory=dict(
                warmup_steps=self.warmup_steps,
                warmup_mib=None if warmup is None else mib(warmup[2]),
                max_after_warmup_mib=None if worst is None else mib(worst[2]),
                max_after_warmup_at_steps=None if worst is None else worst[1],
                max_ratio=None if ratio is None else round(ratio, 4),
                final_mib=None if final is None else mib(final[2]),
                peak_mib=mib(max((s[2] for s in self.samples), default=0)),
                samples=len(self.samples),
                # (steps answered, RSS in MiB) every 100 steps (thinned): a leak climbs
                trajectory=[(s[1], mib(s[2])) for s in by_steps[::thin] + last],
            ),
            updates=self._updates(),
            server_log_bytes=len(log),
            server_tracebacks=log.count(b"Traceback (most recent call last)"),
        )
        summary["problems"] = problems(summary, check_memory=self.check_memory)
        return summary


def _logged_groups(path):
    """The number of requests of each StepGroup in the step log at `path` (the state's format:
    length-prefixed StepGroups; a torn last entry is left out)."""
    counts = []
    with open(path, "rb") as f:
        while len(header := f.read(8)) == 8:
            (length,) = struct.unpack("<Q", header)
            data = f.read(length)
            if len(data) < length:
                break
            counts.append(len(pb.StepGroup.FromString(data).requests))
    return counts


def problems(summary, tolerance=MEMORY_TOLERANCE, check_memory=True):
    """What failed in a load test's summary, one line each; [] when the server passed.
    `check_memory`: whether the RSS must stay within `tolerance` of its warm-up level."""
    out = []
    if summary["answered_ok"] < summary["steps"]:
        out.append(f"answered {summary['answered_ok']} of {summary['steps']} steps")
    if summary["failed"]:
        first = summary["failures"][0]
        out.append(f"failed steps: {summary['failed']} (first: {first['problem']})")
    if summary["server_tracebacks"]:
        out.append(f"the server logged {summary['server_tracebacks']} traceback(s)")
    ratio = summary["memory"]["max_ratio"]
    if check_memory and ratio is None:
        out.append("memory: no warm-up level (the warm-up steps were not all answered)")
    elif check_memory and ratio > 1 + tolerance:
        out.append(
            f"memory: RSS reached {ratio:.3f}x its warm-up level (at "
            f"{summary['memory']['max_after_warmup_at_steps']} steps), over {1 + tolerance:.2f}x"
        )
    return out


def load(devices=16, steps=10000, mode="sequential", workdir=None, **options):
    """Runs the load test (`LoadTest`'s arguments); returns the summary."""
    if workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix=f"load-{mode}-")
    else:
        scratch = contextlib.nullcontext(workdir)
    with scratch as directory:
        return LoadTest(directory, devices, steps, mode, **options).run()


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=16, help="device threads (tokens)")
    parser.add_argument("--steps", type=int, default=10000, help="TRAIN steps answered in all")
    parser.add_argument("--mode", choices=MODES, default="sequential")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None, help="default: the config's")
    parser.add_argument("--deadline_s", type=float, default=60.0, help="each call's deadline")
    parser.add_argument("--sample_interval_s", type=float, default=0.5)
    parser.add_argument("--max_failures", type=int, default=20, help="then the run stops")
    parser.add_argument("--workdir", default=None, help="kept; default: a temporary directory")
    parser.add_argument("--out", default=None, help="also write the summary there")
    parser.add_argument(
        "--mmap_threshold",
        type=int,
        default=None,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the server (as the fuzzer's)",
    )
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    summary = load(
        args.devices,
        args.steps,
        args.mode,
        args.workdir,
        seed=args.seed,
        batch=args.batch,
        deadline_s=args.deadline_s,
        sample_interval_s=args.sample_interval_s,
        max_failures=args.max_failures,
        mmap_threshold=args.mmap_threshold,
    )
    return fuzz_servers.report(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
