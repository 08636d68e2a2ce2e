"""Emulated links (`benchmarks.links`) and the network benchmark's pieces, without training.

The delaying proxy and the namespaces run for real on this machine (the namespace tests need root
and `ip netns`, and are skipped with the reason otherwise). Nothing here trains over a slow link:
`tfsplit-bench-network` itself is run by hand (see its docstring).
"""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from benchmarks import links, namespaces, network_benchmark
from tfsplit import codec
from tfsplit.eval import link_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


@pytest.fixture
def echo_port():
    """A TCP echo server on 127.0.0.1 (a thread per connection); yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def _connect(address):
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _receive(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        data += chunk
    return bytes(data)


def _echo_round_trip(address, payload):
    """Sends `payload` (from a thread) and reads it back; returns (seconds, bytes back)."""
    with _connect(address) as sock:
        start = time.monotonic()
        threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
        back = _receive(sock, len(payload))
        return time.monotonic() - start, back


def test_delay_proxy_adds_the_rtt_and_keeps_every_byte_in_order(echo_port):
    with links.DelayProxy(("127.0.0.1", echo_port), one_way_delay_s=0.03) as proxy:
        with _connect(proxy.address) as sock:
            for _ in range(3):
                start = time.monotonic()
                sock.sendall(b"ping")
                assert _receive(sock, 4) == b"ping"
                assert time.monotonic() - start >= 0.06
        payload = os.urandom(300_000)
        seconds, back = _echo_round_trip(proxy.address, payload)
        assert back == payload and seconds >= 0.06


def test_delay_proxy_does_not_serialise_a_connection(echo_port):
    """Five messages 10 ms apart come back 10 ms apart after one RTT, not one RTT each."""
    with links.DelayProxy(("127.0.0.1", echo_port), one_way_delay_s=0.05) as proxy:
        with _connect(proxy.address) as sock:
            start = time.monotonic()
            for i in range(5):
                sock.sendall(b"m%d" % i)
                time.sleep(0.01)
            assert _receive(sock, 10) == b"m0m1m2m3m4"
            assert 0.1 <= time.monotonic() - start < 0.3


def test_delay_proxy_rate_bounds_throughput(echo_port):
    """400 KB at 8 Mbit/s (1 MB/s) takes at least 0.4 s each way (they overlap in an echo)."""
    with links.DelayProxy(("127.0.0.1", echo_port), rate_mbit=8) as proxy:
        payload = os.urandom(400_000)
        seconds, back = _echo_round_trip(proxy.address, payload)
    assert back == payload
    assert 0.4 <= seconds < 3.0


def test_token_bucket_sends_at_its_rate_after_its_burst():
    bucket = links.TokenBucket(8)  # 1e6 bytes/s, no burst
    now = time.monotonic()
    assert bucket.reserve(100_000) == pytest.approx(now + 0.1, abs=0.02)
    assert bucket.reserve(100_000) == pytest.approx(now + 0.2, abs=0.02)  # queued behind
    bursty = links.TokenBucket(8, burst_bytes=50_000)
    now = time.monotonic()
    assert bursty.reserve(50_000) == pytest.approx(now, abs=0.01)
    assert bursty.reserve(50_000) == pytest.approx(now + 0.05, abs=0.02)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: links.Link("x", 0, 5), "rate_mbit` must be a number > 0"),
        (lambda: links.Link("x", "fast", 5), "rate_mbit` must be a number > 0"),
        (lambda: links.Link("x", 10, -1), "rtt_ms` must be a number >= 0"),
        (lambda: links.Link("a b", 10, 5), "name"),
        (lambda: links.parse_link("dsl"), "name=rate_mbit/rtt_ms"),
        (lambda: links.parse_link("dsl=fast/30"), "must be numbers"),
        (lambda: links.parse_link("dsl=-3/30"), "rate_mbit` must be a number > 0"),
        (lambda: links.TokenBucket(0), "rate_mbit` must be a number > 0"),
        (lambda: links.TokenBucket(1, burst_bytes=-1), "burst_bytes` must be a number >= 0"),
        (lambda: links.DelayProxy(("127.0.0.1", 1), -0.1), "one_way_delay_s` must be"),
        (lambda: links.DelayProxy(("127.0.0.1", 1), rate_mbit=0), "rate_mbit` must be"),
        (lambda: links.DelayProxy("127.0.0.1:1"), "upstream` must be (host, port)"),
        (lambda: namespaces.network_namespaces(0, 5).__enter__(), "rate_mbit` must be"),
        (lambda: namespaces.network_namespaces(1, -5).__enter__(), "rtt_ms` must be"),
        (lambda: links.emulate("wifi").__enter__(), "`link` must be a Link"),
        (lambda: network_benchmark.Sizes(train_size=-1), "train_size` must be an integer >= 0"),
        (lambda: network_benchmark.Sizes(epochs_scale=0), "epochs_scale` must be > 0"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_bad_benchmark_arguments_are_refused_before_anything_runs(tmp_path):
    wifi = links.DEFAULT_LINKS["wifi"]
    sizes = network_benchmark.Sizes()
    cases = [
        (dict(links=[]), "non-empty list of Links"),
        (dict(links=[wifi, wifi]), "unique"),
        (dict(methods=["sl", "sl"]), "distinct"),
        (dict(methods=["fedavg"]), "Unknown method 'fedavg'"),
        (dict(target_fraction=1.5), "target_fraction"),
        (dict(timeout_s=0), "timeout_s"),
    ]
    for change, message in cases:
        kwargs = dict(links=[wifi], config_dir=CONFIG_DIR, workdir=str(tmp_path), sizes=sizes)
        with pytest.raises(ValueError, match=message):
            network_benchmark.benchmark_network(**dict(kwargs, **change))
    assert not os.listdir(tmp_path)


def test_links_parse_by_name_or_rate_and_rtt():
    assert links.parse_link("poor") == links.Link("poor", 2.0, 100.0)
    assert links.parse_link("dsl=16/30") == links.Link("dsl", 16.0, 30.0)
    assert links.parse_link("lan=1000/0.2").rtt_ms == 0.2


def test_the_proxy_emulates_the_link_without_namespaces(echo_port):
    with links.emulate(links.Link("t", 8, 60), namespaces=False) as emulated:
        assert emulated.shaping == links.SHAPING_PROXY and "not requested" in emulated.note
        assert emulated.server_command(["x"]) == ["x"] == emulated.device_command(["x"])
        with emulated.reach(echo_port) as address:
            seconds, back = _echo_round_trip(address, b"x" * 100_000)
    assert back == b"x" * 100_000 and seconds >= 0.1 + 0.06


def _namespaces_or_skip():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"tfsplit-test-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"`ip netns add` is not permitted here: {error}")
    subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def test_namespaces_are_created_shaped_and_always_removed():
    _namespaces_or_skip()
    with namespaces.network_namespaces(20, 10) as pair:
        names = {pair.server, pair.device}
        assert names <= set(namespaces.list_namespaces())
        for name, address in (
            (pair.server, pair.server_address),
            (pair.device, pair.device_address),
        ):
            shown = subprocess.run(
                ["ip", "-n", name, "addr", "show", "veth0"], capture_output=True, text=True
            ).stdout
            assert f"{address}/24" in shown and "UP" in shown
            qdisc = subprocess.run(
                ["tc", "-n", name, "qdisc", "show", "dev", "veth0"], capture_output=True, text=True
            ).stdout
            assert "tbf" in qdisc and "20Mbit" in qdisc
    assert not names & set(namespaces.list_namespaces())
    with pytest.raises(KeyboardInterrupt):
        with namespaces.network_namespaces(20, 10) as pair:
            names = {pair.server, pair.device}
            raise KeyboardInterrupt
    assert not names & set(namespaces.list_namespaces())


_ECHO_SERVER = """
import socket, sys, threading
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
def echo(conn):
    while data := conn.recv(65536):
        conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(listener.accept()[0],), daemon=True).start()
