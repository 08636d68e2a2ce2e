"""A U-shaped split deployed: TFLite head and top on the device, the middle as a SavedModel behind
TF Serving's protocols. The deployed path agrees with the Keras model, and the top never goes to
the server."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfsplit import device, export
from tfsplit.eval import deployment
from tfsplit.serving import validation
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase


@pytest.fixture(scope="module")
def ushaped_run(tmp_path_factory):
    """A U-shaped run of VGG-11 at 1/8 width, trained for two short phases."""
    config = base_config("deprune")
    config.data.train_size, config.data.test_size = 128, 100
    config.data.batch_size, config.data.eval_batch_size = 32, 50
    config.model.width_multiplier = 0.125
    config.model.top = "classifier"
    config.calibration_batches = 1
    config.phases = [phase(budget=8, epochs=1, learning_rate=0.02), phase(16, 1, 0.02)]
    workdir = str(tmp_path_factory.mktemp("ushaped"))
    trainer.train(config, workdir, verbose=0)
    return workdir


@pytest.fixture(scope="module")
def exported(ushaped_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ushaped_export"))
    return export.export_ushaped(ushaped_run, out)


def test_the_three_parts_are_exported_and_checked(exported):
    assert [row["dtype"] for row in exported.rows] == ["float32", "float16"]
    for row in exported.rows:
        assert row["budget"] == 16 and row["samples"] == 100
        assert row["agreement"] >= 0.99, row
        assert row["top_max_abs_diff"] < 1e-5
        # Down: the middle's output in the second cut's float16, whatever the head's dtype.
        shape = device.load_spec(exported.heads[row["dtype"]].metadata_path).top.shape
        assert row["answer_bytes"] == 2 * int(np.prod(shape))
    for dtype, middle in exported.middles.items():
        assert middle.parity["max_abs_diff"] < 1e-3, middle.parity
        assert middle.metadata["output"] == "middle" and middle.metadata["output_shape"]
        signature = tf.saved_model.load(middle.path).signatures["serving_default"]
        assert list(signature.structured_outputs) == ["middle"]
        # The SavedModel holds the middle's variables only: no layer of the top.
        names = {v.name for v in tf.saved_model.load(middle.path).tail_variables}
        assert not any("logits" in name for name in names)
    spec = device.load_spec(exported.heads["float16"].metadata_path)
    assert spec.top.model_file == "top.tflite" and spec.top.output == "middle"


def test_the_middle_is_served_and_the_device_runs_the_top(exported, ushaped_run):
    result = deployment.run_split_inference(
        ushaped_run,
        exported.out_dir,
        dtypes=("float16",),
        protocols=("rest", "grpc"),
        max_samples=40,
        batch_size=8,
    )
    for row in result.rows:
        assert row["agreement"] >= 0.99, row
        assert row["answer_bytes_per_sample"] > 0 and row["top_p50_ms"] > 0
    table = deployment.format_table(result.rows)
    assert "answer_bytes" in table and "top p50" in table


def test_plain_exports_refuse_a_ushaped_run_and_the_ushaped_one_a_plain_run(ushaped_run, tmp_path):
    with pytest.raises(export.ExportError, match="U-shaped split.*export_ushaped"):
        export.export_split(ushaped_run, str(tmp_path))
    config = base_config("deprune")
    config.model.width_multiplier = 0.125
    _, _, _, info = trainer.build_data(config)
    plain = trainer.build_split_model(config, info)
    images = np.zeros((4, 32, 32, 3), np.uint8)
    run = export.TrainedRun.from_model(plain, info, (images, [0] * 4), (images, [0] * 4))
    with pytest.raises(export.ExportError, match="plain split: export it with `export_split`"):
        export.export_ushaped(run, str(tmp_path))


def test_a_tail_spec_with_a_bad_output_is_refused(exported, tmp_path):
    path = os.path.join(exported.middles["float32"].path, validation.SPEC_FILE)
    with open(path) as f:
        spec = json.load(f)
    for bad in ({"output": ""}, {"output_shape": [0]}, {"output_shape": "128"}):
        broken = tmp_path / "spec.json"
        broken.write_text(json.dumps({**spec, **bad}))
        with pytest.raises(validation.TailModelError, match="output name"):
            validation.read_spec_file(str(broken))
