"""How much of the labels the server can read: the norm and cosine attacks of Li et al. (ICLR
2022) on what the server sees, per method, plain split against U-shaped, with and without the
gradient noise defence, at every epoch.

  tfsplit-bench-leakage --workdir=/tmp/tfsplit/leakage --tasks=binary,all --noise=0,1
  tfsplit-bench-leakage --workdir=/tmp/leak-smoke --methods=sl --variant=smoke

Every run is `configs/<method>.py:<variant>` trained in process into --workdir/<run>: the plain
split, and the U-shaped one (the top after --top: by default the classifier's input); the binary
task is class --binary_class against the rest, "all" every class (one-vs-rest AUCs). At each
epoch's end the attacks run on the first --probe_batches validation batches in training mode
(`tfsplit.eval.leakage.LeakageProbe`): the plain split's gradient at the cut, the U-shape's
gradient from the top and its first cut's activations, each as sent (noise included). The noise
perturbs the gradient the server sends down (plain) or the one the top sends up (U-shaped); with
--noise_epochs_factor those runs train longer (named `..._noise<n>_epochs<f>x_seed<s>`). Writes
leakage.json (every run's AUCs and validation accuracy per epoch, its final validation and test
accuracy) and prints the final epoch's table (with several --seeds, each setting's mean and
standard deviation over them); `tfsplit-results-pages` draws a section of docs/results.md from a
copy of it in results/leakage/<name>/ (`tfsplit.eval.leakage_report`).
"""

import json
import os
import sys

from absl import flags

from tfsplit.callbacks.records import read_records
from tfsplit.device import stats
from tfsplit.eval import leakage, leakage_report
from tfsplit.training import trainer
from tfsplit.training.config import load_config_file, scale_epochs
from tfsplit_tools import cli

RESULT_FILE = "leakage.json"
METHODS = ("sl", "casl", "deprune", "prune")

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every run trains.", required=True)
_METHODS = flags.DEFINE_list("methods", ["sl", "casl", "deprune"], f"Of {METHODS}.")
_SPLITS = flags.DEFINE_list("splits", ["plain", "ushaped"], "plain and/or ushaped.")
_TASKS = flags.DEFINE_list("tasks", ["binary", "all"], "binary and/or all (every class).")
_NOISE = flags.DEFINE_list("noise", ["0", "1"], "Gradient noise levels (0 = no defence).")
_VARIANT = flags.DEFINE_string("variant", "", "Config variant of every run, e.g. smoke.")
_BINARY_CLASS = flags.DEFINE_integer("binary_class", 0, "The binary task's class.", lower_bound=0)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; with several, the table gives mean and std.")
_PROBE_BATCHES = flags.DEFINE_integer(
    "probe_batches", 2, "Validation batches attacked.", lower_bound=1
)
_NOISE_EPOCHS_FACTOR = flags.DEFINE_integer(
    "noise_epochs_factor",
    1,
    "Runs with noise train every phase this many times as many epochs: the noise slows "
    "training, and the defence's cost is measured where its runs have levelled off.",
    lower_bound=1,
)
_TOP = flags.DEFINE_string(
    "top", "classifier", "Where the U-shaped runs' top starts (a top point or a cut name)."
)
_CONFIGS_DIR = flags.DEFINE_string(
    "configs_dir", cli.clone_path("configs"), "Folder with sl.py, casl.py and deprune.py."
)


def _choices(values, allowed, flag):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"--{flag} takes some of {list(allowed)}. Received: {values}")
    return values


def _numbers(holder, convert, what):
    """A list flag's values as distinct numbers >= 0 (`convert`: int or float)."""
    flag, values = holder.name, holder.value
    try:
        numbers = [convert(v) for v in values]
    except ValueError:
        numbers = []
    if not numbers or len(set(numbers)) != len(numbers) or not min(numbers) >= 0:
        raise ValueError(f"--{flag} takes distinct {what} >= 0. Received: {values}")
    return numbers


def _config(method, split, task, noise, seed):
    if method == "prune":
        raise ValueError("prune starts from another run's model; measure sl, casl or deprune.")
    config = load_config_file(os.path.join(_CONFIGS_DIR.value, f"{method}.py"), _VARIANT.value)
    config.seed = seed
    config.data.binary_class = _BINARY_CLASS.value if task == "binary" else -1
    if noise:
        scale_epochs(config, _NOISE_EPOCHS_FACTOR.value)
    if split == "ushaped":
        config.model.top = _TOP.value
        config.wire.top_gradient_noise = noise
    else:
        config.wire.gradient_noise = noise
    return config


def _run(name, config):
    workdir = os.path.join(_WORKDIR.value, name)
    validation = trainer.build_data(config).validation
    if validation is None:
        raise ValueError(
            f"{name}: the attacks run on the validation split, and config.data has none "
            "(config.data.validation_fraction > 0 holds one out)."
        )
    probe = leakage.LeakageProbe(validation.take(_PROBE_BATCHES.value), seed=config.seed)
    summary = trainer.train(config, workdir, verbose=2, measure=[probe])
    epochs = [
        dict(
            epoch=r["epoch"],
            val_accuracy=r["val_accuracy"],
            **{k: v for k, v in r.items() if k.startswith("leakage_")},
        )
        for r in read_records(workdir)
    ]
    return dict(
        final_val_accuracy=summary["final_val_accuracy"],
        final_test_accuracy=summary["final_test_accuracy"],
        epochs=epochs,
    )


def main(argv):
    del argv
    methods = _choices(_METHODS.value, METHODS, "methods")
    splits = _choices(_SPLITS.value, ("plain", "ushaped"), "splits")
    tasks = _choices(_TASKS.value, ("binary", "all"), "tasks")
    seeds = _numbers(_SEEDS, int, "integers")
    runs = {}
    for method in methods:
        for split in splits:
            for task in tasks:
                for noise in _numbers(_NOISE, float, "numbers"):
                    for seed in seeds:
                        # A finished run's directory is reused, so a later command over
                        # more seeds in the same --workdir trains only the new ones.
                        longer = noise and _NOISE_EPOCHS_FACTOR.value > 1
                        epochs = f"_epochs{_NOISE_EPOCHS_FACTOR.value}x" if longer else ""
                        name = f"{method}_{split}_{task}_noise{noise:g}{epochs}_seed{seed}"
                        runs[name] = dict(
                            method=method,
                            split=split,
                            task=task,
                            noise=noise,
                            seed=seed,
                            **_run(name, _config(method, split, task, noise, seed)),
                        )
    report = dict(command=" ".join(["tfsplit-bench-leakage", *sys.argv[1:]]), runs=runs)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, RESULT_FILE)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    rows = leakage_report.rows(report)
    print(stats.format_table(rows, [(key, key) for key in rows[0]]))
    print(f"Wrote {path}")


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
