"""The U-shaped split (tfsplit.engine.ushaped): head and top on the device, the middle on the
server. It is the same model as the plain split, its four transfers are counted exactly, and the
labels never go up."""

import types

import numpy as np
import pytest
import tf_keras as keras

import tfsplit
from tfsplit import backbones, codec, export
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase

WIRES = dict(activation_dtype="float32", gradient_dtype="float32")
BATCH = 8


def _images(batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((batch, 32, 32, 3), np.float32), rng.integers(0, 10, batch)


@pytest.fixture(scope="module")
def vgg11():
    keras.utils.set_random_seed(0)
    return backbones.build_backbone("vgg11", 10, (32, 32, 3), width_multiplier=0.125)


def test_without_a_bottleneck_the_three_parts_are_the_model(vgg11):
    split = tfsplit.split_model(
        vgg11, "conv5_relu", top="pool5", top_activation_dtype="float32", **WIRES
    )
    assert isinstance(split, tfsplit.UShapedSplitModel)
    assert [layer.name for layer in split.top.layers] == ["top", "avg_pool", "dropout", "logits"]
    assert split.tail.get_layer("conv8") is vgg11.get_layer("conv8")
    images, _ = _images()
    np.testing.assert_allclose(split(images), vgg11(images), rtol=1e-6, atol=1e-6)
    device = {id(v) for v in split.device_trainable_variables}
    assert {id(v) for v in split.top.trainable_variables} <= device
    assert not device & {id(v) for v in split.tail.trainable_variables}


def test_a_training_step_is_the_plain_splits(vgg11):
    """Same weights, same batch: the U-shaped step updates every weight as the plain one does."""
    images, labels = _images()
    trained = []
    for top in (None, "pool5"):
        keras.utils.set_random_seed(1)
        model = keras.models.clone_model(vgg11)
        model.set_weights(vgg11.get_weights())
        split = (
            tfsplit.split_model(
                model,
                "conv5_relu",
                bottleneck=True,
                top=top,
                top_activation_dtype="float32",
                top_gradient_dtype="float32",
                **WIRES
            )
            if top
            else tfsplit.split_model(model, "conv5_relu", bottleneck=True, **WIRES)
        )
        split.set_budget(5)
        split.compile(keras.optimizers.SGD(0.1, momentum=0.9))
        split.fit(images, labels, batch_size=4, epochs=1, shuffle=False, verbose=0)
        trained.append([w.numpy() for w in model.weights] + [split.encoder.gate_logits.numpy()])
    for plain, ushaped in zip(*trained):
        np.testing.assert_allclose(ushaped, plain, rtol=1e-4, atol=1e-5)


def test_the_four_transfers_are_counted_by_the_codecs_formula(vgg11):
    split = tfsplit.split_model(
        vgg11, "conv5_relu", bottleneck=True, top="pool5", top_gradient_dtype="int8"
    )
    split.set_budget(5)
    split.compile(keras.optimizers.SGD(0.01))
    images, labels = _images(12)
    history = split.fit(images, labels, batch_size=8, epochs=1, verbose=0).history
    cut = dict(height=4, width=4, channels=split.channels, with_labels=False)
    top = dict(height=1, width=1, channels=split.top_channels, with_labels=False)
    up = sum(codec.payload_nbytes(n, k=5, dtype="float16", **cut) for n in (8, 4))
    top_down = sum(codec.payload_nbytes(n, k=64, dtype="float16", **top) for n in (8, 4))
    top_up = sum(codec.payload_nbytes(n, k=64, dtype="int8", **top) for n in (8, 4))
    assert split.top_channels == 64
    assert list(split.sent_payload_bytes.numpy()) == [up, up]
    assert list(split.sent_top_payload_bytes.numpy()) == [top_down, top_up]
    assert history["top_payload_bytes_up"][-1] == top_up
    labelled = sum(
        codec.payload_nbytes(n, k=5, dtype="float16", **dict(cut, with_labels=True)) for n in (8, 4)
    )
    assert labelled > up  # the plain split sends the labels up; the U-shape does not


@pytest.mark.parametrize("backbone", ["vgg11", "resnet18", "mobilenetv2"])
def test_every_backbone_has_its_top_points(backbone):
    keras.utils.set_random_seed(0)
    model = backbones.build_backbone(backbone, 10, (32, 32, 3), width_multiplier=0.125)
    cut = backbones.resolve_cut(backbone, "stem" if backbone != "vgg11" else "conv2")
    tops = {}
    for point in backbones.TOP_POINTS:
        split = tfsplit.split_model(model, cut, top=backbones.resolve_top(backbone, point))
        tops[point] = len(split.top.layers)
        assert split.top.output.shape[-1] == 10
    assert tops["last_block"] > tops["classifier"] > 1


def test_a_top_that_cannot_be_one_is_refused(vgg11):
    with pytest.raises(ValueError, match="The top must start after the cut"):
        tfsplit.split_model(vgg11, "conv5_relu", top="conv3_relu")
    with pytest.raises(ValueError, match=r"Unknown top layer.*top='nope'"):
        tfsplit.split_model(vgg11, "conv5_relu", top="nope")
    with pytest.raises(ValueError, match="nothing after it"):
        tfsplit.split_model(vgg11, "conv5_relu", top="logits")
    keras.utils.set_random_seed(0)
    resnet = backbones.build_backbone("resnet18", 10, (32, 32, 3), width_multiplier=0.125)
    with pytest.raises(ValueError, match="skip connection"):  # inside a residual block
        tfsplit.split_model(resnet, "stem_relu", top="block4_2_relu1")
    with pytest.raises(ValueError, match="top point"):
        backbones.resolve_top("vgg11", "nowhere")


def test_the_ushaped_variant_trains_and_saves_and_the_plain_paths_refuse_it(tmp_path):
    """The codec transport and the plain split's tail export refuse a U-shaped run with a
    message."""
    config = base_config("deprune")
    config.data.train_size, config.data.test_size = 64, 32
    config.data.batch_size, config.data.eval_batch_size = 32, 32
    config.model.width_multiplier = 0.125
    config.model.top = "classifier"
    config.calibration_batches = 1
    config.phases = [phase(budget=0, epochs=1, learning_rate=0.01), phase(8, 1, 0.01)]
    summary = trainer.train(config, str(tmp_path))
    assert summary["model"] == "vgg11@conv5, top after classifier"
    assert summary["train_top_payload_bytes_down"] == summary["train_top_payload_bytes_up"] > 0
    loaded = trainer.load_model(str(tmp_path))
    assert isinstance(loaded, tfsplit.UShapedSplitModel) and loaded.top_cut == "pool5"
    config.wire.transport = "codec"
    info = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    with pytest.raises(ValueError, match="U-shaped split.*the codec transport carries the plain"):
        trainer.build_split_model(config, info)
    with pytest.raises(export.ExportError, match="U-shaped split.*after 'pool5'"):
        export.export_tail(str(tmp_path), str(tmp_path / "serving"))
