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
from tfsplit import codec
from tfsplit import export as export_lib
from tfsplit.device.head import quantize_input
from tfsplit.engine import budget as budget_lib
from tfsplit.export import head as head_lib
from tfsplit.export import qat as qat_lib
from tfsplit.export import run as run_lib
from tfsplit.training import trainer

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
            image = quantize_input(image, input_detail["quantization"])
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
    seniority = run.split.encoder.seniority.numpy()
    assert seniority.any()  # the deprune reset promoted phase one's channels
    # By hand: the largest gates first; among equal ones the more senior, then the lower index.
    by_hand = np.lexsort((np.arange(logits.size), -seniority, -logits))[: run.final_budget]
    expected = budget_lib.top_k_channels(logits, run.final_budget, seniority).numpy()
    for head in heads.values():
        assert head.metadata["indices"] == expected.tolist() == by_hand.tolist()


def test_head_parity_with_keras(run, heads):
    images = run.normalize(run.test_images[:16])
    indices = heads["float32"].metadata["indices"]
    reference = run.split.send(images, indices).numpy()
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
    written = export_lib.head.tflite_split_accuracy(
        run, exports["int8"].model_path, meta["indices"]
    )
    assert conversion["quantization_aware_accuracy"] == written  # the head that was written
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
    indices = run.split.channel_indices(k).numpy()
    images = run.test_images[:8]
    sent = run.split.send(run.normalize(images), indices).numpy()
    expected = tf.nn.softmax(run_lib.keras_split_logits(run, images, indices)).numpy()
    served = export_lib.run_tail(_signature(tails["float32"]), sent, indices)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    wire, scale, zero_point = codec.quantize(sent, "int8")
    served = export_lib.run_tail(_signature(tails["int8"]), wire, indices, scale, zero_point)
    np.testing.assert_allclose(served, expected, atol=0.1)


def test_tail_is_the_models_server_half(run, tails):
    k = run.final_budget
    indices = run.split.channel_indices(k).numpy()
    values = np.random.default_rng(0).normal(size=(4, *run.split.wire_shape[:2], k))
    values = values.astype(np.float32)
    expected = tf.nn.softmax(run.split.receive(values, indices)).numpy()
    served = export_lib.run_tail(_signature(tails["float32"]), values, indices)
    np.testing.assert_allclose(served, expected, atol=1e-6)


def test_tail_serves_the_fill_values_of_channels_a_smaller_budget_leaves_out(workdir, tmp_path):
    run = export_lib.load_run(workdir)  # its own copy: made nested and its fill changed here
    run.split.nested_budgets = True  # only a model trained with nested budgets uses its fill
    fill = np.random.default_rng(1).uniform(0.2, 0.8, size=run.split.channels)
    run.split.decoder.fill.assign(fill.astype(np.float32))
    tail = export_lib.export_tail(
        run, str(tmp_path), model_name="tail", dtype="float32", parity_samples=16
    )
    indices = run.split.channel_indices(2).numpy()
    values = np.random.default_rng(0).uniform(size=(4, *run.split.wire_shape[:2], 2))
    values = values.astype(np.float32)
    expected = tf.nn.softmax(run.split.receive(values, indices)).numpy()
    served = export_lib.run_tail(_signature(tail), values, indices)
    np.testing.assert_allclose(served, expected, atol=1e-6)
    zeros = tf.nn.softmax(run.split.receive(values, indices, fill=np.zeros_like(fill))).numpy()
    assert np.abs(served - zeros).max() > 1e-3  # the fill changed what the tail computes


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
    height, width, channels = run.split.wire_shape
    for dtype, row in by_dtype.items():
        assert row["head_file_bytes"] == heads[dtype].size_bytes
        assert row["payload_bytes"] == codec.payload_nbytes(
            1, height, width, run.final_budget, dtype, False, channels
        )
    with pytest.raises(export_lib.ExportError, match="float16 tail"):
        export_lib.evaluate_exports(run, heads, {"float32": tails["float32"]})
    table = export_lib.format_table(rows)
    assert "agreement" in table.splitlines()[0] and len(table.splitlines()) == 2 + len(rows)


