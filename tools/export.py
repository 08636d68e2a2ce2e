"""Exports a trained split model for deployment: TFLite heads for devices, tails for TF Serving.

  tfsplit-export --workdir=/tmp/tfsplit/deprune
  tfsplit-export --workdir=/tmp/tfsplit/deprune --budget=16 --dtypes=int8 --qat --out=/tmp/deploy
  tfsplit-export --config=configs/deprune.py --trainable --out=/tmp/head   # a new run's device

Writes `head_<dtype>.tflite` + `head_<dtype>.json` into --out (default <workdir>/export) and one
tail per wire dtype into `<out>/serving/tfsplit_tail_<dtype>/<version>/` (serve it with
`--model_base_path=<out>/serving/tfsplit_tail_<dtype>`), then prints, per dtype, the head's size,
its parity with the Keras head and the test accuracy of TFLite head -> exported tail against the
Keras split model at the same budget. --trainable also writes the head's training step,
`head_train.tflite` (TFLite builtin ops only), its weight layout and run `head_train.json` and
the tail the run starts from (`tail_weights.pb`): what `tfsplit-device-train` trains. With
--config instead of --workdir, only that is written, for the model a new run of the config starts
from (a device without TensorFlow opens the run with it). Without --qat/--noqat the int8 head is
fine-tuned with quantization-aware training only when post-training int8 loses more than 1
accuracy point.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import export as export_lib
from tfsplit_tools import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a finished training run.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "With --trainable, instead of --workdir: the config of a run to start.",
    lock_config=True,
)
_OUT = flags.DEFINE_string(
    "out", None, "Output directory; default <workdir>/export (required with --config)."
)
_BUDGET = flags.DEFINE_integer(
    "budget", None, "Channels to send; default the run's final budget.", lower_bound=1
)
_DTYPES = flags.DEFINE_list(
    "dtypes", list(export_lib.HEAD_DTYPES), f"Head dtypes to export, from {export_lib.HEAD_DTYPES}."
)
_QAT = flags.DEFINE_bool(
    "qat",
    None,
    "Quantization-aware training of the int8 head: --qat "
    "always, --noqat never, unset when post-training int8 loses > 1 point.",
)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "tfsplit_tail", "Tail model name prefix; the wire dtype is appended."
)
_VERSION = flags.DEFINE_integer("version", 1, "Tail version directory.", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing export files.")
_TRAINABLE = flags.DEFINE_bool(
    "trainable",
    False,
    "Also write head_train.tflite (builtin ops only) and head_train.json: the head's training "
    "step for a device that trains without TensorFlow; for a U-shaped config or run, "
    "top_train.tflite and top_train.json too (the top's step, with the labels).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if (_WORKDIR.value is None) == (_CONFIG.value is None):
        raise app.UsageError("Pass exactly one of --workdir (a trained run) and --config.")
    if _CONFIG.value is not None:
        if not _TRAINABLE.value or not _OUT.value:
            raise app.UsageError(
                "--config exports a new run's trainable head: add --trainable " "and --out."
            )
        if _CONFIG.value.model.get("top", ""):  # U-shaped: the top trains on the device too
            _print_trainable(*export_lib.export_trainable_ushaped_start(_CONFIG.value, _OUT.value))
        else:
            _print_trainable(export_lib.export_trainable_start(_CONFIG.value, _OUT.value))
        return
    try:
        run = export_lib.load_run(_WORKDIR.value)
        if hasattr(run.split, "top"):
            _export_ushaped(run)
            return
        result = export_lib.export_split(
            run,
            out_dir=_OUT.value,
            budget=_BUDGET.value,
            dtypes=_DTYPES.value,
            qat="auto" if _QAT.value is None else _QAT.value,
            model_name=_MODEL_NAME.value,
            version=_VERSION.value,
            overwrite=_OVERWRITE.value,
        )
    except export_lib.ExportError as error:
        raise app.UsageError(str(error)) from error
    row = result.rows[0]
    print(f"Exported {_WORKDIR.value} at budget {row['budget']} to {result.out_dir}")
    print(export_lib.format_table(result.rows))
    for dtype, tail in result.tails.items():
        print(f"tail {dtype}: {tail.path} ({tail.size_bytes} bytes)")
    if _TRAINABLE.value:
        _print_trainable(export_lib.export_trainable_run(_WORKDIR.value, result.out_dir))


def _print_trainable(head, top=None):
    print(f"trainable head: {head} ({os.path.getsize(head)} bytes)")
    if top is not None:
        print(f"trainable top: {top} ({os.path.getsize(top)} bytes)")


def _export_ushaped(run):
    """A U-shaped run: heads and the top for the device, a middle per wire dtype (and with
    --trainable, the head and top that a device without TensorFlow trains)."""
    dtypes = _DTYPES.value if flags.FLAGS["dtypes"].present else export_lib.USHAPED_DTYPES
    result = export_lib.export_ushaped(
        run,
        out_dir=_OUT.value,
        budget=_BUDGET.value,
        dtypes=dtypes,
        model_name=_MODEL_NAME.value,
        version=_VERSION.value,
        overwrite=_OVERWRITE.value,
    )
    print(f"Exported the U-shaped split {run.workdir} to {result.out_dir}")
    print(f"top: {result.top_path} ({os.path.getsize(result.top_path)} bytes)")
    for row in result.rows:
        middle = result.middles[row["dtype"]]
        print(
            f"{row['dtype']}: head {result.heads[row['dtype']].model_path}, middle {middle.path}; "
            f"top-1 {row['accuracy']:.2%} (Keras {row['keras_accuracy']:.2%}), agreement "
            f"{row['agreement']:.2%}, {row['payload_bytes']} bytes up and "
            f"{row['answer_bytes']} down per image"
        )
    if _TRAINABLE.value:
        _print_trainable(*export_lib.export_trainable_ushaped_run(run.workdir, result.out_dir))


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
