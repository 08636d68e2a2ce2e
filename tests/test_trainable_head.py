"""tfsplit.export.trainable: the head's training step as a builtins-only LiteRT model trains the
same head as the TensorFlow device's step, and a layer it cannot express is refused by name."""

import json
import os
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert import interpreter as litert

import tfsplit
from benchmarks import trainable_ops
from tfsplit import backbones
from tfsplit.device.training import head as device_head
from tfsplit.export import trainable, trainable_export
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase

BATCH, BUDGET = 6, 3
RECORD = "results/trainable_ops/all_cuts.json"  # benchmarks/trainable_ops.py writes it


def _config(backbone, cut, local_loss_weight=0.0, gate_optimizer="adam"):
    config = base_config("deprune")
    config.model.backbone = backbone
    config.model.cut = cut
    config.model.width_multiplier = 0.125
    config.model.local_loss_weight = local_loss_weight
    config.optimizer.gate_optimizer = gate_optimizer
    config.budget_loss.polarization = 0.5
    config.phases = [phase(budget=BUDGET, epochs=1, learning_rate=0.05)]
    return config


def _split(config, image_shape=(16, 16, 3)):
    keras.utils.set_random_seed(0)
    info = types.SimpleNamespace(image_shape=image_shape, num_classes=10)
    return trainer.build_split_model(config, info)


def _tf_device_step(split, images, labels, upstream):
    """The TensorFlow device's training step of the head (`RemoteSplitModel.train_step`'s)."""
    indices = split.channel_indices()
    with tf.GradientTape() as tape:
        values, penalty, local = split.device_step(images, labels, indices)
        device_loss = penalty + local
    variables = split.device_trainable_variables
    gradients = tape.gradient(
        [values, device_loss], variables, output_gradients=[upstream, tf.ones([])]
    )
    split.apply_gradients(gradients, variables)
    return values, indices


@pytest.mark.parametrize(
    "backbone, cut, local, side",
    [
        ("resnet18", "stage2", 0.0, 16),
        ("vgg11", "conv2", 0.5, 32),
        ("mobilenetv2", "block2", 0.0, 16),
    ],
)
def test_litert_steps_train_the_head_as_the_tensorflow_device(tmp_path, backbone, cut, local, side):
    split = _split(_config(backbone, cut, local_loss_weight=local), (side, side, 3))
    split.set_budget(BUDGET)
    split.penalty_weight.assign(0.01)
    path = trainable_export.export_trainable_head(split, str(tmp_path))
    names = trainable_export.op_names(open(path, "rb").read())
    assert not [n for n in names if n.startswith("Flex") or n == "CUSTOM"], names
    layout = json.loads((tmp_path / device_head.LAYOUT_FILE).read_text())
    interpreter = litert.Interpreter(model_path=path)
    runners = {name: interpreter.get_signature_runner(name) for name in device_head.SIGNATURES}
    rng = np.random.default_rng(1)
    module = trainable.TrainableHead(split, *trainable_export.optimizer_settings(split))
    for step in range(3):
        images = rng.normal(size=(BATCH, side, side, 3)).astype(np.float32)
        labels = rng.integers(0, 10, BATCH).astype(np.int32)
        sent = runners["forward"](images=images, budget=np.array([BUDGET], np.int32))
        upstream = rng.normal(size=sent["values"].shape).astype(np.float32) * 0.1
        values, indices = _tf_device_step(split, images, labels, upstream)
        np.testing.assert_array_equal(sent["indices"], indices.numpy())
        np.testing.assert_allclose(sent["values"], values.numpy(), rtol=1e-4, atol=1e-5)
        runners["train"](
            images=images,
            labels=labels,
            upstream_gradient=upstream,
            budget=np.array([BUDGET], np.int32),
            learning_rate=np.array([split.optimizer.learning_rate.numpy()], np.float32),
            gate_learning_rate=np.array([split.gate_optimizer.learning_rate.numpy()], np.float32),
            penalty_weight=np.array([0.01], np.float32),
        )
    got = runners["get_weights"]()["weights"]
    assert got.shape == (layout["size"],)
    # The model's own variables (weights, batch norm statistics, seniority) after three steps;
    # the optimizer's state shows in the second and third steps' updates.
    for entry, (_, variable) in zip(layout["variables"], module.state):
        if entry["kind"] in ("weight", "local_classifier", "state"):
            start = entry["offset"]
            np.testing.assert_allclose(
                got[start : start + entry["size"]],
                np.reshape(variable.numpy(), -1),
                rtol=1e-4,
                atol=1e-4,
                err_msg=entry["name"],
            )


