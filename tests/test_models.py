"""Tests for tfsplit.backbones: VGG backbones, their cut points, AdaptiveAveragePooling2D."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfsplit import backbones as models
from tfsplit.backbones import vgg
from tfsplit.backbones.blocks import AdaptiveAveragePooling2D

VGG11_LAYERS = [
    "image",
    "conv1", "conv1_bn", "conv1_relu", "pool1",
    "conv2", "conv2_bn", "conv2_relu", "pool2",
    "conv3", "conv3_bn", "conv3_relu",
    "conv4", "conv4_bn", "conv4_relu", "pool3",
    "conv5", "conv5_bn", "conv5_relu",
    "conv6", "conv6_bn", "conv6_relu", "pool4",
    "conv7", "conv7_bn", "conv7_relu",
    "conv8", "conv8_bn", "conv8_relu", "pool5",
]  # fmt: skip

# Cut name -> (layer, (h, w, channels)) for a 32x32 input at width 1.0, as in vgg.py's tables.
VGG11_CUTS = {
    "conv1": ("pool1", (16, 16, 64)),
    "conv2": ("pool2", (8, 8, 128)),
    "conv3": ("conv3_relu", (8, 8, 256)),
    "conv4": ("pool3", (4, 4, 256)),
    "conv5": ("conv5_relu", (4, 4, 512)),
    "conv6": ("pool4", (2, 2, 512)),
    "conv7": ("conv7_relu", (2, 2, 512)),
    "conv8": ("pool5", (1, 1, 512)),
}
VGG16_CUTS = {
    "conv1": ("conv1_relu", (32, 32, 64)),
    "conv2": ("pool1", (16, 16, 64)),
    "conv3": ("conv3_relu", (16, 16, 128)),
    "conv4": ("pool2", (8, 8, 128)),
    "conv5": ("conv5_relu", (8, 8, 256)),
    "conv6": ("conv6_relu", (8, 8, 256)),
    "conv7": ("pool3", (4, 4, 256)),
    "conv8": ("conv8_relu", (4, 4, 512)),
    "conv9": ("conv9_relu", (4, 4, 512)),
    "conv10": ("pool4", (2, 2, 512)),
    "conv11": ("conv11_relu", (2, 2, 512)),
    "conv12": ("conv12_relu", (2, 2, 512)),
    "conv13": ("pool5", (1, 1, 512)),
}
VGG11_CONV_CHANNELS = [64, 128, 256, 256, 512, 512, 512, 512]


def _vgg11_feature_params(channels):
    """Conv 3x3 with bias, plus batch norm's gamma, beta, moving mean and moving variance."""
    params, previous = 0, 3
    for width in channels:
        params += 3 * 3 * previous * width + width + 4 * width
        previous = width
    return params


def _pool(output_size, inputs):
    return AdaptiveAveragePooling2D(output_size)(tf.constant(inputs, tf.float32)).numpy()


@pytest.fixture(scope="module")
def vgg11():
    return models.build_backbone("vgg11", 10, (32, 32, 3))


def test_registry_lists_the_vgg_backbones():
    assert models.BACKBONES[:2] == ("vgg11", "vgg16")
    assert {"resnet18", "mobilenetv2"} <= set(models.BACKBONES)
    assert models.cut_points("vgg11") == {cut: layer for cut, (layer, _) in VGG11_CUTS.items()}
    assert models.cut_points("vgg16") == vgg.CUT_POINTS["vgg16"]


def test_vgg11_layer_names(vgg11):
    names = [layer.name for layer in vgg11.layers]
    assert names == VGG11_LAYERS + ["avg_pool", "dropout", "logits"]
    assert vgg11.name == "vgg11"
    assert vgg.feature_layer_names("vgg11") == VGG11_LAYERS[1:]


