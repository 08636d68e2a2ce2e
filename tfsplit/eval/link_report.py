"""Training over emulated links, kept as data: what `tfsplit-bench-network --results_dir` writes,
read back as text and as a plot of accuracy against training time on each link.

A results directory of the network benchmark holds one file, `bench_network.json`: each method's
row on each link (payload, times, final accuracies and its per-epoch validation records), the
links and how they were shaped, and the target that times to target count to.
"""

import os

import numpy as np

from tfsplit.callbacks.records import last_epoch_change
from tfsplit.eval import archive

RESULTS_FILE = "bench_network.json"
PLOTS = ("time_to_accuracy",)
_KEYS = ("rows", "links", "target_accuracy", "target_source")


def holds(results_dir):
    """Whether `results_dir` is a network benchmark's (not a reproduce run's)."""
    return os.path.isfile(os.path.join(results_dir, RESULTS_FILE))


def load(results_dir):
    """The benchmark's result dict, checked for the keys a section needs."""
    result = archive.read_result(results_dir, RESULTS_FILE, "tfsplit-bench-network --results_dir")
    path = os.path.join(results_dir, RESULTS_FILE)
    missing = [key for key in _KEYS if key not in result]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: write it again with the benchmark.")
    return result


def _cell(value, digits):
    return "not reached" if value is None else f"{value:,.{digits}f}"


def _points(moved):
    return "-" if moved is None else f"{moved:+.2f}"


def _link_label(entry):
    return f"{entry['name']} ({entry['rate_mbit']:g} Mbit/s, {entry['rtt_ms']:g} ms)"


def last_changes(result):
    """{'<method> on <link>': [points its last epoch moved validation accuracy]}, the runs that
    trained more than one epoch."""
    changes = {}
    for row in result["rows"]:
        moved = None if "error" in row else last_epoch_change(row["records"])
        if moved is not None:
            changes[f"{row['method']} on {row['link']}"] = [moved]
    return changes


def markdown_table(result):
    """The rows as one Markdown table: every method on every link."""
    lines = [
        "| link | method | shaping | payload MB up | payload MB down | training wall s "
        "(process) | fit s (records) | time to target s (fit) | final validation accuracy | "
        "last epoch's change on validation (points) | final test accuracy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_link = {entry["name"]: entry for entry in result["links"]}
    for row in result["rows"]:
        name = _link_label(by_link[row["link"]])
        method = row["method"] + (" *" if row.get("note") else "")
        if "error" in row:
            cells = [name, method, row["shaping"], f"failed: {row['error']}", *[""] * 7]
        else:
            cells = [
                name,
                method,
                row["shaping"],
                f"{row['payload_mb_up']:.2f}",
                f"{row['payload_mb_down']:.2f}",
                f"{row['process_seconds']:.1f}",
                f"{row['fit_seconds']:.1f}",
                _cell(row["seconds_to_target"], 1),
                f"{100 * row['final_val_accuracy']:.2f}%",
                _points(last_epoch_change(row["records"])),
                f"{100 * row['final_test_accuracy']:.2f}%",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sooner(fast, slow, than=""):
    """'1.33x sooner[ than X] (30.0 s vs 40.0 s)' of `fast` seconds against `slow` ones."""
    ratio, when = slow / fast, "sooner"
    if ratio < 1:
        ratio, when = 1 / ratio, "later"
    return f"{ratio:.2f}x {when}{than} ({fast:.1f} s vs {slow:.1f} s)"


def speedups(result, fast="deprune", slow="sl"):
    """A line per link: how much sooner `fast` finishes than `slow`, by the device process's
    time (which also holds start-up and the server's warm-up before the first step) and by
    `fit`'s own, and reaches the target where both do."""
    lines = []
    for entry in result["links"]:
        rows = {
            row["method"]: row
            for row in result["rows"]
            if row["link"] == entry["name"] and "error" not in row
        }
        if fast in rows and slow in rows:
            fast_row, slow_row = rows[fast], rows[slow]
            process = _sooner(
                fast_row["process_seconds"], slow_row["process_seconds"], f" than {slow.upper()}"
            )
            fit = _sooner(fast_row["fit_seconds"], slow_row["fit_seconds"])
            line = f"{entry['name']}: {fast} finishes {process}; its fit ends {fit}"
            to_target = fast_row["seconds_to_target"], slow_row["seconds_to_target"]
            if None not in to_target:
                line += f"; it reaches the target {_sooner(*to_target)}"
            lines.append(line)
    return lines


def section_lines(result):
    """A page section's text lines (before its plots): the table, the links, target, ratios."""
    lines = [markdown_table(result), ""]
    for entry in result["links"]:
        note = f" ({entry['note']})" if entry.get("note") else ""
        lines.append(f"- {entry['name']}: shaped by {entry['shaping']}{note}.")
    target = result["target_accuracy"]
    target = "none" if target is None else f"{100 * target:.2f}% validation accuracy"
    lines.append(f"- Target: {target} ({result['target_source']}).")
    notes = [row["note"] for row in result["rows"] if row.get("note")]
    start = result.get("prune_start")
    if notes and start:
        lines.append(
            f"- \\* prune: {notes[0]} ({start['seconds']:.1f} s, "
            f"{100 * start['final_val_accuracy']:.2f}% validation accuracy)."
        )
    lines += [f"- {line}." for line in speedups(result)]
    if result.get("machine"):
        lines.append(f"- Machine: {result['machine']}.")
    if result.get("command"):
        lines.append(f"- Command: `{result['command']}`.")
    return lines


def draw_time_to_accuracy(result, figure):
    """Validation accuracy against training time, a panel per link, the target dashed."""
    entries = result["links"]
    panels = figure.subplots(1, len(entries), sharey=True, squeeze=False)[0]
    for axes, entry in zip(panels, entries):
        for row in result["rows"]:
            if row["link"] != entry["name"] or not row.get("records"):
                continue
            seconds = [r["elapsed_seconds"] for r in row["records"]]
            accuracy = 100 * np.array([r["val_accuracy"] for r in row["records"]])
            label = row["method"] + (" *" if row.get("note") else "")
            axes.plot(seconds, accuracy, marker=".", label=label)
        if result["target_accuracy"] is not None:
            axes.axhline(100 * result["target_accuracy"], color="grey", linestyle="--")
        axes.set(title=_link_label(entry), xlabel="training time, s")
    panels[0].set_ylabel("validation accuracy, %")
    panels[0].legend(fontsize=8)
