"""A fuzzer for tfsplit's two servers: the split training server and the tail server (issue 25).

Each server runs in a child process that this module starts (`--serve=training|tail`), on
127.0.0.1 with a token, so that a crash, a hang or an allocation of many GiB shows as what it is (a
dead process, a missed deadline, its RSS) without taking the fuzzer down. The fuzzer is the client:
it sends a seeded stream of malformed, replayed and unauthenticated messages, each with the statuses
its generator accepts, and after each one (every `good_every`) a good request that must be served
correctly.

Training (`TrainingFuzzer`): the tiny ResNet-18 run of tests/test_net.py behind
`TrainingServicer`s started with `service.serve`, a `TokenInterceptor`, the bounds
`tfsplit-train-server` derives from the config and its `--warm_up`: a pool of sequential ones
(each with its state directory) and of parallel ones (for AverageHeads). Runs open with a valid
Hello carrying the real model digest. The stream reaches the training path: valid step ids with
mutated payloads (bit flips, truncation, header fields, k, channels, indices, duplicate indices, a
huge declared batch with few bytes, real batches of thousands, labels out of range, dtypes,
non-finite and extreme values), learning rates, nesting and calibration flags, unknown kinds, wrong
and replayed step ids, retries with another payload, wrong digests and device ids (100 KB),
undecodable bytes, missing and wrong tokens, Hello / Checkpoint / TailWeights / AverageHeads with
mutated fields and tensor protos whose declared shape does not match their bytes. Before the
stream, fresh servers of the pool get stray first Hellos, each followed by the device's own.

Tail (`TailFuzzer`): the tiny model's tail exported by `tfsplit.export.export_tail` (int8 wire,
budget 8) behind a `TailServer`: PredictRequests with mutated tensors (dtypes, ranks, shapes, huge
declared shapes with few bytes, content sizes, indices, NaN scales, zero points, inputs, targets)
over gRPC, and raw HTTP requests (mutated JSON bodies, routes, methods, tokens, Content-Length
missing or wrong, bodies of the wrong size) over REST.

Checks per message: the server process is alive (else a crash: it is restarted, at most
`max_restarts` times); the call ended within its deadline (else a hang); the status is one the
generator accepts (OK only where the message is valid); never UNKNOWN or INTERNAL, nor an HTTP 5xx
other than what HTTP itself prescribes (501 for an unknown method, 505 for an unknown version); a
refusal's message is under 1 KB; what the server logged about the message holds no traceback and
is under 2 KB; a refused message left the tail's weights as they were (training, `check_tail`);
the next good request is served correctly (training: OK, a finite gradient payload of the sent
shape, finite logits and loss, the step id advancing; tail: the probabilities of the served
SavedModel's signature called in this process). Memory: the server's RSS after every message,
against its level after the warm-up (the shapes a device sends, then two passes over every
generator); a sampler records the peak and the message in flight at the time, counts a message
during which the RSS rose by `spike_mib` as a spike, and kills a server that grows by `guard_mib`
(a crash). A run whose good steps keep failing (a NaN tail) is counted as broken and the fuzzer
moves on to a fresh run of the pool. Findings are grouped by check, generator, status and message
(numbers masked), each with a count and its first message.

    python -m benchmarks.fuzz_servers --target=training --messages=20000 --seed=0
    python -m benchmarks.fuzz_servers --target=tail --messages=5000 --seed=0

print a JSON summary; its `problems` lists every check that failed (empty when the server passed).
tests/test_fuzz.py runs a bounded share.
"""

import abc
import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types

import grpc
import numpy as np

import tfsplit
from tfsplit import codec, data, export
from tfsplit.auth import credentials
from tfsplit.auth import grpc_server as security
from tfsplit.auth import identity as identity_lib
from tfsplit.device import rest as device_rest
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol.framing import reply_logits
from tfsplit.serving import TailServer, tensors
from tfsplit.serving import validation as serving_validation
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase
from tfsplit.training.messages import model_digest
from tfsplit.training.server import service as service_lib

import tensorflow as tf  # isort: skip  (after tfsplit, which selects Keras 2)
from tensorflow.core.framework import tensor_pb2, types_pb2  # isort: skip
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2  # isort: skip

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tfsplit.__file__)))
MAX_MESSAGE_BYTES = 1024  # a refusal's message must be shorter
MAX_LOG_BYTES = 2048  # what the server may log about one message (a traceback is longer)
DEVICE = "device-0"
OTHER_DEVICE = "device-1"  # with per-device tokens: a device whose token the fuzzer also holds
TAIL_MODEL = "tail"
TAIL_DTYPE = "int8"
TAIL_BUDGET = 8
TAIL_MAX_BATCH = 32
_READY_FILE = "ready.json"
_START_TIMEOUT_S = 300
_TRAINING_SERVICE = "/tfsplit.training.SplitTraining/"
_PREDICTION_SERVICE = "/tensorflow.serving.PredictionService/"
_REPLIES = {
    "Hello": pb.HelloReply,
    "Step": pb.StepReply,
    "TailWeights": pb.TailWeightsReply,
    "Checkpoint": pb.CheckpointReply,
    "AverageHeads": pb.AverageHeadsReply,
}
_REQUESTS = {
    "Hello": pb.HelloRequest,
    "Step": pb.StepRequest,
    "TailWeights": pb.TailWeightsRequest,
    "Checkpoint": pb.CheckpointRequest,
    "AverageHeads": pb.AverageHeadsRequest,
}
_TRAIN, _EVALUATE, _CALIBRATE = (
    pb.StepRequest.TRAIN,
    pb.StepRequest.EVALUATE,
    pb.StepRequest.CALIBRATE,
)

# The statuses a generator accepts. A message with several faults may be refused for either.
OK = frozenset({"OK"})
INVALID = frozenset({"INVALID_ARGUMENT"})
STATE = frozenset({"FAILED_PRECONDITION"})
INVALID_OR_STATE = INVALID | STATE
TOO_BIG = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"})
AUTH = frozenset({"UNAUTHENTICATED"})
IDENTITY = frozenset({"FAILED_PRECONDITION", "PERMISSION_DENIED", "INVALID_ARGUMENT"})
# Finite values that may still overflow a float16 gradient: trained, or refused as non-finite.
VALUES = frozenset({"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"})
NOT_FOUND = frozenset({"NOT_FOUND"})
RATE = frozenset({"OK", "INVALID_ARGUMENT", "OUT_OF_RANGE"})  # refused, or the server's rate used
FULL = frozenset({"RESOURCE_EXHAUSTED", "PERMISSION_DENIED"})  # a run full, or a device unknown
PERMISSION = frozenset({"PERMISSION_DENIED"})
_CRASH_CODES = frozenset({"INTERNAL", "UNKNOWN"})

_HEADER = {  # offset and struct format of the codec header's fields (tfsplit/codec/layout.py)
    "magic": (0, "<4s"),
    "version": (4, "<B"),
    "kind": (5, "<B"),
    "dtype": (6, "<B"),
    "flags": (7, "<B"),
    "batch": (8, "<I"),
    "height": (12, "<H"),
    "width": (14, "<H"),
    "channels": (16, "<H"),
    "k": (18, "<H"),
}
# Declared shapes of a one-value tensor proto: 16 GiB, 512 MiB, 2^62 and 1M float32 elements.
EXPANSION_SHAPES = ([65536, 65536], [16384, 8192], [1 << 31, 1 << 31], [1 << 20])


# ------------------------------------------------------------------------------ the servers


def tiny_config():
    """tests/test_net.py's run: ResNet-18 at 1/8 width cut at stage2, no dropout, 2 phases."""
    config = base_config("deprune")
    config.model.backbone = "resnet18"
    config.model.cut = "stage2"
    config.model.width_multiplier = 0.125
    config.data.train_size = 128
    config.data.test_size = 64
    config.data.batch_size = 32
    config.data.eval_batch_size = 32
    config.calibration_batches = 2
    config.phases = [
        phase(budget=4, epochs=1, learning_rate=0.05),
        phase(budget=8, epochs=1, learning_rate=0.05, reset="deprune"),
    ]
    return config


def _builder(config):
    def build_split(image_shape, num_classes):
        info = types.SimpleNamespace(image_shape=tuple(image_shape), num_classes=num_classes)
        return trainer.build_split_model(config, info)

    return build_split


def _describe(split, config):
    """What a device knows of the run: the digest, shapes and wire of `split`."""
    return dict(
        digest=model_digest(split),
        image_shape=[int(d) for d in split.head.input.shape[1:]],
        num_classes=int(split.tail.output.shape[-1]),
        channels=int(split.channels),
        height=int(split.height),
        width=int(split.width),
        activation_dtype=split.activation_dtype,
        gradient_dtype=split.gradient_dtype,
        batch_size=int(config.data.batch_size),
        learning_rate=float(config.phases[0].learning_rate),
        head_weights=[[list(w.shape), w.dtype.name] for w in split.head.get_weights()],
        tail_weights=[[list(w.shape), w.dtype.name] for w in split.tail.get_weights()],
    )


def _write_ready(workdir, ready):
    path = os.path.join(workdir, _READY_FILE)
    with open(path + ".partial", "w") as f:
        json.dump(ready, f)
    os.replace(path + ".partial", path)


def serve_training(
    workdir,
    sequential,
    parallel,
    identity="devices",
    warm_up=True,
    max_devices=None,
    average_timeout_s=5.0,
):
    """The child's training servers: `sequential` and `parallel` TrainingServicers, none opened,
    each on its own port with the bounds `tfsplit-train-server` derives from the config (largest
    batch and learning rate), `max_devices` (None: the server's default), parallel mode's
    `average_timeout_s` and its `--warm_up` (unless `warm_up` is False), and either
    per-device tokens (`identity="devices"`, the tokens file `<workdir>/tokens`) or one shared
    token (`"shared"`, `<workdir>/token`); runs until stdin closes."""
    service_lib.one_inter_op_thread()  # as tfsplit-train-server
    if identity == "devices":
        device_identity = identity_lib.DeviceIdentity(
            identity_lib.DeviceTokens(os.path.join(workdir, "tokens"))
        )
        interceptors, identify = [device_identity], device_identity.identify
    else:
        token = credentials.read_token_file(os.path.join(workdir, "token"))
        interceptors, identify = [security.TokenInterceptor(token)], None
    config = tiny_config()
    build_split = _builder(config)
    servers, ports = [], {"sequential": [], "parallel": []}
    for mode, count in (("sequential", sequential), ("parallel", parallel)):
        options = dict(service_lib.config_limits(config), warm_up=warm_up, max_devices=max_devices)
        if mode == "parallel":
            options.update(parallel=True, average_timeout_s=average_timeout_s)
        for i in range(count):
            state_dir = os.path.join(workdir, f"state-{mode}-{i}")
            servicer = service_lib.TrainingServicer(
                build_split, state_dir, identify=identify, **options
            )
            server, port = service_lib.serve(servicer, 0, interceptors=interceptors)
            servers.append(server)
            ports[mode].append(port)
    split = build_split((32, 32, 3), 10)
    _write_ready(workdir, dict(pid=os.getpid(), ports=ports, model=_describe(split, config)))
    sys.stdin.read()  # until the fuzzer closes the pipe (or exits)
    for server in servers:
        server.stop(0)


def export_tiny_tail(base_path, dtype=TAIL_DTYPE, budget=TAIL_BUDGET):
    """The tiny run's tail (untrained) exported to `<base_path>/tail/1` by `export_tail`."""
    info = data.DatasetInfo("synthetic", 10, (32, 32, 3), 16, 16, (0.5,) * 3, (0.25,) * 3)
    split = trainer.build_split_model(tiny_config(), info)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    run = export.TrainedRun.from_model(split, info, (images, labels), (images, labels), budget)
    export.export_tail(run, base_path, TAIL_MODEL, dtype=dtype, parity_samples=8)


