"""Tests for tfsplit.backbones.splitter: head/tail of any functional model, with or without bottleneck."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfsplit.backbones import SplitModel, build_backbone, resolve_cut, split_model
from tfsplit.layers.bottleneck import Decoder, MaskedEncoder

BOTTLENECK = {"feature_compression": 2, "resolution_compression": 2, "gate_init_max": 1.0}


def _images(shape=(32, 32, 3), batch=3, seed=0):
    return np.random.RandomState(seed).rand(batch, *shape).astype("float32")


def _assert_split_matches(model, split, inputs, training=False):
    whole = model(inputs, training=training).numpy()
    halves = split.tail(split.head(inputs, training=training), training=training).numpy()
    np.testing.assert_array_equal(halves, whole)


@pytest.fixture(scope="module")
def vgg11():
    keras.utils.set_random_seed(0)
    return build_backbone("vgg11", 10, (32, 32, 3), width_multiplier=0.125)


def _residual_model():
    """Stem, then a residual block (Add with a list input), a constant scale and a frozen BN."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="res_a")(x)
    y = keras.layers.BatchNormalization(name="res_bn")(y, training=False)
    y = keras.layers.ReLU(name="res_relu")(y)
    y = keras.layers.Conv2D(4, 3, padding="same", name="res_b")(y)
    x = keras.layers.Add(name="add")([x, y]) * 0.5
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="resnet_toy")


@pytest.mark.parametrize("cut, wire", [("conv2", (8, 8, 16)), ("conv5", (4, 4, 64))])
def test_vgg11_split_equals_model_at_research_cuts(vgg11, cut, wire):
    split = split_model(vgg11, resolve_cut("vgg11", cut))
    assert isinstance(split, SplitModel)
    assert split.cut == resolve_cut("vgg11", cut)
    assert split.wire_shape == wire and split.channels == wire[-1]
    assert split.encoder is None and split.decoder is None
    _assert_split_matches(vgg11, split, _images())
    assert split.head.get_layer("conv1") is vgg11.get_layer("conv1")
    assert split.tail.get_layer("logits") is vgg11.get_layer("logits")
    head_names = {layer.name for layer in split.head.layers}
    tail_names = {layer.name for layer in split.tail.layers} - {"wire"}
    assert head_names.isdisjoint(tail_names)
    assert head_names | tail_names == {layer.name for layer in vgg11.layers}


def test_full_model_shares_weights_with_head_and_tail(vgg11):
    split = split_model(vgg11, "pool2")
    images = _images()
    full = split.tail(split.head(images, training=False), training=False)
    np.testing.assert_array_equal(full, vgg11(images, training=False))
    assert split.head.count_params() + split.tail.count_params() == vgg11.count_params()


def test_residual_block_after_the_cut_is_replayed_with_its_arguments():
    model = _residual_model()
    split = split_model(model, "stem_relu")
    images = _images((8, 8, 3))
    _assert_split_matches(model, split, images)
    # res_bn was called with training=False; the tail must keep it frozen in training mode too.
    _assert_split_matches(model, split, images, training=True)
    traced = tf.function(lambda x: split.tail(split.head(x, training=False), training=False))
    np.testing.assert_allclose(traced(images), model(images, training=False), rtol=1e-6, atol=1e-6)
    assert split.tail.get_layer("add") is model.get_layer("add")


@pytest.mark.parametrize("cut", ["res_a", "res_relu", "res_b"])
def test_skip_connection_across_the_cut_raises(cut):
    model = _residual_model()
    with pytest.raises(ValueError, match=r"does not separate the model.*'add'.*stem_relu"):
        split_model(model, cut)
    _assert_split_matches(model, split_model(model, "add"), _images((8, 8, 3)))


def test_model_can_be_split_again():
    model = _residual_model()
    split_model(model, "stem_relu")
    again = split_model(model, "stem_relu")
    _assert_split_matches(model, again, _images((8, 8, 3)))


def test_sequential_model_and_flat_cut():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    split = split_model(model, "flat")
    assert split.wire_shape == (32,)
    _assert_split_matches(model, split, _images((6, 6, 2)))
    with pytest.raises(ValueError, match=r"\(batch, H, W, C\)"):
        split_model(model, "flat", BOTTLENECK)


def test_unknown_cut_lists_the_layers():
    with pytest.raises(ValueError, match=r"expected one of \['stem', 'stem_relu', 'res_a'"):
        split_model(_residual_model(), "conv5")


def test_cut_at_the_output_layer_raises():
    with pytest.raises(ValueError, match="nothing after it"):
        split_model(_residual_model(), "logits")


def test_non_functional_models_raise():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    model = Subclassed()
    model(tf.zeros((1, 3)))
    with pytest.raises(ValueError, match="subclassed"):
        split_model(model, "dense")
    with pytest.raises(ValueError, match="functional"):
        split_model(keras.layers.Dense(2), "dense")


