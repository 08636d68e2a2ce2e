"""The paper's claims side by side: SL, CA-SL, deprune and prune on the same data, model and wire.

Trains every method into its own sub-directory of one workdir (re-running resumes), then builds one
table from the runs' own records and computes the paper's three ratios from that table:
deprune vs SL (network, accuracy), deprune vs CA-SL (accuracy at the same final budget), prune vs
CA-SL (time to a target accuracy). Prune's starting model is trained as its own run and reported on
its own row, so the time comparison is honest both ways.
"""

import copy
import csv
import json
import os

from absl import logging

from tfsplit import callbacks
from tfsplit.eval import curve
from tfsplit.training import trainer as trainer_lib

METHODS = ("sl", "casl", "deprune", "prune")
NESTED = "deprune (nested budgets)"  # deprune trained to serve every budget: the curve's model.
UNNESTED = "deprune (without nested budgets)"  # deprune trained for its final budget alone.
# The "section.key" settings every method's config must share.
_SHARED = "data.name model.backbone model.cut model.width_multiplier wire.activation_dtype"


def split_prune_config(prune_config):
    """Prune's unmasked first phase as a run of its own, and the prune phases that start from it."""
    phases = list(prune_config.phases)
    if len(phases) < 2 or phases[0].budget != 0:
        raise ValueError(
            "The prune config must start with an unmasked phase (budget 0) followed "
            f"by at least one prune phase. Received phases: {phases}"
        )
    start, finetune = copy.deepcopy(prune_config), copy.deepcopy(prune_config)
    start.phases = phases[:1]
    finetune.phases = phases[1:]
    return start, finetune


def time_to_target(records, target):
    """(seconds, epochs) until the first epoch whose validation accuracy reaches `target`, else
    Nones."""
    for record in records:
        if record["val_accuracy"] >= target:
            return record["elapsed_seconds"], record["epoch"]
    return None, None


def table_row(method, summary, records, target):
    seconds, epochs = time_to_target(records, target)
    return dict(
        method=method,
        final_budget=summary["final_budget"],
        final_val_accuracy=summary["final_val_accuracy"],
        final_test_accuracy=summary["final_test_accuracy"],
        payload_mb_up=summary["train_payload_bytes_up"] / 1e6,
        payload_mb_down=summary["train_payload_bytes_down"] / 1e6,
        inference_payload_bytes_per_sample=summary["inference_payload_bytes_per_sample"],
        wall_seconds=summary["wall_seconds"],
        epochs=summary["epochs"],
        seconds_to_target=seconds,
        epochs_to_target=epochs,
        last_epoch_change_points=callbacks.last_epoch_change(records),
    )


def paper_ratios(rows):
    """The paper's three comparisons, from the table rows (keyed by method)."""
    by = {row["method"]: row for row in rows}
    sl, casl, deprune, prune = by["sl"], by["casl"], by["deprune"], by["prune"]
    start = by.get("prune (start model)")

    def traffic(row):
        return row["payload_mb_up"] + row["payload_mb_down"]

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def points(a, b):
        return 100 * (a["final_test_accuracy"] - b["final_test_accuracy"])

    prune_total = None
    if prune["seconds_to_target"] is not None and start is not None:
        prune_total = prune["seconds_to_target"] + start["wall_seconds"]
    return dict(
        deprune_vs_sl_network=ratio(traffic(sl), traffic(deprune)),
        deprune_vs_sl_accuracy_points=points(deprune, sl),
        deprune_vs_casl_accuracy_points=points(deprune, casl),
        same_final_budget=deprune["final_budget"] == casl["final_budget"],
        prune_vs_casl_time_to_target=ratio(casl["seconds_to_target"], prune["seconds_to_target"]),
        prune_vs_casl_time_to_target_with_start=ratio(casl["seconds_to_target"], prune_total),
    )


def _train(config, workdir):
    summary = trainer_lib.train(config, workdir)
    return summary, callbacks.read_records(workdir)


