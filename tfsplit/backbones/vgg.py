"""VGG-11 and VGG-16 with batch norm, the backbones of the paper, with stable layer names.

Features: every convolution is 3x3 "same" with bias (as in the PyTorch research code), then batch
norm, then ReLU; "M" in the configuration is a 2x2 max pool with stride 2. Batch norm uses
PyTorch's defaults (momentum 0.9 in Keras terms, epsilon 1e-5) so that the paper's network behaves
as it did there. Channels are `max(1, round(c * width_multiplier))`.

Layer names (stable; cut points and checkpoints rely on them):
  `image` (input), `conv{i}`, `conv{i}_bn`, `conv{i}_relu` for i = 1.. in order, `pool{j}` for
  j = 1..5, then the classifier:
  - classifier="cifar" (default): `avg_pool` (global average pool; at 32x32 the map is 1x1, so
    this equals a flatten), `dropout`, `logits`.
  - classifier="imagenet" (the research code's): `adaptive_pool` (to 7x7, PyTorch semantics),
    `flatten`, `fc1`, `fc1_relu`, `fc1_dropout`, `fc2`, `fc2_relu`, `fc2_dropout`, `logits`;
    fc1 and fc2 have `max(1, round(4096 * width_multiplier))` units.

Cut points. `CUT_POINTS[name]["conv{i}"]` is the output of the block that ends with conv i: the
max pool right after conv i when there is one, otherwise conv i's ReLU. The research code's two
VGG-11 cuts are "conv2" (after the 2nd convolution) and "conv5" (after the 5th).

VGG-11 (configuration "A"), 32x32 input, width 1.0:

  | cut   | layer       | output shape | channels |
  |-------|-------------|--------------|----------|
  | conv1 | pool1       | 16x16x64     | 64       |
  | conv2 | pool2       | 8x8x128      | 128      |  research cut
  | conv3 | conv3_relu  | 8x8x256      | 256      |
  | conv4 | pool3       | 4x4x256      | 256      |
  | conv5 | conv5_relu  | 4x4x512      | 512      |  research cut
  | conv6 | pool4       | 2x2x512      | 512      |
  | conv7 | conv7_relu  | 2x2x512      | 512      |
  | conv8 | pool5       | 1x1x512      | 512      |

VGG-16 (configuration "D"), 32x32 input, width 1.0, by stage: the cut of a stage's last conv is
the pool after it, the cuts of its other convs are their ReLUs.

  | convs     | conv output | last conv's cut | its output |
  |-----------|-------------|-----------------|------------|
  | conv1-2   | 32x32x64    | pool1           | 16x16x64   |
  | conv3-4   | 16x16x128   | pool2           | 8x8x128    |
  | conv5-7   | 8x8x256     | pool3           | 4x4x256    |
  | conv8-10  | 4x4x512     | pool4           | 2x2x512    |
  | conv11-13 | 2x2x512     | pool5           | 1x1x512    |
"""

import numbers

import tf_keras as keras

from tfsplit.backbones.blocks import AdaptiveAveragePooling2D, conv_bn, pooled_logits, scaled
from tfsplit.backbones.checks import check_backbone_arguments

CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
    ),
}  # fmt: skip
CLASSIFIERS = ("cifar", "imagenet")
MIN_INPUT_SIZE = 32  # Five 2x2 pools with stride 2 need at least 2**5 pixels per side.
IMAGENET_POOL_SIZE = 7
IMAGENET_HIDDEN_UNITS = 4096


def _blocks(config):
    """Yields (kind, index, channels) for each conv ("conv", i, c) and pool ("pool", j, None)."""
    conv_index = pool_index = 0
    for entry in config:
        if entry == "M":
            pool_index += 1
            yield "pool", pool_index, None
        else:
            conv_index += 1
            yield "conv", conv_index, entry


def _cut_points(config):
    cuts = {}
    last_conv = None
    for kind, index, _ in _blocks(config):
        if kind == "conv":
            last_conv = f"conv{index}"
            cuts[last_conv] = f"{last_conv}_relu"
        elif last_conv is not None:
            cuts[last_conv] = f"pool{index}"
    return cuts


