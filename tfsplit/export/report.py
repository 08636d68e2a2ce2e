"""Exports a whole split (heads and their tails) and measures what deployment would give.

For every head dtype the matching tail takes the same wire dtype (float32 -> float32,
float16 -> float16, int8 -> int8). The comparison runs the real deployed path on the test set:
TFLite head in the LiteRT interpreter -> wire values as the device sends them -> the reloaded
SavedModel tail, against the float Keras split model at the same budget. Each row also says what
one image costs on the wire as `payload_bytes` (`codec.payload_nbytes`); what a request weighs
depends on the protocol and is measured by `tfsplit.eval.deployment`.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from tfsplit import codec
from tfsplit.device import spec as device_spec
from tfsplit.device import stats
from tfsplit.device.payload import build_payload
from tfsplit.export import head as head_lib
from tfsplit.export import run as run_lib
from tfsplit.export import tail as tail_lib

EXPORT_DIR = "export"
SERVING_DIR = "serving"
# The deployed pair against the float Keras split model; `tfsplit.eval.deployment` shows them too.
ACCURACY_COLUMNS = (
    ("accuracy", "top-1", ".2%"),
    ("keras_accuracy", "Keras top-1", ".2%"),
    ("agreement", "agreement", ".2%"),
)
TABLE_COLUMNS = (
    ("dtype", "dtype"),
    ("head_file", "file"),
    ("head_file_bytes", "file_bytes"),
    ("payload_bytes", "payload_bytes"),
    ("parity", "parity vs Keras"),
    *ACCURACY_COLUMNS,
)


@dataclasses.dataclass
class SplitExport:
    """Everything `export_split` wrote and measured.

    Attributes:
      out_dir: where the heads are; the tails are under `<out_dir>/serving/`.
      heads: dtype -> `HeadExport`.
      tails: dtype -> `TailExport` (the tail for that head's wire dtype).
      rows: one dict per dtype, from `evaluate_exports`.
    """

    out_dir: str
    heads: dict
    tails: dict
    rows: list


def _check_pairs(heads, tails):
    """Every head needs a tail of its wire dtype that accepts its budget; all share one budget."""
    budgets = {head.metadata["budget"] for head in heads.values()}
    if len(budgets) != 1:
        raise run_lib.ExportError(f"The heads must share one budget. Received: {sorted(budgets)}")
    for dtype, head in heads.items():
        tail = tails.get(dtype)
        if tail is None or tail.dtype != dtype or tail.metadata["max_budget"] < min(budgets):
            raise run_lib.ExportError(
                f"The {dtype} head needs a {dtype} tail with max_budget >= {min(budgets)}. "
                f"Received: {tail}"
            )


def _deployed_predictions(head, tail, images):
    """Top-1 classes through the deployed path: LiteRT head -> device payload -> SavedModel tail."""
    outputs, _ = head_lib.run_head(head.model_path, images)
    spec = device_spec.spec_from_json(head.metadata, head.metadata_path)
    payload = build_payload(outputs, spec)  # what the device sends, float16 cast included
    signature = tf.saved_model.load(tail.path).signatures[tail_lib.SIGNATURE]
    return tail_lib.run_tail(signature, *payload.inputs().values()).argmax(-1)


def evaluate_exports(workdir, heads, tails):
    """Test-set accuracy of each deployed pair (TFLite head -> SavedModel tail) vs Keras.

    Args:
      workdir: the training workdir the exports came from, or its `TrainedRun`.
      heads: dtype -> `HeadExport`, all at one budget.
      tails: dtype -> `TailExport`, one for every head dtype, accepting that budget.

    Returns:
      A list of dicts, one per dtype: dtype, head_file, head_file_bytes (the .tflite's size),
      tail_dir, tail_dir_bytes (the SavedModel's size), budget, payload_bytes (one image's
      selection as the codec encodes it), head_max_abs_diff (and head_max_quantization_steps for
      int8), tail_max_abs_diff, accuracy (deployed), keras_accuracy (float Keras split at the same
      budget), agreement (share of test images where both predict the same class).

    Raises:
      ExportError: heads without a matching tail, or heads at different budgets.
    """
    run = run_lib.as_run(workdir)
    _check_pairs(heads, tails)
    indices = next(iter(heads.values())).metadata["indices"]
    keras_predictions = run_lib.keras_split_logits(run, run.test_images, indices).argmax(-1)
    images = run.normalize(run.test_images)
    height, width, channels = run.split.wire_shape
    rows = []
    for dtype, head in heads.items():
        predictions = _deployed_predictions(head, tails[dtype], images)
        parity, k = head.metadata["parity"], head.metadata["budget"]
        row = {
            "dtype": dtype,
            "head_file": head.model_path,
            "head_file_bytes": head.size_bytes,
            "tail_dir": tails[dtype].path,
            "tail_dir_bytes": tails[dtype].size_bytes,
            "budget": k,
            "payload_bytes": codec.payload_nbytes(1, height, width, k, dtype, False, channels),
            "head_max_abs_diff": parity["max_abs_diff"],
            "tail_max_abs_diff": tails[dtype].parity["max_abs_diff"],
            "accuracy": float(np.mean(predictions == run.test_labels)),
            "keras_accuracy": float(np.mean(keras_predictions == run.test_labels)),
            "agreement": float(np.mean(predictions == keras_predictions)),
        }
        if "max_quantization_steps" in parity:
            row["head_max_quantization_steps"] = parity["max_quantization_steps"]
        rows.append(row)
    return rows


def _parity(row):
    steps = row.get("head_max_quantization_steps")
    text = f"max |d| {row['head_max_abs_diff']:.2e}"
    return text if steps is None else f"{text} ({steps} steps)"


def format_table(rows):
    """The rows of `evaluate_exports` as a plain-text table with a header line."""
    shown = [
        dict(row, head_file=os.path.basename(row["head_file"]), parity=_parity(row)) for row in rows
    ]
    return stats.format_table(shown, TABLE_COLUMNS)


def export_split(
    workdir,
    out_dir=None,
    budget=None,
    dtypes=head_lib.HEAD_DTYPES,
    qat="auto",
    model_name="tfsplit_tail",
    version=1,
    overwrite=False,
):
    """Exports the heads, one tail per wire dtype, and measures the deployed accuracy.

    Args:
      workdir: a training workdir (or a `TrainedRun`).
      out_dir: where to write; `<workdir>/export` by default. Heads go to
        `<out_dir>/head_<dtype>.tflite|json`, tails to `<out_dir>/serving/<model_name>_<dtype>/
        <version>/`.
      budget, dtypes, qat: as in `export_head`.
      model_name: prefix of the tails' model names; the wire dtype is appended.
      version: the tails' version directory.
      overwrite: replace existing files instead of failing.

    Returns:
      A `SplitExport`.

    Raises:
      ExportError: bad arguments, a workdir that is not a finished run, or existing files.
    """
    run = run_lib.as_run(workdir)
    if out_dir is None and not run.workdir:
        raise run_lib.ExportError("`out_dir` is required for a run without a workdir.")
    out_dir = os.path.join(run.workdir, EXPORT_DIR) if out_dir is None else os.fspath(out_dir)
    base_path = os.path.join(out_dir, SERVING_DIR)
    dtypes = head_lib.check_dtypes(dtypes)
    tail_paths = [os.path.join(base_path, f"{model_name}_{d}", str(version)) for d in dtypes]
    existing = [path for path in tail_paths if os.path.exists(path)]
    if existing and not overwrite:
        raise run_lib.ExportError(f"Tails already exist: {existing}; pass overwrite=True.")
    heads = head_lib.export_head(run, out_dir, budget, dtypes, qat=qat, overwrite=overwrite)
    k = next(iter(heads.values())).metadata["budget"]
    tails = {
        dtype: tail_lib.export_tail(
            run, base_path, f"{model_name}_{dtype}", version, dtype, k, overwrite=overwrite
        )
        for dtype in heads
    }
    return SplitExport(out_dir, heads, tails, evaluate_exports(run, heads, tails))