def serve_tail(workdir, max_batch_size):
    """The child's tail server (gRPC and REST) with the token of `<workdir>/token`, on the tiny
    tail exported on first use; runs until stdin closes."""
    token = credentials.read_token_file(os.path.join(workdir, "token"))
    base = os.path.join(workdir, "models")
    if not os.path.isdir(os.path.join(base, TAIL_MODEL)):
        export_tiny_tail(base)
    server = TailServer(base, TAIL_MODEL, token=token, max_batch_size=max_batch_size).start()
    with open(os.path.join(server.served.version_dir, serving_validation.SPEC_FILE)) as f:
        spec = json.load(f)
    ready = dict(
        pid=os.getpid(),
        grpc_port=server.grpc_port,
        rest_port=server.rest_port,
        version=server.served.version,
        version_dir=server.served.version_dir,
        max_batch_size=max_batch_size,
        spec=spec,
    )
    _write_ready(workdir, ready)
    sys.stdin.read()
    server.stop(0)


class ServerProcess:
    """A `--serve` child of this module, with `files` (name -> text) written in its workdir
    first: started, watched (RSS, log) and stopped."""

    def __init__(self, target, workdir, files, args=(), env=None, cpu=None):
        """`cpu`: the one CPU (number) the child runs on (`taskset`), None: any."""
        os.makedirs(workdir, exist_ok=True)
        for name, text in files.items():  # the credentials, readable by this user only
            fd = os.open(os.path.join(workdir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                f.write(text)
        self.workdir = workdir
        self.log_path = os.path.join(workdir, "server.log")
        if os.path.exists(os.path.join(workdir, _READY_FILE)):
            os.remove(os.path.join(workdir, _READY_FILE))  # a previous run's
        path = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, **(env or {}))
        env.update(PYTHONPATH=os.pathsep.join(path), TF_CPP_MIN_LOG_LEVEL="2")
        command = [sys.executable, "-m", "benchmarks.fuzz_servers", f"--serve={target}"]
        if cpu is not None:
            command = ["taskset", "--cpu-list", str(cpu)] + command
        command += [f"--workdir={workdir}", *args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=log, stderr=log
            )
        self.pid = self.process.pid

    def wait_ready(self, timeout_s=_START_TIMEOUT_S):
        path = os.path.join(self.workdir, _READY_FILE)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"The fuzzed server did not start (exit {self.process.returncode}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)
        with open(path) as f:
            return json.load(f)

    def alive(self):
        return self.process.poll() is None

    def rss(self):
        """The child's resident memory in bytes (None once it is gone)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def log_bytes(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_since(self, mark, limit=1 << 16):
        """What the server logged since the log was `mark` bytes long (at most `limit`)."""
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read(limit)

    def log_tail(self, size=3000):
        with open(self.log_path, "rb") as f:
            f.seek(max(0, self.log_bytes() - size))
            return f.read().decode("utf-8", "replace")

    def kill(self):
        if self.alive():
            self.process.kill()
        self.process.wait()

    def stop(self, timeout_s=30):
        if self.alive():
            try:
                self.process.stdin.close()
                self.process.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class MemoryMonitor:
    """Samples a server's RSS every `interval_s`: its peak, the peak within the current message
    (`window_peak`, reset by `start`), and the message in flight at the peak; kills the server
    when it passes `limit` bytes (then `killed` says at which message and size)."""

    def __init__(self, server, interval_s=0.02):
        self.server = server
        self.interval_s = interval_s
        self.limit = None
        self.peak, self.peak_label = 0, ""
        self.window_peak, self.label = 0, "start-up"
        self.killed = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-memory", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            rss = self.server.rss()
            if rss is None:
                return
            self.window_peak = max(self.window_peak, rss)
            if rss > self.peak:
                self.peak, self.peak_label = rss, self.label
            if self.limit is not None and rss > self.limit and self.killed is None:
                self.killed = (self.label, rss)
                self.server.kill()

    def start(self, label):
        self.label = label
        self.window_peak = self.server.rss() or 0

    def close(self):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------ bookkeeping


@dataclasses.dataclass
class Case:
    """One fuzzed message.

    Attributes:
      kind: the generator's name (what the summary counts by).
      method: the RPC ("Step", "Predict", ...) or "REST".
      request: a protobuf message, or the raw bytes to send as one.
      expect: the statuses accepted (gRPC code names; REST: "HTTP <status>").
      metadata: the call's metadata; None sends the token.
      half_close: REST: shut the socket's write side after sending (a body shorter than its
        Content-Length then ends instead of leaving the server waiting).
    """

    kind: str
    method: str
    request: object
    expect: frozenset
    metadata: tuple | None = None
    half_close: bool = False
    verify: object = None  # tail: reply bytes -> "" or what is wrong with an accepted answer


@dataclasses.dataclass
class Result:
    code: str  # a gRPC status name, or "HTTP <status>"
    details: str
    reply: bytes | None
    seconds: float


def _bitflipped(rng, data):
    """`data` with one to five random bytes replaced."""
    message = bytearray(data)
    for _ in range(rng.integers(1, 6)):
        message[rng.integers(len(message))] = int(rng.integers(256))
    return message


def _pick_bad_token(rng, token):
    """Call metadata with a missing, wrong, malformed or oversized token."""
    return [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", token),),
        (("authorization", "Basic " + token),),
        (("authorization", "Bearer " + token + "x"),),
        (("authorization", "Bearer " + token[:-1]),),
        (("authorization", "Bearer " + "A" * 100_000),),
        (("x-token", token),),
    ][rng.integers(8)]


def _unary(channel, path, request, token, deadline_s, metadata=None):
    """One raw unary call (bytes or a message) with the token's metadata unless given: a Result."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    if metadata is None:
        metadata = credentials.call_metadata(token)
    began = time.monotonic()
    try:
        reply = channel.unary_unary(path)(data, timeout=deadline_s, metadata=metadata)
        return Result("OK", "", reply, time.monotonic() - began)
    except grpc.RpcError as error:
        return Result(error.code().name, error.details() or "", None, time.monotonic() - began)


class Tally:
    """Counts per status and per generator, the checks that failed (`findings`, grouped by check,
    generator, status and the message with its numbers masked) and the slowest call."""

    def __init__(self):
        self.codes = collections.Counter()
        self.by_kind = collections.defaultdict(collections.Counter)
        self.checks = collections.Counter()
        self.good = collections.Counter()
        self.slowest = (0.0, "")
        self._findings = {}

    def record(self, kind, code, seconds):
        self.codes[code] += 1
        self.by_kind[kind][code] += 1
        if seconds > self.slowest[0]:
            self.slowest = (seconds, kind)

    def finding(self, check, kind, code="", details=""):
        self.checks[check] += 1
        key = (check, kind, code, re.sub(r"[0-9]+", "#", details)[:60])
        entry = self._findings.setdefault(
            key, dict(check=check, kind=kind, status=code, details=details[:200], count=0)
        )
        entry["count"] += 1

    def findings(self):
        return sorted(self._findings.values(), key=lambda f: (f["check"], -f["count"], f["kind"]))


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _patched(data, field, value):
    offset, fmt = _HEADER[field]
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _mib(size):
    return round(size / 2**20, 1)