CUT_POINTS = {name: _cut_points(config) for name, config in CONFIGS.items()}


def feature_layer_names(name):
    """Names of the feature layers of `name` in order: the layers a cut can sit behind.

    Args:
      name: "vgg11" or "vgg16".

    Returns:
      List of layer names, e.g. ["conv1", "conv1_bn", "conv1_relu", "pool1", ...].

    Raises:
      ValueError: when `name` is not a known VGG.
    """
    _check_name(name)
    names = []
    for kind, index, _ in _blocks(CONFIGS[name]):
        if kind == "conv":
            names += [f"conv{index}", f"conv{index}_bn", f"conv{index}_relu"]
        else:
            names.append(f"pool{index}")
    return names


def _check_name(name):
    if name not in CONFIGS:
        raise ValueError(
            f"Unknown VGG `name`; expected one of {sorted(CONFIGS)}. Received: {name=}"
        )


def _validate(name, num_classes, input_shape, width_multiplier, classifier, dropout_rate):
    _check_name(name)
    check_backbone_arguments(
        num_classes, input_shape, width_multiplier, classifier, CLASSIFIERS, "VGG"
    )
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real):
        raise ValueError(f"`dropout_rate` must be a number. Received: {dropout_rate=!r}")
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"`dropout_rate` must be in [0, 1). Received: {dropout_rate=}")
    if min(input_shape[:2]) < MIN_INPUT_SIZE:
        raise ValueError(
            f"VGG's five 2x2 max pools need an input of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
            f" pixels; resize or pad the images. Received: input_shape={tuple(input_shape)}"
        )


def _features(x, config, width_multiplier):
    for kind, index, channels in _blocks(config):
        if kind == "pool":
            x = keras.layers.MaxPooling2D(2, strides=2, name=f"pool{index}")(x)
            continue
        name = f"conv{index}"
        filters = scaled(channels, width_multiplier)
        x = conv_bn(x, filters, 3, (name, f"{name}_bn"), use_bias=True)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _imagenet_classifier(x, num_classes, width_multiplier, dropout_rate):
    x = AdaptiveAveragePooling2D(IMAGENET_POOL_SIZE, name="adaptive_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    units = scaled(IMAGENET_HIDDEN_UNITS, width_multiplier)
    for name in ("fc1", "fc2"):
        x = keras.layers.Dense(units, name=name)(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        x = keras.layers.Dropout(dropout_rate, name=f"{name}_dropout")(x)
    return keras.layers.Dense(num_classes, name="logits")(x)


def build_vgg(
    name="vgg11",
    num_classes=10,
    input_shape=(32, 32, 3),
    width_multiplier=1.0,
    classifier="cifar",
    dropout_rate=0.5,
):
    """Builds a batch-norm VGG as a functional Keras model that returns logits.

    Args:
      name: "vgg11" (configuration "A", the paper's) or "vgg16" (configuration "D").
      num_classes: number of logits.
      input_shape: (height, width, channels); height and width at least 32.
      width_multiplier: scales every conv and hidden dense width; tests use 0.125 for speed.
      classifier: "cifar" (global pool, dropout, dense) or "imagenet" (the research code's
        7x7 adaptive pool and two 4096-wide dense layers, ~120M weights at width 1.0).
      dropout_rate: dropout before each dense layer of the classifier.

    Returns:
      An uncompiled `keras.Model` named `name`, from `image` to `logits`.

    Raises:
      ValueError: for an unknown name or classifier, a non-positive width or class count, a
        dropout rate outside [0, 1), or an input smaller than 32x32.
    """
    _validate(name, num_classes, input_shape, width_multiplier, classifier, dropout_rate)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _features(inputs, CONFIGS[name], width_multiplier)
    if classifier == "cifar":
        return keras.Model(inputs, pooled_logits(x, num_classes, dropout_rate), name=name)
    logits = _imagenet_classifier(x, num_classes, width_multiplier, dropout_rate)
    return keras.Model(inputs, logits, name=name)
