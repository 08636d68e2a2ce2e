"""Reproduces the paper's claims side by side: SL, CA-SL, deprune and prune, one table.

  tfsplit-reproduce --preset=quick --workdir=/tmp/tfsplit/reproduce   # embedded data, 2 CPU cores
  tfsplit-reproduce --preset=paper --workdir=/tmp/tfsplit/paper       # VGG-11, CIFAR-10; a GPU

Presets (each loads configs/<method>.py with one variant):
  quick: the embedded dataset; minutes on a CPU.
  quick_hard: the harder embedded dataset (synthetic_hard, 80 classes, every method with the
    device-side local classifier at half weight; `--variants=local`: full weight); minutes on a
    CPU.
  quick_small: the embedded dataset with 1500 training images (the small-data setting).
  paper: VGG-11, CIFAR-10 and the reference schedules; a GPU.

Each method trains into --workdir/<method> (re-running resumes). Prints the table, deprune's
accuracy-versus-budget next to CA-SL trained at each budget, and the paper's three ratios; writes
results.csv, results.md, results.json and budget_curve_vs_casl.csv into --workdir. With --seeds=N
every run is made at N seeds (the configs' seed, then the next ones), each in --workdir/seed_<s>
with its own tables there, and the tables in --workdir hold their means and each seed's values:

  tfsplit-reproduce --preset=quick_hard --seeds=2 --workdir=/tmp/tfsplit/hard_seeds
"""

import os
import sys

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.eval import archive, reproduce, seeds
from tfsplit.training import config as config_lib
from tfsplit_tools import cli

# preset -> variant of the files in configs/.
PRESETS = {"quick": "", "quick_hard": "hard", "quick_small": "small", "paper": "paper"}

_PRESET = flags.DEFINE_enum(
    "preset",
    "quick",
    list(PRESETS),
    "quick: embedded dataset, minutes on a CPU; quick_hard: its harder 80-class version; "
    "quick_small: 1500 training images; paper: VGG-11, CIFAR-10, reference schedules.",
)
_VARIANTS = flags.DEFINE_string(
    "variants",
    "",
    "Comma-separated config variants applied to every method besides the preset's, e.g. local.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for all runs and results.", required=True
)
_CONFIGS = flags.DEFINE_string(
    "configs_dir", cli.clone_path("configs"), "Folder with sl.py, casl.py, deprune.py and prune.py."
)
_TARGET = flags.DEFINE_float(
    "target_accuracy",
    None,
    "Target for time-to-accuracy; default CA-SL's final accuracy less one point.",
    lower_bound=0,
    upper_bound=1,
)
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start prune from this finished run instead of training its start model."
)
_DATA_PATH = flags.DEFINE_string(
    "data_path",
    None,
    "Local dataset archive for every method (config data.path), e.g. a CIFAR-10 python tar.gz.",
)
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir",
    None,
    "Also keep the runs as data here (replaced): the configs, each run's summary and epoch "
    "records, and the aggregate that tfsplit-results-pages draws the docs' tables and plots "
    "from (e.g. results/quick).",
)
_SEEDS = flags.DEFINE_integer(
    "seeds",
    1,
    "Train every run at this many seeds (the configs' seed and the ones after it) and report "
    "their means; a single run's accuracy can move by points with the seed.",
    lower_bound=1,
)


def load_configs():
    """Every method's config for --preset, with --data_path where given."""
    variant = ",".join(name for name in (PRESETS[_PRESET.value], _VARIANTS.value) if name)
    configs = {}
    for method in reproduce.METHODS:
        path = os.path.join(_CONFIGS.value, f"{method}.py")
        configs[method] = config_lib.load_config_file(path, variant)
        if _DATA_PATH.value:
            configs[method].data.path = _DATA_PATH.value
    return configs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configs = load_configs()
    first = configs["deprune"].seed
    trained = list(range(first, first + _SEEDS.value))
    if _SEEDS.value == 1:
        result = reproduce.reproduce(configs, _WORKDIR.value, _TARGET.value, _INIT_FROM.value)
    else:
        result = seeds.reproduce_at_seeds(
            configs, _WORKDIR.value, trained, _TARGET.value, _INIT_FROM.value
        )
    paths = reproduce.write_results(result, _WORKDIR.value)
    if _RESULTS_DIR.value:
        count = archive.archive(_WORKDIR.value, _RESULTS_DIR.value, configs, trained, result)
        print(f"kept {count} runs in {_RESULTS_DIR.value}")
    print(reproduce.format_markdown(result))
    print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