"""


def test_a_link_between_namespaces_has_its_rtt_and_rate():
    """An echo server in the server's namespace, a client thread in the device's."""
    _namespaces_or_skip()
    with links.emulate(links.Link("t", 8, 40)) as emulated:
        assert emulated.shaping in (links.SHAPING_NETEM, links.SHAPING_TBF_PROXY)
        argv = [sys.executable, "-c", _ECHO_SERVER, emulated.server_host]
        server = subprocess.Popen(emulated.server_command(argv), stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            results = {}

            def client():
                namespaces.enter_namespace(emulated.device_netns)
                with emulated.reach(port) as address:
                    results["ping"] = _echo_round_trip(address, b"ping")
                    results["bulk"] = _echo_round_trip(address, b"y" * 400_000)

            thread = threading.Thread(target=client)
            thread.start()
            thread.join(timeout=30)
        finally:
            server.kill()
            server.wait()
    seconds, back = results["ping"]
    assert back == b"ping" and seconds >= 0.04
    seconds, back = results["bulk"]
    assert back == b"y" * 400_000 and seconds >= 0.4  # 400 KB at 1 MB/s, each way


def test_sizes_shrink_every_method_and_prune_fine_tunes_from_its_start():
    sizes = network_benchmark.Sizes(train_size=300, test_size=100, epochs_scale=1 / 6)
    runs = network_benchmark.method_runs(CONFIG_DIR, ["sl", "deprune", "prune"], sizes, "/start")
    sl = runs["sl"]
    assert sl.flags[0] == f"--config={CONFIG_DIR}/sl.py"
    assert "--config.data.train_size=300" in sl.flags and "--config.data.test_size=100" in sl.flags
    assert "--config.phases[0].epochs=5" in sl.flags and sl.config.phases[0].epochs == 5
    assert sl.config.data.train_size == 300
    deprune = runs["deprune"].config
    assert [p.epochs for p in deprune.phases] == [3, 2]
    assert all(p.boost_epochs <= p.epochs and p.anneal_epochs <= p.epochs for p in deprune.phases)
    prune = runs["prune"]
    assert prune.flags[0] == f"--config={CONFIG_DIR}/prune.py:finetune"
    assert "--config.init_from=/start" in prune.flags
    assert all(p.budget for p in prune.config.phases)  # no unmasked pretraining over the link
    start = network_benchmark.prune_start_config(CONFIG_DIR, sizes)
    assert [p.budget for p in start.phases] == [0] and start.phases[0].epochs == 5
    unchanged = network_benchmark.method_runs(
        CONFIG_DIR, ["casl"], network_benchmark.Sizes(variant="smoke"), ""
    )["casl"]
    assert unchanged.flags == [f"--config={CONFIG_DIR}/casl.py:smoke"]


def test_estimates_follow_the_codec():
    """SL sends all 128 channels of its 4x4 cut in float16: 4 KB a sample each way and more."""
    sizes = network_benchmark.Sizes(train_size=64, test_size=32, epochs_scale=0.02)
    config = network_benchmark.method_runs(CONFIG_DIR, ["sl"], sizes, "")["sl"].config
    estimate = network_benchmark.estimate_traffic(config)
    assert estimate["wire_shape"] == [4, 4, 128]
    assert estimate["bytes_up"] > (64 + 32) * 4096 and estimate["bytes_down"] > 64 * 4096
    assert estimate["calls"] == 2  # one training step, one evaluation batch
    poor = links.DEFAULT_LINKS["poor"]
    seconds = network_benchmark.link_seconds(estimate, poor)
    expected = (estimate["bytes_up"] + estimate["bytes_down"]) * 8 / 2e6 + 2 * 0.1
    assert seconds == pytest.approx(expected)


def test_a_ushaped_estimate_sends_no_labels_and_crosses_the_second_cut():
    """The plain estimate without the labels, plus the middle's output down (training,
    evaluation) and the top's gradient up: 128 float16 values a sample at the top (pool5, 1x1)."""
    sizes = {
        variant: network_benchmark.Sizes(variant, train_size=64, test_size=32, epochs_scale=0.02)
        for variant in ("", "ushaped")
    }
    plain, ushaped = (
        network_benchmark.estimate_traffic(
            network_benchmark.method_runs(CONFIG_DIR, ["sl"], sizes[v], "")["sl"].config
        )
        for v in sizes
    )
    labels = codec.payload_nbytes(64, 4, 4, 128, "float16", True, 128) - codec.payload_nbytes(
        64, 4, 4, 128, "float16", False, 128
    )
    second = {n: codec.payload_nbytes(n, 1, 1, 128, "float16", False, 128) for n in (32, 64)}
    assert ushaped["bytes_up"] == plain["bytes_up"] - labels + second[64]
    logits = 4 * 10 * (64 + 32)
    assert ushaped["bytes_down"] == plain["bytes_down"] - logits + second[64] + second[32]
    assert ushaped["calls"] == 3  # FORWARD and TRAIN of the one step, one evaluation batch