def reproduce(configs, workdir, target_accuracy=None, init_from=None):
    """Trains the four methods (and CA-SL at deprune's curve budgets) and tabulates them.

    Args:
      configs: dict with ConfigDicts for "sl", "casl", "deprune" and "prune" (prune starting with
        an unmasked phase unless `init_from` is given). All must share data, model and wire.
      workdir: one sub-directory per run is made here.
      target_accuracy: validation accuracy for the time-to-target columns; default: CA-SL's
        final validation accuracy less one point (so CA-SL reaches it, near its end).
      init_from: a finished run to start prune from instead of training its start model (prune's
        unmasked first phase is then skipped).

    Returns:
      dict with "rows" (the table), "ratios", "curve" (one deprune model with nested budgets, at
      1/8, 1/4, 1/2 and all of its final budget, next to CA-SL trained at each), and
      "target_accuracy". Deprune is also trained the other way, with nested budgets where its
      config has none ("deprune (nested budgets)", the curve's model) or without them
      ("deprune (without nested budgets)"), as an extra run and row.
    """
    _check_same_setting(configs)
    runs = {}
    for method in ("sl", "casl", "deprune"):
        logging.info("reproduce: training %s", method)
        runs[method] = _train(configs[method], os.path.join(workdir, method))
    # Deprune with and without nested budgets, whichever its config makes, so that what one
    # model for every budget costs at the final budget is measured: the other is its own run.
    other = copy.deepcopy(configs["deprune"])
    nested = not other.budget_sampling.nested
    other.budget_sampling.nested = nested
    other_dir = "deprune_nested" if nested else "deprune_unnested"
    runs[NESTED if nested else UNNESTED] = _train(other, os.path.join(workdir, other_dir))
    curve_dir = other_dir if nested else "deprune"
    if init_from:
        finetune = copy.deepcopy(configs["prune"])
        if finetune.phases[0].budget == 0:  # the start model is given: skip its phase.
            finetune = split_prune_config(finetune)[1]
        finetune.init_from = init_from
    else:
        start, finetune = split_prune_config(configs["prune"])
        runs["prune (start model)"] = _train(start, os.path.join(workdir, "prune_start"))
        finetune.init_from = os.path.join(workdir, "prune_start")
    runs["prune"] = _train(finetune, os.path.join(workdir, "prune"))

    curve_rows = _deprune_curve(configs["casl"], runs, workdir, os.path.join(workdir, curve_dir))

    target = target_accuracy
    if target is None:
        target = runs["casl"][0]["final_val_accuracy"] - 0.01
    order = ["sl", "casl", "deprune", NESTED, UNNESTED, "prune (start model)", "prune"]
    rows = [table_row(m, *runs[m], target) for m in order if m in runs]
    return dict(rows=rows, ratios=paper_ratios(rows), curve=curve_rows, target_accuracy=target)


def _deprune_curve(casl_config, runs, workdir, deprune_workdir):
    deprune_curve, summary = curve.evaluate_workdir(deprune_workdir)
    final_budget = summary["final_budget"]
    rows = []
    for point in deprune_curve:
        k = point["budget"]
        if k == final_budget:
            casl_accuracy = runs["casl"][0]["final_test_accuracy"]
        else:
            config = copy.deepcopy(casl_config)
            config.phases[0].budget = k
            summary, _ = _train(config, os.path.join(workdir, f"casl_{k}"))
            casl_accuracy = summary["final_test_accuracy"]
        rows.append(
            dict(
                budget=k,
                deprune_test_accuracy=point["test_accuracy"],
                casl_test_accuracy=casl_accuracy,
                payload_bytes_per_sample=point["payload_bytes_per_sample"],
            )
        )
    return rows


def _check_same_setting(configs):
    missing = set(METHODS) - set(configs)
    if missing:
        raise ValueError(
            f"reproduce needs a config for each of {METHODS}; missing {sorted(missing)}."
        )
    reference = configs["deprune"]
    for method in METHODS:
        config = configs[method]
        for section, key in (setting.split(".") for setting in _SHARED.split()):
            if config[section][key] != reference[section][key]:
                raise ValueError(
                    f"All methods must share {section}.{key}; {method} has "
                    f"{config[section][key]!r}, deprune has {reference[section][key]!r}."
                )


