"""Accuracy versus budget: one trained model serving many budgets (adaptive inference).

The gates rank the channels, so a model trained at budget k can send its k' <= k most important
channels when the link is poor. This measures what each k' costs in accuracy and saves in bytes.
"""

import csv
import os

from tfsplit import codec, data, inference

CSV_FILE = "budget_curve.csv"
PNG_FILE = "budget_curve.png"
FIELDS = ("budget", "test_accuracy", "bytes_per_sample")


def default_budgets(final_budget):
    """1/8, 1/4, 1/2 and all of the final budget (at least one channel each)."""
    return sorted({max(1, final_budget // 8), max(1, final_budget // 4),
                   max(1, final_budget // 2), final_budget})


def check_budgets(budgets, channels, has_bottleneck):
    budgets = list(budgets)
    if not budgets:
        raise ValueError("Expected at least one budget. Received: budgets=[]")
    for k in budgets:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= channels:
            raise ValueError(f"Each budget must be an integer in [1, {channels}]. "
                             f"Received: budget={k!r}")
        if not has_bottleneck and k != channels:
            raise ValueError(f"A model without the masked bottleneck sends all {channels} "
                             f"channels; it has no ranking for a smaller budget. Received: {k}")
    return budgets


def budget_curve(split, dataset, budgets, wire_dtype):
    """Test accuracy and inference bytes per sample at each budget.

    Args:
      split: a trained `SplitModel`.
      dataset: batched (images, labels) test data, normalized as in training.
      budgets: channel counts to evaluate.
      wire_dtype: the activations' wire dtype.

    Returns:
      list of dicts with FIELDS, in the order of `budgets`.
    """
    budgets = check_budgets(budgets, split.channels, split.encoder is not None)
    predict = inference.build_predict_fn(split, wire_dtype)
    height, width, _ = split.wire_shape
    return [
        dict(budget=k, test_accuracy=inference.accuracy(predict, dataset, k),
             bytes_per_sample=codec.payload_nbytes(1, height, width, k, wire_dtype, False,
                                                   channels=split.channels))
        for k in budgets
    ]


def evaluate_run(run, budgets=None, batch_size=500):
    """`budget_curve` for a loaded training run (`tfsplit.export.load_run`) on its test set."""
    budgets = default_budgets(run.final_budget) if budgets is None else budgets
    dataset = data.build_eval_dataset(run.test_images, run.test_labels, run.info, batch_size)
    return budget_curve(run.split, dataset, budgets, run.config.wire.activation_dtype)


def write_curve(rows, out_dir, title):
    """Writes the rows as CSV and as a PNG plot (accuracy against bytes); returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(out_dir, CSV_FILE), os.path.join(out_dir, PNG_FILE)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({key: row[key] for key in FIELDS} for row in rows)
    figure, axis = pyplot.subplots(figsize=(5, 3.5), dpi=120)
    axis.plot([r["bytes_per_sample"] for r in rows], [100 * r["test_accuracy"] for r in rows],
              marker="o")
    for row in rows:
        axis.annotate(f"k={row['budget']}", (row["bytes_per_sample"], 100 * row["test_accuracy"]),
                      textcoords="offset points", xytext=(4, -10), fontsize=8)
    axis.set_xscale("log", base=2)  # budgets double from point to point.
    axis.set_xlabel("inference bytes per sample")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path)
    pyplot.close(figure)
    return csv_path, png_path