def test_shared_layer_raises():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    hidden = keras.layers.ReLU(name="relu")(shared(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(shared(hidden)))
    with pytest.raises(ValueError, match=r"shared.*\['shared'\]"):
        split_model(model, "relu")


def test_several_inputs_raise():
    first, second = keras.Input((2,)), keras.Input((2,))
    joined = keras.layers.Concatenate(name="concat")([first, second])
    model = keras.Model([first, second], keras.layers.Dense(1, name="out")(joined))
    with pytest.raises(ValueError, match="exactly one input"):
        split_model(model, "concat")


def test_bottleneck_shapes_and_layers(vgg11):
    config = ml_collections.ConfigDict(BOTTLENECK)
    split = split_model(vgg11, "pool2", config)
    assert split.wire_shape == (4, 4, 8) and split.channels == 8
    assert isinstance(split.encoder, MaskedEncoder) and split.encoder.name == "encoder"
    assert isinstance(split.decoder, Decoder) and split.decoder.name == "decoder"
    assert split.head.layers[-1] is split.encoder
    assert split.tail.layers[1] is split.decoder
    assert tuple(split.decoder.output.shape) == (None, 8, 8, 16)  # what conv3 expects
    wire = split.head(_images(), training=False)
    assert tuple(wire.shape) == (3, 4, 4, 8)
    assert tuple(split.tail(wire, training=False).shape) == (3, 10)
    plain = split_model(vgg11, "conv5_relu", dict(BOTTLENECK, feature_compression=1))
    assert plain.wire_shape == (2, 2, 64)
    identity = dict(BOTTLENECK, feature_compression=1, resolution_compression=1)
    assert split_model(vgg11, "pool2", identity).wire_shape == (8, 8, 16)


def test_gradients_reach_gate_logits_head_and_tail(vgg11):
    split = split_model(vgg11, "pool2", BOTTLENECK)
    labels = np.array([0, 3, 7])
    with tf.GradientTape() as tape:
        logits = split.tail(split.head(_images(), training=True), training=True)
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        loss = tf.reduce_mean(losses)
    watched = [
        split.encoder.gate_logits,
        vgg11.get_layer("conv1").kernel,
        split.decoder.deconv.kernel,
        vgg11.get_layer("logits").kernel,
    ]
    grads = tape.gradient(loss, watched)
    assert [grad is None for grad in grads] == [False] * 4
    assert np.all(np.abs(grads[0].numpy()) > 0)
    assert all(np.any(grad.numpy() != 0) for grad in grads[1:])


def test_head_and_tail_save_and_reload(vgg11, tmp_path):
    split = split_model(vgg11, "pool2", BOTTLENECK)
    images = _images()
    wire = split.head(images, training=False).numpy()
    logits = split.tail(wire, training=False).numpy()
    split.head.save(str(tmp_path / "head.keras"))
    split.tail.save(str(tmp_path / "tail.keras"))
    head = keras.models.load_model(str(tmp_path / "head.keras"))
    tail = keras.models.load_model(str(tmp_path / "tail.keras"))
    assert isinstance(head.get_layer("encoder"), MaskedEncoder)
    assert isinstance(tail.get_layer("decoder"), Decoder)
    np.testing.assert_array_equal(head(images, training=False).numpy(), wire)
    np.testing.assert_array_equal(tail(wire, training=False).numpy(), logits)


@pytest.mark.parametrize(
    "bottleneck, message",
    [
        (dict(BOTTLENECK, feature_compression=3), "must divide the 16 channels"),
        (dict(BOTTLENECK, resolution_compression=3), "must divide the cut's height and width"),
        (dict(BOTTLENECK, feature_compression=0), "feature_compression` must be an integer"),
        (dict(BOTTLENECK, resolution_compression=True), "resolution_compression` must be"),
        (dict(BOTTLENECK, gate_init_max=-1.0), "gate_init_max` must be a number >= 0"),
        ({"feature_compression": 2, "resolution_compression": 2}, "exactly the keys"),
        (dict(BOTTLENECK, budget=4), "exactly the keys"),
        ([2, 2, 15.0], "must be None, True, a dict or a ConfigDict"),
    ],
)
def test_bad_bottleneck_config_raises(vgg11, bottleneck, message):
    with pytest.raises(ValueError, match=message):
        split_model(vgg11, "pool2", bottleneck)


def _softmax_model(ending):
    """A classifier that ends in a softmax, as keras.applications models do."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if ending == "dense":
        outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    else:
        x = keras.layers.Dense(3, name="dense")(x)
        last = keras.layers.Softmax if ending == "softmax" else keras.layers.Activation
        outputs = (last() if ending == "softmax" else last("softmax"))(x)
    return keras.Model(inputs, outputs, name=f"{ending}_classifier")


@pytest.mark.parametrize("ending", ["dense", "softmax", "activation"])
def test_a_final_softmax_is_left_out_of_the_tail(ending, tmp_path):
    keras.utils.set_random_seed(0)
    model = _softmax_model(ending)
    inputs = _images((8, 8, 3))
    probabilities = model(inputs).numpy()
    split = split_model(model, "conv_b")
    logits = split.tail(split.head(inputs)).numpy()  # `split(x)` rounds the wire to float16
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), probabilities, atol=1e-6)
    assert not np.allclose(logits.sum(-1), 1.0)
    # The user's model keeps its softmax, and shares the final layer's weights with the tail.
    np.testing.assert_array_equal(model(inputs).numpy(), probabilities)
    dense = model.get_layer("predictions" if ending == "dense" else "dense")
    assert any(dense.kernel is w for w in split.tail.weights)
    # A second split and a saved one hold the same logits.
    masked = split_model(model, "conv_a", bottleneck=BOTTLENECK | {"resolution_compression": 1})
    path = str(tmp_path / "split.keras")
    masked.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(inputs).numpy(), masked(inputs).numpy())
    assert not np.allclose(loaded(inputs).numpy().sum(-1), 1.0)
