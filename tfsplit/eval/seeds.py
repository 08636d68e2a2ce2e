"""The reproduce table over several seeds: each seed's runs, and their means.

On data where a single run's accuracy moves by points with the seed (the hard embedded set at
ten epochs: docs/experiments.md), one run per method cannot tell methods apart; the mean of a few
can, and the per-seed values show how far apart they are. Each seed trains into
`<workdir>/seed_<s>` with its own table there; the means go in `<workdir>`.
"""

import copy
import os

import numpy as np
from absl import logging

from tfsplit.eval import reproduce as reproduce_lib

# Row columns that differ between seeds and are shown seed by seed beside their mean.
PER_SEED_COLUMNS = ("final_val_accuracy", "final_test_accuracy", "last_epoch_change_points")
CURVE_COLUMNS = ("deprune_test_accuracy", "casl_test_accuracy")


def seed_workdir(workdir, seed):
    return os.path.join(workdir, f"seed_{seed}")


def reproduce_at_seeds(configs, workdir, seeds, target_accuracy=None, init_from=None):
    """`reproduce.reproduce` once per seed, then `combine` of the results.

    Args:
      configs: as for `reproduce.reproduce`; their `seed` is replaced by each of `seeds`.
      workdir: seed s trains in `<workdir>/seed_<s>` (re-running resumes each run).
      seeds: two or more distinct ints.
      target_accuracy, init_from: as for `reproduce.reproduce`; the default target is each seed's
        own CA-SL accuracy less one point.

    Returns:
      `combine` of the per-seed results; each seed's tables are also written in its directory.
    """
    seeds = [int(seed) for seed in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"Give two or more distinct seeds. Received: {seeds}")
    results = []
    for seed in seeds:
        logging.info("reproduce: seed %d of %s", seed, seeds)
        seeded = {method: copy.deepcopy(config) for method, config in configs.items()}
        for config in seeded.values():
            config.seed = seed
        directory = seed_workdir(workdir, seed)
        result = reproduce_lib.reproduce(seeded, directory, target_accuracy, init_from)
        reproduce_lib.write_results(result, directory)
        results.append(result)
    return combine(results, seeds)


def spread_text(values, digits, unit=""):
    """'mean ± sd' of values over seeds (sd with n - 1), or the one value alone."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}{unit}"


def _mean(values):
    """Mean of the values, or None when any is None (a target some seed never reached)."""
    if any(value is None for value in values):
        return None
    if all(isinstance(value, bool) for value in values):
        return all(values)
    return float(np.mean(values))


def _combine_rows(rows_by_seed, per_seed_columns):
    """One row per position: the mean of each numeric column, lists of `per_seed_columns`."""
    combined = []
    for rows in zip(*rows_by_seed):
        row = dict(rows[0])
        for key, value in row.items():
            values = [r[key] for r in rows]
            if any(v != value for v in values):  # equal ones (budgets, bytes) keep their type
                row[key] = _mean(values)
        for key in per_seed_columns:
            row[f"{key}_per_seed"] = [r[key] for r in rows]
        combined.append(row)
    return combined


def combine(results, seeds):
    """Several seeds' `reproduce` results as one of the same form, with means.

    Rows and curve points are matched by position (every seed runs the same methods and budgets);
    numeric columns become their mean (None where any seed has None), the columns in
    `PER_SEED_COLUMNS` and `CURVE_COLUMNS` also keep each seed's value, and each ratio is the mean
    of the seeds' ratios (a time-to-target ratio is taken within a seed, against its own target).
    """
    methods = [[row["method"] for row in result["rows"]] for result in results]
    budgets = [[point["budget"] for point in result["curve"]] for result in results]
    if any(m != methods[0] for m in methods) or any(b != budgets[0] for b in budgets):
        raise ValueError(
            f"Every seed must run the same methods and budgets. Received methods {methods}, "
            f"curve budgets {budgets}."
        )
    ratios = {
        key: _mean([result["ratios"][key] for result in results]) for key in results[0]["ratios"]
    }
    return dict(
        rows=_combine_rows([r["rows"] for r in results], PER_SEED_COLUMNS),
        ratios=ratios,
        ratios_per_seed=[result["ratios"] for result in results],
        curve=_combine_rows([r["curve"] for r in results], CURVE_COLUMNS),
        target_accuracy=_mean([result["target_accuracy"] for result in results]),
        seeds=list(seeds),
    )