def _format(value, digits=2):
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _per_seed(row, key, cell):
    """`cell` of the value, then each seed's in parentheses where the seeds differ."""
    values = row.get(f"{key}_per_seed")
    text = cell(row[key])
    cells = [cell(value) for value in values or ()]
    if len(set(cells)) < 2:  # one seed, or every seed alike (the bytes)
        return text
    return f"{text} ({' / '.join(cells)})"


def _percent(row, key):
    return _per_seed(row, key, lambda value: f"{100 * value:.2f}%")


def _points(row, key):
    return _per_seed(row, key, lambda value: "-" if value is None else f"{value:+.2f}")


def _times(ratio):
    return "target not reached" if ratio is None else f"{ratio:.2f}x faster"


def _ratio_cells(result):
    """ratio(key, form): the ratio in `form` (a format string or function), then each seed's."""

    def ratio(key, form):
        cell = form if callable(form) else form.format
        row = dict(value=result["ratios"][key])
        if "ratios_per_seed" in result:
            row["value_per_seed"] = [ratios[key] for ratios in result["ratios_per_seed"]]
        return _per_seed(row, "value", cell)

    return ratio


def format_markdown(result):
    """The table, the curve and the three ratios as Markdown."""
    rows, ratios = result["rows"], result["ratios"]
    lines = [
        "| method | final budget | final validation accuracy | test accuracy | training "
        "payload MB up | training payload MB down | inference payload bytes/sample | wall "
        "seconds | epochs | seconds to target | epochs to target | last epoch's change "
        "(points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["method"],
            _format(row["final_budget"]),
            _percent(row, "final_val_accuracy"),
            _percent(row, "final_test_accuracy"),
            _format(row["payload_mb_up"]),
            _format(row["payload_mb_down"]),
            _format(row["inference_payload_bytes_per_sample"]),
            _format(row["wall_seconds"], 1),
            _format(row["epochs"]),
            _format(row["seconds_to_target"], 1),
            _format(row["epochs_to_target"]),
            _points(row, "last_epoch_change_points"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Target (validation) accuracy: {100 * result['target_accuracy']:.2f}%. Times to target "
        "and the last epoch's change are on the validation split; test accuracy is evaluated "
        "once per run, at its end, and the comparisons below are on it.",
        "",
        "| budget | deprune with nested budgets (one model) | CA-SL trained at that budget | "
        "inference payload bytes/sample |",
        "|---|---|---|---|",
    ]
    for point in result["curve"]:
        lines.append(
            f"| {point['budget']} | {_percent(point, 'deprune_test_accuracy')} | "
            f"{_percent(point, 'casl_test_accuracy')} | "
            f"{_format(point['payload_bytes_per_sample'], 1)} |"
        )
    ratio = _ratio_cells(result)
    lines += [
        "",
        f"- deprune vs SL: {ratio('deprune_vs_sl_network', _format)}x less training payload, "
        f"{ratio('deprune_vs_sl_accuracy_points', '{:+.2f}')} accuracy points "
        "(paper: 4x, no loss).",
        "- deprune vs CA-SL at the same final budget: "
        f"{ratio('deprune_vs_casl_accuracy_points', '{:+.2f}')} accuracy points (paper: +4)"
        + ("" if ratios["same_final_budget"] else " - WARNING: final budgets differ")
        + ".",
        f"- prune vs CA-SL, time to target: {ratio('prune_vs_casl_time_to_target', _times)} "
        f"fine-tuning, {ratio('prune_vs_casl_time_to_target_with_start', _times)} counting "
        "the start model's training (paper: up to 6x faster).",
    ]
    if "seeds" in result:
        lines += [
            "",
            f"Means over seeds {', '.join(map(str, result['seeds']))}; each seed's value in "
            "parentheses, in that order. Each seed's own tables: seed_<seed>/results.md.",
        ]
    return "\n".join(lines) + "\n"


def write_results(result, workdir):
    """results.csv (the table), budget_curve_vs_casl.csv and results.md; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    names = ("results.csv", "budget_curve_vs_casl.csv", "results.md")
    paths = {name: os.path.join(workdir, name) for name in names}
    for name, rows in zip(names, (result["rows"], result["curve"])):
        with open(paths[name], "w", newline="") as f:
            # The columns are those of `table_row` and `_deprune_curve`, in their order.
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    with open(paths["results.md"], "w") as f:
        f.write(format_markdown(result))
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return paths
