"""Accuracy versus budget from one trained model."""

import csv

import pytest

import tfsplit  # noqa: F401
from tfsplit import codec, curve
from tfsplit.config import base_config, phase
from tfsplit.export import load_run
from tfsplit.train import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = base_config("casl")
    config.data.train_size = 128
    config.data.test_size = 100
    config.data.batch_size = 32
    config.model.width_multiplier = 0.125
    config.log_every_steps = 0
    config.phases = [phase(budget=16, epochs=1, learning_rate=0.05)]
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer = Trainer(config, workdir)
    trainer.run()
    return trainer, workdir


def test_default_budgets():
    assert curve.default_budgets(32) == [4, 8, 16, 32]
    assert curve.default_budgets(4) == [1, 2, 4]


@pytest.mark.parametrize("budgets, message", [
    ([], "at least one budget"),
    ([0], r"integer in \[1, 64\]"),
    ([65], r"integer in \[1, 64\]"),
    ([2.5], "integer"),
    ([True], "integer"),
])
def test_bad_budgets_are_rejected(budgets, message):
    with pytest.raises(ValueError, match=message):
        curve.check_budgets(budgets, 64, has_bottleneck=True)


def test_a_model_without_bottleneck_only_has_its_full_width():
    assert curve.check_budgets([64], 64, has_bottleneck=False) == [64]
    with pytest.raises(ValueError, match="no ranking"):
        curve.check_budgets([8], 64, has_bottleneck=False)


def test_curve_matches_the_trainers_evaluation_and_the_codec(trained):
    trainer, _ = trained
    rows = curve.budget_curve(trainer.split, trainer.test_ds, [2, 16, 64], "float16")
    assert [r["budget"] for r in rows] == [2, 16, 64]
    trainer.steps.set_budget(16, masking=True)
    assert rows[1]["test_accuracy"] == trainer.steps.evaluate(trainer.test_ds)
    assert rows[1]["test_accuracy"] == trainer.records[-1]["test_accuracy"]
    for row in rows:
        assert row["bytes_per_sample"] == codec.payload_nbytes(1, 4, 4, row["budget"], "float16",
                                                               False, channels=64)


def test_evaluate_run_writes_csv_and_png(trained, tmp_path):
    _, workdir = trained
    run = load_run(workdir)
    rows = curve.evaluate_run(run)
    assert [r["budget"] for r in rows] == [2, 4, 8, 16]
    csv_path, png_path = curve.write_curve(rows, str(tmp_path), "test")
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert [int(r["budget"]) for r in written] == [2, 4, 8, 16]
    assert float(written[-1]["test_accuracy"]) == rows[-1]["test_accuracy"]
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
