"""Network namespaces for emulated links: two of them joined by a veth pair shaped with `tc`.

`network_namespaces` makes and always removes them; `enter_namespace` moves one thread into one
(the delaying proxy listens and connects from there). Needs root and `ip`/`tc`; where they are
missing it raises `NamespacesUnavailable`, and `benchmarks.links` falls back to a loopback proxy.
"""

import contextlib
import ctypes
import dataclasses
import itertools
import os
import subprocess

from absl import logging

SUBNET = "10.200.0"  # Inside the run's own namespaces, so concurrent runs never collide.
SERVER_ADDRESS, DEVICE_ADDRESS = f"{SUBNET}.1", f"{SUBNET}.2"
_VETH = "veth0"
_TBF_LATENCY_MS = 400  # How long a packet may wait in the shaper's queue before it is dropped.
_CLONE_NEWNET = 0x40000000
_IP_TIMEOUT_S = 30
_names = itertools.count()


def check_rate(name, value, allow_none=False):
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        hint = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a number > 0{hint}. Received: {name}={value!r}")


def check_nonnegative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")


def enter_namespace(name):
    """Moves the calling thread (only it) into network namespace `name` (see setns(2))."""
    fd = os.open(os.path.join("/var/run/netns", name), os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {name}: {os.strerror(error)}")
    finally:
        os.close(fd)


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, or not permitted)."""


def _run(*command):
    """Runs `command` (ip, tc); raises RuntimeError with its stderr on failure."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result.stdout


@dataclasses.dataclass
class NamespacePair:
    """Two network namespaces joined by a shaped veth pair (see `network_namespaces`)."""

    server: str
    device: str
    server_address: str
    device_address: str
    netem: bool  # The kernel adds the delay; else a proxy must.


def _add_namespace(name):
    if os.geteuid() != 0:
        raise NamespacesUnavailable("network namespaces need root")
    try:
        _run("ip", "netns", "add", name)
    except (OSError, RuntimeError) as error:
        raise NamespacesUnavailable(str(error)) from None


def _shape(netns, rate_mbit, one_way_delay_ms):
    """tbf at `rate_mbit` on the veth's egress, netem's delay under it if the kernel has netem;
    returns whether it has."""
    bytes_per_s = rate_mbit * 1e6 / 8
    burst = int(max(4 * 1514, bytes_per_s / 100))  # 10 ms of data, at least a few packets.
    tbf = f"rate {rate_mbit:g}mbit burst {burst} latency {_TBF_LATENCY_MS}ms".split()
    _run("tc", "-n", netns, "qdisc", "add", "dev", _VETH, "root", "handle", "1:", "tbf", *tbf)
    if not one_way_delay_ms:
        return True
    try:
        netem = f"netem delay {one_way_delay_ms:g}ms limit 100000".split()
        _run(
            "tc",
            "-n",
            netns,
            "qdisc",
            "add",
            "dev",
            _VETH,
            "parent",
            "1:1",
            "handle",
            "10:",
            *netem,
        )
        return True
    except RuntimeError as error:  # "Specified qdisc kind is unknown": no sch_netem.
        logging.info("No netem in this kernel (%s); a proxy adds the delay.", error)
        return False


@contextlib.contextmanager
def network_namespaces(rate_mbit, rtt_ms, prefix="tfsplit"):
    """Yields a `NamespacePair`: a server and a device namespace, a veth pair between them.

    Both veth ends are shaped to `rate_mbit` (`tc tbf`), so each direction has the rate; each
    gets half of `rtt_ms` from netem where the kernel has it (`NamespacePair.netem`). The
    namespaces are deleted on exit, whatever ended the block (an error, KeyboardInterrupt).

    Raises:
      ValueError: a bad rate or RTT.
      NamespacesUnavailable: not root, no `ip`, or `ip netns add` refused.
      RuntimeError: a later `ip` or `tc` command failed (the namespaces are removed first).
    """
    check_rate("rate_mbit", rate_mbit)
    check_nonnegative("rtt_ms", rtt_ms)
    base = f"{prefix}-{os.getpid()}-{next(_names)}"
    server, device = f"{base}-server", f"{base}-device"
    _add_namespace(server)
    made = [server]
    try:
        _add_namespace(device)
        made.append(device)
        veth = ["ip", "link", "add", _VETH, "netns", server, "type", "veth"]
        _run(*veth, "peer", "name", _VETH, "netns", device)
        netem = True
        for netns, address in ((server, SERVER_ADDRESS), (device, DEVICE_ADDRESS)):
            _run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", _VETH)
            _run("ip", "-n", netns, "link", "set", _VETH, "up")
            _run("ip", "-n", netns, "link", "set", "lo", "up")
            netem = _shape(netns, rate_mbit, rtt_ms / 2) and netem
        logging.info(
            "Namespaces %s and %s: %g Mbit/s, %g ms RTT.", server, device, rate_mbit, rtt_ms
        )
        yield NamespacePair(server, device, SERVER_ADDRESS, DEVICE_ADDRESS, netem)
    finally:
        for netns in reversed(made):
            try:
                _run("ip", "netns", "del", netns)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
                logging.error("Could not delete network namespace %s: %s", netns, error)


def list_namespaces():
    """Names of the network namespaces that exist now."""
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]
