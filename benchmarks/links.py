"""Emulated network links for benchmarks: a rate, a round-trip time, and where they come from.

`emulate(link)` gives a server and a device a link between them. As root, where network
namespaces are permitted, each gets its own namespace, joined by a veth pair whose both ends
are shaped by the kernel (`tc ... tbf`); the delay comes from `netem` where the kernel has it,
else from a `DelayProxy` inside the device's namespace. Elsewhere the proxy on loopback does the
rate (a token bucket) and the delay, and the link says so in `shaping`.

`TokenBucket` is the one rate shaper of the project (`local_s3.FaultProxy` uses it too).
"""

import contextlib
import dataclasses
import queue
import re
import socket
import threading
import time

from absl import logging

from benchmarks.namespaces import (
    NamespacesUnavailable,
    check_nonnegative,
    check_rate,
    enter_namespace,
    network_namespaces,
)

_RECV_BYTES = 65536

SHAPING_NETEM = "tc tbf + netem (netns)"
SHAPING_TBF_PROXY = "tc tbf + proxy delay (netns)"
SHAPING_PROXY = "proxy token bucket + delay (loopback)"


@dataclasses.dataclass(frozen=True)
class Link:
    """A link to emulate: its name, its rate each way in Mbit/s and its round-trip time in ms."""

    name: str
    rate_mbit: float
    rtt_ms: float

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[\w.-]+", self.name):
            raise ValueError(f"A link's name must be letters, digits, _.-. Received: {self.name!r}")
        check_rate("rate_mbit", self.rate_mbit)
        check_nonnegative("rtt_ms", self.rtt_ms)


DEFAULT_LINKS = {
    "wifi": Link("wifi", 100.0, 5.0),
    "4g": Link("4g", 10.0, 40.0),
    "poor": Link("poor", 2.0, 100.0),
}


def parse_link(spec):
    """A `Link` from a name in DEFAULT_LINKS or "name=rate_mbit/rtt_ms" (e.g. "dsl=16/30")."""
    if spec in DEFAULT_LINKS:
        return DEFAULT_LINKS[spec]
    match = re.fullmatch(r"\s*([^=\s]+)\s*=\s*([^/\s]+)\s*/\s*(\S+)\s*", str(spec))
    if not match:
        raise ValueError(
            f"A link is one of {sorted(DEFAULT_LINKS)} or 'name=rate_mbit/rtt_ms' "
            f"(e.g. 'dsl=16/30'). Received: {spec!r}"
        )
    name, rate, rtt = match.groups()
    try:
        rate, rtt = float(rate), float(rtt)
    except ValueError:
        raise ValueError(f"Link {spec!r}: rate and RTT must be numbers.") from None
    return Link(name, rate, rtt)


class TokenBucket:
    """A link's serialisation: bytes leave at `rate_mbit`, after a burst of up to `burst_bytes`.

    Shared by every connection that uses the link, so they compete for it as on a real one.
    `reserve` says when bytes handed over now have left (without waiting); `wait` sleeps until
    then. With burst 0 the link sends back to back and never faster than its rate.

    Args:
      rate_mbit: the rate in Mbit/s (> 0).
      burst_bytes: tokens an idle link saves up (>= 0).
    """

    def __init__(self, rate_mbit, burst_bytes=0):
        check_rate("rate_mbit", rate_mbit)
        check_nonnegative("burst_bytes", burst_bytes)
        self.rate_mbit = rate_mbit
        self.bytes_per_s = rate_mbit * 1e6 / 8
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, num_bytes):
        """The `time.monotonic()` at which `num_bytes` handed to the link now have left it."""
        with self._lock:
            now = time.monotonic()
            refill = (now - self._updated) * self.bytes_per_s
            self._tokens = min(self.burst_bytes, self._tokens + refill) - num_bytes
            self._updated = now
            return now + max(0.0, -self._tokens) / self.bytes_per_s

    def wait(self, num_bytes):
        """Blocks until `num_bytes` handed to the link now have left it."""
        time.sleep(max(0.0, self.reserve(num_bytes) - time.monotonic()))


