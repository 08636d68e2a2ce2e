"""The label-leakage benchmark's results, kept as data: what `tfsplit-bench-leakage` writes,
copied into a results directory, read back as a table of each setting's last epoch.

A results directory of the benchmark holds one file, `leakage.json`: the command, and per run its
method, split, task, noise and seed, its final validation and test accuracy, and per epoch its
validation accuracy and attack AUCs (`leakage_<what>_<attack>`).
"""

import os

from tfsplit.callbacks.records import last_epoch_change
from tfsplit.eval import archive
from tfsplit.eval.leakage import ATTACKS
from tfsplit.eval.seeds import spread_text

RESULTS_FILE = "leakage.json"
PLOTS = ()
# What the server sees, as `leakage.observed` names it, with the table's heading.
TARGETS = {
    "cut_gradient": "cut gradient",
    "top_gradient": "top's gradient",
    "activations": "cut-1 activations",
}
_RUN_KEYS = ("method", "split", "task", "noise", "final_val_accuracy", "final_test_accuracy")


def holds(results_dir):
    """Whether `results_dir` is the leakage benchmark's."""
    return os.path.isfile(os.path.join(results_dir, RESULTS_FILE))


def load(results_dir):
    """The benchmark's result dict, checked for what a section needs."""
    path = os.path.join(results_dir, RESULTS_FILE)
    result = archive.read_result(
        results_dir, RESULTS_FILE, "tfsplit-bench-leakage (leakage.json, copied from its workdir)"
    )
    if not isinstance(result.get("runs"), dict) or not result["runs"]:
        raise ValueError(f"{path} has no runs: write it again with the benchmark.")
    for name, run in result["runs"].items():
        missing = [key for key in _RUN_KEYS if key not in run]
        if missing or not run.get("epochs") or "val_accuracy" not in run["epochs"][-1]:
            raise ValueError(
                f"{path}: run {name} lacks {', '.join(missing) or 'validated epochs'}; it was "
                "written before the benchmark recorded validation accuracy. Run it again."
            )
    return result


def settings(result):
    """{setting: [its runs, one per seed]}, a setting being a run's name without its seed."""
    grouped = {}
    for name, run in result["runs"].items():
        grouped.setdefault(name.rsplit("_seed", 1)[0], []).append(run)
    return grouped


def last_changes(result):
    """{setting: [points its last epoch moved validation accuracy, per seed]}, the settings
    that trained more than one epoch."""
    changes = {}
    for setting, runs in settings(result).items():
        moved = [last_epoch_change(run["epochs"]) for run in runs]
        if None not in moved:
            changes[setting] = moved
    return changes


def rows(result):
    """Each setting's last epoch: accuracies and each attack's AUC ('-' where the split does not
    show that target), as text; over several seeds the mean ± the standard deviation."""
    table = []
    for runs in settings(result).values():
        first = runs[0]
        moved = [last_epoch_change(run["epochs"]) for run in runs]
        row = {
            "method": first["method"],
            "split": first["split"],
            "task": first["task"],
            "noise": f"{first['noise']:g}",
            "epochs": str(len(first["epochs"])),
            "val accuracy": spread_text([100 * r["final_val_accuracy"] for r in runs], 2, "%"),
            "last epoch's change": " / ".join("-" if m is None else f"{m:+.2f}" for m in moved),
            "test accuracy": spread_text([100 * r["final_test_accuracy"] for r in runs], 2, "%"),
        }
        for target, heading in TARGETS.items():
            keys = [f"leakage_{target}_{attack}" for attack in ATTACKS]
            if keys[0] not in first["epochs"][-1]:
                row[f"{heading}: norm / cosine"] = "-"
                continue
            row[f"{heading}: norm / cosine"] = " / ".join(
                spread_text([run["epochs"][-1][key] for run in runs], 3) for key in keys
            )
        table.append(row)
    return table


def section_lines(result):
    """A page section's text lines: the seeds, the table, the command."""
    table = rows(result)
    seeds = sorted({run.get("seed", 0) for run in result["runs"].values()})
    several = len(seeds) > 1
    lines = [
        f"Seed{'s' if several else ''} {', '.join(map(str, seeds))}"
        + (": the mean ± the standard deviation over them" if several else "")
        + ". AUCs of the last epoch (0.5: nothing leaks; the attacker's better of a score and its "
        "negation); accuracies on validation (every epoch) and test (once, at the end).",
        "",
    ]
    shown = [key for key in table[0] if any(row[key] != "-" for row in table)]
    lines.append("| " + " | ".join(shown) + " |")
    lines.append("|" + "|".join("---" if i < 4 else "---:" for i in range(len(shown))) + "|")
    lines += ["| " + " | ".join(row[key] for key in shown) + " |" for row in table]
    lines += ["", f"- Command: `{result['command']}`."]
    return lines
