"""Tests for tfsplit.backbones.resnet and tfsplit.backbones.mobilenet: shapes, counts, cuts, splits."""

import numpy as np
import pytest
import tf_keras as keras

from tfsplit import backbones as models
from tfsplit.backbones import mobilenet, resnet

BOTTLENECK = {"feature_compression": 1, "resolution_compression": 1, "gate_init_max": 15.0}

# Cut name -> (layer, (h, w, channels)) for a 32x32 input at width 1.0, as in the modules' tables.
RESNET18_CUTS = {
    "stem": ("stem_relu", (32, 32, 64)),
    "block1_1": ("block1_1_out", (32, 32, 64)),
    "block1_2": ("block1_2_out", (32, 32, 64)),
    "stage1": ("block1_2_out", (32, 32, 64)),
    "block2_1": ("block2_1_out", (16, 16, 128)),
    "block2_2": ("block2_2_out", (16, 16, 128)),
    "stage2": ("block2_2_out", (16, 16, 128)),
    "block3_1": ("block3_1_out", (8, 8, 256)),
    "block3_2": ("block3_2_out", (8, 8, 256)),
    "stage3": ("block3_2_out", (8, 8, 256)),
    "block4_1": ("block4_1_out", (4, 4, 512)),
    "block4_2": ("block4_2_out", (4, 4, 512)),
    "stage4": ("block4_2_out", (4, 4, 512)),
}
MOBILENETV2_CUTS = {
    "stem": ("stem_relu", (32, 32, 32)),
    "block1": ("block1_out", (32, 32, 16)),
    "stage1": ("block1_out", (32, 32, 16)),
    "block2": ("block2_out", (32, 32, 24)),
    "block3": ("block3_out", (32, 32, 24)),
    "stage2": ("block3_out", (32, 32, 24)),
    "block4": ("block4_out", (16, 16, 32)),
    "block5": ("block5_out", (16, 16, 32)),
    "block6": ("block6_out", (16, 16, 32)),
    "stage3": ("block6_out", (16, 16, 32)),
    "block7": ("block7_out", (8, 8, 64)),
    "block8": ("block8_out", (8, 8, 64)),
    "block9": ("block9_out", (8, 8, 64)),
    "block10": ("block10_out", (8, 8, 64)),
    "stage4": ("block10_out", (8, 8, 64)),
    "block11": ("block11_out", (8, 8, 96)),
    "block12": ("block12_out", (8, 8, 96)),
    "block13": ("block13_out", (8, 8, 96)),
    "stage5": ("block13_out", (8, 8, 96)),
    "block14": ("block14_out", (4, 4, 160)),
    "block15": ("block15_out", (4, 4, 160)),
    "block16": ("block16_out", (4, 4, 160)),
    "stage6": ("block16_out", (4, 4, 160)),
    "block17": ("block17_out", (4, 4, 320)),
    "stage7": ("block17_out", (4, 4, 320)),
    "top": ("top_relu", (4, 4, 1280)),
}
# Blocks of MobileNetV2 at width 1.0 as (input channels, expansion, output channels), Table 2.
MOBILENETV2_BLOCKS = (
    [(32, 1, 16), (16, 6, 24), (24, 6, 24)]
    + [(24, 6, 32)] + [(32, 6, 32)] * 2
    + [(32, 6, 64)] + [(64, 6, 64)] * 3
    + [(64, 6, 96)] + [(96, 6, 96)] * 2
    + [(96, 6, 160)] + [(160, 6, 160)] * 2
    + [(160, 6, 320)]
)  # fmt: skip
SPLIT_CASES = [
    ("resnet18", "stem", (32, 32, 8)),
    ("resnet18", "block1_1", (32, 32, 8)),
    ("resnet18", "stage2", (16, 16, 16)),
    ("resnet18", "block3_1", (8, 8, 32)),
    ("resnet18", "block4_2", (4, 4, 64)),
    ("mobilenetv2", "stem", (32, 32, 8)),
    ("mobilenetv2", "block2", (32, 32, 8)),
    ("mobilenetv2", "stage3", (16, 16, 8)),
    ("mobilenetv2", "block11", (8, 8, 24)),
    ("mobilenetv2", "block15", (4, 4, 40)),
    ("mobilenetv2", "top", (4, 4, 1280)),
]
SMALL_WIDTH = {"resnet18": 0.125, "mobilenetv2": 0.25}


def _conv_bn(kernel, channels_in, channels_out):
    """Trainable weights of a bias-free conv and its batch norm (gamma and beta)."""
    return kernel * kernel * channels_in * channels_out + 2 * channels_out


def _resnet18_trainable(widths, classes):
    params, channels_in = _conv_bn(3, 3, widths[0]), widths[0]
    for width in widths:
        for _ in range(2):
            params += _conv_bn(3, channels_in, width) + _conv_bn(3, width, width)
            params += _conv_bn(1, channels_in, width) if channels_in != width else 0
            channels_in = width
    return params + channels_in * classes + classes