@pytest.mark.parametrize(
    "name, cuts, width",
    [("vgg11", VGG11_CUTS, 1.0), ("vgg11", VGG11_CUTS, 0.25), ("vgg16", VGG16_CUTS, 0.25)],
)
def test_cut_shapes_at_32x32(name, cuts, width):
    model = models.build_backbone(name, 10, (32, 32, 3), width_multiplier=width)
    assert models.cut_points(name) == {cut: layer for cut, (layer, _) in cuts.items()}
    for cut, (layer, (height, width_px, channels)) in cuts.items():
        assert models.resolve_cut(name, cut) == layer
        expected = (None, height, width_px, round(channels * width))
        assert tuple(model.get_layer(layer).output.shape) == expected, cut
    assert tuple(model.output.shape) == (None, 10)


def test_vgg16_at_width_one_has_the_documented_cut_shapes():
    model = models.build_backbone("vgg16", 10, (32, 32, 3))
    for layer, shape in VGG16_CUTS.values():
        assert tuple(model.get_layer(layer).output.shape[1:]) == shape


def test_vgg11_cifar_parameter_count(vgg11):
    features = _vgg11_feature_params(VGG11_CONV_CHANNELS)
    assert features == 9_231_488
    assert vgg11.count_params() == features + 512 * 10 + 10 == 9_236_618


def test_width_multiplier_rounds_and_keeps_at_least_one_channel():
    model = models.build_backbone("vgg11", 10, (32, 32, 3), width_multiplier=0.125)
    widths = [model.get_layer(f"conv{i}").filters for i in range(1, 9)]
    assert widths == [8, 16, 32, 32, 64, 64, 64, 64]
    assert model.count_params() == _vgg11_feature_params(widths) + 64 * 10 + 10
    tiny = vgg.build_vgg("vgg11", 3, (32, 32, 1), width_multiplier=0.001)
    assert [tiny.get_layer(f"conv{i}").filters for i in range(1, 9)] == [1] * 8


def test_vgg11_imagenet_classifier_shapes_and_parameter_count():
    model = models.build_backbone("vgg11", 10, (32, 32, 3), classifier="imagenet")
    shapes = {
        "pool5": (None, 1, 1, 512),
        "adaptive_pool": (None, 7, 7, 512),
        "flatten": (None, 25088),
        "fc1": (None, 4096),
        "fc1_relu": (None, 4096),
        "fc1_dropout": (None, 4096),
        "fc2": (None, 4096),
        "fc2_dropout": (None, 4096),
        "logits": (None, 10),
    }
    for layer, shape in shapes.items():
        assert tuple(model.get_layer(layer).output.shape) == shape, layer
    classifier = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert classifier == 119_586_826
    expected = _vgg11_feature_params(VGG11_CONV_CHANNELS) + classifier
    assert model.count_params() == expected == 128_818_314


