"""tfsplit-bench-data end to end on a small config: every source, one table, bench_data.json.

The tool starts its own moto S3 server on 127.0.0.1 (and stops it); the figures of a run this
small mean nothing, so only their presence and sanity are checked.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import data_benchmark

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_data_measures_every_source_and_writes_its_rows(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfsplit_tools.bench_data",
            "--config=configs/deprune.py:smoke",
            "--config.data.train_size=256",
            "--config.data.test_size=64",
            "--config.model.width_multiplier=0.125",
            f"--workdir={tmp_path}",
            "--repeats=1",
            "--s3_link_mbit=200",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_data.json").read_text())
    assert [row["source"] for row in rows] == [
        "in-memory",
        "image folder (PNG files)",
        "local shards",
        "S3 shards (200 Mbit/s link)",
        "S3 shards (200 Mbit/s link), local cache",
        f"Grain (local shards, {data_benchmark.GRAIN_THREADS} threads)",
    ]
    for row in rows:
        assert set(data_benchmark.ROW_KEYS) <= set(row)
        for key in data_benchmark.ROW_KEYS[1:]:
            assert row[key] > 0, (row["source"], key)
    assert rows[0]["train_ratio_to_memory"] == 1.0
    for row in rows:
        assert row["source"] in result.stdout
    assert "machine:" in result.stdout
    assert len(list((tmp_path / "s3_cache").iterdir())) == 8  # the training shards, verified