class _Fuzzer(abc.ABC):
    """What both fuzzers share: the child server and its restarts, the memory checks, the checks
    of one answer, the main loop and the summary."""

    target = ""

    def __init__(
        self,
        workdir,
        seed=0,
        deadline_s=10.0,
        good_every=1,
        guard_mib=3072,
        spike_mib=256,
        max_restarts=3,
        mmap_threshold=None,
    ):
        self.workdir = workdir
        # glibc's MALLOC_MMAP_THRESHOLD_ for the server: a fixed threshold keeps freed large
        # buffers from staying in its heaps (tells a leak from the allocator's retention).
        self.server_env = (
            {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
        )
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.deadline_s = deadline_s
        self.good_every = good_every
        self.guard_bytes = guard_mib << 20
        self.spike_bytes = spike_mib << 20
        self.max_restarts = max_restarts
        self.token = secrets.token_urlsafe(24)
        self.tally = Tally()
        self.life = 0
        self.server = self.monitor = None
        self.stopped = ""
        self.startup_s = 0.0
        self.baseline = None
        self.memory = dict(after=[], lives=[])
        self._last_kind = "start"

    # ------------------------------------------------------------------------- the server
    def _server_args(self):
        return []

    def _server_files(self):
        return {"token": self.token}

    def _start(self):
        """Starts a server (a new life), waits until it listens, connects."""
        self.life += 1
        began = time.monotonic()
        workdir = os.path.join(self.workdir, f"life-{self.life}")
        files, args = self._server_files(), self._server_args()
        self.server = ServerProcess(self.target, workdir, files, args, self.server_env)
        ready = self.server.wait_ready()
        self.startup_s += time.monotonic() - began
        self.monitor = MemoryMonitor(self.server)
        self.monitor.limit = (self.server.rss() or 0) + self.guard_bytes
        self.baseline = None
        self._log_start = self.server.log_bytes()
        self._connect(ready)

    @abc.abstractmethod
    def _connect(self, ready):
        """Opens the clients to the server that `ready` describes."""

    def _close_life(self):
        """Stops the server (once) and records its life's memory and log."""
        server, monitor = self.server, self.monitor
        self.server = self.monitor = None
        if monitor is not None:
            monitor.close()
        if server is None:
            return
        server.stop()
        if monitor is not None:  # it listened
            self.memory["lives"].append(
                dict(
                    life=self.life,
                    baseline_mib=None if self.baseline is None else _mib(self.baseline),
                    peak_mib=_mib(monitor.peak),
                    peak_during=monitor.peak_label,
                    log_bytes=server.log_bytes() - self._log_start,
                )
            )

    def _crashed(self, kind):
        """After each message: a dead server is a crash; it is restarted (or the run stops)."""
        if self.server.alive():
            return False
        killed = self.monitor.killed
        how = (
            f"killed by the fuzzer's memory guard at {_mib(killed[1])} MiB during {killed[0]}"
            if killed
            else f"exit status {self.server.process.returncode}: {self.server.log_tail(400)}"
        )
        self.tally.finding("crash", kind, "", how)
        self._close_life()
        if self.life > self.max_restarts:
            self.stopped = f"the server crashed {self.life} times"
            return True
        self._start()
        self._warm()
        self._rebase()
        return True

    # ------------------------------------------------------------------------- memory
    def _set_baseline(self):
        time.sleep(0.2)
        rss = self.server.rss()
        if rss is not None:  # else it died: the crash check follows
            self.baseline, self.monitor.limit = rss, rss + self.guard_bytes

    def _after_message(self, kind):
        rss = self.server.rss()
        if self.baseline is not None and rss is not None:
            self.memory["after"].append((rss / self.baseline, kind, rss, self.sent))
        if (
            self.baseline is not None
            and self.monitor.window_peak > self.baseline + self.spike_bytes
        ):
            self.tally.finding(
                "memory_spike",
                kind,
                "",
                f"RSS rose to {_mib(self.monitor.window_peak)} MiB (baseline "
                f"{_mib(self.baseline)} MiB) while the server answered it",
            )

    def _pick(self, options):
        """One of `options` (a sequence), drawn from the run's seed."""
        return options[self.rng.integers(len(options))]

    # ------------------------------------------------------------------------- one answer
    def _begin(self, kind):
        """Before a fuzzed message: what the memory sampler and the log check attribute to it."""
        self._last_kind = kind
        self.monitor.start(kind)
        self._log_mark = self.server.log_bytes()

    def _check(self, case, result):
        """The checks of one fuzzed message's answer (not of the good requests)."""
        logged = self.server.log_since(self._log_mark)
        if b"Traceback (most recent call last)" in logged:
            line = logged[logged.rfind(b"\n", 0, len(logged) - 1) + 1 :].decode("utf-8", "replace")
            self.tally.finding("traceback_logged", case.kind, result.code, line.strip())
        elif len(logged) > MAX_LOG_BYTES:
            self.tally.finding("long_log", case.kind, result.code, f"{len(logged)} bytes logged")
        code = result.code
        self.tally.record(case.kind, code, result.seconds)
        if code == "DEADLINE_EXCEEDED" or code == "TIMEOUT" or result.seconds >= self.deadline_s:
            self.tally.finding("hang", case.kind, code, f"{result.seconds:.1f} s")
        elif code in _CRASH_CODES or (code.startswith("HTTP 5") and code not in case.expect):
            self.tally.finding("internal", case.kind, code, result.details)
        elif code not in case.expect:
            self.tally.finding(
                "unexpected_status",
                case.kind,
                code,
                f"expected {sorted(case.expect)}; {result.details}",
            )
        if code != "OK" and not code.startswith("HTTP 2"):
            if len(result.details.encode("utf-8", "replace")) >= MAX_MESSAGE_BYTES:
                self.tally.finding(
                    "long_message",
                    case.kind,
                    code,
                    f"{len(result.details.encode('utf-8', 'replace'))} bytes: {result.details}",
                )

    # ------------------------------------------------------------------------- the run
    @abc.abstractmethod
    def _generators(self):
        """The message generators of this target, each weighted by its count."""

    @abc.abstractmethod
    def _fuzz_one(self, generator):
        """Sends one message that `generator` makes and checks its answer."""

    def _warm(self):
        """After a start: whatever must work before the stream (open runs, references)."""

    def run(self, messages, time_limit_s=None):
        """Sends `messages` fuzzed messages (the first two passes over every generator warm up);
        returns the summary."""
        began = time.monotonic()
        os.makedirs(self.workdir, exist_ok=True)
        names, weights = zip(*self._generators())
        weights = np.asarray(weights, np.float64) / sum(weights)
        warmup = list(names) * 2
        self.rng.shuffle(warmup)
        self.sent = self.position = 0
        final = None
        try:
            self._start()
            self._warm()
            self._baseline_at = len(warmup)
            while self.sent < messages and not self.stopped:
                if time_limit_s is not None and time.monotonic() - began > time_limit_s:
                    self.stopped = f"the time limit ({time_limit_s} s) was reached"
                    break
                if self.baseline is None and self.position >= self._baseline_at:
                    self._set_baseline()
                warming = self.position < len(warmup)
                name = warmup[self.position] if warming else self.rng.choice(names, p=weights)
                self.position += 1
                if not self._fuzz_one(name):
                    continue
                self.sent += 1
                if self.server.alive() and self.sent % self.good_every == 0:
                    self._good()
                if self._crashed(self._last_kind):
                    continue
                self._after_message(self._last_kind)
            final = self.server.rss() if self.server is not None else None
        finally:
            self._close_life()
            self._shutdown()
        return self._summary(messages, self.sent, time.monotonic() - began, final)

    def _rebase(self):
        """A new server or run: measure the baseline again after one pass of the generators."""
        self.baseline = None
        self._baseline_at = self.position + len(self._generators())

    def _shutdown(self):
        """Closes the clients."""

    @abc.abstractmethod
    def _good(self):
        """Sends one good request and checks it was served correctly."""

    def _summary(self, messages, sent, seconds, final):
        after = self.memory["after"]
        worst = max(after, default=(None, "", None, None))
        step = max(1, len(after) // 20)
        lives = self.memory["lives"]
        memory = dict(
            baseline_mib=lives[-1]["baseline_mib"] if lives else None,
            max_after_message_mib=None if worst[2] is None else _mib(worst[2]),
            max_ratio=None if worst[0] is None else round(worst[0], 4),
            max_after=worst[1],
            final_mib=None if final is None else _mib(final),
            peak_mib=max((life["peak_mib"] for life in lives), default=None),
            lives=lives,
            # (messages sent, RSS in MiB) through the run: a leak climbs, an allocator levels off
            trajectory=[(sent, _mib(rss)) for _, _, rss, sent in after[::step] + after[-1:]],
        )
        summary = dict(
            target=self.target,
            seed=self.seed,
            messages=messages,
            sent=sent,
            seconds=round(seconds, 1),
            startup_seconds=round(self.startup_s, 1),
            stopped=self.stopped,
            restarts=self.life - 1,
            codes=dict(self.tally.codes.most_common()),
            good=dict(self.tally.good),
            checks=dict(self.tally.checks),
            memory=memory,
            server_log_bytes=sum(life["log_bytes"] for life in lives),
            slowest_call=dict(seconds=round(self.tally.slowest[0], 3), kind=self.tally.slowest[1]),
            by_kind={k: dict(v) for k, v in sorted(self.tally.by_kind.items())},
            findings=self.tally.findings(),
        )
        summary["problems"] = problems(summary)
        return summary


def problems(summary, memory_tolerance=0.10):
    """What failed in a summary, one line per check; [] when the server passed everything."""
    out = []
    if summary["stopped"]:
        out.append(f"stopped early: {summary['stopped']}")
    if summary["sent"] < summary["messages"]:
        out.append(f"sent {summary['sent']} of {summary['messages']} messages")
    for check, count in sorted(summary["checks"].items()):
        out.append(f"{check}: {count}")
    ratio = summary["memory"]["max_ratio"]
    if ratio is None:
        out.append("memory: no baseline (fewer messages than the warm-up)")
    elif ratio > 1 + memory_tolerance:
        out.append(
            f"memory: RSS reached {ratio:.3f}x its warm-up level (after "
            f"{summary['memory']['max_after']}), over {1 + memory_tolerance:.2f}x"
        )
    return out


# ------------------------------------------------------------------------------ training


def _generator(weight, where="any"):
    """Marks a fuzzer's `_gen_<name>` method: its share of the stream and the runs it goes to
    ("any", "sequential" or "parallel"; training only)."""

    def mark(method):
        method.weight, method.where = weight, where
        return method

    return mark


@dataclasses.dataclass(eq=False)
class _Run:
    """One TrainingServicer of the child and what the fuzzer knows of device-0's run there."""

    name: str
    channel: grpc.Channel
    parallel: bool
    opened: bool = False
    next_step: int = 0
    last: tuple | None = None  # (request, reply bytes) of device-0's last trained step
    tail: str | None = None  # sha256 of the TailWeights reply, when known
    failures: int = 0  # good steps failed in a row
    round: int = 0
    accepted: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=4)
    )


