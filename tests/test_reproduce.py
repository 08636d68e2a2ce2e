"""The reproduce table and the paper's ratios, on recorded runs and end to end on smoke configs."""

import glob
import json
import os
import subprocess
import sys

import pytest

import tfsplit  # noqa: F401
from tfsplit.eval import reproduce, seeds
from tfsplit.training.config import load_config_file, phase

REPO_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
# Prints {preset: {method: [data.name, data.train_size, local loss weight]}} from the tool's
# own load_configs(), and the local weight under --variants=local (full weight on the hard set).
PRESETS_SCRIPT = """
import json
from absl import flags
from tfsplit_tools import reproduce
loaded = {}
for preset in reproduce.PRESETS:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tfsplit-reproduce", "--workdir=unused", "--preset=" + preset])
    configs = reproduce.load_configs()
    loaded[preset] = {
        m: [c.data.name, c.data.train_size, c.model.local_loss_weight] for m, c in configs.items()
    }
for preset in ("quick", "quick_hard"):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tfsplit-reproduce", "--workdir=unused", "--preset=" + preset, "--variants=local"])
    configs = reproduce.load_configs()
    loaded[preset + ",local"] = {
        m: [c.data.name, c.model.local_loss_weight] for m, c in configs.items()
    }
print(json.dumps(loaded))
"""


def summary(accuracy, up, down, budget, wall, epochs):
    """A run's summary: `accuracy` on validation, a point less on test (told apart below)."""
    return dict(
        final_val_accuracy=accuracy,
        final_test_accuracy=accuracy - 0.01,
        train_payload_bytes_up=up,
        train_payload_bytes_down=down,
        final_budget=budget,
        inference_payload_bytes_per_sample=20 + 2 * budget,
        wall_seconds=wall,
        epochs=epochs,
    )


def records(accuracies, seconds_per_epoch):
    return [
        dict(epoch=i + 1, val_accuracy=a, elapsed_seconds=seconds_per_epoch * (i + 1))
        for i, a in enumerate(accuracies)
    ]


@pytest.fixture
def recorded_rows():
    target = 0.80
    runs = {
        "sl": (summary(0.90, 400e6, 400e6, 128, 100.0, 4), records([0.5, 0.7, 0.85, 0.90], 25)),
        "casl": (summary(0.81, 100e6, 100e6, 32, 80.0, 4), records([0.4, 0.6, 0.75, 0.81], 20)),
        "deprune": (summary(0.86, 60e6, 40e6, 32, 90.0, 4), records([0.3, 0.6, 0.80, 0.86], 22.5)),
        "prune (start model)": (
            summary(0.88, 300e6, 300e6, 128, 60.0, 2),
            records([0.7, 0.88], 30),
        ),
        "prune": (summary(0.83, 20e6, 20e6, 32, 10.0, 2), records([0.82, 0.83], 5)),
    }
    return [reproduce.table_row(m, *runs[m], target) for m in runs]


def test_time_to_target_is_the_first_epoch_that_reaches_it():
    assert reproduce.time_to_target(records([0.5, 0.8, 0.9], 10), 0.8) == (20, 2)
    assert reproduce.time_to_target(records([0.5, 0.6], 10), 0.8) == (None, None)


def test_table_rows_from_recorded_runs(recorded_rows):
    by = {r["method"]: r for r in recorded_rows}
    assert by["sl"]["payload_mb_up"] == 400.0 and by["deprune"]["payload_mb_down"] == 40.0
    assert by["deprune"]["inference_payload_bytes_per_sample"] == 84
    assert by["sl"]["seconds_to_target"] == 75 and by["sl"]["epochs_to_target"] == 3
    assert by["casl"]["seconds_to_target"] == 80 and by["casl"]["epochs_to_target"] == 4
    assert by["prune"]["seconds_to_target"] == 5 and by["prune"]["epochs_to_target"] == 1
    assert by["prune"]["last_epoch_change_points"] == pytest.approx(1.0)


def test_paper_ratios_from_recorded_runs(recorded_rows):
    ratios = reproduce.paper_ratios(recorded_rows)
    assert ratios["deprune_vs_sl_network"] == pytest.approx(800 / 100)
    assert ratios["deprune_vs_sl_accuracy_points"] == pytest.approx(-4.0)
    assert ratios["deprune_vs_casl_accuracy_points"] == pytest.approx(5.0)
    assert ratios["same_final_budget"]
    assert ratios["prune_vs_casl_time_to_target"] == pytest.approx(80 / 5)
    assert ratios["prune_vs_casl_time_to_target_with_start"] == pytest.approx(80 / 65)


