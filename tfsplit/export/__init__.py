"""Deployment exports of a trained split model: TFLite heads for devices, SavedModel tails for TF
Serving, and the checks that the exported pair behaves like the Keras model it came from.

  exports = export_split("/tmp/tfsplit/deprune")        # heads + tails + accuracy table
  print(format_table(exports.rows))

or piece by piece: `export_head(workdir, out_dir)`, `export_tail(workdir, base_path)`, and
`export_trainable_run(workdir, out_dir)` for a device that trains its head without TensorFlow. A
`SplitModel` trained in Python exports the same way with its data:

  run = TrainedRun.from_model(model, info, (x_train, y_train), (x_test, y_test))
  exports = export_split(run, out_dir="/tmp/deploy")

A U-shaped run deploys in three parts, its top staying on the device: `export_ushaped(workdir)`;
its device trains head and top without TensorFlow from `export_trainable_ushaped_run(workdir,
out_dir)`.
"""

from tfsplit.export.head import HEAD_DTYPES, HeadExport, export_head, run_head
from tfsplit.export.report import SplitExport, evaluate_exports, export_split, format_table
from tfsplit.export.run import ExportError, TrainedRun, load_run, load_run_test_images
from tfsplit.export.tail import SIGNATURE, TAIL_DTYPES, TailExport, export_tail, run_tail
from tfsplit.export.trainable_export import (
    export_trainable_head,
    export_trainable_run,
    export_trainable_start,
)
from tfsplit.export.trainable_top import (
    export_trainable_ushaped,
    export_trainable_ushaped_run,
    export_trainable_ushaped_start,
)
from tfsplit.export.ushaped import USHAPED_DTYPES, UShapedExport, export_ushaped

__all__ = [
    "ExportError",
    "HEAD_DTYPES",
    "HeadExport",
    "SIGNATURE",
    "SplitExport",
    "TAIL_DTYPES",
    "TailExport",
    "TrainedRun",
    "USHAPED_DTYPES",
    "UShapedExport",
    "evaluate_exports",
    "export_head",
    "export_split",
    "export_tail",
    "export_trainable_head",
    "export_trainable_run",
    "export_trainable_start",
    "export_trainable_ushaped",
    "export_trainable_ushaped_run",
    "export_trainable_ushaped_start",
    "export_ushaped",
    "format_table",
    "load_run",
    "load_run_test_images",
    "run_head",
    "run_tail",
]