class TrainingFuzzer(_Fuzzer):
    """Fuzzes `tfsplit-train-server`'s service (see the module docstring).

    Args:
      workdir: where the child servers keep their state and logs.
      seed: seeds the stream (the token is random).
      deadline_s: every call's deadline; a call that reaches it is a hang.
      good_every: a good step after every this many fuzzed messages.
      check_tail: after a message that must leave the tail as it was (a refusal, an evaluation),
        fetch the tail's weights and compare (two TailWeights calls per message at most).
      identity: "devices": per-device tokens (device-0's is the fuzzer's, device-1's lets it try
        to act as device-0); "shared": one token for every device.
      sequential, parallel: servicers in the child's pools (sequential: the first is fuzzed,
        the next ones get stray first Hellos, then replace a broken run).
      warm_up: the servers warm their tails up at every batch size (`--warm_up`).
      guard_mib, spike_mib, max_restarts: see the module docstring.
    """

    target = "training"

    def __init__(
        self,
        workdir,
        check_tail=True,
        identity="devices",
        sequential=4,
        parallel=2,
        warm_up=True,
        **kwargs,
    ):
        super().__init__(workdir, **kwargs)
        self.check_tail = check_tail
        self.identity, self.warm_up = identity, warm_up
        self.other_token = secrets.token_urlsafe(24)
        self.pool_sizes = dict(sequential=sequential, parallel=parallel)
        self.pools = dict(sequential=[], parallel=[])
        self.runs = {}
        self.model = None
        self._new_devices = 0

    def _server_args(self):
        return [
            f"--sequential={self.pool_sizes['sequential']}",
            f"--parallel={self.pool_sizes['parallel']}",
            f"--identity={self.identity}",
        ] + ([] if self.warm_up else ["--no_warm_up"])

    def _server_files(self):
        if self.identity == "shared":
            return {"token": self.token}
        return {"tokens": f"{DEVICE} {self.token}\n{OTHER_DEVICE} {self.other_token}\n"}

    def _connect(self, ready):
        self.model = ready["model"]
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.pools = {
            mode: [
                _Run(
                    f"{mode}-{i}",
                    grpc.insecure_channel(f"127.0.0.1:{port}", options),
                    mode == "parallel",
                )
                for i, port in enumerate(ports)
            ]
            for mode, ports in ready["ports"].items()
        }
        self.runs = {}
        self._new_devices = 0

    def _shutdown(self):
        for pool in self.pools.values():
            for run in pool:
                run.channel.close()

    # ------------------------------------------------------------------------- calls
    def _call(self, run, method, request, metadata=None):
        return _unary(
            run.channel, _TRAINING_SERVICE + method, request, self.token, self.deadline_s, metadata
        )

    def _tail_hash(self, run):
        result = self._call(
            run, "TailWeights", pb.TailWeightsRequest(model_digest=self.model["digest"])
        )
        return _sha(result.reply) if result.code == "OK" else None

    # ------------------------------------------------------------------------- good messages
    def _hello(self, device=DEVICE, **fields):
        m = self.model
        good = dict(
            model_digest=m["digest"],
            image_shape=m["image_shape"],
            num_classes=m["num_classes"],
            device_id=device,
        )
        return pb.HelloRequest(**dict(good, **fields))

    def _payload(
        self, batch=None, k=4, labels=True, dtype=None, channels=None, size=None, scale=1.0
    ):
        """A well-formed activations payload (what a device sends), in the run's wire unless
        the arguments say otherwise."""
        m = self.model
        batch = int(self.rng.integers(2, 9)) if batch is None else batch
        channels = m["channels"] if channels is None else channels
        height, width = (m["height"], m["width"]) if size is None else size
        values = self.rng.normal(0.0, scale, (batch, height, width, k)).astype(np.float32)
        values = np.clip(values, -65000.0, 65000.0)  # within float16's range: finite on the wire
        indices = self.rng.permutation(channels)[:k]
        label_values = self.rng.integers(0, m["num_classes"], batch) if labels else None
        return codec.encode(
            values, indices, channels, dtype or m["activation_dtype"], labels=label_values
        )

    def _step(self, run, step=None, payload=None, kind=_TRAIN, **fields):
        fields = dict(dict(learning_rate=self.model["learning_rate"], device_id=DEVICE), **fields)
        return pb.StepRequest(
            kind=kind,
            model_digest=self.model["digest"],
            step=run.next_step if step is None else step,
            payload=self._payload(labels=kind == _TRAIN) if payload is None else payload,
            **fields,
        )

    def _open(self, run):
        result = self._call(run, "Hello", self._hello())
        if result.code != "OK":
            self.tally.finding(
                "good_request_failed", f"Hello of {run.name}", result.code, result.details
            )
            return False
        run.opened, run.next_step = True, pb.HelloReply.FromString(result.reply).next_step
        return True

    def _check_train_reply(self, request, reply_bytes):
        """'' if `reply_bytes` answer the TRAIN `request` as a trained step must, else why not."""
        try:
            reply = pb.StepReply.FromString(reply_bytes)
            sent = codec.decode(request.payload)
            gradient = codec.decode(
                reply.payload, expect_kind="gradients", expect_dtype=self.model["gradient_dtype"]
            )
            logits = reply_logits(reply)
        except Exception as error:  # noqa: BLE001  (whatever is wrong with the reply)
            return f"the reply does not decode: {type(error).__name__}: {error}"[:300]
        if reply.step != request.step:
            return f"the reply is for step {reply.step}, not {request.step}"
        if gradient.values.shape != sent.values.shape:
            return f"gradient shape {gradient.values.shape} for activations {sent.values.shape}"
        if not np.array_equal(np.sort(gradient.indices), np.sort(sent.indices)):
            return "the gradient's channels are not the ones sent"
        if logits.shape != (sent.values.shape[0], self.model["num_classes"]):
            return f"logits of shape {logits.shape}"
        if not np.isfinite(logits).all() or not math.isfinite(reply.loss):
            return f"non-finite logits or loss (loss {reply.loss})"
        return ""

    def _good(self, payload=None):
        """A good step on the run the last message went to, checked; a run whose good steps keep
        failing is broken and replaced by the next of its pool."""
        run = self._last_run
        if run is None or not run.opened:
            return
        payload = self._payload(batch=int(self.rng.integers(2, 9))) if payload is None else payload
        request = self._step(run, payload=payload)
        result = self._call(run, "Step", request)
        self.tally.good["sent"] += 1
        problem = f"{result.code}: {result.details}" if result.code != "OK" else ""
        problem = problem or self._check_train_reply(request, result.reply)
        run.tail = None  # trained, or failed after changing it: fetched again before the next
        if not problem:
            run.next_step += 1
            run.last, run.failures = (request, result.reply), 0
            return
        self.tally.good["failed"] += 1
        if not self.server.alive():
            return
        self.tally.finding("good_request_failed", f"after {self._last_kind}", result.code, problem)
        run.failures += 1
        if run.failures >= 3:
            self.tally.finding(
                "run_broken",
                self._last_kind,
                result.code,
                f"{run.name}: 3 good steps failed; accepted before: {list(run.accepted)}",
            )
            self._replace(run)
        else:
            self._open(run)  # back in step with the server

    def _replace(self, run):
        mode = "parallel" if run.parallel else "sequential"
        spares = [
            r
            for r in self.pools[mode]
            if r is not run and r.failures < 3 and r is not self.runs.get(mode)
        ]
        run.failures = 3
        if not spares:
            self.stopped = f"every {mode} run of the pool broke"
            return
        self.runs[mode] = spares[0]
        if not spares[0].opened:
            self._open(spares[0])
        self._rebase()  # a new run's model

    # ------------------------------------------------------------------------- the stream
    def _warm(self):
        self._last_run = None
        for mode in ("sequential", "parallel"):
            if self.pools[mode]:
                self.runs[mode] = self.pools[mode][0]
                if not self._open(self.runs[mode]):
                    self.stopped = f"the device's Hello did not open the {mode} run"
                    return
        if self.life == 1:
            self._first_hellos()
        for run in self.runs.values():  # the shapes a device sends, before the baseline
            for batch, k in ((1, 1), (self.model["batch_size"], self.model["channels"])):
                self._last_run = run
                self._good(self._payload(batch=batch, k=k))

    def _first_hellos(self):
        """Stray first Hellos to fresh servers of the pool, each followed by the device's own,
        which must open the run (these servers are then spares)."""
        m = self.model
        stray = [
            ("first_hello_other_model", pb.HelloRequest(
                model_digest="f" * 64, image_shape=[40, 40, 3], num_classes=7, device_id=DEVICE
            ), IDENTITY),
            ("first_hello_expansion", self._hello(
                tail_weights=self._weights(m["tail_weights"], expand=EXPANSION_SHAPES[1])
            ), INVALID),
            ("first_hello_bad_weights", self._hello(
                tail_weights=[b"\xff" * 7] * len(m["tail_weights"])
            ), INVALID),
        ]  # fmt: skip
        for run, (kind, request, expect) in zip(self.pools["sequential"][1:], stray):
            self._begin(kind)
            before = self.server.rss() or 0
            self._check(Case(kind, "Hello", request, expect), self._call(run, "Hello", request))
            if self._crashed(kind):
                return
            if self.monitor.window_peak > before + self.spike_bytes:
                self.tally.finding(
                    "memory_spike",
                    kind,
                    "",
                    f"RSS rose by {_mib(self.monitor.window_peak - before)} MiB",
                )
            result = self._call(run, "Hello", self._hello())
            self.tally.good["sent"] += 1
            if result.code != "OK" or pb.HelloReply.FromString(result.reply).next_step != 0:
                self.tally.good["failed"] += 1
                self.tally.finding(
                    "good_request_failed", f"after {kind}", result.code, result.details
                )
                run.failures = 3
            else:
                run.opened = True

    def _weights(self, specs, expand=None, index=0):
        """Serialized TensorProtos of random weights of `specs`; with `expand`, weight `index`
        becomes one value declaring that shape."""
        blobs = []
        for shape, dtype in specs:
            array = self.rng.normal(0.0, 0.1, shape).astype(dtype)
            blobs.append(tensors.to_tensor_proto(array).SerializeToString())
        if expand is not None:
            blobs[index] = _expansion_blob(expand)
        return blobs

    def _fuzz_one(self, name):
        """Sends one message of generator `name` and checks its answer; False if the generator
        had nothing to send."""
        want = getattr(self, f"_gen_{name}").where
        mode = want if want != "any" else ("parallel" if self.rng.random() < 0.25 else "sequential")
        run = self.runs.get(mode)
        if run is None or run.failures >= 3:
            return False
        case = getattr(self, f"_gen_{name}")(run)
        if case is None:
            return False
        self._last_run = run
        if self.check_tail and run.tail is None:
            run.tail = self._tail_hash(run)
        self._begin(case.kind)
        result = self._call(run, case.method, case.request, case.metadata)
        self._check(case, result)
        if not self.server.alive():
            return True
        parsed = _parse(_REQUESTS[case.method], case.request)
        changed = result.code == "OK" and self._after_ok(run, case, parsed, result.reply)
        if changed:
            run.tail = None
            run.accepted.append(case.kind)
        elif self.check_tail and run.tail is not None:
            now = self._tail_hash(run)
            if now is not None and now != run.tail:
                self.tally.finding(
                    "state_changed", case.kind, result.code,
                    f"the tail's weights changed; {result.details}",
                )  # fmt: skip
            run.tail = now
        return True

    def _after_ok(self, run, case, request, reply_bytes):
        """Follows an accepted message: device-0's next step, a retry's kept reply; returns
        whether the tail may have changed."""
        if request is None:
            return True
        try:
            reply = _REPLIES[case.method].FromString(reply_bytes)
        except Exception as error:  # noqa: BLE001
            self.tally.finding("bad_reply", case.kind, "OK", f"{type(error).__name__}: {error}")
            return True
        if case.method == "Hello":
            if request.device_id == DEVICE and request.model_digest == self.model["digest"]:
                run.next_step = reply.next_step
            return bool(request.resume)
        if case.method != "Step" or request.kind not in (_TRAIN, _CALIBRATE):
            return False
        if request.kind == _CALIBRATE:
            return True
        if request.device_id == DEVICE and request.step == run.next_step:
            problem = self._check_train_reply(request, reply_bytes)
            if problem:
                self.tally.finding("bad_reply", case.kind, "OK", problem)
            run.next_step += 1
            run.last = (request, reply_bytes)
        elif request.device_id == DEVICE and run.last and request.step == run.next_step - 1:
            if request == run.last[0] and reply_bytes != run.last[1]:
                self.tally.finding("bad_reply", case.kind, "OK", "a retry got another reply")
            return False
        return True

    def _generators(self):
        return [
            (name[5:], getattr(self, name).weight) for name in dir(self) if name.startswith("_gen_")
        ]

    # ------------------------------------------------------------------------- generators
    # Each takes the run the message goes to and returns a Case (None: nothing to send now).

    @_generator(4)
    def _gen_payload_bitflip(self, run):
        payload = bytearray(self._payload())
        for _ in range(self.rng.integers(1, 9)):
            payload[self.rng.integers(len(payload))] ^= 1 << int(self.rng.integers(8))
        return Case("payload_bitflip", "Step", self._step(run, payload=bytes(payload)), VALUES)

    @_generator(3)
    def _gen_payload_truncated(self, run):
        payload = self._payload()
        payload = payload[: self.rng.integers(len(payload))]
        return Case("payload_truncated", "Step", self._step(run, payload=payload), INVALID)

    @_generator(2)
    def _gen_payload_extended(self, run):
        payload = self._payload() + self.rng.bytes(int(self.rng.integers(1, 65)))
        return Case("payload_extended", "Step", self._step(run, payload=payload), INVALID)

    @_generator(3)
    def _gen_header_code(self, run):
        field = self._pick(["magic", "version", "kind", "dtype", "flags"])
        value = {
            "magic": b"TFSQ",
            "version": self._pick([0, 2, 255]),
            "kind": self._pick([0, 2, 3, 255]),
            "dtype": self._pick([0, 1, 3, 4, 255]),
            "flags": self._pick([0, 2, 3, 4, 0x81, 255]),
        }[field]
        payload = _patched(self._payload(), field, value)
        return Case(f"header_{field}", "Step", self._step(run, payload=payload), INVALID)

    @_generator(4)
    def _gen_header_size(self, run):
        field = self._pick(["batch", "height", "width", "channels", "k"])
        payload = self._payload()
        offset, fmt = _HEADER[field]
        (was,) = struct.unpack_from(fmt, payload, offset)
        top = 2**32 - 1 if field == "batch" else 2**16 - 1
        choices = [v for v in (0, 1, was - 1, was + 1, was * 2, top) if v != was and 0 <= v <= top]
        payload = _patched(payload, field, self._pick(choices))
        return Case(f"header_{field}", "Step", self._step(run, payload=payload), INVALID)

    @_generator(2)
    def _gen_declared_huge_batch(self, run):
        batch = self._pick([65536, 1 << 24, 2**31, 2**32 - 1])
        payload = _patched(self._payload(batch=2), "batch", batch)
        return Case("declared_huge_batch", "Step", self._step(run, payload=payload), INVALID)

    @_generator(2)
    def _gen_wrong_spatial(self, run):
        m = self.model
        size = [(m["height"] // 2, m["width"]), (m["height"], m["width"] + 1), (1, 1), (64, 64)]
        payload = self._payload(size=self._pick(size))
        return Case("wrong_spatial", "Step", self._step(run, payload=payload), INVALID)

    @_generator(2)
    def _gen_wrong_channels(self, run):
        channels = self._pick([4, self.model["channels"] - 1, self.model["channels"] * 2, 4096])
        payload = self._payload(k=min(4, channels), channels=channels)
        return Case("wrong_channels", "Step", self._step(run, payload=payload), INVALID)

    @_generator(2)
    def _gen_index_out_of_range(self, run):
        payload = bytearray(self._payload(k=4))
        struct.pack_into("<H", payload, codec.HEADER_NBYTES + 2 * int(self.rng.integers(4)),
                         self._pick([self.model["channels"], 255, 65535]))  # fmt: skip
        return Case("index_out_of_range", "Step", self._step(run, payload=bytes(payload)), INVALID)

    @_generator(2)
    def _gen_duplicate_indices(self, run):
        payload = bytearray(self._payload(k=4))
        first = struct.unpack_from("<H", payload, codec.HEADER_NBYTES)[0]
        struct.pack_into(
            "<H", payload, codec.HEADER_NBYTES + 2 * int(self.rng.integers(1, 4)), first
        )
        return Case("duplicate_indices", "Step", self._step(run, payload=bytes(payload)), INVALID)

    @_generator(2)
    def _gen_budget(self, run):  # any k of the bottleneck is a device's budget: trained
        k = self._pick([1, 2, 3, 5, 8, 15, self.model["channels"]])
        return Case("budget", "Step", self._step(run, payload=self._payload(k=k)), OK)

    @_generator(2)
    def _gen_batch_small(self, run):  # within the config's batch: trained
        batch = int(self.rng.integers(1, self.model["batch_size"] + 1))
        return Case("batch_small", "Step", self._step(run, payload=self._payload(batch=batch)), OK)

    @_generator(1)
    def _gen_batch_over_config(self, run):  # above the config's batch: a cap may refuse it
        batch = int(self.rng.integers(self.model["batch_size"] + 1, 8 * self.model["batch_size"]))
        step = self._step(run, payload=self._payload(batch=batch))
        return Case("batch_over_config", "Step", step, TOO_BIG | OK)

    @_generator(1)
    def _gen_batch_huge(self, run):  # real bytes (up to 8 MiB): must be refused
        batch = self._pick([4096, 8192])
        step = self._step(run, payload=self._payload(batch=batch))
        return Case("batch_huge", "Step", step, TOO_BIG)

    @_generator(2)
    def _gen_labels_out_of_range(self, run):
        payload = bytearray(self._payload(k=4, batch=4))
        label = self._pick([self.model["num_classes"], -1, 2**31 - 1, -(2**31)])
        struct.pack_into(
            "<i", payload, codec.HEADER_NBYTES + 8 + 4 * int(self.rng.integers(4)), label
        )
        return Case("labels_out_of_range", "Step", self._step(run, payload=bytes(payload)), INVALID)

    @_generator(1)
    def _gen_labels_missing(self, run):
        step = self._step(run, payload=self._payload(labels=False))
        return Case("labels_missing", "Step", step, INVALID)

    @_generator(2)
    def _gen_wrong_dtype(self, run):
        dtype = self._pick([d for d in codec.WIRE_DTYPES if d != self.model["activation_dtype"]])
        step = self._step(run, payload=self._payload(dtype=dtype))
        return Case(f"dtype_{dtype}", "Step", step, INVALID)

    @_generator(2)
    def _gen_nonfinite_values(self, run):
        payload = bytearray(self._payload(k=4, batch=2))
        values = 2 * self.model["height"] * self.model["width"] * 4
        offset = len(payload) - 2 * int(self.rng.integers(1, values + 1))  # a float16 value
        struct.pack_into("<H", payload, offset, self._pick([0x7C00, 0xFC00, 0x7E00]))
        return Case("nonfinite_values", "Step", self._step(run, payload=bytes(payload)), INVALID)

    @_generator(1)
    def _gen_extreme_values(self, run):  # finite float16 values at the top of its range
        step = self._step(run, payload=self._payload(scale=self._pick([1e3, 3e4])))
        return Case("extreme_values", "Step", step, VALUES)

    @_generator(2)
    def _gen_learning_rate_invalid(self, run):
        rate = self._pick([math.nan, math.inf, -math.inf, -1.0, -1e-8])
        return Case("learning_rate_invalid", "Step", self._step(run, learning_rate=rate), INVALID)

    @_generator(2)
    def _gen_learning_rate_huge(self, run):
        rate = self._pick([1e3, 1e30, 3e38])
        step = self._step(run, learning_rate=rate)
        return Case("learning_rate_huge", "Step", step, RATE)

    @_generator(1)
    def _gen_learning_rate_tiny(self, run):
        rate = self._pick([0.0, 1e-30, 1e-45])
        step = self._step(run, learning_rate=rate)
        return Case("learning_rate_tiny", "Step", step, RATE)

    @_generator(1)
    def _gen_nesting(self, run):
        return Case("nesting", "Step", self._step(run, nesting=True), OK | INVALID_OR_STATE)

    @_generator(1)
    def _gen_calibration_flags_on_train(self, run):
        step = self._step(
            run, calibration_begin=bool(self.rng.integers(2)), calibration_finish=True
        )
        return Case("calibration_flags_on_train", "Step", step, OK)

    @_generator(2)
    def _gen_unknown_kind(self, run):
        kind = self._pick([0, 4, 7, 2**31 - 1, -1])
        return Case("unknown_kind", "Step", self._step(run, kind=kind), INVALID)

    @_generator(1)
    def _gen_evaluate(self, run):
        step = self._step(run, kind=_EVALUATE, payload=self._payload(labels=False))
        return Case("evaluate", "Step", step, OK)

    @_generator(1)
    def _gen_evaluate_mutated(self, run):
        payload = self._payload(labels=False)
        payload = _patched(payload, "batch", self._pick([0, 2**31]))
        return Case(
            "evaluate_mutated", "Step", self._step(run, kind=_EVALUATE, payload=payload), INVALID
        )

    @_generator(1)
    def _gen_calibrate(self, run):
        begin, finish = bool(self.rng.integers(2)), bool(self.rng.integers(2))
        step = self._step(run, kind=_CALIBRATE, payload=self._payload(labels=False),
                          calibration_begin=begin, calibration_finish=finish)  # fmt: skip
        return Case("calibrate", "Step", step, OK if begin else OK | INVALID_OR_STATE)

    @_generator(3)
    def _gen_step_id_wrong(self, run):
        choices = [run.next_step + 1, run.next_step + 1000, -1, -(2**63), 2**63 - 1]
        if run.next_step >= 2:
            choices.append(run.next_step - 2)
        step = self._step(run, step=self._pick(choices))
        return Case("step_id_wrong", "Step", step, INVALID_OR_STATE)

    @_generator(3)
    def _gen_replay_other_payload(self, run):
        if run.last is None:
            return None
        step = self._step(run, step=run.next_step - 1)
        return Case("replay_other_payload", "Step", step, STATE)

    @_generator(1)
    def _gen_retry_same(self, run):
        if run.last is None:
            return None
        return Case("retry_same", "Step", run.last[0], OK)

    @_generator(2)
    def _gen_digest_wrong(self, run):
        digest = self._pick(["0" * 64, "", self.model["digest"][:-1], "x" * 100_000])
        method = self._pick(["Step", "Hello", "Checkpoint", "TailWeights"])
        request = self._valid_request(run, method)
        request.model_digest = digest
        return Case(f"digest_wrong_{method}", method, request, INVALID_OR_STATE)

    @_generator(1)
    def _gen_device_unknown(self, run):
        device = self._pick(["device-9", "fuzz-unknown", "device-0 ", "DEVICE-0"])
        return Case("device_unknown", "Step", self._step(run, device_id=device), IDENTITY)

    @_generator(2)
    def _gen_device_id_long(self, run):
        device = self._pick(["d" * 100_000, "é" * 50_000, "\x00" * 1000, "device-0\n" * 5000])
        method = self._pick(["Step", "Hello", "Checkpoint"])
        request = self._valid_request(run, method)
        request.device_id = device
        return Case(f"device_id_long_{method}", method, request, IDENTITY)

    @_generator(1)
    def _gen_empty_message(self, run):
        method = self._pick(list(_REQUESTS))
        return Case(f"empty_{method}", method, b"", IDENTITY)

    @_generator(2)
    def _gen_raw_bytes(self, run):
        method = self._pick(list(_REQUESTS))
        data = self.rng.bytes(int(self.rng.integers(1, 2000)))
        return Case(f"raw_bytes_{method}", method, data, IDENTITY)

    @_generator(3)
    def _gen_proto_bitflip(self, run):
        message = _bitflipped(self.rng, self._step(run).SerializeToString())
        if self.rng.random() < 0.3:
            message = message[: self.rng.integers(1, len(message))]
        return Case("proto_bitflip", "Step", bytes(message), VALUES | IDENTITY)

    @_generator(3)
    def _gen_token(self, run):
        metadata = _pick_bad_token(self.rng, self.token)
        method = self._pick(["Step", "Hello", "Checkpoint", "TailWeights", "AverageHeads"])
        request = self._valid_request(run, method)
        return Case(f"token_{method}", method, request, _token_expect(metadata), metadata)

    @_generator(2)
    def _gen_impersonation(self, run):
        """Acting as another device: refused where each device has its own token."""
        if self.identity != "devices":
            return None
        method = self._pick(["Step", "Hello", "Checkpoint", "AverageHeads"])
        request = self._valid_request(run, method)
        if self.rng.random() < 0.5:  # device-1's token, device-0's request
            metadata = credentials.call_metadata(self.other_token)
        else:  # device-0's token, a request of device-1
            request.device_id, metadata = OTHER_DEVICE, None
        return Case(f"impersonation_{method}", method, request, PERMISSION, metadata)

    def _valid_request(self, run, method):
        m = self.model
        if method == "Step":
            return self._step(run)
        if method == "Hello":
            return self._hello()
        if method == "Checkpoint":
            return pb.CheckpointRequest(
                model_digest=m["digest"], device_id=DEVICE, step=run.next_step
            )
        if method == "TailWeights":
            return pb.TailWeightsRequest(model_digest=m["digest"])
        run.round += 1
        return pb.AverageHeadsRequest(
            model_digest=m["digest"],
            device_id=DEVICE,
            round=run.round,
            weights=self._weights(m["head_weights"]),
            samples=int(self.rng.integers(1, 1000)),
        )

    @_generator(1)
    def _gen_hello_other_model(self, run):
        request = self._hello(model_digest="f" * 64)
        if self.rng.random() < 0.5:
            del request.image_shape[:]
            request.image_shape.extend([40, 40, 3])
            request.num_classes = 7
        return Case("hello_other_model", "Hello", request, IDENTITY)

    @_generator(1)
    def _gen_hello_shape_wrong(self, run):
        shape = [[0, 0, 0], [40, 40, 3], [2**31 - 1] * 3, [32, 32], [32] * 10, [-1, 32, 3]]
        request = self._hello()
        del request.image_shape[:]
        request.image_shape.extend(self._pick(shape))
        return Case("hello_shape_wrong", "Hello", request, INVALID_OR_STATE)

    @_generator(1)
    def _gen_hello_classes_wrong(self, run):
        request = self._hello(num_classes=self._pick([0, -1, 7, 2**31 - 1]))
        return Case("hello_classes_wrong", "Hello", request, OK | INVALID_OR_STATE)

    @_generator(1)
    def _gen_hello_tail_weights(self, run):  # the run is open: the weights change nothing
        m = self.model
        if self.rng.random() < 0.5:
            shape = self._pick(EXPANSION_SHAPES)
            weights = self._weights(m["tail_weights"], expand=shape)
        else:
            weights = [b"\x08\x01\x12\x00"] * int(self.rng.integers(0, 100))
        request = self._hello(tail_weights=weights)
        return Case("hello_tail_weights", "Hello", request, OK | INVALID_OR_STATE | IDENTITY)

    @_generator(1)
    def _gen_hello_new_device(self, run):
        if run.parallel:
            return None  # a parallel run waits for its devices' steps
        self._new_devices += 1
        request = self._hello(device=f"fuzz-{self._new_devices % 6}")
        return Case("hello_new_device", "Hello", request, OK | FULL)

    @_generator(1)
    def _gen_hello_resume(self, run):
        step = self._pick([run.next_step, max(0, run.next_step - 1), run.next_step + 5, -1, 2**62])
        request = self._hello(resume=True, resume_step=step)
        return Case("hello_resume", "Hello", request, OK | INVALID_OR_STATE)

    @_generator(2)
    def _gen_checkpoint_mutated(self, run):
        step = self._pick([run.next_step + 1, run.next_step - 1, -1, 2**63 - 1])
        request = self._valid_request(run, "Checkpoint")
        request.step = step
        if self.rng.random() < 0.3:
            request.device_id = "device-9"
        return Case("checkpoint_mutated", "Checkpoint", request, IDENTITY)

    @_generator(1)
    def _gen_checkpoint(self, run):
        return Case("checkpoint", "Checkpoint", self._valid_request(run, "Checkpoint"), OK)

    @_generator(1)
    def _gen_tail_weights(self, run):
        return Case("tail_weights", "TailWeights", self._valid_request(run, "TailWeights"), OK)

    @_generator(1, where="parallel")
    def _gen_average(self, run):
        return Case("average", "AverageHeads", self._valid_request(run, "AverageHeads"), OK)

    @_generator(2, where="parallel")
    def _gen_average_expansion(self, run):
        request = self._valid_request(run, "AverageHeads")
        shape = self._pick(EXPANSION_SHAPES)
        request.weights[int(self.rng.integers(len(request.weights)))] = _expansion_blob(shape)
        return Case("average_expansion", "AverageHeads", request, TOO_BIG)

    @_generator(2, where="parallel")
    def _gen_average_mutated(self, run):
        request = self._valid_request(run, "AverageHeads")
        index = int(self.rng.integers(len(request.weights)))
        what = self._pick(["count", "dtype", "truncated", "garbage", "samples", "round"])
        if what == "count":
            del request.weights[index]
        elif what == "dtype":
            array = tensors.from_tensor_proto(
                tensor_pb2.TensorProto.FromString(request.weights[index])
            )
            request.weights[index] = tensors.to_tensor_proto(
                array.astype(np.float16)
            ).SerializeToString()
        elif what == "truncated":
            proto = tensor_pb2.TensorProto.FromString(request.weights[index])
            proto.tensor_content = proto.tensor_content[:-4]
            request.weights[index] = proto.SerializeToString()
        elif what == "garbage":
            request.weights[index] = self.rng.bytes(int(self.rng.integers(1, 64)))
        elif what == "samples":
            request.samples = self._pick([0, -1, -(2**63)])
        else:
            request.round = -1
        return Case(f"average_{what}", "AverageHeads", request, INVALID)

    @_generator(1, where="sequential")
    def _gen_average_on_sequential(self, run):
        return Case(
            "average_on_sequential", "AverageHeads", self._valid_request(run, "AverageHeads"), STATE
        )


def _token_expect(metadata):
    """UNAUTHENTICATED; gRPC's transport refuses metadata over 16 KB itself (RESOURCE_EXHAUSTED)."""
    if sum(len(key) + len(value) for key, value in metadata) > 16384:
        return AUTH | frozenset({"RESOURCE_EXHAUSTED"})
    return AUTH


def _expansion_blob(shape):
    """A TensorProto of one float32 value that declares `shape` (what `tf.make_ndarray` pads)."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto.SerializeToString()


def _parse(message_class, request):
    if not isinstance(request, bytes):
        return request
    try:
        return message_class.FromString(request)
    except Exception:  # noqa: BLE001  (not a message of that class)
        return None


# ------------------------------------------------------------------------------ the tail


def _read_http(sock, deadline):
    """The raw answer on `sock`: until the peer closes, or the body its Content-Length gives."""
    data, length = b"", None
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
        head, found, body = data.partition(b"\r\n\r\n")
        if found and length is None:
            match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            length = int(match.group(1)) if match else -1
        if length is not None and length >= 0 and len(body) >= length:
            break
    else:
        raise TimeoutError("no complete answer before the deadline")
    return data


def _http_result(raw, seconds):
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/\d\.\d (\d{3})", head)
    if match is None:  # http.server answers what it cannot parse as HTTP/0.9: a bare HTML page
        match = re.search(rb"Error code: (\d{3})", raw)
        if match is None:
            return Result("NO_ANSWER", f"not an HTTP answer: {raw[:100]!r}", None, seconds)
        head, body = b"", raw
    status = int(match.group(1))
    try:
        answer = json.loads(body)
        details = answer.get("error", "") if isinstance(answer, dict) else ""
    except ValueError:
        details = body.decode("utf-8", "replace")
    return Result(f"HTTP {status}", details if status >= 300 else "", body, seconds)


def _http_expect(*statuses):
    return frozenset(f"HTTP {status}" for status in statuses)


HTTP_OK = _http_expect(200)
HTTP_BAD = _http_expect(400)


class TailFuzzer(_Fuzzer):
    """Fuzzes `tfsplit-serve` (a `TailServer`) over gRPC and REST (see the module docstring).

    Args:
      workdir: where the child exports the tail and logs.
      max_batch_size: the server's largest batch.
      (the rest: see `TrainingFuzzer`.)
    """

    target = "tail"

    def __init__(self, workdir, max_batch_size=TAIL_MAX_BATCH, **kwargs):
        super().__init__(workdir, **kwargs)
        self.max_batch_size = max_batch_size
        self.references = []
        self.channel = None
        self._protocol = "grpc"

    def _server_args(self):
        return [f"--max_batch_size={self.max_batch_size}"]

    def _connect(self, ready):
        self.spec = ready["spec"]
        self.version_dir = ready["version_dir"]
        self.rest_port = ready["rest_port"]
        if self.channel is not None:
            self.channel.close()
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}", options)

    def _shutdown(self):
        if self.channel is not None:
            self.channel.close()

    # ------------------------------------------------------------------------- calls
    def _grpc(self, method, request, metadata=None):
        return _unary(
            self.channel,
            _PREDICTION_SERVICE + method,
            request,
            self.token,
            self.deadline_s,
            metadata,
        )

    def _http(self, raw, half_close=False):
        began = time.monotonic()
        deadline = began + self.deadline_s
        try:
            with socket.create_connection(("127.0.0.1", self.rest_port), self.deadline_s) as sock:
                try:
                    sock.sendall(raw)
                    if half_close:
                        sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the server answered before reading everything: read its answer
                answer = _read_http(sock, deadline)
        except TimeoutError:
            return Result("TIMEOUT", "", None, time.monotonic() - began)
        except OSError as error:
            return Result(
                "NO_ANSWER", f"{type(error).__name__}: {error}", None, time.monotonic() - began
            )
        return _http_result(answer, time.monotonic() - began)

    def _send(self, case):
        if case.method == "REST":
            return self._http(case.request, case.half_close)
        return self._grpc(case.method, case.request, case.metadata)

    # ------------------------------------------------------------------------- good requests
    def _arrays(self, batch=None, k=None, rng=None):
        """A good payload's four inputs, made by the codec as a device's are."""
        rng = self.rng if rng is None else rng
        s = self.spec
        batch = int(rng.integers(1, 5)) if batch is None else batch
        k = s["max_budget"] if k is None else k
        values = rng.normal(0.0, 1.0, (batch, s["height"], s["width"], k)).astype(np.float32)
        indices = rng.permutation(s["channels"])[:k]
        payload = codec.decode(codec.encode(values, indices, s["channels"], s["dtype"]))
        return dict(
            values=np.asarray(payload.values),
            indices=payload.indices.astype(np.int32),
            scale=np.float32(payload.scale),
            zero_point=np.int32(payload.zero_point),
        )

    def _predict(self, arrays, name=TAIL_MODEL, signature="serving_default"):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature
        for key, array in arrays.items():
            request.inputs[key].CopyFrom(tensors.to_tensor_proto(array))
        return request

    def _body(self, arrays, **extra):
        inputs = {key: np.asarray(array).tolist() for key, array in arrays.items()}
        return json.dumps(dict(extra, inputs=inputs), separators=(",", ":")).encode()

    def _raw(self, body=b"", method="POST", path=None, token=True, length=True, headers=()):
        """Raw HTTP/1.1 request bytes; `length` True sends the body's Content-Length, a value
        sends that value, False none."""
        path = f"/v1/models/{TAIL_MODEL}:predict" if path is None else path
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines.append("Content-Type: application/json")
        if token:
            lines.append(f"Authorization: Bearer {self.token}")
        if length is not False:
            lines.append(f"Content-Length: {len(body) if length is True else length}")
        lines.extend(headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _probabilities(self, protocol, reply):
        if protocol == "grpc":
            response = predict_pb2.PredictResponse.FromString(reply)
            return tensors.from_tensor_proto(response.outputs[serving_validation.OUTPUT_NAME])
        return device_rest.output_from_answer(json.loads(reply))

    def _verify(self, protocol, batch):
        """A check of an accepted request's answer: (batch, classes) finite probabilities."""

        def verify(reply):
            try:
                probabilities = self._probabilities(protocol, reply)
            except Exception as error:  # noqa: BLE001
                return f"the answer does not decode: {type(error).__name__}: {error}"[:300]
            if probabilities.shape != (batch, self.spec["num_classes"]):
                return f"probabilities of shape {probabilities.shape}, expected ({batch}, classes)"
            if not np.isfinite(probabilities).all():
                return "non-finite probabilities"
            if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
                return "probabilities that do not sum to 1"
            return ""

        return verify

    def _ask(self, protocol, arrays):
        """(probabilities or None, problem) of a good request."""
        if protocol == "grpc":
            result = self._grpc("Predict", self._predict(arrays))
        else:
            result = self._http(self._raw(self._body(arrays)))
        if result.code not in ("OK", "HTTP 200"):
            return None, f"{result.code}: {result.details}"
        problem = self._verify(protocol, len(arrays["values"]))(result.reply)
        return (None, problem) if problem else (self._probabilities(protocol, result.reply), "")

    def _warm(self):
        """The good requests and their answers: the served SavedModel's signature, called here
        (so a tail the server corrupts, or serves wrongly from the start, fails them)."""
        signature = tf.saved_model.load(self.version_dir).signatures[self.spec["signature"]]
        self.references = []
        for seed in range(4):
            arrays = self._arrays(batch=3, rng=np.random.default_rng(1000 + seed))
            outputs = signature(**{key: tf.constant(value) for key, value in arrays.items()})
            self.references.append((arrays, outputs[serving_validation.OUTPUT_NAME].numpy()))
            for protocol in ("grpc", "rest"):
                self._protocol = protocol
                self._good()

    def _good(self):
        """One of the good requests, over the protocol of the last message, checked."""
        arrays, expected = self.references[self.tally.good["sent"] % len(self.references)]
        self.tally.good["sent"] += 1
        got, problem = self._ask(self._protocol, arrays)
        if not problem and not np.allclose(got, expected, atol=1e-6):
            problem = f"probabilities differ from the warm-up's by {np.abs(got - expected).max()}"
        if problem:
            self.tally.good["failed"] += 1
            self.tally.finding("good_request_failed", f"after {self._last_kind}", "", problem)

    def _fuzz_one(self, name):
        case = getattr(self, f"_gen_{name}")()
        self._protocol = "rest" if case.method == "REST" else "grpc"
        self._begin(case.kind)
        result = self._send(case)
        self._check(case, result)
        verify = case.verify
        if verify is not None and result.code in ("OK", "HTTP 200") and self.server.alive():
            problem = verify(result.reply)
            if problem:
                self.tally.finding("bad_reply", case.kind, result.code, problem)
        return True

    def _generators(self):
        return [
            (name[5:], getattr(self, name).weight) for name in dir(self) if name.startswith("_gen_")
        ]

    # ------------------------------------------------------------------------- gRPC generators
    @_generator(3)
    def _gen_grpc_good(self):
        arrays = self._arrays()
        case = Case("grpc_good", "Predict", self._predict(arrays), OK)
        case.verify = self._verify("grpc", len(arrays["values"]))
        return case

    @_generator(3)
    def _gen_grpc_values_dtype(self):
        arrays = self._arrays()
        request = self._predict(arrays)
        if self.rng.random() < 0.5:
            dtype = self._pick(["float32", "float16", "int32"])
            request.inputs["values"].CopyFrom(
                tensors.to_tensor_proto(arrays["values"].astype(dtype))
            )
        else:
            enum = self._pick(
                [types_pb2.DT_STRING, types_pb2.DT_DOUBLE, types_pb2.DT_INT64, 0, 999]
            )
            request.inputs["values"].dtype = enum
        return Case("grpc_values_dtype", "Predict", request, INVALID)

    @_generator(2)
    def _gen_grpc_values_shape(self):
        s = self.spec
        arrays = self._arrays(batch=2)
        values = arrays["values"]
        shapes = [
            (2 * s["height"], s["width"], values.shape[3]),
            (2, s["height"], s["width"], values.shape[3], 1),
            (2, s["height"] + 1, s["width"], values.shape[3]),
            (2, s["height"], 1, values.shape[3]),
        ]
        shape = self._pick(shapes)
        arrays["values"] = self.rng.integers(-128, 128, shape).astype(np.int8)
        return Case("grpc_values_shape", "Predict", self._predict(arrays), INVALID)

    @_generator(2)
    def _gen_grpc_budget(self):
        s = self.spec
        k = self._pick([0, s["max_budget"] + 1, s["channels"], s["channels"] + 1])
        arrays = self._arrays(batch=2, k=min(k, s["max_budget"]) or 1)
        arrays["values"] = self.rng.integers(-128, 128, (2, s["height"], s["width"], k)).astype(
            np.int8
        )
        arrays["indices"] = (np.arange(k) % s["channels"]).astype(np.int32)
        return Case("grpc_budget", "Predict", self._predict(arrays), INVALID)

    @_generator(2)
    def _gen_grpc_batch(self):
        batch = self._pick([0, self.max_batch_size + 1, 4 * self.max_batch_size])
        arrays = self._arrays(batch=max(batch, 1))
        if batch == 0:
            arrays["values"] = arrays["values"][:0]
        return Case("grpc_batch", "Predict", self._predict(arrays), TOO_BIG)

    @_generator(3)
    def _gen_grpc_declared_huge(self):
        s = self.spec
        request = self._predict(self._arrays())
        name = self._pick(["values", "values", "indices"])
        shapes = {
            "values": [[2**31 - 1, s["height"], s["width"], s["max_budget"]],
                       [2**40, 2**40, 1, 1], [65536, 65536, s["width"], s["max_budget"]]],
            "indices": [[2**40], [2**31 - 1]],
        }[name]  # fmt: skip
        proto = request.inputs[name]
        del proto.tensor_shape.dim[:]
        for size in self._pick(shapes):
            proto.tensor_shape.dim.add(size=size)
        if self.rng.random() < 0.5:  # one typed value instead of the bytes (make_ndarray pads)
            proto.tensor_content = b""
            proto.int_val.append(1)
        return Case(f"grpc_declared_huge_{name}", "Predict", request, TOO_BIG)

    @_generator(1)
    def _gen_grpc_negative_dim(self):
        request = self._predict(self._arrays())
        request.inputs["values"].tensor_shape.dim[0].size = -1
        return Case("grpc_negative_dim", "Predict", request, INVALID)

    @_generator(2)
    def _gen_grpc_content_size(self):
        request = self._predict(self._arrays())
        proto = request.inputs[self._pick(["values", "indices", "scale"])]
        cut = int(self.rng.integers(1, 5))
        if self.rng.random() < 0.5:
            proto.tensor_content = proto.tensor_content[:-cut]
        else:
            proto.tensor_content += self.rng.bytes(cut)
        return Case("grpc_content_size", "Predict", request, INVALID)

    @_generator(2)
    def _gen_grpc_typed_fields(self):
        arrays = self._arrays(batch=1)
        request = self._predict(arrays)
        proto = request.inputs["values"]
        flat = arrays["values"].ravel().astype(int).tolist()
        what = self._pick(["short", "both", "other_field", "out_of_range"])
        if what == "short":
            proto.tensor_content = b""
            proto.int_val.extend(flat[:-1])
        elif what == "both":
            proto.int_val.extend(flat)
        elif what == "other_field":
            proto.tensor_content = b""
            proto.float_val.extend(flat)
        else:
            proto.tensor_content = b""
            proto.int_val.extend([300] * len(flat))
        return Case(f"grpc_typed_{what}", "Predict", request, INVALID)

    @_generator(1)
    def _gen_grpc_unknown_rank(self):
        request = self._predict(self._arrays())
        request.inputs["values"].tensor_shape.unknown_rank = True
        return Case("grpc_unknown_rank", "Predict", request, INVALID)

    @_generator(3)
    def _gen_grpc_indices(self):
        s = self.spec
        arrays = self._arrays()
        indices = arrays["indices"]
        what = self._pick(["range", "negative", "duplicate", "length", "rank", "int64"])
        request = self._predict(arrays)
        if what == "range":
            indices[0] = self._pick([s["channels"], 1000, 2**31 - 1])
        elif what == "negative":
            indices[0] = self._pick([-1, -(2**31)])
        elif what == "duplicate":
            indices[1] = indices[0]
        elif what == "length":
            indices = indices[: int(self.rng.integers(len(indices)))]
        elif what == "rank":
            indices = indices[None]
        if what == "int64":
            request.inputs["indices"].dtype = types_pb2.DT_INT64
        else:
            request.inputs["indices"].CopyFrom(tensors.to_tensor_proto(indices))
        return Case(f"grpc_indices_{what}", "Predict", request, INVALID)

    @_generator(2)
    def _gen_grpc_scale(self):
        arrays = self._arrays()
        if self.rng.random() < 0.8:
            arrays["scale"] = np.float32(self._pick([np.nan, np.inf, -np.inf, 0.0, -1.0]))
        else:
            arrays["scale"] = np.asarray([arrays["scale"]], np.float32)
        return Case("grpc_scale", "Predict", self._predict(arrays), INVALID)

    @_generator(1)
    def _gen_grpc_zero_point(self):
        arrays = self._arrays()
        arrays["zero_point"] = np.int32(self._pick([128, -129, 2**31 - 1, -(2**31)]))
        return Case("grpc_zero_point", "Predict", self._predict(arrays), INVALID)

    @_generator(2)
    def _gen_grpc_inputs(self):
        arrays = self._arrays()
        what = self._pick(["missing", "extra", "none"])
        if what == "missing":
            del arrays[self._pick(list(arrays))]
        elif what == "extra":
            arrays["labels"] = np.zeros(2, np.int32)
        else:
            arrays = {}
        return Case(f"grpc_inputs_{what}", "Predict", self._predict(arrays), INVALID)

    @_generator(2)
    def _gen_grpc_target(self):
        request = self._predict(self._arrays())
        what = self._pick(["name", "long_name", "version", "label", "signature", "long_signature"])
        if what == "name":
            request.model_spec.name = self._pick(["", "tail2", "../tail"])
        elif what == "long_name":
            request.model_spec.name = "t" * 100_000
        elif what == "version":
            request.model_spec.version.value = self._pick([0, 2, -1, 2**63 - 1])
        elif what == "label":
            request.model_spec.version_label = "stable"
        elif what == "signature":
            request.model_spec.signature_name = "other"
        else:
            request.model_spec.signature_name = "s" * 100_000
        return Case(f"grpc_target_{what}", "Predict", request, NOT_FOUND | INVALID)

    @_generator(1)
    def _gen_grpc_output_filter(self):
        request = self._predict(self._arrays())
        request.output_filter.extend([self._pick(["logits", "", "o" * 10_000])])
        return Case("grpc_output_filter", "Predict", request, INVALID)

    @_generator(2)
    def _gen_grpc_raw_bytes(self):
        method = self._pick(["Predict", "GetModelMetadata"])
        data = self.rng.bytes(int(self.rng.integers(1, 2000)))
        return Case(f"grpc_raw_bytes_{method}", method, data, INVALID | NOT_FOUND)

    @_generator(3)
    def _gen_grpc_bitflip(self):
        message = _bitflipped(self.rng, self._predict(self._arrays()).SerializeToString())
        return Case("grpc_bitflip", "Predict", bytes(message), OK | INVALID | NOT_FOUND)

    @_generator(2)
    def _gen_grpc_token(self):
        metadata = _pick_bad_token(self.rng, self.token)
        expect = _token_expect(metadata)
        if self.rng.random() < 0.5:
            request = self._predict(self._arrays())
            return Case("grpc_token_Predict", "Predict", request, expect, metadata)
        request = self._metadata_request()
        return Case("grpc_token_metadata", "GetModelMetadata", request, expect, metadata)

    def _metadata_request(self, fields=("signature_def",), name=TAIL_MODEL):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
        request.model_spec.name = name
        return request

    @_generator(1)
    def _gen_grpc_metadata(self):
        what = self._pick(["good", "fields", "name"])
        if what == "good":
            return Case("grpc_metadata_good", "GetModelMetadata", self._metadata_request(), OK)
        if what == "fields":
            fields = [[], ["x"], ["signature_def", "x"], ["f" * 10_000]][self.rng.integers(4)]
            return Case(
                "grpc_metadata_fields", "GetModelMetadata", self._metadata_request(fields), INVALID
            )
        request = self._metadata_request(name="tail2")
        return Case("grpc_metadata_name", "GetModelMetadata", request, NOT_FOUND)

    @_generator(1)
    def _gen_grpc_unimplemented(self):
        method = self._pick(["Classify", "Regress", "MultiInference"])
        return Case(f"grpc_{method}", method, b"", frozenset({"UNIMPLEMENTED"}))

    # ------------------------------------------------------------------------- REST generators
    def _rest(self, kind, raw, expect, half_close=False):
        return Case(kind, "REST", raw, expect, half_close=half_close)

    @_generator(3)
    def _gen_rest_good(self):
        arrays = self._arrays()
        case = self._rest("rest_good", self._raw(self._body(arrays)), HTTP_OK)
        case.verify = self._verify("rest", len(arrays["values"]))
        return case

    @_generator(1)
    def _gen_rest_good_rows(self):
        arrays = self._arrays()
        shared = {
            key: np.asarray(arrays[key]).tolist() for key in ("indices", "scale", "zero_point")
        }
        rows = [dict(shared, values=row.tolist()) for row in arrays["values"]]
        body = json.dumps({"instances": rows}).encode()
        return self._rest("rest_good_rows", self._raw(body), HTTP_OK)

    @_generator(3)
    def _gen_rest_json_malformed(self):
        body = self._body(self._arrays())
        choices = [
            body[: self.rng.integers(1, len(body))],
            self.rng.bytes(int(self.rng.integers(1, 500))),
            b"",
            b"{",
            b'{"inputs": {"values": "\xff\xfe"}}',
            body.replace(b",", b";", 1),
        ]
        return self._rest("rest_json_malformed", self._raw(self._pick(choices)), HTTP_BAD)

    @_generator(1)
    def _gen_rest_json_deep(self):
        depth = self._pick([1000, 100_000])
        body = b'{"inputs": {"values": ' + b"[" * depth + b"]" * depth + b"}}"
        return self._rest("rest_json_deep", self._raw(body), HTTP_BAD)

    @_generator(3)
    def _gen_rest_values(self):
        body = self._body(self._arrays(batch=1))
        tokens = [b"NaN", b"Infinity", b"1e999", b'"1"', b"true", b"null", b"{}", b"1.5", b"300"]
        token = self._pick(tokens)
        # The first number of `values` becomes the token.
        body = re.sub(rb'("values":\[+)(-?\d+)', lambda m: m.group(1) + token, body, count=1)
        return self._rest("rest_values", self._raw(body), HTTP_BAD)

    @_generator(2)
    def _gen_rest_shapes(self):
        s = self.spec
        what = self._pick(["spatial", "budget", "batch", "empty", "rank"])
        arrays = self._arrays(batch=2)
        if what == "spatial":
            arrays["values"] = arrays["values"][:, 1:]
        elif what == "budget":
            k = s["max_budget"] + 1
            arrays["values"] = np.zeros((2, s["height"], s["width"], k), np.int8)
            arrays["indices"] = np.arange(k, dtype=np.int32)
        elif what == "batch":
            arrays = self._arrays(batch=self.max_batch_size + 1)
        elif what == "empty":
            arrays["values"] = arrays["values"][:0]
        else:
            arrays["values"] = arrays["values"][0]
        return self._rest(f"rest_shapes_{what}", self._raw(self._body(arrays)), HTTP_BAD)

    @_generator(2)
    def _gen_rest_indices(self):
        arrays = self._arrays()
        inputs = {key: np.asarray(value).tolist() for key, value in arrays.items()}
        what = self._pick(["range", "duplicate", "float", "huge", "negative", "length"])
        indices = inputs["indices"]
        if what == "range":
            indices[0] = self.spec["channels"]
        elif what == "duplicate":
            indices[1] = indices[0]
        elif what == "float":
            indices[0] = 1.5
        elif what == "huge":
            indices[0] = 2**70
        elif what == "negative":
            indices[0] = -1
        else:
            inputs["indices"] = indices[:-1]
        body = json.dumps({"inputs": inputs}).encode()
        return self._rest(f"rest_indices_{what}", self._raw(body), HTTP_BAD)

    @_generator(2)
    def _gen_rest_quantization(self):
        arrays = self._arrays()
        inputs = {key: np.asarray(value).tolist() for key, value in arrays.items()}
        key, value = [
            ("scale", float("nan")), ("scale", 0), ("scale", -1), ("scale", "1"), ("scale", [1.0]),
            ("zero_point", 300), ("zero_point", 1.5), ("zero_point", None),
        ][self.rng.integers(8)]  # fmt: skip
        inputs[key] = value
        body = json.dumps({"inputs": inputs}).encode()  # NaN is written as the literal NaN
        return self._rest(f"rest_{key}", self._raw(body), HTTP_BAD)

    @_generator(2)
    def _gen_rest_keys(self):
        good = json.loads(self._body(self._arrays()))
        inputs = good["inputs"]
        bodies = [
            {},
            {"inputs": inputs, "instances": [inputs]},
            {"inputs": inputs, "extra": 1},
            {"inputs": [inputs]},
            {"inputs": {k: v for k, v in inputs.items() if k != "scale"}},
            {"inputs": dict(inputs, labels=[1])},
            {"inputs": inputs, "signature_name": 5},
            {"inputs": inputs, "signature_name": "other"},
        ]
        body = json.dumps(self._pick(bodies)).encode()
        return self._rest("rest_keys", self._raw(body), HTTP_BAD | _http_expect(404))

    @_generator(1)
    def _gen_rest_rows_bad(self):
        arrays = self._arrays()
        shared = {
            key: np.asarray(arrays[key]).tolist() for key in ("indices", "scale", "zero_point")
        }
        rows = [dict(shared, values=row.tolist()) for row in arrays["values"]]
        what = self._pick(["empty", "mismatch", "many", "not_objects"])
        if what == "empty":
            rows = []
        elif what == "mismatch":
            rows = rows + [dict(rows[0], indices=rows[0]["indices"][::-1])]
        elif what == "many":
            rows = rows[:1] * (self.max_batch_size + 1)
        else:
            rows = [1, 2]
        return self._rest(
            f"rest_rows_{what}", self._raw(json.dumps({"instances": rows}).encode()), HTTP_BAD
        )

    @_generator(1)
    def _gen_rest_not_object(self):
        body = [b"[]", b"1", b'"x"', b"null"][self.rng.integers(4)]
        return self._rest("rest_not_object", self._raw(body), HTTP_BAD)

    @_generator(2)
    def _gen_rest_route(self):
        body = self._body(self._arrays())
        routes = [
            ("POST", "/v1/models/tail2:predict", _http_expect(404)),
            ("POST", f"/v1/models/{TAIL_MODEL}/versions/9:predict", _http_expect(404)),
            ("POST", f"/v1/models/{TAIL_MODEL}/labels/x:predict", _http_expect(404)),
            ("POST", f"/v2/models/{TAIL_MODEL}:predict", _http_expect(404)),
            ("POST", f"/v1/models/{TAIL_MODEL}:classify", _http_expect(404)),
            ("POST", "/" + "p" * 100_000, _http_expect(404, 414)),
            ("GET", f"/v1/models/{TAIL_MODEL}:predict", _http_expect(405)),
            ("POST", f"/v1/models/{TAIL_MODEL}", _http_expect(405)),
            ("GET", f"/v1/models/{TAIL_MODEL}/versions/99999999999999999999999", _http_expect(404)),
        ]
        method, path, expect = self._pick(routes)
        return self._rest("rest_route", self._raw(body, method=method, path=path), expect)

    @_generator(1)
    def _gen_rest_method(self):
        method = self._pick(["PUT", "DELETE", "PATCH", "FOO"])
        # HTTP's own answer to a method no route takes: 405, or 501 for one it does not know.
        return self._rest(
            f"rest_method_{method}", self._raw(b"{}", method=method), _http_expect(405, 501)
        )

    @_generator(3)
    def _gen_rest_token(self):
        body = self._body(self._arrays())
        headers = [
            (),
            ("Authorization: Bearer wrong",),
            (f"Authorization: {self.token}",),
            (f"Authorization: Basic {self.token}",),
            (f"Authorization: Bearer {self.token}x",),
            ("Authorization: Bearer " + "A" * 100_000,),
        ][self.rng.integers(6)]
        expect = (
            _http_expect(401, 431)
            if len(headers) and len(headers[0]) > 65536
            else _http_expect(401)
        )
        return self._rest("rest_token", self._raw(body, token=False, headers=headers), expect)

    @_generator(3)
    def _gen_rest_content_length(self):
        body = self._body(self._arrays())
        what = self._pick(["missing", "text", "negative", "longer", "shorter", "huge", "chunked"])
        if what == "missing":
            return self._rest(
                "rest_length_missing", self._raw(body, length=False), _http_expect(411)
            )
        if what == "chunked":
            raw = self._raw(b"", length=False, headers=("Transfer-Encoding: chunked",))
            chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            return self._rest("rest_length_chunked", raw + chunked, _http_expect(411))
        length = {
            "text": "abc",
            "negative": "-5",
            "longer": len(body) + int(self.rng.integers(1, 1000)),
            "shorter": len(body) - int(self.rng.integers(1, 20)),
            "huge": 10**12,
        }[what]
        expect = _http_expect(413) if what == "huge" else HTTP_BAD
        raw = self._raw(body, length=length)
        return self._rest(f"rest_length_{what}", raw, expect, half_close=what == "longer")

    @_generator(1)
    def _gen_rest_unauthenticated_body(self):
        if self.rng.random() < 0.5:
            raw = self._raw(self.rng.bytes(1 << 20), token=False)
            return self._rest("rest_unauthenticated_body", raw, _http_expect(401))
        raw = self._raw(b"", token=False, length=10**12)
        return self._rest(
            "rest_unauthenticated_huge_length", raw, _http_expect(401, 413), half_close=True
        )

    @_generator(1)
    def _gen_rest_garbage(self):
        raws = [
            (b"GARBAGE\r\n\r\n", HTTP_BAD),
            (b"GET / HTTP/2.0\r\n\r\n", _http_expect(505)),  # HTTP's own answer
            (
                self.rng.bytes(200).replace(b"\r\n", b"") + b"\r\n\r\n",
                HTTP_BAD | frozenset({"NO_ANSWER"}),
            ),
            (
                b"POST /v1/models/tail:predict HTTP/1.1\r\nno colon here\r\n\r\n",
                HTTP_BAD | _http_expect(401),
            ),
        ]
        raw, expect = self._pick(raws)
        return self._rest("rest_garbage", raw, expect)


# ------------------------------------------------------------------------------ the program


def fuzz(target, messages, seed=0, workdir=None, time_limit_s=None, **options):
    """Fuzzes `target` ("training" or "tail") with `messages` messages; returns the summary."""
    fuzzer_class = {"training": TrainingFuzzer, "tail": TailFuzzer}[target]
    if workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-")
    else:
        scratch = contextlib.nullcontext(workdir)
    with scratch as directory:
        fuzzer = fuzzer_class(directory, seed=seed, **options)
        return fuzzer.run(messages, time_limit_s=time_limit_s)


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("training", "tail"), default="training")
    parser.add_argument("--messages", type=int, default=1000, help="fuzzed messages to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="kept; default: a temporary directory")
    parser.add_argument("--good_every", type=int, default=1, help="a good request every N")
    parser.add_argument("--deadline_s", type=float, default=10.0, help="each call's deadline")
    parser.add_argument("--time_limit_s", type=float, default=None, help="stop sending after")
    parser.add_argument("--no_check_tail", action="store_true", help="training: skip the check")
    parser.add_argument(
        "--identity",
        choices=("devices", "shared"),
        default="devices",
        help="training: per-device tokens, or one shared token",
    )
    parser.add_argument(
        "--no_warm_up",
        action="store_true",
        help="training: the server without its warm-up (tfsplit-train-server --nowarm_up)",
    )
    parser.add_argument("--out", default=None, help="also write the summary there")
    parser.add_argument(
        "--mmap_threshold",
        type=int,
        default=None,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the server (e.g. 131072): a leak still climbs, "
        "the allocator's retention of freed request buffers does not",
    )
    # The child's side (started by the fuzzer).
    parser.add_argument("--serve", choices=("training", "tail"), help=argparse.SUPPRESS)
    parser.add_argument("--sequential", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max_batch_size", type=int, default=TAIL_MAX_BATCH, help=argparse.SUPPRESS
    )
    parser.add_argument("--max_devices", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--average_timeout_s", type=float, default=5.0, help=argparse.SUPPRESS)
    return parser


def report(summary, out=None):
    """Prints `summary` as JSON (also into `out`); the exit status: 1 when it has problems."""
    text = json.dumps(summary, indent=2)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 1 if summary["problems"] else 0


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.serve == "training":
        serve_training(
            args.workdir,
            args.sequential,
            args.parallel,
            args.identity,
            not args.no_warm_up,
            args.max_devices,
            args.average_timeout_s,
        )
        return 0
    if args.serve == "tail":
        serve_tail(args.workdir, args.max_batch_size)
        return 0
    options = dict(
        good_every=args.good_every, deadline_s=args.deadline_s, mmap_threshold=args.mmap_threshold
    )
    if args.target == "training":
        options.update(
            check_tail=not args.no_check_tail,
            identity=args.identity,
            warm_up=not args.no_warm_up,
        )
    summary = fuzz(
        args.target, args.messages, args.seed, args.workdir, args.time_limit_s, **options
    )
    return report(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
