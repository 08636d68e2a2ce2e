"""Tests of tfsplit.deploy (split inference over loopback) on one smoke-trained deprune run."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import codec, deploy
from tfsplit import export as export_lib
from tfsplit.export import run as run_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = 12
ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}


@pytest.fixture(scope="module")
def run(smoke_workdir):
    return export_lib.load_run(smoke_workdir)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def result(run, export_dir):
    """Exports into an empty directory, then runs both protocols for every dtype."""
    return deploy.run_split_inference(
        run, export_dir, protocols=("rest", "grpc"), max_samples=SAMPLES, qat=False
    )


def test_rows_for_every_dtype_and_protocol(result, export_dir):
    assert [(row["dtype"], row["protocol"]) for row in result.rows] == [
        (dtype, protocol) for dtype in export_lib.HEAD_DTYPES for protocol in ("rest", "grpc")
    ]
    assert result.export_dir == export_dir
    assert pathlib.Path(export_dir, "head_int8.tflite").exists()  # exported because missing
    assert result.settings["max_samples"] == SAMPLES and result.settings["batch_size"] == 1
    for row in result.rows:
        assert row["samples"] == row["requests"] == SAMPLES and row["complete"]


def test_agreement_and_accuracy_against_keras(run, result):
    k = run.final_budget
    keras = run_lib.keras_split_logits(
        run, run.test_images[:SAMPLES], run_lib.selected_channels(run, k)
    ).argmax(-1)
    keras_accuracy = float(np.mean(keras == run.test_labels[:SAMPLES]))
    for row in result.rows:
        assert row["budget"] == k
        assert row["keras_accuracy"] == keras_accuracy
        assert row["agreement"] >= (0.99 if row["dtype"] != "int8" else 0.75)
        assert abs(row["accuracy"] - keras_accuracy) <= 1.0 - row["agreement"]


def test_bytes_per_sample(run, result):
    height, width, channels = run.split.wire_shape
    k = run.final_budget
    for row in result.rows:
        dtype = row["dtype"]
        raw = height * width * k * ITEMSIZE[dtype] + 4 * k + 4 + 4
        assert row["payload_bytes_per_sample"] == raw
        assert row["codec_bytes_per_sample"] == codec.payload_nbytes(
            1, height, width, k, dtype, with_labels=False, channels=channels
        )
        assert row["request_bytes_per_sample"] > raw  # protocol framing on top
        if row["protocol"] == "grpc":  # protobuf tags and names: ~150 bytes, not a multiple
            assert row["request_bytes_per_sample"] < raw + 300


def test_latencies_are_sane(result):
    for row in result.rows:
        for stage in ("head", "encode", "network_tail", "total"):
            assert 0 < row[f"{stage}_p50_ms"] <= row[f"{stage}_p95_ms"] < 10_000
        assert row["total_p50_ms"] >= row["network_tail_p50_ms"]
        assert row["total_mean_ms"] == pytest.approx(
            row["head_mean_ms"] + row["encode_mean_ms"] + row["network_tail_mean_ms"], rel=1e-6
        )
    table = deploy.format_infer_table(result.rows)
    assert len(table.splitlines()) == 2 + len(result.rows)
    assert "net+tail p50" in table.splitlines()[0]


def test_write_results(result, tmp_path):
    json_path, csv_path = deploy.write_results(result, str(tmp_path / "out"))
    written = json.loads(pathlib.Path(json_path).read_text())
    assert written["rows"] == result.rows and written["settings"] == result.settings
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [row["dtype"] for row in rows] == [row["dtype"] for row in result.rows]
    assert float(rows[0]["agreement"]) == result.rows[0]["agreement"]


def test_batches_time_limit_and_export_dir_alone(run, result, export_dir):
    batched = deploy.run_split_inference(
        export_dir=export_dir, dtypes="float16", protocols="grpc", max_samples=8, batch_size=4
    )
    (row,) = batched.rows
    assert batched.workdir == run.workdir  # found through the head JSON's source
    assert (row["samples"], row["requests"]) == (8, 2)
    assert row["payload_bytes_per_sample"] == pytest.approx(
        next(r for r in result.rows if r["dtype"] == "float16")["payload_bytes_per_sample"]
        - (4 * run.final_budget + 8) * 3 / 4  # indices, scale and zero point shared by 4
    )
    limited = deploy.run_split_inference(
        run, export_dir, dtypes="int8", protocols="rest", max_samples=SAMPLES, max_seconds=1e-6
    )
    assert limited.rows[0]["samples"] == 1 and not limited.rows[0]["complete"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"protocols": ("http",)}, "protocols"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"num_threads": 1.5}, "num_threads"),
    ],
)
def test_bad_arguments_fail_clearly(run, export_dir, kwargs, message):
    with pytest.raises(deploy.InferError, match=message):
        deploy.run_split_inference(run, export_dir, **kwargs)


def test_missing_directories_fail_clearly(tmp_path):
    with pytest.raises(deploy.InferError, match="workdir"):
        deploy.run_split_inference()
    with pytest.raises(deploy.InferError, match="No head JSON"):
        deploy.run_split_inference(export_dir=str(tmp_path))
    with pytest.raises(export_lib.ExportError, match="existing directory"):
        deploy.run_split_inference(str(tmp_path / "missing"))


def test_infer_tool(run, result, export_dir, tmp_path):
    # A subprocess, as users run it: the tool's absl flags would clash in the test process.
    argv = [
        f"--workdir={run.workdir}",
        f"--export_dir={export_dir}",
        f"--out={tmp_path}",
        "--max_samples=4",
        "--dtypes=float32",
        "--protocols=grpc",
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "tools.infer", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    assert lines[1].split()[:4] == ["dtype", "proto", "samples", "top-1"]
    assert lines[3].split()[:3] == ["float32", "grpc", "4"]
    assert json.loads((tmp_path / "infer.json").read_text())["rows"][0]["samples"] == 4
    assert (tmp_path / "infer.csv").exists()
