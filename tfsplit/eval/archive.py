"""A reproduce run kept as data: what `tfsplit-reproduce --results_dir` writes, and reads back.

Layout of a results directory (one per preset, committed under `results/`):

    results.json                  the aggregate (`reproduce` or `seeds.combine`: rows, ratios,
                                  curve, target), what the docs' tables are generated from
    config/<method>.json          each method's resolved config
    seed_<s>/<run>/summary.json   each run's summary and epoch records, as its workdir held
    seed_<s>/<run>/metrics.jsonl  them (<run>: sl, casl, deprune, deprune_nested or
                                  deprune_unnested, prune_start, prune, casl_<budget>)

Nothing is computed here: the figures are the runs' own, copied, so anyone can check a table
against the runs it came from, or draw it again.
"""

import json
import os
import shutil

from tfsplit.callbacks.records import METRICS_FILE, SUMMARY_FILE

RESULTS_FILE = "results.json"


def archive(workdir, out_dir, configs, seeds, result):
    """Copies what a reproduce run in `workdir` left into `out_dir` (see the module doc).

    Args:
      workdir: the reproduce workdir (one seed's runs in it, or `seed_<s>/` per seed).
      out_dir: the results directory; replaced.
      configs: {method: ConfigDict} as the runs were configured (before each seed's own).
      seeds: the seeds trained; with more than one, each has `seed_<s>/` in `workdir`.
      result: the aggregate that `reproduce` or `seeds.combine` returned.

    Returns:
      The number of runs archived.
    """
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("`seeds` must name at least one seed.")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.join(out_dir, "config"))
    for method, config in configs.items():
        with open(os.path.join(out_dir, "config", f"{method}.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    runs = 0
    for seed in seeds:
        source = workdir if len(seeds) == 1 else os.path.join(workdir, f"seed_{seed}")
        for run in sorted(os.listdir(source)):
            if not os.path.isfile(os.path.join(source, run, SUMMARY_FILE)):
                continue
            target = os.path.join(out_dir, f"seed_{seed}", run)
            os.makedirs(target)
            for name in (SUMMARY_FILE, METRICS_FILE):
                shutil.copyfile(os.path.join(source, run, name), os.path.join(target, name))
            runs += 1
    if not runs:
        raise FileNotFoundError(f"No finished run (a {SUMMARY_FILE}) under {workdir}.")
    with open(os.path.join(out_dir, RESULTS_FILE), "w") as f:
        json.dump(dict(result, seeds=seeds), f, indent=2, sort_keys=True)
        f.write("\n")
    return runs


def read_result(results_dir, file_name, writer):
    """The JSON file `file_name` of a results directory, which the command `writer` writes."""
    path = os.path.join(results_dir, file_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: expected a directory written by {writer}.")
    with open(path) as f:
        return json.load(f)


def load(results_dir):
    """(aggregate, {seed: {run: (summary, records)}}) of a results directory."""
    result = read_result(results_dir, RESULTS_FILE, "tfsplit-reproduce --results_dir")
    runs = {}
    for seed in result["seeds"]:
        seed_dir = os.path.join(results_dir, f"seed_{seed}")
        runs[seed] = {}
        for run in sorted(os.listdir(seed_dir)):
            with open(os.path.join(seed_dir, run, SUMMARY_FILE)) as f:
                summary = json.load(f)
            with open(os.path.join(seed_dir, run, METRICS_FILE)) as f:
                records = [json.loads(line) for line in f if line.strip()]
            runs[seed][run] = (summary, records)
    return result, runs
