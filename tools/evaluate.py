"""Accuracy versus budget for one trained run: adaptive inference from one model.

  tfsplit-evaluate --workdir=/tmp/tfsplit/deprune --budgets=4,8,16,32

Evaluates the trained SplitModel at each budget k' (its top-k' channels by gate importance) on
the run's test set and reports test accuracy and inference payload bytes per sample; writes
budget_curve.csv and budget_curve.png into --out (default: the run's workdir). Says which budgets
the run was trained to serve (its final budget; with nested budgets, k/8 to k by default) and
warns for each budget asked for outside them.
"""

import sys

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.eval import curve
from tfsplit_tools import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished training run.", required=True)
_BUDGETS = flags.DEFINE_list(
    "budgets",
    None,
    "Budgets to evaluate; default 1/8, 1/4, 1/2 and all of the run's final budget.",
)
_OUT = flags.DEFINE_string("out", None, "Where to write the CSV and PNG; default --workdir.")


def parse_budgets(values):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--budgets takes integers. Received: {','.join(values)}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    budgets = parse_budgets(_BUDGETS.value) if _BUDGETS.value else None
    rows, summary = curve.evaluate_workdir(_WORKDIR.value, budgets)
    title = f"{summary['mode']}, {summary['model']}, {summary['dataset']}"
    csv_path, png_path = curve.write_curve(rows, _OUT.value or _WORKDIR.value, title)
    print(f"{'budget':>7} {'test accuracy':>14} {'payload bytes/sample':>21}")
    for row in rows:
        print(
            f"{row['budget']:>7} {100 * row['test_accuracy']:>13.2f}% "
            f"{row['payload_bytes_per_sample']:>21,}" + ("" if row["served"] else "  (not trained)")
        )
    smallest, largest = summary["served_budgets"]
    served = f"budget {smallest}" if smallest == largest else f"budgets {smallest} to {largest}"
    print(f"the model was trained to serve {served}")
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