def test_set_weights_round_trips(tmp_path):
    split = _split(_config("resnet18", "stage1"))
    path = trainable_export.export_trainable_head(split, str(tmp_path))
    interpreter = litert.Interpreter(model_path=path)
    get = interpreter.get_signature_runner("get_weights")
    weights = get()["weights"]
    changed = weights + np.float32(0.5)
    interpreter.get_signature_runner("set_weights")(weights=changed)
    np.testing.assert_array_equal(get()["weights"], changed)


def test_the_readme_models_head_exports(tmp_path):
    """The README's own functional model: a strided conv with a fused ReLU at the cut."""
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="features")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(64, 3, activation="relu")(h))
    split = tfsplit.split_model(
        keras.Model(inputs, keras.layers.Dense(10)(h)), "features", bottleneck=True
    )
    split.compile(
        keras.optimizers.SGD(0.05, momentum=0.9), gate_optimizer=keras.optimizers.Adam(0.05)
    )
    path = trainable_export.export_trainable_head(split, str(tmp_path))
    names = trainable_export.op_names(open(path, "rb").read())
    assert not [n for n in names if n.startswith("Flex") or n == "CUSTOM"], names
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    infer = litert.Interpreter(model_path=path).get_signature_runner("infer")
    sent = infer(images=images, budget=np.array([8], np.int32))
    indices = split.channel_indices(8)
    np.testing.assert_array_equal(sent["indices"], indices.numpy())
    np.testing.assert_allclose(
        sent["values"], split.send(images, indices).numpy(), rtol=1e-4, atol=1e-5
    )


def test_a_layer_it_cannot_express_is_refused_by_name():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.LeakyReLU(name="leaky")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="cut")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    split = backbones.split_model(
        model,
        "cut",
        bottleneck=dict(feature_compression=2, resolution_compression=1, gate_init_max=15.0),
    )
    split.compile(keras.optimizers.SGD(0.1))
    with pytest.raises(trainable.UnsupportedLayerError, match=r"layer 'leaky' \(LeakyReLU\)"):
        trainable.TrainableHead(split)


# The stems; the parity test above converts three deeper heads (max pools, residual adds with a
# projection, depthwise convs and ReLU6). Every other cut is converted by
# `benchmarks/trainable_ops.py` (about 25 minutes on 2 cores), whose record the next test reads.
@pytest.mark.parametrize(
    "backbone, cut",
    [("vgg11", "conv1"), ("resnet18", "stem"), ("mobilenetv2", "stem")],
)
def test_trainable_heads_of_the_backbones_hold_builtin_ops_only(backbone, cut):
    split = _split(_config(backbone, cut), (32, 32, 3))
    model = trainable_export.convert(
        trainable.TrainableHead(split, *trainable_export.optimizer_settings(split))
    )
    names = trainable_export.op_names(model)
    assert {"BATCH_MATMUL", "TOPK_V2"} <= set(names)  # convolutions are patch matmuls
    assert not [n for n in names if n.startswith("Flex") or n == "CUSTOM"], names


def test_every_backbone_cut_is_recorded_with_builtin_ops_only():
    """`results/trainable_ops/all_cuts.json` covers every cut the backbones name today, made by
    today's exporter: a new cut or backbone, or a change to the exporter's code, fails here until
    the conversion record is made again."""
    with open(os.path.join(os.path.dirname(__file__), "..", RECORD)) as f:
        record = json.load(f)
    assert record["exporter_sha256"] == trainable_ops.exporter_fingerprint(), "rerun: " + RECORD
    assert record["failed"] == []
    for backbone in backbones.BACKBONES:
        for layer, names in trainable_ops.cut_layers(backbone).items():
            entry = record["cuts"].get(f"{backbone}/{layer}")
            assert entry is not None, f"{backbone} cut {names} not converted; rerun: {RECORD}"
            assert entry["cut_names"] == names and entry["builtins_only"], entry
            assert not [op for op in entry["ops"] if op.startswith("Flex") or op == "CUSTOM"]
            assert {"BATCH_MATMUL", "TOPK_V2"} <= set(entry["ops"]), entry["ops"]