class DelayProxy:
    """A threaded TCP proxy that delays each direction by a fixed time, optionally rate-limited.

    Bytes read at time t are written at t + `one_way_delay_s` (after the token bucket has sent
    them, when `rate_mbit` is set): reading goes on while earlier bytes wait, so a connection is
    never serialised by the delay, and bytes keep their order. Each direction has its own bucket,
    shared by all connections. Threads are daemons and stop on `close()`.

    Args:
      upstream: (host, port) to forward to.
      one_way_delay_s: delay added in each direction (the RTT is twice this, plus the path's own).
      rate_mbit: the rate of each direction in Mbit/s; None: as fast as the path goes.
      netns: network namespace to listen and connect in (by name; None: this process's).
      listen_host: the address to listen on (a free port is picked).
    """

    def __init__(
        self, upstream, one_way_delay_s=0.0, rate_mbit=None, netns=None, listen_host="127.0.0.1"
    ):
        if not (
            isinstance(upstream, tuple) and len(upstream) == 2 and isinstance(upstream[1], int)
        ):
            raise ValueError(f"`upstream` must be (host, port). Received: {upstream!r}")
        check_nonnegative("one_way_delay_s", one_way_delay_s)
        check_rate("rate_mbit", rate_mbit, allow_none=True)
        self.upstream, self.delay_s, self.netns = upstream, float(one_way_delay_s), netns
        # Small reads on a slow link: a read is delivered whole, so it should take ~10 ms to send.
        self._recv_bytes = _RECV_BYTES
        self._buckets = (None, None)
        if rate_mbit is not None:
            self._buckets = (TokenBucket(rate_mbit), TokenBucket(rate_mbit))
            self._recv_bytes = int(min(_RECV_BYTES, max(1460, rate_mbit * 1e6 / 8 / 100)))
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets = set()
        self._listening = queue.Queue()
        self._thread = threading.Thread(target=self._accept_loop, args=(listen_host,), daemon=True)
        self._thread.start()
        listener = self._listening.get(timeout=10)
        if isinstance(listener, BaseException):
            raise listener
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        self.address = f"{self.host}:{self.port}"

    def _accept_loop(self, listen_host):
        try:
            if self.netns:
                enter_namespace(self.netns)  # Sockets made here live there.
            listener = socket.create_server((listen_host, 0))
            listener.settimeout(0.05)
        except OSError as error:
            self._listening.put(error)
            return
        self._listening.put(listener)
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError as error:
                logging.warning("DelayProxy: cannot reach %s: %s", self.upstream, error)
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, server))
            done = threading.Barrier(2, action=lambda c=client, s=server: self._release(c, s))
            for source, target, bucket in ((client, server, 0), (server, client, 1)):
                chunks = queue.SimpleQueue()
                args = (source, chunks, self._buckets[bucket])
                threading.Thread(target=self._read, args=args, daemon=True).start()
                args = (chunks, target, (source, target), done)
                threading.Thread(target=self._write, args=args, daemon=True).start()

    def _read(self, source, chunks, bucket):
        """Reads one direction; queues each read with the time it is due at the other end."""
        try:
            while True:
                data = source.recv(self._recv_bytes)
                if not data:
                    break
                sent = time.monotonic()
                if bucket is not None:
                    sent = bucket.reserve(len(data))
                    time.sleep(max(0.0, sent - time.monotonic()))  # The link is busy until then.
                chunks.put((sent + self.delay_s, data))
        except OSError:
            pass
        chunks.put((time.monotonic() + self.delay_s, None))  # End of stream, after the rest.

    def _write(self, chunks, target, pair, done):
        """Writes each queued read at its due time; passes the end of stream on as a half-close."""
        try:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if data is None:
                    target.shutdown(socket.SHUT_WR)
                    break
                target.sendall(data)
        except OSError:
            for sock in pair:  # Wakes the other direction's reader too.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()

    def _release(self, *sockets):
        with self._lock:
            self._sockets.difference_update(sockets)
        for sock in sockets:
            sock.close()

    def close(self):
        self._closed.set()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@dataclasses.dataclass
class EmulatedLink:
    """Where a server and a device run and how they reach each other over an emulated link.

    `server_command(argv)` and `device_command(argv)` wrap a command to run on each side; the
    server listens on `server_host`; `reach(port)` gives the address the device dials. `shaping`
    says what shapes the link; `note` why, where it fell back.
    """

    link: Link
    shaping: str
    server_host: str
    note: str = ""
    server_netns: str = None
    device_netns: str = None
    proxy_rate_mbit: float = None
    proxy_delay_s: float = 0.0

    def server_command(self, argv):
        return _in_namespace(self.server_netns, argv)

    def device_command(self, argv):
        return _in_namespace(self.device_netns, argv)

    @contextlib.contextmanager
    def reach(self, port):
        """Yields the "host:port" the device dials for a server on `port` (a delaying proxy's,
        closed when the block ends, where the link needs one)."""
        if not self.proxy_delay_s and self.proxy_rate_mbit is None:
            yield f"{self.server_host}:{port}"
            return
        with DelayProxy(
            (self.server_host, port),
            self.proxy_delay_s,
            rate_mbit=self.proxy_rate_mbit,
            netns=self.device_netns,
        ) as proxy:
            yield proxy.address


def _in_namespace(netns, argv):
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


@contextlib.contextmanager
def emulate(link, namespaces=True):
    """Yields an `EmulatedLink` for `link`; everything it made is removed on exit.

    Args:
      link: the `Link`.
      namespaces: try network namespaces and tc first; False goes straight to the proxy.
    """
    if not isinstance(link, Link):
        raise ValueError(f"`link` must be a Link. Received: {link!r}")
    one_way_s = link.rtt_ms / 2000
    with contextlib.ExitStack() as stack:
        pair, note = None, "namespaces not requested"
        if namespaces:
            try:
                pair = stack.enter_context(network_namespaces(link.rate_mbit, link.rtt_ms))
            except NamespacesUnavailable as error:
                note = f"namespaces not permitted: {error}"
                logging.warning("%s; shaping %s in a proxy on loopback.", note, link.name)
        if pair is None:
            emulated = EmulatedLink(
                link, SHAPING_PROXY, "127.0.0.1", note, None, None, link.rate_mbit, one_way_s
            )
        else:
            emulated = EmulatedLink(
                link,
                SHAPING_NETEM if pair.netem else SHAPING_TBF_PROXY,
                pair.server_address,
                "" if pair.netem else "no netem in this kernel: a proxy adds the delay",
                pair.server,
                pair.device,
                None,
                0.0 if pair.netem else one_way_s,
            )
        yield emulated