def test_markdown_quotes_the_numbers(recorded_rows):
    result = dict(
        rows=recorded_rows,
        ratios=reproduce.paper_ratios(recorded_rows),
        target_accuracy=0.8,
        curve=[
            dict(
                budget=4,
                deprune_test_accuracy=0.5,
                casl_test_accuracy=0.6,
                payload_bytes_per_sample=292.5,
            )
        ],
    )
    text = reproduce.format_markdown(result)
    header = text.splitlines()[0]
    assert "payload MB up" in header and "payload MB down" in header
    assert "inference payload bytes/sample" in header
    assert "| deprune | 32 | 86.00% | 85.00% | 60.00 | 40.00 | 84 |" in text
    assert "8.00x less training payload, -4.00 accuracy points" in text
    assert "+5.00 accuracy points" in text
    assert "16.00x faster fine-tuning, 1.23x faster counting the start model" in text
    assert "| 4 | 50.00% | 60.00% | 292.5 |" in text


def test_a_target_never_reached_is_reported_as_such(recorded_rows):
    rows = [dict(r, seconds_to_target=None) if r["method"] == "prune" else r for r in recorded_rows]
    ratios = reproduce.paper_ratios(rows)
    assert ratios["prune_vs_casl_time_to_target"] is None
    text = reproduce.format_markdown(dict(rows=rows, ratios=ratios, target_accuracy=0.8, curve=[]))
    assert "time to target: target not reached fine-tuning" in text
    assert "| 10.0 | 2 | not reached | 1 |" in text


def seed_result(rows, shift, casl_4):
    """`reproduce`'s result from `rows` with every accuracy moved by `shift`."""
    rows = [
        dict(
            r,
            final_val_accuracy=r["final_val_accuracy"] + shift,
            final_test_accuracy=r["final_test_accuracy"] + shift,
            wall_seconds=100.0 + shift,
        )
        for r in rows
    ]
    curve = [
        dict(
            budget=4,
            deprune_test_accuracy=0.5 + shift,
            casl_test_accuracy=casl_4,
            payload_bytes_per_sample=156,
        )
    ]
    return dict(rows=rows, ratios=reproduce.paper_ratios(rows), curve=curve, target_accuracy=0.8)


def test_seeds_combine_into_means_with_each_seeds_values(recorded_rows):
    slow = [dict(r, seconds_to_target=None) if r["method"] == "prune" else r for r in recorded_rows]
    combined = seeds.combine(
        [seed_result(recorded_rows, 0.0, 0.6), seed_result(slow, 0.02, 0.7)], [0, 1]
    )
    deprune = combined["rows"][2]
    assert deprune["final_val_accuracy"] == pytest.approx(0.87)
    assert deprune["final_val_accuracy_per_seed"] == pytest.approx([0.86, 0.88])
    assert deprune["final_test_accuracy"] == pytest.approx(0.86)
    assert deprune["final_test_accuracy_per_seed"] == pytest.approx([0.85, 0.87])
    assert deprune["wall_seconds"] == pytest.approx(100.01)
    assert deprune["final_budget"] == 32 and isinstance(deprune["final_budget"], int)
    prune = combined["rows"][-1]
    assert prune["seconds_to_target"] is None  # one seed never reached the target
    assert combined["ratios"]["prune_vs_casl_time_to_target"] is None
    assert combined["ratios"]["deprune_vs_casl_accuracy_points"] == pytest.approx(5.0)
    assert combined["ratios"]["same_final_budget"] is True
    point = combined["curve"][0]
    assert point["casl_test_accuracy"] == pytest.approx(0.65)
    assert point["casl_test_accuracy_per_seed"] == pytest.approx([0.6, 0.7])
    text = reproduce.format_markdown(combined)
    assert "| deprune | 32 | 87.00% (86.00% / 88.00%) | 86.00% (85.00% / 87.00%) |" in text
    assert "| 4 | 51.00% (50.00% / 52.00%) | 65.00% (60.00% / 70.00%) | 156 |" in text
    assert "time to target: target not reached (16.00x faster / target not reached)" in text
    assert "Means over seeds 0, 1" in text
    assert "8.00x less training payload" in text  # the same bytes at every seed: shown once


def test_seeds_must_run_the_same_methods(recorded_rows):
    other = seed_result(recorded_rows, 0.0, 0.6)
    other["rows"] = other["rows"][:-1]
    with pytest.raises(ValueError, match="same methods and budgets"):
        seeds.combine([seed_result(recorded_rows, 0.0, 0.6), other], [0, 1])


