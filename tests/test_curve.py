"""Accuracy versus budget from one trained SplitModel (tfsplit.eval.curve)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import codec
from tfsplit.eval import curve
from tfsplit.training import trainer
from tfsplit.training.config import load_config_file

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split(smoke_workdir):
    return trainer.load_model(smoke_workdir)


@pytest.fixture(scope="module")
def test_ds(smoke_workdir):
    """The run's test pipeline, built from its recorded config as training built it."""
    with open(os.path.join(smoke_workdir, trainer.CONFIG_FILE)) as f:
        return trainer.build_data(ml_collections.ConfigDict(json.load(f))).test


def test_served_budgets_are_the_final_one_or_the_nested_range():
    config = ml_collections.ConfigDict(dict(budget_sampling=dict(nested=False, min_fraction=0.125)))
    assert curve.served_budgets(config, 32) == (32, 32)
    config.budget_sampling.nested = True
    assert curve.served_budgets(config, 32) == (4, 32)
    assert curve.served_budgets(config, 5) == (1, 5)
    config.budget_sampling.min_fraction = 0.5
    assert curve.served_budgets(config, 5) == (3, 5)


def test_default_budgets():
    assert curve.default_budgets(32) == [4, 8, 16, 32]
    assert curve.default_budgets(4) == [1, 2, 4]
    assert curve.default_budgets(1) == [1]


@pytest.mark.parametrize(
    "budgets, message",
    [
        ([], "at least one budget"),
        ([0], r"integer in \[1, 64\]"),
        ([65], r"integer in \[1, 64\]"),
        ([2.5], "integer"),
        ([True], "integer"),
    ],
)
def test_bad_budgets_are_rejected(split, test_ds, budgets, message):
    with pytest.raises(ValueError, match=message):
        curve.budget_curve(split, test_ds, budgets)


def test_a_model_without_bottleneck_only_has_its_full_width():
    config = load_config_file(str(REPO_ROOT / "configs" / "sl.py"), "smoke")
    _, _, sl_test_ds, info = trainer.build_data(config)
    unmasked = trainer.build_split_model(config, info)
    with pytest.raises(ValueError, match="Without a masked bottleneck"):
        curve.budget_curve(unmasked, sl_test_ds, [8])
    rows = curve.budget_curve(unmasked, sl_test_ds, [unmasked.channels])
    assert [row["budget"] for row in rows] == [unmasked.channels]


def test_curve_is_the_models_own_evaluation(smoke_workdir, split, test_ds):
    with open(os.path.join(smoke_workdir, "summary.json")) as f:
        summary = json.load(f)
    final = summary["final_budget"]
    in_force = int(split.budget.numpy())
    rows = curve.budget_curve(split, test_ds, [2, final, split.channels])
    assert int(split.budget.numpy()) == in_force  # restored
    assert [r["budget"] for r in rows] == [2, final, split.channels]
    # At the final budget it is exactly what training measured on the same test set.
    assert rows[1]["test_accuracy"] == pytest.approx(summary["final_test_accuracy"])
    split.budget.assign(2)
    assert rows[0]["test_accuracy"] == pytest.approx(
        split.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"]
    )
    split.budget.assign(in_force)
    # Bytes are the codec's for one image sent alone, as in the run's summary.
    height, width, channels = split.wire_shape
    for row in rows:
        assert row["payload_bytes_per_sample"] == codec.payload_nbytes(
            1, height, width, row["budget"], "float16", False, channels
        )
    assert rows[1]["payload_bytes_per_sample"] == summary["inference_payload_bytes_per_sample"]


def test_evaluate_workdir_writes_csv_and_png(smoke_workdir, tmp_path):
    rows, summary = curve.evaluate_workdir(smoke_workdir)
    budgets = curve.default_budgets(summary["final_budget"])
    assert [r["budget"] for r in rows] == budgets
    final = summary["final_budget"]
    assert summary["served_budgets"] == (final // 8, final)  # deprune nests by default
    assert [r["served"] for r in rows] == [final // 8 <= b <= final for b in budgets]
    csv_path, png_path = curve.write_curve(rows, str(tmp_path), "test")
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(curve.FIELDS)
    assert [int(r["budget"]) for r in written] == budgets
    assert float(written[-1]["test_accuracy"]) == rows[-1]["test_accuracy"]
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="finished tfsplit-train run"):
        curve.evaluate_workdir(str(tmp_path))


def test_tool_prints_the_curve(smoke_workdir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfsplit_tools.evaluate",
            "--workdir",
            smoke_workdir,
            "--budgets=2,4",
        ]
        + ["--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["budget", "test", "accuracy", "payload", "bytes/sample"]
    assert [line.split()[0] for line in lines[1:3]] == ["2", "4"]
    # The smoke run nests its budgets (deprune's default) from an eighth of its final one, 4.
    with open(os.path.join(smoke_workdir, "summary.json")) as f:
        final_budget = json.load(f)["final_budget"]
    assert final_budget == 32
    assert lines[1].endswith("(not trained)") and not lines[2].endswith("(not trained)")
    assert lines[3] == f"the model was trained to serve budgets 4 to {final_budget}"
    assert f"Budget 2: this model was trained to serve budgets 4 to {final_budget};" in (
        result.stderr
    )
    assert "Budget 4:" not in result.stderr
    assert (tmp_path / curve.CSV_FILE).exists() and (tmp_path / curve.PNG_FILE).exists()