def test_tool_exports_and_prints_table(workdir, tmp_path):
    # A subprocess, as users run it: importing the tool here would define its absl flags in the
    # test process, where another tool's flags of the same name would clash.
    argv = ["--workdir", workdir, "--out", str(tmp_path), "--dtypes=float32", "--noqat"]
    argv.append("--trainable")
    result = subprocess.run(
        [sys.executable, "-m", "tfsplit_tools.export", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header, rule, row = result.stdout.splitlines()[1:4]
    assert header.split()[:4] == ["dtype", "file", "file_bytes", "payload_bytes"]
    assert set(rule) <= {"-", " "}
    assert row.split()[:2] == ["float32", "head_float32.tflite"] and row.endswith("100.00%")
    assert (tmp_path / "head_float32.tflite").exists()
    assert (tmp_path / "serving" / "tfsplit_tail_float32" / "1" / "saved_model.pb").exists()
    model = (tmp_path / "head_train.tflite").read_bytes()
    assert f"trainable head: {tmp_path / 'head_train.tflite'} ({len(model)} bytes)" in result.stdout
    layout = json.loads((tmp_path / "head_train.json").read_text())
    assert layout["signatures"] == [
        "forward",
        "train",
        "infer",
        "get_weights",
        "set_weights",
    ]
    assert layout["run"]["model_digest"] and layout["run"]["phases"]
    assert layout["size"] == sum(entry["size"] for entry in layout["variables"])


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
    for name in (trainer.CONFIG_FILE, "summary.json"):
        (tmp_path / name).write_text(pathlib.Path(workdir, name).read_text())
    with pytest.raises(export_lib.ExportError, match="no trained model"):
        export_lib.export_tail(str(tmp_path), str(tmp_path / "serving"))


# ---------------------------------------------------------------------------------------------
# The run: a loaded SplitModel, or one given with its data.


def test_load_run_loads_the_saved_split_model(run, workdir):
    saved = trainer.load_model(workdir)
    assert type(run.split) is type(saved)
    for loaded, expected in zip(run.split.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(loaded, expected)
    assert run.final_budget == int(saved.budget.numpy()) == run.summary["final_budget"]
    assert run.source == {
        "workdir": os.path.abspath(workdir),
        "model": os.path.abspath(os.path.join(workdir, trainer.MODEL_FILE)),
    }
    k, indices = run.select()
    assert k == run.final_budget
    np.testing.assert_array_equal(indices, run.split.channel_indices(k).numpy())


def test_load_run_test_images_gives_the_runs_test_set(run, workdir, tmp_path):
    images, labels = export_lib.load_run_test_images(workdir, 5)
    np.testing.assert_array_equal(images, run.test_images[:5])
    np.testing.assert_array_equal(labels, run.test_labels[:5])
    with pytest.raises(export_lib.ExportError, match="No training config"):
        export_lib.load_run_test_images(str(tmp_path), 5)
    with pytest.raises(export_lib.ExportError, match="count"):
        export_lib.load_run_test_images(workdir, 0)


def test_a_split_model_exports_with_its_data(run, tmp_path):
    train, test = (run.train_images, run.train_labels), (run.test_images, run.test_labels)
    with pytest.raises(export_lib.ExportError, match="TrainedRun.from_model"):
        export_lib.export_tail(run.split, str(tmp_path))
    with pytest.raises(export_lib.ExportError, match="uint8 images"):
        export_lib.TrainedRun.from_model(run.split, run.info, train, (run.test_images[:, :8], []))
    with pytest.raises(export_lib.ExportError, match="budget"):
        export_lib.TrainedRun.from_model(run.split, run.info, train, test, budget=0)
    given = export_lib.TrainedRun.from_model(run.split, run.info, train, test, budget=4)
    assert given.source == {"workdir": "", "model": ""} and given.final_budget == 4
    heads = export_lib.export_head(
        given, str(tmp_path), dtypes="float32", qat=False, representative_samples=8
    )
    assert heads["float32"].metadata["indices"] == run.split.channel_indices(4).numpy().tolist()
    tail = export_lib.export_tail(given, str(tmp_path / "serving"), parity_samples=8)
    assert tail.metadata["max_budget"] == 4 and tail.metadata["source"] == ""
    assert tail.parity["max_abs_diff"] < 1e-5
    with pytest.raises(export_lib.ExportError, match="out_dir"):
        export_lib.export_split(given)


def test_qat_fine_tunes_with_fit_at_a_fixed_selection(run):
    k, indices = run.select()
    float_weights = [w.copy() for w in run.split.get_weights()]
    representative = run.normalize(run.train_images[:16])
    qat_split, settings = qat_lib.fine_tune_head(run, indices, representative)
    assert isinstance(qat_split, tfsplit.SplitModel) and qat_split.tail is not run.split.tail
    assert not qat_split.tail.trainable_weights  # the tail is a frozen copy
    assert float(qat_split.penalty_weight.numpy()) == 0.0  # budget loss off
    assert int(qat_split.budget.numpy()) == k
    # The gates did not move, so the selection is still the exported one.
    np.testing.assert_array_equal(
        qat_split.encoder.gate_logits.numpy(), run.split.encoder.gate_logits.numpy()
    )
    np.testing.assert_array_equal(qat_split.channel_indices().numpy(), indices)
    # The rest of the head did train; the float model is untouched.
    first_kernel = qat_split.head.trainable_weights[0].numpy()
    assert first_kernel.shape == run.split.head.trainable_weights[0].shape
    assert not np.array_equal(first_kernel, run.split.head.trainable_weights[0].numpy())
    for before, after in zip(float_weights, run.split.get_weights()):
        np.testing.assert_array_equal(before, after)
    batches = -(-len(run.train_images) // run.batch_size)
    assert settings["steps"] == batches and len(settings["epoch_losses"]) == 1
    assert qat_split.send(representative[:2], indices).shape == (2, *run.split.wire_shape[:2], k)
