"""Tests of tfsplit.eval.deployment (split inference over loopback) on one smoke-trained run."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import codec
from tfsplit import export as export_lib
from tfsplit.eval import deployment
from tfsplit.export import run as run_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = 12


@pytest.fixture(scope="module")
def run(smoke_workdir):
    return export_lib.load_run(smoke_workdir)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def result(run, export_dir):
    """Exports into an empty directory, then runs both protocols for every dtype."""
    return deployment.run_split_inference(
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
    _, indices = run.select(k)
    keras = run_lib.keras_split_logits(run, run.test_images[:SAMPLES], indices).argmax(-1)
    keras_accuracy = float(np.mean(keras == run.test_labels[:SAMPLES]))
    for row in result.rows:
        assert row["budget"] == k
        assert row["keras_accuracy"] == keras_accuracy
        assert row["agreement"] >= (0.99 if row["dtype"] != "int8" else 0.75)
        assert abs(row["accuracy"] - keras_accuracy) <= 1.0 - row["agreement"]


def _payload_bytes(run, batch, dtype):
    height, width, channels = run.split.wire_shape
    return codec.payload_nbytes(batch, height, width, run.final_budget, dtype, False, channels)


def test_bytes_per_sample(run, result):
    k = run.final_budget
    for row in result.rows:
        payload_bytes = _payload_bytes(run, 1, row["dtype"])
        assert row["payload_bytes_per_sample"] == payload_bytes
        assert row["request_bytes_per_sample"] > payload_bytes  # protocol framing on top
        if row["protocol"] == "grpc":  # int32 indices, protobuf tags and names: not a multiple
            assert row["request_bytes_per_sample"] < payload_bytes + 2 * k + 300
        else:  # numbers as JSON text
            assert row["request_bytes_per_sample"] > 2 * payload_bytes


def test_latencies_are_sane(result):
    for row in result.rows:
        for stage in ("head", "encode", "network_tail", "total"):
            assert 0 < row[f"{stage}_p50_ms"] <= row[f"{stage}_p95_ms"] < 10_000
        assert row["total_p50_ms"] >= row["network_tail_p50_ms"]
        assert row["total_mean_ms"] == pytest.approx(
            row["head_mean_ms"] + row["encode_mean_ms"] + row["network_tail_mean_ms"], rel=1e-6
        )
    table = deployment.format_table(result.rows)
    assert len(table.splitlines()) == 2 + len(result.rows)
    header = table.splitlines()[0]
    assert "net+tail p50" in header and "request_bytes  payload_bytes" in header


def test_write_results(result, tmp_path):
    json_path, csv_path = deployment.write_results(result, str(tmp_path / "out"))
    written = json.loads(pathlib.Path(json_path).read_text())
    assert written["rows"] == result.rows and written["settings"] == result.settings
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    byte_columns = [name for name in rows[0] if "bytes" in name]
    assert byte_columns == [
        "request_bytes_per_sample",
        "payload_bytes_per_sample",
        "answer_bytes_per_sample",
    ]
    assert [row["dtype"] for row in rows] == [row["dtype"] for row in result.rows]
    assert float(rows[0]["agreement"]) == result.rows[0]["agreement"]


def test_batches_time_limit_and_export_dir_alone(run, result, export_dir):
    batched = deployment.run_split_inference(
        export_dir=export_dir, dtypes="float16", protocols="grpc", max_samples=8, batch_size=4
    )
    (row,) = batched.rows
    assert batched.workdir == run.workdir  # found through the head JSON's source
    assert (row["samples"], row["requests"]) == (8, 2)
    # One header and index list for 4 images.
    assert row["payload_bytes_per_sample"] == _payload_bytes(run, 4, "float16") / 4
    assert row["payload_bytes_per_sample"] < _payload_bytes(run, 1, "float16")
    limited = deployment.run_split_inference(
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
    with pytest.raises(deployment.InferError, match=message):
        deployment.run_split_inference(run, export_dir, **kwargs)


def test_missing_directories_fail_clearly(tmp_path):
    with pytest.raises(deployment.InferError, match="workdir"):
        deployment.run_split_inference()
    with pytest.raises(deployment.InferError, match="No head JSON"):
        deployment.run_split_inference(export_dir=str(tmp_path))
    with pytest.raises(export_lib.ExportError, match="existing directory"):
        deployment.run_split_inference(str(tmp_path / "missing"))


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
        [sys.executable, "-m", "tfsplit_tools.infer", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    assert lines[1].split()[:4] == ["dtype", "proto", "samples", "top-1"]
    assert lines[1].split()[7:9] == ["request_bytes", "payload_bytes"]  # "Keras top-1": 2 words
    assert lines[3].split()[:3] == ["float32", "grpc", "4"]
    assert json.loads((tmp_path / "infer.json").read_text())["rows"][0]["samples"] == 4
    assert (tmp_path / "infer.csv").exists()
