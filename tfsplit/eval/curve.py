"""Accuracy versus budget: one trained model serving many budgets (adaptive inference).

The gates rank the channels, so a model trained at budget k can send its k' <= k most important
channels when the link is poor. Each point is `SplitModel.evaluate` at budget k': the same test
step that measured the run during training, with its accuracy and its byte count (what inference
sends up, in the codec's encoding), so the curve and the training records agree by construction.
"""

import csv
import json
import math
import os

import ml_collections
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tfsplit import callbacks
from tfsplit.training import trainer

CSV_FILE = "budget_curve.csv"
PNG_FILE = "budget_curve.png"
FIELDS = ("budget", "test_accuracy", "payload_bytes_per_sample")


def default_budgets(final_budget):
    """1/8, 1/4, 1/2 and all of the final budget (at least one channel each)."""
    return sorted({max(1, final_budget // fraction) for fraction in (8, 4, 2, 1)})


def served_budgets(config, final_budget):
    """(smallest, largest) budget a run was trained to serve: its final budget alone, or with
    nested budgets (`config.budget_sampling.nested`) every budget from ceil(k * min_fraction)
    up to k. At a smaller budget the tail meets inputs it never saw in training: accuracy falls
    far below that of a model trained at that budget."""
    if config.budget_sampling.nested:
        return max(1, math.ceil(config.budget_sampling.min_fraction * final_budget)), final_budget
    return final_budget, final_budget


def _count_samples(dataset):
    samples = sum(int(labels.shape[0]) for _, labels in dataset)
    if not samples:
        raise ValueError("The evaluation dataset is empty; expected at least one batch.")
    return samples


def budget_curve(split, dataset, budgets):
    """Test accuracy and payload bytes per sample of one model at each budget.

    The model's budget in force is restored afterwards. A model loaded without compiling is
    compiled with `SplitModel.compile`'s defaults (loss and accuracy); evaluation trains nothing.

    Args:
      split: a trained `SplitModel`.
      dataset: batched (images, labels) test data, normalized as in training.
      budgets: channel counts to evaluate, each in [1, C] (only C without a masked bottleneck).

    Returns:
      list of dicts with FIELDS, in the order of `budgets`. `payload_bytes_per_sample` is the
      codec's size of one image's payload sent alone (header and indices included), the same
      count as a run's `inference_payload_bytes_per_sample`.

    Raises:
      ValueError: no budgets, a bad budget (see `SplitModel.check_budget`) or an empty dataset.
    """
    budgets = list(budgets)
    if not budgets:
        raise ValueError("Expected at least one budget. Received: budgets=[]")
    for k in budgets:
        split.check_budget(k)
    if split.compiled_loss is None:
        split.compile()
    _count_samples(dataset)
    in_force = int(split.budget.numpy())
    rows = []
    try:
        for k in budgets:
            split.budget.assign(k)
            result = split.evaluate(dataset, verbose=0, return_dict=True)
            sent = int(split.payload_bytes(1, k, training=False)[0])
            rows.append(dict(zip(FIELDS, (int(k), float(result["accuracy"]), sent))))
    finally:
        split.budget.assign(in_force)
    return rows


def _read_json(workdir, name):
    path = os.path.join(workdir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {name} in {workdir}; expected the workdir of a finished tfsplit-train run."
        )
    with open(path) as f:
        return json.load(f)


def evaluate_workdir(workdir, budgets=None):
    """`budget_curve` of a finished training run on its own test set, as training evaluated it.

    Args:
      workdir: the workdir of a finished `tfsplit-train` run.
      budgets: default 1/8, 1/4, 1/2 and all of the run's final budget.

    Returns:
      (rows, summary): the curve and the run's summary.json, with `served_budgets` added: the
      (smallest, largest) budget the run was trained to serve. Each row says whether its budget
      is among them (`served`); a warning is logged for each one that is not.

    Raises:
      FileNotFoundError: `workdir` is not a finished run.
    """
    config = ml_collections.ConfigDict(_read_json(workdir, trainer.CONFIG_FILE))
    summary = _read_json(workdir, callbacks.SUMMARY_FILE)
    split = trainer.load_model(workdir)
    test_ds = trainer.build_data(config).test
    final_budget = int(summary["final_budget"])
    budgets = default_budgets(final_budget) if budgets is None else budgets
    smallest, largest = summary["served_budgets"] = served_budgets(config, final_budget)
    rows = budget_curve(split, test_ds, budgets)
    for row in rows:
        row["served"] = smallest <= row["budget"] <= largest
        if not row["served"]:
            logging.warning(
                "Budget %d: this model was trained to serve budgets %d to %d%s; expect an "
                "accuracy far below a model trained at %d.",
                row["budget"],
                smallest,
                largest,
                (
                    ""
                    if config.budget_sampling.nested
                    else " (train with nested budgets, "
                    "--config.budget_sampling.nested=True, to serve smaller ones)"
                ),
                row["budget"],
            )
    return rows, summary


def write_curve(rows, out_dir, title):
    """Writes the rows as CSV and as a PNG plot (accuracy against bytes); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(out_dir, CSV_FILE), os.path.join(out_dir, PNG_FILE)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({key: row[key] for key in FIELDS} for row in rows)
    points = [(row["payload_bytes_per_sample"], 100 * row["test_accuracy"]) for row in rows]
    # A Figure on its own Agg canvas, not pyplot: no global backend is set for the caller.
    figure = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.plot(*zip(*points), marker="o")
    for row, point in zip(rows, points):
        axis.annotate(
            f"k={row['budget']}", point, textcoords="offset points", xytext=(4, -10), fontsize=8
        )
    axis.set_xscale("log", base=2)  # budgets double from point to point.
    axis.set_xlabel("inference payload bytes per sample")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path)
    return csv_path, png_path
