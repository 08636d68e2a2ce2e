"""Results kept as data (`tfsplit.eval.archive`) and the page generated from them
(`tfsplit.eval.pages`): the committed docs/results.md sections are what the committed results
give, and a section is drawn from the runs' own files."""

import json
import os
import pathlib

import numpy as np
import pytest

import tfsplit  # noqa: F401
from tfsplit.eval import archive, leakage_report, link_report, pages, seeds
from tfsplit.training.config import base_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = REPO_ROOT / "docs" / "results.md"
HISTORY = REPO_ROOT / "docs" / "history.md"


@pytest.mark.parametrize("page", [PAGE, HISTORY], ids=lambda page: page.name)
def test_the_committed_sections_are_what_the_committed_results_give(page):
    names = pages.sections(page.read_text())
    assert names, f"docs/{page.name} holds no generated section"
    for name in names:
        directory = REPO_ROOT / name
        rendered = pages.render(name, str(directory), "plots")
        assert pages.section_text(str(page), name) == rendered, (
            f"docs/{page.name}'s {name} differs from what its results give: run "
            "tfsplit-results-pages"
        )
        if page == PAGE:  # the results page quotes converged runs only; history keeps the rest
            assert "Every run's last epoch moved validation accuracy by less than" in rendered
            assert "Not converged" not in rendered, f"{name} has runs that did not converge"
        for line in rendered.splitlines():  # the plots it shows are committed
            if line.startswith("!["):
                assert (PAGE.parent / line.split("(")[1].rstrip(")")).is_file(), line
        if link_report.holds(str(directory)):  # every method trained on every link
            result = link_report.load(str(directory))
            assert all("error" not in row and row["records"] for row in result["rows"])
            assert len(result["rows"]) == len(result["links"]) * len(
                {row["method"] for row in result["rows"]}
            )
            continue
        if leakage_report.holds(str(directory)):  # load checks every run's validated epochs
            assert leakage_report.load(str(directory))["runs"]
            continue
        result, runs = archive.load(str(directory))
        assert len(result["seeds"]) >= 3
        for by_run in runs.values():  # every run kept with its records
            assert {"sl", "casl", "deprune", "prune"} <= set(by_run)