def _mobilenetv2_trainable(classes):
    params = _conv_bn(3, 3, 32)
    for channels_in, expansion, channels_out in MOBILENETV2_BLOCKS:
        hidden = channels_in * expansion
        params += _conv_bn(1, channels_in, hidden) if expansion != 1 else 0
        params += 3 * 3 * hidden + 2 * hidden  # Depthwise conv and its batch norm.
        params += _conv_bn(1, hidden, channels_out)
    return params + _conv_bn(1, 320, 1280) + 1280 * classes + classes


def _trainable(model):
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


def _batch_norm_channels(model):
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    return sum(layer.gamma.shape[0] for layer in layers)


def _images(shape=(32, 32, 3), batch=2, seed=0):
    return np.random.RandomState(seed).rand(batch, *shape).astype("float32")


@pytest.fixture(scope="module")
def full_models():
    """Both backbones at width 1.0, built once: shapes and counts need no forward pass."""
    return {name: models.build_backbone(name, 10, (32, 32, 3)) for name in SMALL_WIDTH}


@pytest.fixture(scope="module")
def small_models():
    keras.utils.set_random_seed(0)
    return {
        name: models.build_backbone(name, 10, (32, 32, 3), width_multiplier=width)
        for name, width in SMALL_WIDTH.items()
    }


def test_registry_holds_both_backbones_with_documented_cuts():
    assert models.BACKBONES[-2:] == ("resnet18", "mobilenetv2")
    assert models.cut_points("resnet18") == {c: layer for c, (layer, _) in RESNET18_CUTS.items()}
    expected = {c: layer for c, (layer, _) in MOBILENETV2_CUTS.items()}
    assert models.cut_points("mobilenetv2") == expected
    assert models.resolve_cut("resnet18", "block2_1") == "block2_1_out"
    assert models.resolve_cut("resnet18", "stem_bn") == "stem_bn"
    assert models.resolve_cut("mobilenetv2", "stage5") == "block13_out"
    assert models.resolve_cut("mobilenetv2", "top_conv") == "top_conv"


@pytest.mark.parametrize(
    "name, cuts", [("resnet18", RESNET18_CUTS), ("mobilenetv2", MOBILENETV2_CUTS)]
)
def test_every_documented_cut_has_its_shape_at_width_one(full_models, name, cuts):
    model = full_models[name]
    for cut, (layer, shape) in cuts.items():
        assert tuple(model.get_layer(layer).output.shape) == (None, *shape), cut
    for layer in {"resnet18": resnet.CUT_LAYERS, "mobilenetv2": mobilenet.CUT_LAYERS}[name]:
        model.get_layer(layer)  # Raises ValueError for a missing layer.
    assert tuple(model.output.shape) == (None, 10)
    assert model.layers[0].name == "image" and model.layers[-1].name == "logits"


def test_resnet18_parameter_count(full_models):
    model = full_models["resnet18"]
    assert _resnet18_trainable((64, 128, 256, 512), 10) == 11_173_962
    assert _trainable(model) == 11_173_962
    # Moving mean and variance of 64 + 4*64 + 5*128 + 5*256 + 5*512 = 4800 batch-norm channels.
    assert _batch_norm_channels(model) == 4800
    assert model.count_params() == 11_173_962 + 2 * 4800


def test_mobilenetv2_parameter_count(full_models):
    model = full_models["mobilenetv2"]
    # torchvision's ImageNet MobileNetV2 has 3,504,872; 1000 -> 10 classes drops 990 * 1281.
    assert _mobilenetv2_trainable(10) == 3_504_872 - 990 * 1281 == 2_236_682
    assert _trainable(model) == 2_236_682
    assert model.count_params() == 2_236_682 + 2 * _batch_norm_channels(model) == 2_270_794


def test_resnet18_block_layers_and_widths(small_models):
    model = small_models["resnet18"]
    names = {layer.name for layer in model.layers if layer.name.startswith("block2_1_")}
    suffixes = "conv1 bn1 relu1 conv2 bn2 shortcut_conv shortcut_bn add out".split()
    assert names == {f"block2_1_{suffix}" for suffix in suffixes}
    assert not any(layer.name.startswith("block1_1_shortcut") for layer in model.layers)
    widths = [model.get_layer(f"block{s}_2_conv2").filters for s in range(1, 5)]
    assert [model.get_layer("stem_conv").filters, *widths] == [8, 8, 16, 32, 64]
    assert _trainable(model) == _resnet18_trainable((8, 16, 32, 64), 10)
    assert model.get_layer("block2_1_conv1").strides == (2, 2)
    assert model.get_layer("stem_conv").strides == (1, 1)


