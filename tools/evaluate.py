"""Accuracy versus budget for one trained run: adaptive inference from one model.

  tfsplit-evaluate --workdir=/tmp/tfsplit/deprune --budgets=4,8,16,32

Sends the top-k' channels by gate importance for each budget k' and reports test accuracy and
inference bytes per sample; writes budget_curve.csv and budget_curve.png into --out (default: the
run's workdir).
"""

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import curve
from tfsplit.export import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished training run.", required=True)
_BUDGETS = flags.DEFINE_list("budgets", None, "Budgets to evaluate; default 1/8, 1/4, 1/2 and "
                             "all of the run's final budget.")
_OUT = flags.DEFINE_string("out", None, "Where to write the CSV and PNG; default --workdir.")


def parse_budgets(values):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--budgets takes integers. Received: {','.join(values)}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run = load_run(_WORKDIR.value)
    budgets = parse_budgets(_BUDGETS.value) if _BUDGETS.value else None
    rows = curve.evaluate_run(run, budgets)
    title = f"{run.config.mode}, {run.summary['model']}, {run.info.name}"
    csv_path, png_path = curve.write_curve(rows, _OUT.value or _WORKDIR.value, title)
    print(f"{'budget':>7} {'test accuracy':>14} {'bytes/sample':>13}")
    for row in rows:
        print(f"{row['budget']:>7} {100 * row['test_accuracy']:>13.2f}% "
              f"{row['bytes_per_sample']:>13}")
    print(f"wrote {csv_path} and {png_path}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
