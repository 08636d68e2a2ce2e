"""Tests of tfsplit.export on one smoke-trained deprune run (trained once for the module)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import budget as budget_lib
from tfsplit import codec
from tfsplit import export as export_lib
from tfsplit.export import head as head_lib
from tfsplit.export import run as run_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(smoke_workdir):
    return smoke_workdir


@pytest.fixture(scope="module")
def run(workdir):
    return export_lib.load_run(workdir)


@pytest.fixture(scope="module")
def heads(run, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("heads")
    return export_lib.export_head(
        run, str(out_dir), qat=False, representative_samples=64, parity_samples=64
    )


@pytest.fixture(scope="module")
def tails(run, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    return {
        dtype: export_lib.export_tail(
            run, str(base), model_name=f"tail_{dtype}", dtype=dtype, parity_samples=64
        )
        for dtype in export_lib.TAIL_DTYPES
    }


def _signature(tail):
    return tf.saved_model.load(tail.path).signatures[export_lib.SIGNATURE]


# ---------------------------------------------------------------------------------------------
# Heads.


def test_head_files_run_with_litert_at_batch_one(run, heads):
    height, width, _ = run.split.wire_shape
    k = run.final_budget
    assert sorted(heads) == sorted(export_lib.HEAD_DTYPES)
    for dtype, head in heads.items():
        assert os.path.getsize(head.model_path) == head.size_bytes > 0
        interpreter = Interpreter(model_path=head.model_path)
        interpreter.allocate_tensors()
        input_detail = interpreter.get_input_details()[0]
        output_detail = interpreter.get_output_details()[0]
        assert tuple(input_detail["shape"]) == (1, *run.info.image_shape)
        assert tuple(output_detail["shape"]) == (1, height, width, k)
        image = run.normalize(run.test_images[:1])
        if dtype == "int8":
            image = head_lib.quantize_images(image, input_detail["quantization"])
        interpreter.set_tensor(input_detail["index"], image)
        interpreter.invoke()
        output = interpreter.get_tensor(output_detail["index"])
        expected = {"float32": np.float32, "float16": np.float32, "int8": np.int8}[dtype]
        assert output.dtype == expected and output.shape == (1, height, width, k)


def test_head_json_describes_model_and_wire(run, heads, workdir):
    height, width, channels = run.split.wire_shape
    for dtype, head in heads.items():
        with open(head.metadata_path) as f:
            meta = json.load(f)
        assert meta == head.metadata
        assert meta["model"] == f"head_{dtype}.tflite" and meta["dtype"] == dtype
        assert meta["budget"] == run.final_budget == len(meta["indices"])
        assert (meta["channels"], meta["height"], meta["width"]) == (channels, height, width)
        assert meta["input"]["shape"] == [1, *run.info.image_shape]
        assert meta["output"]["shape"] == [1, height, width, run.final_budget]
        assert meta["normalization"]["mean"] == pytest.approx(list(run.info.mean))
        assert meta["normalization"]["std"] == pytest.approx(list(run.info.std))
        assert meta["num_classes"] == run.info.num_classes
        assert meta["wire"]["dtype"] == dtype
        assert meta["source"]["workdir"] == os.path.abspath(workdir)
        assert meta["versions"]["tensorflow"] == tf.__version__
    assert heads["float16"].metadata["output"]["dtype"] == "float32"  # cast on the device
    assert heads["float32"].metadata["input"]["scale"] is None


def test_selected_indices_are_top_k_of_gates(run, heads):
    logits = run.split.encoder.gate_logits.numpy()
    importance = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))) ** 2
    by_hand = np.argsort(-importance, kind="stable")[: run.final_budget]
    expected = budget_lib.top_k_channels(logits, run.final_budget).numpy()
    for head in heads.values():
        assert head.metadata["indices"] == expected.tolist()
        assert sorted(head.metadata["indices"]) == sorted(by_hand.tolist())


def test_head_parity_with_keras(run, heads):
    images = run.normalize(run.test_images[:16])
    indices = heads["float32"].metadata["indices"]
    reference = run_lib.selected_head(run.split.head, indices)(images).numpy()
    outputs, quantization = export_lib.run_head(heads["float32"].model_path, images)
    assert quantization is None
    np.testing.assert_allclose(outputs, reference, atol=1e-5)
    assert heads["float32"].metadata["parity"]["max_abs_diff"] < 1e-5
    assert heads["float16"].metadata["parity"]["max_abs_diff"] < 2e-2
    int8 = heads["int8"].metadata["parity"]
    assert int8["samples"] == 64
    assert int8["mean_quantization_steps"] <= 5 and int8["max_quantization_steps"] <= 32


def test_int8_output_is_the_wire_payload(run, heads):
    head = heads["int8"]
    meta = head.metadata
    images = run.normalize(run.test_images[:4])
    outputs, (scale, zero_point) = export_lib.run_head(head.model_path, images)
    assert outputs.dtype == np.int8
    assert meta["output"]["dtype"] == meta["input"]["dtype"] == "int8"
    assert (meta["output"]["scale"], meta["output"]["zero_point"]) == (scale, zero_point)
    assert (meta["wire"]["scale"], meta["wire"]["zero_point"]) == (scale, zero_point)
    data = codec.encode(
        outputs, meta["indices"], meta["channels"], "int8", scale=scale, zero_point=zero_point
    )
    payload = codec.decode(data, expect_dtype="int8")
    np.testing.assert_array_equal(payload.values, outputs)
    expected = (outputs.astype(np.float32) - zero_point) * np.float32(scale)
    np.testing.assert_array_equal(payload.dequantized(), expected)


def test_head_smaller_budget_and_one_dtype(run, tmp_path):
    exports = export_lib.export_head(run, str(tmp_path), budget=2, dtypes="float32", qat=False)
    assert list(exports) == ["float32"]
    meta = exports["float32"].metadata
    assert meta["budget"] == 2 and meta["output"]["shape"][-1] == 2
    gates = run.split.encoder.gate_logits
    assert meta["indices"] == budget_lib.top_k_channels(gates, 2).numpy().tolist()
    with pytest.raises(export_lib.ExportError, match="already exist"):
        export_lib.export_head(run, str(tmp_path), budget=2, dtypes="float32", qat=False)


def test_quantization_aware_int8_head(run, tmp_path):
    weights_before = [w.copy() for w in run.split.head.get_weights()]
    exports = export_lib.export_head(
        run, str(tmp_path), dtypes=("int8",), qat=True, representative_samples=32
    )
    meta = exports["int8"].metadata
    conversion = meta["conversion"]
    assert conversion["method"] == "quantization-aware"
    batch_size = run.config.data.batch_size
    assert conversion["fine_tuning"]["steps"] == -(-len(run.train_images) // batch_size)
    assert 0.0 <= conversion["quantization_aware_accuracy"] <= 1.0
    assert meta["output"]["dtype"] == "int8"
    assert meta["parity"]["mean_quantization_steps"] <= 5
    for before, after in zip(weights_before, run.split.head.get_weights()):
        np.testing.assert_array_equal(before, after)  # only the quantized copy was fine-tuned


def test_auto_qat_follows_the_one_point_rule(run, tmp_path):
    exports = export_lib.export_head(
        run, str(tmp_path), dtypes="int8", qat="auto", representative_samples=32
    )
    conversion = exports["int8"].metadata["conversion"]
    loss = conversion["float_accuracy"] - conversion["post_training_accuracy"]
    assert conversion["qat"] == "auto"
    assert ("fine_tuning" in conversion) == (loss > head_lib.QAT_AUTO_MAX_LOSS)


# ---------------------------------------------------------------------------------------------
# Tails.


def test_tail_layout_json_and_signature(run, tails, workdir):
    height, width, channels = run.split.wire_shape
    for dtype, tail in tails.items():
        assert tail.path.endswith(os.path.join(f"tail_{dtype}", "1"))
        assert os.path.isfile(os.path.join(tail.path, "saved_model.pb"))
        with open(os.path.join(tail.path, "assets.extra", "tfsplit_tail.json")) as f:
            meta = json.load(f)
        assert meta == {
            "dtype": dtype,
            "channels": channels,
            "height": height,
            "width": width,
            "max_budget": run.final_budget,
            "num_classes": run.info.num_classes,
            "signature": "serving_default",
            "source": os.path.abspath(workdir),
        }
        signature = _signature(tail)
        _, inputs = signature.structured_input_signature
        assert {name: (spec.dtype, spec.shape.as_list()) for name, spec in inputs.items()} == {
            "values": (tf.as_dtype(dtype), [None, height, width, None]),
            "indices": (tf.int32, [None]),
            "scale": (tf.float32, []),
            "zero_point": (tf.int32, []),
        }
        outputs = signature.structured_outputs
        assert list(outputs) == ["probabilities"]
        assert outputs["probabilities"].dtype == tf.float32
        assert outputs["probabilities"].shape.as_list() == [None, run.info.num_classes]


def test_tail_equals_keras_tail_on_same_payload(run, tails):
    assert tails["float32"].parity["max_abs_diff"] < 1e-5
    assert tails["float32"].parity["max_abs_diff_vs_float"] < 1e-5
    for dtype in ("float16", "int8"):
        parity = tails[dtype].parity
        assert parity["max_abs_diff"] < 1e-5  # same payload: only float rounding differs
        assert parity["max_abs_diff_vs_float"] < 0.1  # quantized wire vs float wire
        assert parity["agreement_vs_float"] >= 0.9


def test_tail_accepts_a_smaller_budget(run, tails):
    k = 2
    indices = run_lib.selected_channels(run, k)
    images = run.test_images[:8]
    sent = run_lib.selected_head(run.split.head, indices)(run.normalize(images)).numpy()
    expected = tf.nn.softmax(run_lib.keras_split_logits(run, images, indices)).numpy()
    served = export_lib.run_tail(_signature(tails["float32"]), sent, indices)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    wire, scale, zero_point = codec.quantize(sent, "int8")
    served = export_lib.run_tail(_signature(tails["int8"]), wire, indices, scale, zero_point)
    np.testing.assert_allclose(served, expected, atol=0.1)


def test_scatter_places_channels_by_hand():
    values = tf.constant([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])  # (2, 1, 1, 2)
    full = run_lib.scatter_channels(values, tf.constant([3, 0]), 4).numpy()
    np.testing.assert_array_equal(full[:, 0, 0], [[2.0, 0.0, 0.0, 1.0], [4.0, 0.0, 0.0, 3.0]])


def test_tail_rejects_bad_payloads(run, tails):
    signature = _signature(tails["int8"])
    height, width, channels = run.split.wire_shape
    too_many = run.final_budget + 1
    values = np.zeros((1, height, width, too_many), np.int8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_budget"):
        export_lib.run_tail(signature, values, np.arange(too_many), 0.1, 0)
    values = np.zeros((1, height, width, 2), np.int8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="distinct"):
        export_lib.run_tail(signature, values, [1, 1], 0.1, 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="< "):
        export_lib.run_tail(signature, values, [0, channels], 0.1, 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="scale"):
        export_lib.run_tail(signature, values, [0, 1], 0.0, 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one channel"):
        export_lib.run_tail(signature, values, [0, 1, 2], 0.1, 0)


# ---------------------------------------------------------------------------------------------
# End to end and the tool.


def test_tflite_head_to_saved_model_tail_agrees_with_keras(run, heads, tails):
    rows = export_lib.evaluate_exports(run, heads, tails)
    by_dtype = {row["dtype"]: row for row in rows}
    assert by_dtype["float32"]["agreement"] == 1.0
    assert by_dtype["float32"]["accuracy"] == by_dtype["float32"]["keras_accuracy"]
    assert by_dtype["float16"]["agreement"] >= 0.95
    assert by_dtype["int8"]["agreement"] >= 0.85
    with pytest.raises(export_lib.ExportError, match="float16 tail"):
        export_lib.evaluate_exports(run, heads, {"float32": tails["float32"]})
    table = export_lib.format_table(rows)
    assert "agreement" in table.splitlines()[0] and len(table.splitlines()) == 2 + len(rows)


def test_tool_exports_and_prints_table(workdir, tmp_path):
    # A subprocess, as users run it: importing the tool here would define its absl flags in the
    # test process, where another tool's flags of the same name would clash.
    argv = ["--workdir", workdir, "--out", str(tmp_path), "--dtypes=float32", "--noqat"]
    result = subprocess.run(
        [sys.executable, "-m", "tools.export", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header, rule, row = result.stdout.splitlines()[1:4]
    assert header.split()[:3] == ["dtype", "file", "bytes"] and set(rule) <= {"-", " "}
    assert row.split()[:2] == ["float32", "head_float32.tflite"] and row.endswith("100.00%")
    assert (tmp_path / "head_float32.tflite").exists()
    assert (tmp_path / "serving" / "tfsplit_tail_float32" / "1" / "saved_model.pb").exists()


# ---------------------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize("budget", [0, -1, 10_000, 2.5, True])
def test_bad_budget_fails_clearly(run, tmp_path, budget):
    with pytest.raises(export_lib.ExportError, match="budget"):
        export_lib.export_head(run, str(tmp_path), budget=budget, dtypes="float32")
    with pytest.raises(export_lib.ExportError, match="budget"):
        export_lib.export_tail(run, str(tmp_path), max_budget=budget)


def test_bad_dtypes_and_options_fail_clearly(run, tmp_path):
    with pytest.raises(export_lib.ExportError, match="dtypes"):
        export_lib.export_head(run, str(tmp_path), dtypes=("bfloat16",))
    with pytest.raises(export_lib.ExportError, match="dtypes"):
        export_lib.export_head(run, str(tmp_path), dtypes=())
    with pytest.raises(export_lib.ExportError, match="qat"):
        export_lib.export_head(run, str(tmp_path), qat="sometimes")
    with pytest.raises(export_lib.ExportError, match="representative_samples"):
        export_lib.export_head(run, str(tmp_path), representative_samples=0)
    with pytest.raises(export_lib.ExportError, match="dtype"):
        export_lib.export_tail(run, str(tmp_path), dtype="uint8")
    with pytest.raises(export_lib.ExportError, match="version"):
        export_lib.export_tail(run, str(tmp_path), version=0)
    assert not list(tmp_path.iterdir())


def test_workdir_without_checkpoint_fails_clearly(workdir, tmp_path):
    with pytest.raises(export_lib.ExportError, match="existing directory"):
        export_lib.load_run(str(tmp_path / "missing"))
    with pytest.raises(export_lib.ExportError, match="config"):
        export_lib.export_head(str(tmp_path), str(tmp_path / "out"))
    for name in (run_lib.CONFIG_FILE, "summary.json"):
        (tmp_path / name).write_text(pathlib.Path(workdir, name).read_text())
    with pytest.raises(export_lib.ExportError, match="no checkpoint"):
        export_lib.export_tail(str(tmp_path), str(tmp_path / "serving"))