def _row(link, method, seconds, accuracy, curve):
    records = [
        dict(epoch=i + 1, elapsed_seconds=at, val_accuracy=reached)
        for i, (at, reached) in enumerate(curve)
    ]
    return dict(
        link=link,
        method=method,
        shaping="s",
        process_seconds=seconds,
        fit_seconds=seconds - 10,
        final_val_accuracy=accuracy,
        final_test_accuracy=accuracy - 0.01,
        payload_mb_up=1.0,
        payload_mb_down=0.5,
        records=records,
        note="",
        seconds_to_target=None,
    )


def test_target_table_and_speedup_lines():
    wifi, poor = links.DEFAULT_LINKS["wifi"], links.DEFAULT_LINKS["poor"]
    rows = [
        _row("wifi", "sl", 40.0, 0.80, [[10, 0.5], [20, 0.8]]),
        _row("wifi", "deprune", 30.0, 0.70, [[10, 0.7]]),
        _row("poor", "sl", 300.0, 0.80, [[100, 0.5], [200, 0.8]]),
        dict(link="poor", method="deprune", shaping="s", error="boom"),
    ]
    target, source = network_benchmark.choose_target(rows, [poor, wifi], None, 0.9)
    assert target == pytest.approx(0.72) and "SL" in source and "wifi" in source
    assert network_benchmark.choose_target(rows, [wifi], 0.5, 0.9) == (0.5, "given")
    result = dict(
        rows=rows,
        links=[
            dict(name=link.name, rate_mbit=link.rate_mbit, rtt_ms=link.rtt_ms)
            for link in (wifi, poor)
        ],
    )
    table = link_report.markdown_table(result).splitlines()
    assert table[0].startswith("| link | method | shaping |") and len(table) == 2 + len(rows)
    assert "not reached" in table[2] and "failed: boom" in table[5]
    assert "| 80.00% | +30.00 | 79.00% |" in table[2] and "| 70.00% | - | 69.00% |" in table[3]
    result["rows"][1]["fit_seconds"] = 35.0  # a slower fit, sooner done: a shorter start-up
    assert link_report.speedups(result) == [
        "wifi: deprune finishes 1.33x sooner than SL (30.0 s vs 40.0 s); its fit ends 1.17x "
        "later (35.0 s vs 30.0 s)"
    ]
    assert link_report.speedups(result, fast="sl", slow="deprune") == [
        "wifi: sl finishes 1.33x later than DEPRUNE (40.0 s vs 30.0 s); its fit ends 1.17x "
        "sooner (30.0 s vs 35.0 s)"
    ]
    for row, seconds in zip(result["rows"][:2], (20.0, 5.0)):  # both reach it: a third ratio
        row["seconds_to_target"] = seconds
    assert link_report.speedups(result)[0].endswith(
        "; it reaches the target 4.00x sooner (5.0 s vs 20.0 s)"
    )


def test_without_root_the_link_falls_back_to_the_proxy_and_says_why(monkeypatch):
    monkeypatch.setattr(namespaces.os, "geteuid", lambda: 1000)
    with links.emulate(links.DEFAULT_LINKS["4g"]) as emulated:
        assert emulated.shaping == links.SHAPING_PROXY
        assert emulated.note == "namespaces not permitted: network namespaces need root"
        assert emulated.proxy_rate_mbit == 10 and emulated.proxy_delay_s == pytest.approx(0.02)