def test_mobilenetv2_residuals_follow_the_width(full_models, small_models):
    full, small = full_models["mobilenetv2"], small_models["mobilenetv2"]
    kinds = [type(full.get_layer(f"block{i}_out")).__name__ for i in (1, 2, 3)]
    assert kinds == ["Identity", "Identity", "Add"]
    # At width 0.25 the stem (32 -> 8) and blocks 1-2 (16, 24 -> 8) share 8 channels at stride 1,
    # so blocks 1 and 2 gain a residual; the cut names stay the same.
    assert all(isinstance(small.get_layer(f"block{i}_out"), keras.layers.Add) for i in (1, 2, 3))
    assert "block1_expand_conv" not in {layer.name for layer in full.layers}
    widths = [small.get_layer(f"block{i}_project_conv").filters for i in (1, 2, 4, 7, 11, 14, 17)]
    assert widths == [8, 8, 8, 16, 24, 40, 80]
    assert small.get_layer("top_conv").filters == 1280
    assert small.get_layer("stem_conv").strides == (1, 1)
    assert small.get_layer("block4_depthwise_conv").strides == (2, 2)


@pytest.mark.parametrize(
    "value, expected",
    [(4.0, 8), (5.6, 8), (12.0, 16), (18.0, 24), (20.0, 24), (36.0, 40), (48.0, 48), (1280, 1280)],
)
def test_make_divisible_rounds_like_the_paper(value, expected):
    # 18 -> 16 would lose over 10%, so it goes up to 24; 20 and 36 round half up.
    assert mobilenet.make_divisible(value) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"value": 0}, "value"),
        ({"value": -3.0}, "value"),
        ({"value": float("inf")}, "value"),
        ({"value": "8"}, "value"),
        ({"value": 8.0, "divisor": 0}, "divisor"),
    ],
)
def test_make_divisible_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mobilenet.make_divisible(**kwargs)


@pytest.mark.parametrize("name", list(SMALL_WIDTH))
def test_other_input_shapes_and_class_counts(name):
    model = models.build_backbone(name, 7, (40, 48, 1), width_multiplier=SMALL_WIDTH[name])
    assert tuple(model.get_layer(models.resolve_cut(name, "stem")).output.shape[1:3]) == (40, 48)
    last = {"resnet18": "stage4", "mobilenetv2": "stage7"}[name]
    assert tuple(model.get_layer(models.resolve_cut(name, last)).output.shape[1:3]) == (5, 6)
    assert model(_images((40, 48, 1))).shape == (2, 7)


@pytest.mark.parametrize("name, cut, wire", SPLIT_CASES)
def test_split_at_block_outputs_equals_the_model(small_models, name, cut, wire):
    model = small_models[name]
    split = models.split_model(model, models.resolve_cut(name, cut))
    assert split.wire_shape == wire
    inputs = _images()
    head_out = split.head(inputs, training=False)
    np.testing.assert_array_equal(
        split.tail(head_out, training=False).numpy(), model(inputs, training=False).numpy()
    )


@pytest.mark.parametrize(
    "name, layer",
    [
        ("resnet18", "block2_1_conv1"),
        ("resnet18", "block1_2_bn2"),
        ("mobilenetv2", "block3_expand_relu"),
        ("mobilenetv2", "block8_project_bn"),
    ],
)
def test_cut_inside_a_residual_block_is_rejected(small_models, name, layer):
    with pytest.raises(ValueError, match=f"Unknown cut for {name}"):
        models.resolve_cut(name, layer)
    with pytest.raises(ValueError, match="does not separate the model.*skip connection"):
        models.split_model(small_models[name], layer)


@pytest.mark.parametrize("name, cut, wire", [SPLIT_CASES[2], SPLIT_CASES[8]])
def test_split_with_masked_bottleneck_has_the_cut_shape_on_the_wire(small_models, name, cut, wire):
    split = models.split_model(small_models[name], models.resolve_cut(name, cut), BOTTLENECK)
    assert split.wire_shape == wire and split.channels == wire[-1]
    assert split.head.layers[-1] is split.encoder and split.encoder.channels == wire[-1]
    assert split.decoder.channels == wire[-1]
    head_out = split.head(_images(), training=False)
    assert head_out.shape == (2, *wire)
    assert split.tail(head_out, training=False).shape == (2, 10)


@pytest.mark.parametrize("name", list(SMALL_WIDTH))
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"input_shape": (32, 32)}, "input_shape"),
        ({"input_shape": (32, 0, 3)}, "input_shape width"),
        ({"input_shape": "32x32x3"}, "input_shape"),
        ({"width_multiplier": 0}, "width_multiplier"),
        ({"width_multiplier": -1.0}, "width_multiplier"),
        ({"width_multiplier": float("nan")}, "width_multiplier"),
        ({"width_multiplier": float("inf")}, "width_multiplier"),
        ({"width_multiplier": True}, "width_multiplier"),
        ({"classifier": "imagenet"}, r"classifier. must be one of \('cifar',\)"),
    ],
)
def test_builders_reject_bad_arguments(name, kwargs, message):
    arguments = {
        "num_classes": 10,
        "input_shape": (32, 32, 3),
        "width_multiplier": 0.125,
        "classifier": "cifar",
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        models.build_backbone(name, **arguments)


@pytest.mark.parametrize(
    "name, layers", [("resnet18", resnet.CUT_LAYERS), ("mobilenetv2", mobilenet.CUT_LAYERS)]
)
def test_every_cut_layer_separates_the_model(small_models, name, layers):
    for layer in layers:
        assert models.split_model(small_models[name], models.resolve_cut(name, layer)).cut == layer
