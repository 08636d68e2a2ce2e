"""A local S3-compatible server (moto, in its own process) and a TCP link that fails on cue.

The benchmark and the tests run object storage for real on 127.0.0.1: `MotoServer` starts
`python -m moto.server`, so every byte goes through botocore, urllib3 and sockets as it would
against AWS or MinIO. `FaultProxy` sits between client and server: it can take the "network"
down for a while, break one download after N bytes, or shape the link to a rate (an emulated
slow link for the benchmark).
"""

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from benchmarks.links import TokenBucket

_START_TIMEOUT_S = 20.0
_RANGE_HEADER = re.compile(rb"(?im)^range:\s*bytes=(\d+)-")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on a free port of 127.0.0.1, started and waited for.

    Use as a context manager (or call `stop`): the process never outlives the test session. Its
    output goes to a temporary file (a pipe could fill and block it) and is shown if it fails.

    Args:
      start_timeout_s: how long to wait for the server to answer HTTP before failing.
    """

    def __init__(self, start_timeout_s=_START_TIMEOUT_S):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait(start_timeout_s)
        except BaseException:
            self.kill()
            raise

    def _wait(self, timeout_s):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {self._process.returncode} before answering at "
                    f"{self.endpoint}:\n{self.output()}"
                )
            try:
                opener.open(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # An HTTP error is an answer too.
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not answer at {self.endpoint} within {timeout_s} s:\n"
                        f"{self.output()}"
                    ) from None
                time.sleep(0.1)

    @property
    def alive(self):
        return self._process.poll() is None

    def output(self, tail_bytes=4000):
        """The last `tail_bytes` of the server's stdout and stderr."""
        with contextlib.suppress(ValueError, OSError):
            self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, self._log.tell() - tail_bytes))
            return self._log.read().decode("utf-8", "replace")
        return ""

    def kill(self):
        """SIGKILL: the server vanishes mid-whatever, as a crashed one would."""
        if self.alive:
            self._process.kill()
        self._process.wait(timeout=10)

    def stop(self):
        if self.alive:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


# AWS settings that would point boto3 elsewhere than the local server (a profile, a proxy...).
_FOREIGN_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


def client_environment(endpoint):
    """(variables to set, variables to remove) that point boto3 at the local server `endpoint`
    through the standard AWS settings alone, keeping the user's own ~/.aws files and profile
    out."""
    missing = os.path.join(tempfile.gettempdir(), "tfsplit-no-aws-config")
    no_proxy = "127.0.0.1,localhost"
    settings = dict(
        AWS_CONFIG_FILE=missing,
        AWS_SHARED_CREDENTIALS_FILE=missing,
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",  # No credential probes off the box.
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
    )
    return settings, _FOREIGN_AWS_VARIABLES


def _reset(sock):
    """Closes `sock` with a TCP reset, waking any thread blocked in recv on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of `upstream_port`, failing on cue.

    Pass-through by default. `down()` resets every open connection and every new one until
    `up()` (`down_for(seconds)` does both); `drop_after(n)` forwards the next n bytes coming
    back from the server and then cuts that connection (a clean close mid-response), once.
    It counts `refused` and `dropped` connections and records the start of every Range header
    the client sends in `ranges`. All threads are daemons and stop on `close()`.

    Args:
      upstream_port: the server's port on 127.0.0.1.
      rate_mbit: shape the server-to-client direction to this many Mbit/s over all connections
        together (a `links.TokenBucket`; None = as fast as loopback goes).
    """

    def __init__(self, upstream_port, rate_mbit=None):
        if rate_mbit is not None and not (isinstance(rate_mbit, (int, float)) and rate_mbit > 0):
            raise ValueError(f"`rate_mbit` must be a number > 0 or None. Received: {rate_mbit!r}")
        self._bucket = None if rate_mbit is None else TokenBucket(rate_mbit)
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._connections = set()
        self._timers = []
        self._is_down = False
        self._drop_budget = None
        self._closed = threading.Event()
        self.refused = 0
        self.dropped = 0
        self.ranges = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def down(self):
        with self._lock:
            self._is_down = True
            connections, self._connections = list(self._connections), set()
        for sock in connections:
            _reset(sock)

    def up(self):
        with self._lock:
            self._is_down = False

    def down_for(self, seconds):
        """Down now, up again after `seconds` (from a daemon timer)."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def drop_after(self, n_bytes):
        """Cuts the connection that carries the next `n_bytes` from the server, after them."""
        with self._lock:
            self._drop_budget = n_bytes

    def _accept_loop(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                refuse = self._is_down or self._closed.is_set()
                self.refused += refuse
            if refuse:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self._upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._connections.update((client, server))
            for source, target, downstream in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, target, downstream), daemon=True
                ).start()

    def _pump(self, source, target, downstream):
        """Copies one direction until either side closes; then closes both."""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                cut = False
                with self._lock:
                    if downstream and self._drop_budget is not None:
                        if len(data) >= self._drop_budget:
                            data, cut = data[: self._drop_budget], True
                            self._drop_budget = None
                            self.dropped += 1
                        else:
                            self._drop_budget -= len(data)
                    if not downstream:
                        self.ranges.extend(int(m) for m in _RANGE_HEADER.findall(data))
                if downstream and self._bucket is not None:
                    self._bucket.wait(len(data))  # Shared by every connection.
                target.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.difference_update((source, target))
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self):
        self._closed.set()
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self.down()
        self._listener.close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
