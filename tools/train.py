"""Trains a split model (SL, CA-SL, deprune or prune) from a config file.

  tfsplit-train --config=configs/deprune.py --workdir=/tmp/tfsplit/deprune
  tfsplit-train --config=configs/deprune.py:smoke --config.data.name=cifar10 --workdir=...

Config -> data -> SplitModel -> fit with PhaseSchedule, records, TensorBoard and BackupAndRestore.
Writes metrics.jsonl, summary.json, config.json, checkpoints/ and tensorboard/ into --workdir;
re-running on the same --workdir resumes from the last backup (every checkpoint_every_steps).
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import train as train_lib
from tools import run_tool

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for results and checkpoints.", required=True
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    logging.info("Training %s in %s", config.mode, _WORKDIR.value)
    summary = train_lib.train(config, _WORKDIR.value)
    print(json.dumps(summary, indent=2))


def run():
    run_tool(main)


if __name__ == "__main__":
    run()