def test_each_seed_trains_in_its_own_directory(recorded_rows, monkeypatch, tmp_path):
    calls = []

    def fake_reproduce(configs, workdir, target_accuracy, init_from):
        calls.append((workdir, sorted({c.seed for c in configs.values()})))
        return seed_result(recorded_rows, 0.01 * len(calls), 0.6)

    monkeypatch.setattr(reproduce, "reproduce", fake_reproduce)
    configs = {
        m: load_config_file(os.path.join(CONFIG_DIR, f"{m}.py"), "smoke") for m in reproduce.METHODS
    }
    combined = seeds.reproduce_at_seeds(configs, str(tmp_path), [3, 4])
    assert calls == [(str(tmp_path / "seed_3"), [3]), (str(tmp_path / "seed_4"), [4])]
    assert {c.seed for c in configs.values()} == {0}  # the caller's configs are left as given
    assert os.path.isfile(tmp_path / "seed_4" / "results.md")
    assert combined["seeds"] == [3, 4]
    for bad in ([3], [3, 3]):
        with pytest.raises(ValueError, match="two or more distinct seeds"):
            seeds.reproduce_at_seeds(configs, str(tmp_path), bad)


def test_prune_config_is_split_into_start_and_finetune():
    config = load_config_file(os.path.join(CONFIG_DIR, "prune.py"))
    start, finetune = reproduce.split_prune_config(config)
    assert [p.budget for p in start.phases] == [0]
    assert [p.reset for p in finetune.phases] == ["prune"]
    config.phases = [phase(budget=8, epochs=1, learning_rate=0.1)]
    with pytest.raises(ValueError, match="must start with an unmasked phase"):
        reproduce.split_prune_config(config)


def test_methods_must_share_the_setting():
    configs = {
        m: load_config_file(os.path.join(CONFIG_DIR, f"{m}.py"), "smoke") for m in reproduce.METHODS
    }
    configs["sl"].model.cut = "conv2"
    with pytest.raises(ValueError, match="All methods must share model.cut"):
        reproduce.reproduce(configs, "/nonexistent")
    del configs["sl"]
    with pytest.raises(ValueError, match=r"missing \['sl'\]"):
        reproduce.reproduce(configs, "/nonexistent")


@pytest.mark.slow
def test_reproduce_end_to_end_on_smoke_configs(tmp_path):
    configs = {
        m: load_config_file(os.path.join(CONFIG_DIR, f"{m}.py"), "smoke") for m in reproduce.METHODS
    }
    for config in configs.values():  # half the smoke set: nine runs, the suite's time
        config.data.train_size, config.data.test_size = 128, 64
    result = reproduce.reproduce(configs, str(tmp_path))
    assert [r["method"] for r in result["rows"]] == [
        "sl",
        "casl",
        "deprune",
        "deprune (without nested budgets)",
        "prune (start model)",
        "prune",
    ]
    assert [p["budget"] for p in result["curve"]] == [4, 8, 16, 32]
    assert glob.glob(str(tmp_path / "casl_*"))
    paths = reproduce.write_results(result, str(tmp_path))
    for path in paths.values():
        assert os.path.getsize(path) > 0
    sl = result["rows"][0]
    deprune = result["rows"][2]
    assert result["ratios"]["deprune_vs_sl_network"] == pytest.approx(
        (sl["payload_mb_up"] + sl["payload_mb_down"])
        / (deprune["payload_mb_up"] + deprune["payload_mb_down"])
    )
    # The curve's model is deprune's own run, nested by default: at its final budget, that run's
    # own evaluation.
    nested = result["rows"][2]
    final = [p for p in result["curve"] if p["budget"] == nested["final_budget"]][0]
    assert final["deprune_test_accuracy"] == pytest.approx(nested["final_test_accuracy"])


def test_tool_presets_load_the_data_they_name():
    # A subprocess, as in test_tools.py: the tools' absl flags are global to a process.
    result = subprocess.run(
        [sys.executable, "-c", PRESETS_SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    expected = {
        "quick,local": ["synthetic", 1.0],
        "quick_hard,local": ["synthetic_hard", 1.0],
        "quick": ["synthetic", 0, 0.0],
        "quick_hard": ["synthetic_hard", 0, 0.5],  # the local classifier at half weight
        "quick_small": ["synthetic", 2500, 0.0],  # 1500 to train on, 1000 held out
        "paper": ["cifar10", 0, 0.0],
    }
    assert set(loaded) == set(expected)
    for preset, data in expected.items():
        assert loaded[preset] == {m: data for m in reproduce.METHODS}, preset
