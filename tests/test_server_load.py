"""The training server's memory under load (benchmarks/load_server.py, issue 25, through the swarm
of benchmarks/server_swarm.py): a bounded share of the full run, the server in a child process on
127.0.0.1 with per-device tokens.

Device threads, each with its own channel, token and step ids, send good TRAIN steps until all are
answered; every reply must be a trained step's (a finite gradient of the shape sent), and every
sample of the server's RSS after the warm-up (100 steps here) must stay within 10% of its level
then. The full runs (16 devices, 10,000 steps):

    python -m benchmarks.load_server --devices=16 --steps=10000 --mode=sequential --out=FILE.json
    python -m benchmarks.load_server --devices=16 --steps=10000 --mode=parallel --out=FILE.json
"""

import json
import pathlib

import pytest

from benchmarks import load_server, server_swarm

DEVICES = 4


def _report(summary):
    return json.dumps(summary, indent=1)[:8000]


@pytest.mark.parametrize("mode, steps", [("sequential", 4 * 50), ("parallel", 4 * 50)])
def test_the_training_servers_memory_stays_flat_under_load(tmp_path, mode, steps):
    """Through `tfsplit-bench-server`'s swarm, which adds the idle devices' memory and, in
    parallel mode, a SplitFed round of every device's head."""
    summary = server_swarm.SwarmTest(str(tmp_path), DEVICES, steps, mode).run()
    report = _report(summary)
    assert summary["idle_bytes_per_device"] < 1 << 20, report
    assert summary["samples_per_s"] > 0 and summary["mean_batch_formed"] >= 16, report
    if mode == "parallel":
        assert summary["averaging"]["devices_averaged"] == DEVICES, report
        assert summary["averaging"]["problem"] == "", report
    else:
        assert summary["averaging"] is None, report
    assert summary["answered_ok"] == steps and summary["failed"] == 0, report
    assert summary["server_tracebacks"] == 0, report
    memory = summary["memory"]
    assert memory["warmup_steps"] == 100, report
    assert memory["max_ratio"] is not None and memory["max_ratio"] <= 1.10, report
    assert memory["samples"] >= steps // load_server.SAMPLE_EVERY_STEPS, report
    updates = summary["updates"]
    assert updates["logged_steps"] == steps, report
    if mode == "sequential":  # each step in turn
        assert updates["updates"] == steps, report
    else:  # concurrent devices' steps joined (those of one budget train together)
        assert updates["max_steps_per_update"] > 1, report
    assert summary["problems"] == [], report


def test_the_warm_up_is_a_tenth_of_the_steps_within_100_and_500():
    assert load_server.warmup_steps(10000) == 500
    assert load_server.warmup_steps(2000) == 200
    assert load_server.warmup_steps(600) == 100
    assert load_server.warmup_steps(50) == 50


def test_the_docs_swarm_table_is_the_committed_results():
    """docs/networked-training.md's table is what `tfsplit-bench-server` printed, drawn again from
    the summaries it wrote."""
    root = pathlib.Path(__file__).resolve().parents[1]
    name = "results/server_scale/bench_server.json"
    runs = json.loads((root / name).read_text())["runs"]
    page = (root / "docs" / "networked-training.md").read_text()
    section = page.split(f"<!-- {name}: the table tfsplit-bench-server printed -->")[1]
    assert section.split(f"<!-- end of {name} -->")[0].strip() == server_swarm.table(runs)
    assert [(r["devices"], r["mode"]) for r in runs] == [
        (n, mode) for n in (1, 10, 100, 1000) for mode in ("sequential", "parallel")
    ]
    assert all(r["failed"] == 0 and r["problems"] == [] for r in runs)