def test_imagenet_classifier_scales_hidden_units_and_replicates_the_1x1_map():
    model = vgg.build_vgg("vgg11", 5, (32, 32, 3), 0.125, classifier="imagenet", dropout_rate=0.1)
    assert model.get_layer("fc1").units == model.get_layer("fc2").units == 512
    probe = keras.Model(model.input, model.get_layer("adaptive_pool").output)
    pooled = probe(np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")).numpy()
    np.testing.assert_array_equal(pooled, np.broadcast_to(pooled[:, :1, :1, :], pooled.shape))
    assert model(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 5)


def test_adaptive_pool_replicates_a_single_pixel():
    inputs = np.array([3.0, -1.5]).reshape(1, 1, 1, 2)
    out = _pool(7, inputs)
    assert out.shape == (1, 7, 7, 2)
    np.testing.assert_array_equal(out[..., 0], np.full((1, 7, 7), 3.0))
    np.testing.assert_array_equal(out[..., 1], np.full((1, 7, 7), -1.5))


def test_adaptive_pool_averages_disjoint_bins():
    inputs = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    # Bins are the 2x2 quadrants: means of {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}.
    expected = np.array([[2.5, 4.5], [10.5, 12.5]]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(_pool(2, inputs), expected, rtol=1e-6)


def test_adaptive_pool_overlapping_bins_like_pytorch():
    # Value 5h + w. Row bins of 5 -> 3 are [0, 2), [1, 4), [3, 5) with mean rows 0.5, 2, 3.5;
    # columns likewise, so bin (i, j) averages to 5 * r_i + c_j.
    grid = np.arange(25, dtype=np.float32).reshape(5, 5)
    inputs = np.stack([grid, -grid], axis=-1)[None]
    expected = np.array([[3.0, 4.5, 6.0], [10.5, 12.0, 13.5], [18.0, 19.5, 21.0]])
    out = _pool(3, inputs)
    np.testing.assert_allclose(out[0, ..., 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[0, ..., 1], -expected, rtol=1e-6)


def test_adaptive_pool_non_square_grid_in_tf_function_and_batch():
    grid = np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1)
    batch = np.concatenate([grid, 2 * grid])
    layer = AdaptiveAveragePooling2D((1, 2))
    # One row bin (all rows), column bins [0, 2) and [2, 4): means of {0,1,4,5,8,9}, {2,3,...}.
    expected = np.array([4.5, 6.5]).reshape(1, 1, 2, 1)
    eager = layer(batch).numpy()
    graph = tf.function(layer)(tf.constant(batch)).numpy()
    np.testing.assert_allclose(eager, np.concatenate([expected, 2 * expected]), rtol=1e-6)
    np.testing.assert_array_equal(eager, graph)
    assert tuple(layer.compute_output_shape((None, 3, 4, 1))) == (None, 1, 2, 1)


def test_adaptive_pool_config_round_trip_and_save(tmp_path):
    layer = AdaptiveAveragePooling2D((7, 3), name="pool")
    config = layer.get_config()
    assert config["output_size"] == (7, 3)
    clone = AdaptiveAveragePooling2D.from_config(config)
    inputs = np.random.RandomState(1).rand(2, 5, 4, 3).astype("float32")
    np.testing.assert_array_equal(layer(inputs).numpy(), clone(inputs).numpy())
    model = keras.Sequential([keras.Input((5, 4, 3)), layer])
    path = str(tmp_path / "pool.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.layers[0], AdaptiveAveragePooling2D)
    np.testing.assert_array_equal(model(inputs).numpy(), reloaded(inputs).numpy())


@pytest.mark.parametrize("output_size", [0, (1, 2, 3), (2, -1), 2.5, True])
def test_adaptive_pool_rejects_bad_output_size(output_size):
    with pytest.raises(ValueError, match="output_size"):
        AdaptiveAveragePooling2D(output_size)


def test_adaptive_pool_needs_static_height_and_width():
    with pytest.raises(ValueError, match="static height and width"):
        AdaptiveAveragePooling2D(2)(keras.Input((None, None, 3)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "vgg13"}, "Unknown VGG"),
        ({"width_multiplier": 0}, "width_multiplier"),
        ({"width_multiplier": -0.5}, "width_multiplier"),
        ({"width_multiplier": float("inf")}, "width_multiplier"),
        ({"width_multiplier": "1"}, "width_multiplier"),
        ({"classifier": "resnet"}, "classifier"),
        ({"input_shape": (16, 16, 3)}, "at least 32x32"),
        ({"input_shape": (32, 31, 3)}, "at least 32x32"),
        ({"input_shape": (32, 32)}, "input_shape"),
        ({"input_shape": (32, 32, 0)}, "channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
    ],
)
def test_build_vgg_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vgg.build_vgg(**kwargs)


def test_registry_functions_reject_unknown_names():
    with pytest.raises(ValueError, match="Unknown backbone.*vgg11"):
        models.build_backbone("resnet50", 10, (32, 32, 3))
    with pytest.raises(ValueError, match="Unknown backbone"):
        models.cut_points("vgg19")
    with pytest.raises(ValueError, match="Unknown cut for vgg11.*conv5.*pool2"):
        models.resolve_cut("vgg11", "conv9")
    with pytest.raises(ValueError, match="Unknown VGG"):
        vgg.feature_layer_names("vgg13")


def test_resolve_cut_accepts_layer_names():
    assert models.resolve_cut("vgg11", "pool2") == "pool2"
    assert models.resolve_cut("vgg16", "conv3_bn") == "conv3_bn"
    assert models.resolve_cut("vgg11", "conv2") == "pool2"
    assert models.resolve_cut("vgg11", "conv5") == "conv5_relu"