def _write_run(directory, val, test, epochs_val):
    os.makedirs(directory)
    summary = dict(final_val_accuracy=val, final_test_accuracy=test)
    (pathlib.Path(directory) / "summary.json").write_text(json.dumps(summary))
    lines = [json.dumps(dict(epoch=i + 1, val_accuracy=v)) for i, v in enumerate(epochs_val)]
    (pathlib.Path(directory) / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _seed_result(shift):
    row = dict(final_budget=32, payload_mb_up=1.0, payload_mb_down=0.5, epochs=2)
    row.update(wall_seconds=10.0, last_epoch_change_points=None)
    rows = [
        dict(row, method=label, final_val_accuracy=0.8 + shift, final_test_accuracy=0.7 + shift)
        for label in ("SL", "deprune")
    ]
    rows.append(dict(rows[-1], method="deprune (without nested budgets)", final_val_accuracy=0.81))
    curve = [
        dict(
            budget=4,
            deprune_test_accuracy=0.5 + shift,
            casl_test_accuracy=0.6,
            payload_bytes_per_sample=84.0,
        )
    ]
    ratios = dict(
        deprune_vs_sl_network=2.0,
        deprune_vs_sl_accuracy_points=0.0,
        deprune_vs_casl_accuracy_points=1.5,
        same_final_budget=True,
        prune_vs_casl_time_to_target=None,
        prune_vs_casl_time_to_target_with_start=None,
    )
    return dict(rows=rows, ratios=ratios, curve=curve, target_accuracy=0.79)


def test_a_section_is_drawn_from_the_runs_files(tmp_path):
    workdir = tmp_path / "work"
    for seed, shift in ((0, 0.0), (1, 0.02)):
        _write_run(workdir / f"seed_{seed}" / "sl", 0.8, 0.7, [0.5, 0.8 + shift])
        _write_run(workdir / f"seed_{seed}" / "deprune", 0.8, 0.7, [0.795, 0.8])
    result = seeds.combine([_seed_result(0.0), _seed_result(0.02)], [0, 1])
    configs = {"sl": base_config("sl")}
    out = tmp_path / "results" / "toy"
    assert archive.archive(str(workdir), str(out), configs, [0, 1], result) == 4
    assert json.loads((out / "config" / "sl.json").read_text())["mode"] == "sl"
    text = pages.render("results/toy", str(out), "plots")
    # SL: validation 80% and 82% -> 81.00 ± 1.41 (n - 1); it moved 30 and 32 points last epoch.
    assert f"| SL | 32 | 81.00 ± {100 * np.std([0.8, 0.82], ddof=1):.2f}% | 71.00 ± 1.41%" in text
    assert "| +30.00 / +32.00 |" in text and "| +0.50 / +0.50 |" in text
    assert "Not converged (the last epoch moved validation accuracy by 1 point or more" in text
    assert "at some seed): sl." in text  # deprune moved half a point: settled
    assert "| 4 | 51.00 ± 1.41% | 60.00 ± 0.00% | 84.0 |" in text
    assert "at budget 4 and every seed: -10.00 to -8.00 test points." in text
    assert "- CA-SL trained at the smallest budget (4) against SL: -11.00 points" in text
    assert "(not reached at every seed: not reached / not reached) in fine-tuning" in text
    # deprune's default nested, its other run without: 80% / 82% against 81% / 81%.
    assert "The row deprune is deprune as its config made it in these runs, with nested " in text
    assert "- nesting costs 0.00 validation points at the final budget" in text
    page = tmp_path / "page.md"
    start, end = (marker.format(name="results/toy") for marker in (pages.START, pages.END))
    page.write_text(f"# Page\n\nkept\n\n{start}\nstale\n{end}\n\nkept too\n")
    assert pages.update_page(str(page), str(tmp_path / "results"), str(tmp_path / "plots")) == [
        "results/toy"
    ]
    written = page.read_text()
    assert written.startswith("# Page\n\nkept\n\n") and written.endswith(f"{end}\n\nkept too\n")
    assert pages.section_text(str(page), "results/toy") == pages.render(
        "results/toy", str(out), "plots"
    )
    for plot in pages.PLOTS:
        assert (tmp_path / "plots" / f"results_toy_{plot}.png").stat().st_size > 1000


def _link_row(link, method, curve, note=""):
    records = [
        dict(epoch=i + 1, elapsed_seconds=10.0 * (i + 1), val_accuracy=v)
        for i, v in enumerate(curve)
    ]
    return dict(
        link=link,
        method=method,
        shaping="tc tbf",
        process_seconds=12.0 * len(curve),
        fit_seconds=10.0 * len(curve),
        final_val_accuracy=curve[-1],
        final_test_accuracy=curve[-1] - 0.01,
        payload_mb_up=2.0,
        payload_mb_down=1.0,
        epochs=len(curve),
        records=records,
        note=note,
        seconds_to_target=None,
    )


def test_a_network_benchmark_section_is_drawn_from_its_file(tmp_path):
    links = [
        dict(name="wifi", rate_mbit=100.0, rtt_ms=5.0, shaping="tc tbf", note=""),
        dict(name="poor", rate_mbit=2.0, rtt_ms=100.0, shaping="proxy", note="not root"),
    ]
    rows = [
        _link_row("wifi", "sl", [0.5, 0.8]),
        _link_row("wifi", "prune", [0.7, 0.75, 0.78], note="fine-tuning only"),
        dict(_link_row("poor", "sl", [0.5, 0.8, 0.8, 0.8]), shaping="proxy"),
    ]
    result = dict(
        rows=rows,
        links=links,
        target_accuracy=0.72,
        target_source="0.9 x SL's final validation accuracy on wifi",
        prune_start=dict(seconds=5.0, final_val_accuracy=0.6),
        command="tfsplit-bench-network --workdir=/tmp/x",
    )
    out = tmp_path / "results" / "links" / "plain"
    out.mkdir(parents=True)
    (out / link_report.RESULTS_FILE).write_text(json.dumps(result))
    text = pages.render("results/links/plain", str(out), "plots")
    assert "| wifi (100 Mbit/s, 5 ms) | prune * | tc tbf | 2.00 | 1.00 | 36.0 | 30.0 |" in text
    assert (
        "| poor (2 Mbit/s, 100 ms) | sl | proxy | 2.00 | 1.00 | 48.0 | 40.0 | not reached" in text
    )
    # final validation, the last epoch's change on it, final test
    assert "| 80.00% | +30.00 | 79.00% |" in text and "| 80.00% | +0.00 | 79.00% |" in text
    assert "- poor: shaped by proxy (not root)." in text
    assert "- Target: 72.00% validation accuracy (0.9 x SL's final validation" in text
    assert "- \\* prune: fine-tuning only (5.0 s, 60.00% validation accuracy)." in text
    assert "- Command: `tfsplit-bench-network --workdir=/tmp/x`." in text
    # wifi's SL moved 30 points in its last epoch, prune 3; poor's SL settled.
    assert "- Not converged (the last epoch moved validation accuracy by 1 point or more): " \
        "prune on wifi, sl on wifi.\n" in text  # fmt: skip
    assert text.endswith("![time_to_accuracy of results/links/plain]"
                         "(plots/results_links_plain_time_to_accuracy.png)")  # fmt: skip
    [path] = pages.draw("results/links/plain", str(out), str(tmp_path / "plots"))
    assert path.endswith("results_links_plain_time_to_accuracy.png")
    assert os.path.getsize(path) > 1000
    del result["target_accuracy"]
    (out / link_report.RESULTS_FILE).write_text(json.dumps(result))
    with pytest.raises(ValueError, match="lacks target_accuracy"):
        pages.render("results/links/plain", str(out), "plots")


def _leakage_run(method, split, seed, vals, aucs):
    epochs = [dict(epoch=i + 1, val_accuracy=v) for i, v in enumerate(vals)]
    epochs[-1].update(aucs)
    return dict(method=method, split=split, task="binary", noise=0.0, seed=seed,
                final_val_accuracy=vals[-1], final_test_accuracy=vals[-1] - 0.01, epochs=epochs)  # fmt: skip


def test_a_leakage_section_is_drawn_from_its_file(tmp_path):
    cut = "leakage_cut_gradient_"
    runs = {
        "sl_plain_binary_noise0_seed0": _leakage_run(
            "sl", "plain", 0, [0.5, 0.80], {cut + "norm": 0.9, cut + "cosine": 0.6}
        ),
        "sl_plain_binary_noise0_seed1": _leakage_run(
            "sl", "plain", 1, [0.5, 0.90], {cut + "norm": 0.7, cut + "cosine": 0.8}
        ),
        "deprune_ushaped_binary_noise0_seed0": _leakage_run(
            "deprune", "ushaped", 0, [0.9, 0.905],
            {"leakage_top_gradient_norm": 0.95, "leakage_top_gradient_cosine": 1.0},
        ),  # fmt: skip
    }
    out = tmp_path / "results" / "leakage" / "x"
    out.mkdir(parents=True)
    result = dict(command="tfsplit-bench-leakage --workdir=/tmp/x", runs=runs)
    (out / leakage_report.RESULTS_FILE).write_text(json.dumps(result))
    text = pages.render("results/leakage/x", str(out), "plots")
    assert text.startswith("Seeds 0, 1: the mean ± the standard deviation over them.")
    # two seeds of SL: the mean ± sd of each figure; the split shows no top, so no top column
    assert "| sl | plain | binary | 0 | 2 | 85.00 ± 7.07% | +30.00 / +40.00 | 84.00 ± 7.07% | " \
        "0.800 ± 0.141 / 0.700 ± 0.141 | - |" in text  # fmt: skip
    assert (
        "| deprune | ushaped | binary | 0 | 2 | 90.50% | +0.50 | 89.50% | - | 0.950 / 1.000 |"
        in text
    )
    assert "cut-1 activations" not in text
    assert "- Command: `tfsplit-bench-leakage --workdir=/tmp/x`." in text
    assert text.endswith("- Not converged (the last epoch moved validation accuracy by 1 point or "
                         "more): sl_plain_binary_noise0.")  # fmt: skip
    assert pages.draw("results/leakage/x", str(out), str(tmp_path / "plots")) == []
    del runs["sl_plain_binary_noise0_seed1"]["epochs"][-1]["val_accuracy"]
    (out / leakage_report.RESULTS_FILE).write_text(json.dumps(result))
    with pytest.raises(ValueError, match="run sl_plain_binary_noise0_seed1 lacks validated epochs"):
        pages.render("results/leakage/x", str(out), "plots")


def test_a_page_without_sections_or_results_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Nothing generated\n")
    with pytest.raises(ValueError, match="no generated section"):
        pages.update_page(str(page), str(tmp_path), str(tmp_path / "plots"))
    with pytest.raises(FileNotFoundError, match="tfsplit-reproduce --results_dir"):
        archive.load(str(tmp_path / "missing"))


def _short(value):
    """1.8e-2 for 0.0184, the way the docs write a distance; 0 for 0."""
    return "0" if value == 0 else f"{value:.1e}".replace("e-0", "e-")


_NUDGE_KEYS = ("keras_relative_l2", "litert_relative_l2")


def _nudged(rows):
    """'Keras a to b; LiteRT c to d' of `sensitivity`'s rows, the way the table writes it."""

    def span(key):
        low, high = sorted(row[key] for row in rows.values())[:: len(rows) - 1]
        return _short(low) if _short(low) == _short(high) else f"{_short(low)} to {_short(high)}"

    return "; ".join(span(key) for key in _NUDGE_KEYS)


def test_the_device_parity_table_is_the_committed_measurement():
    """docs/device-training.md's table of distances is results/device_training/parity.json."""
    result = json.loads((REPO_ROOT / "results" / "device_training" / "parity.json").read_text())
    runtime, wire = sorted(result["runtime_step_relative_l2"]), result["wire"]
    expected = {
        "the heads after the epoch": _short(result["epoch_relative_l2"]),
        "each device's epoch run again, against its own first run": (
            f"{_short(result['keras_run_again_relative_l2'])} and "
            f"{_short(result['litert_run_again_relative_l2'])} (each is deterministic)"
        ),
        "each LiteRT `train` step against the exported graph run by TensorFlow, from the same "
        "weights with the same inputs": (
            f"at most {_short(runtime[-2])} (one step: {_short(runtime[-1])})"
        ),
        "the LiteRT run's calls sent again to two fresh servers": (
            "0 (the same replies, bit for bit)" if result["server"]["identical_replies"] else "-"
        ),
        "the server's gradients, step 0": _short(wire[0]["gradient_relative_l2"]),
        "the server's gradients, step 1": _short(wire[1]["gradient_relative_l2"]),
        "step 1, with step 0's payload made the Keras device's": _short(
            result["server"]["step1_gradient_gap_with_step0_the_same"]
        ),
        "each device's epoch from the starting weights with one value one float32 step up, "
        "against its own run (Keras; LiteRT)": _nudged(result["one_weight_nudged"]),
        "the heads, trained on the same gradients for 4 steps": _short(
            result["same_gradients_4_steps_relative_l2"]
        ),
        "the heads, trained on the same gradients for the whole epoch": _short(
            result["same_gradients_epoch_relative_l2"]
        ),
    }
    for key, change in (
        ("gates_at_fixed_rate", "the gates at a fixed Adam rate of 0.05 a step"),
        ("float32_wire", "a float32 wire"),
        ("gates_at_fixed_rate_and_float32_wire", "both changes"),
    ):
        changed = result["config_changes"][key]
        expected[f"the epoch, {change}"] = _short(changed["epoch_relative_l2"])
        expected[f"the same gradients, {change}"] = _short(
            changed["same_gradients_epoch_relative_l2"]
        )
        expected[f"one value nudged, {change} (Keras; LiteRT)"] = _nudged(
            changed["one_weight_nudged"]
        )
    # One last-bit difference carries each device more than ten times the target from itself.
    nudges = result["one_weight_nudged"].values()
    assert all(row[key] > 10 * 1e-4 for row in nudges for key in _NUDGE_KEYS)
    page = (REPO_ROOT / "docs" / "device-training.md").read_text()
    rows = dict(
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in page.splitlines()
        if line.startswith("| ") and line.count("|") == 3
    )
    for measurement, value in expected.items():
        assert rows.get(measurement) == value, measurement
    # The float32 wire's same-gradients runs: the same channels sent, and one runtime step apart.
    float32_wire = result["config_changes"]["float32_wire"]
    both = result["config_changes"]["gates_at_fixed_rate_and_float32_wire"]
    assert float32_wire["same_gradients_same_channels"] and both["same_gradients_same_channels"]
    steps = float32_wire["same_gradients_runtime_step_relative_l2"]
    others = sorted(steps[:1] + steps[2:])
    prose = " ".join(page.split())
    last = [f"{row['keras_gradient_steps'][-1]:.2f}" for row in nudges]
    assert f"to the nudged Keras device end the epoch {last[0]} and {last[1]} apart" in prose
    # Its farthest runtime step moved conv1 to conv3 and one channel of conv3's batch norm.
    farthest = float32_wire["same_gradients_farthest_step"]
    assert farthest["step"] == 1
    assert sorted(farthest["values_apart"]) == [
        f"conv{layer}{part}:0"
        for layer in (1, 2, 3)
        for part in ("/kernel", "_bn/beta", "_bn/gamma")
        if (layer, part) != (3, "_bn/gamma")
    ]
    assert farthest["values_apart"]["conv3_bn/beta:0"] == 1
    assert (
        f"end {_short(steps[1])} apart (every other step {_short(others[-1])} at most; with both "
        f"changes {_short(both['same_gradients_runtime_step_relative_l2'][1])} at step 1)"
    ) in prose
    kernels = {
        cells[0]: cells[1:]
        for cells in (
            [cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in page.splitlines()
            if line.strip().startswith("| ") and line.count("|") == 4
        )
    }
    for resolver, label in (
        ("AUTO", "XNNPACK (`AUTO`, the device's)"),
        ("BUILTIN_WITHOUT_DEFAULT_DELEGATES", "builtin, no delegate"),
        ("BUILTIN_REF", "reference"),
    ):
        measured = result["kernel_sets"][resolver]
        assert kernels[label] == [
            f"{measured['float32_differing']:,} of {measured['values']:,}",
            f"{measured['float16_differing']:,}",
        ], resolver


def _table(page, header):
    """The rows of the markdown table under the line `header`, as lists of cells."""
    lines = page[page.index(header) :].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_device_step_tables_are_the_committed_measurements():
    """docs/results.md's LiteRT step and profile tables, and the oneDNN-off ratios, are the
    committed files'."""
    results = REPO_ROOT / "results" / "device_training"
    step = json.loads((results / "bench_head_trainable.json").read_text())
    onednn_off = json.loads((results / "onednn_off" / "bench_head_trainable.json").read_text())
    profile = json.loads((results / "step_profile.json").read_text())["share_by_op"]
    page = PAGE.read_text()
    assert _table(page, "One training step of the head (the third command") == [
        [
            str(row["batch"]),
            f"{row['step_ms']:.2f}",
            f"{row['step_ms_per_sample']:.2f}",
            f"{row['keras_step_ms']:.2f}",
            f"{row['keras_step_ms_per_sample']:.2f}",
            f"{row['litert_over_keras']:.2f}",
        ]
        for row in step["rows"]
    ]
    at = {row["batch"]: row for row in step["rows"]}
    off = {row["batch"]: row for row in onednn_off["rows"]}
    prose = " ".join(page.split())
    assert f"the LiteRT step costs {at[32]['litert_over_keras']:.2f}x the Keras step" in prose
    assert (
        f"takes {off[32]['keras_step_ms']:.2f} ms at batch 32, and the LiteRT step "
        f"{off[32]['litert_over_keras']:.2f}x it ({off[8]['litert_over_keras']:.2f}x at batch 8, "
        f"{off[1]['litert_over_keras']:.2f}x at batch 1)"
    ) in prose
    rows = _table(page, "Where the time goes, op by op (the fifth command")
    *named, (rest_label, rest_share) = rows
    assert rest_label.startswith("interpreter, ")
    # "XNNPACK matmul (the convolutions, ...)" is the profile's "XNNPACK matmul (gemm)".
    keys = [
        label.split(" (")[0].replace("XNNPACK matmul", "XNNPACK matmul (gemm)")
        for label, _ in named
    ]
    for key, (label, share) in zip(keys, named):
        assert share == f"{100 * profile[key]:.1f}%", label
    assert rest_share == f"{100 * (sum(profile.values()) - sum(profile[k] for k in keys)):.1f}%"


def test_the_device_training_table_is_the_committed_run():
    """docs/results.md's two device trainers are results/device_training/deprune.json's."""
    result = json.loads((REPO_ROOT / "results" / "device_training" / "deprune.json").read_text())
    rows = {
        cells[0]: cells[1:]
        for cells in _table(PAGE.read_text(), "`results/device_training/deprune.json`:")
    }
    for device, label in (
        ("keras", "Keras (`tfsplit-train --server`)"),
        ("litert", "LiteRT (`tfsplit-device-train`)"),
    ):
        run = result["devices"][device]
        peak = f"{run['peak_rss_mib']:,.1f} MiB"
        assert rows[label] == [
            f"{100 * run['final_val_accuracy']:.2f}%",
            f"{100 * run['final_test_accuracy']:.2f}%",
            f"{run['train_payload_bytes_up']:,} / {run['train_payload_bytes_down']:,}",
            f"{run['process_seconds']:.1f} s",
            f"**{peak}**" if device == "litert" else peak,
        ], device
    assert result["devices"]["litert"]["peak_rss_mib"] * 2**20 < 250e6  # the device's budget
