"""MobileNetV2 (Sandler et al. 2018) for 32x32 input, functional Keras, stable names, block cuts.

The network of the paper's Table 2, adapted to CIFAR as is common: the first convolution and the
first block of the second stage (24 channels) have stride 1 instead of 2, so a 32x32 image is
downsampled three times and reaches the final 1x1 convolution (1280 channels) at 4x4. Each
inverted residual block expands its input by a factor t (6, or 1 in the first block, which then
has no expansion convolution) with a 1x1 conv, filters it with a 3x3 depthwise conv, and projects
it back with a linear 1x1 conv; the input is added back when the stride is 1 and the channel
counts agree. Convolutions have no bias, are followed by batch norm (PyTorch's defaults, as in
`tfsplit.backbones.blocks`) and, except the projection, by ReLU6; padding is "same".

Widths follow the reference implementations: every channel count is `make_divisible(c * width)`
(a multiple of 8, at least 8, never more than 10% below c * width), and the final convolution keeps
1280 channels for widths below 1. The classifier is a global average pool, dropout 0.2 and a dense
layer. At width 1.0 with 10 classes the model has 2,236,682 trainable weights: torchvision's
ImageNet MobileNetV2 (3,504,872) with a 10-way instead of a 1000-way classifier; strides change
no weight shape. Keras's `count_params` adds the 34,112 batch-norm moving statistics.

Layer names (stable; cut points and checkpoints rely on them):
  `image` (input); stem `stem_conv`, `stem_bn`, `stem_relu`; block i = 1..17 is `block{i}` with
  layers `{block}_expand_conv`, `{block}_expand_bn`, `{block}_expand_relu` (t > 1 only),
  `{block}_depthwise_conv`, `{block}_depthwise_bn`, `{block}_depthwise_relu`,
  `{block}_project_conv`, `{block}_project_bn`, and `{block}_out`: the residual Add, or an identity
  layer in a block without residual. Whether a block has a residual depends on the width (at tiny
  widths channel counts round to the same multiple of 8), so the identity keeps the output's name
  fixed. Then `top_conv`, `top_bn`, `top_relu`, `avg_pool`, `dropout`, `logits`.

Cut points. A residual's skip crosses every layer inside its block, so such cuts are impossible.
Inside a block without residual a cut would be possible but wasteful: the expanded tensors are t
times wider than the block's narrow output, which is the natural place to send. Cuts are therefore
the stem, the block outputs and the final convolution: "block{i}" is `block{i}_out`, "stage{s}"
aliases the last block of stage s (stages are the rows of Table 2), "stem" is `stem_relu` and "top"
is `top_relu`. `CUT_LAYERS` lists every layer `resolve_cut` accepts by name.

MobileNetV2, 32x32 input, width 1.0, by stage. Every block of a stage has the stage's output shape;
all but the first block of a stage add their input back (blocks 3, 5, 6, 8-10, 12, 13, 15, 16).

  | cut    | layer       | blocks | output shape |
  |--------|-------------|--------|--------------|
  | stem   | stem_relu   |        | 32x32x32     |
  | stage1 | block1_out  | 1      | 32x32x16     |
  | stage2 | block3_out  | 2-3    | 32x32x24     |
  | stage3 | block6_out  | 4-6    | 16x16x32     |
  | stage4 | block10_out | 7-10   | 8x8x64       |
  | stage5 | block13_out | 11-13  | 8x8x96       |
  | stage6 | block16_out | 14-16  | 4x4x160      |
  | stage7 | block17_out | 17     | 4x4x320      |
  | top    | top_relu    |        | 4x4x1280     |
"""

import math
import numbers

import tf_keras as keras

from tfsplit.backbones.blocks import batch_norm, conv_bn_relu, pooled_logits, residual_cuts
from tfsplit.backbones.checks import check_backbone_arguments, check_positive_int

# (expansion t, channels c, blocks n, stride s of the first block): the paper's Table 2 with the
# second row's stride 2 -> 1 for 32x32 input.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
STEM_STRIDE = 1  # 2 on ImageNet.
TOP_CHANNELS = 1280
CHANNEL_DIVISOR = 8
CLASSIFIERS = ("cifar",)
_FAMILY = "MobileNetV2 is the CIFAR variant"  # How errors about the classifier start.
DROPOUT_RATE = 0.2
RELU6 = 6.0


def make_divisible(value, divisor=CHANNEL_DIVISOR):
    """Rounds a scaled channel count to the nearest multiple of `divisor`, as the paper's code does.

    Multiples of 8 keep the channels aligned with the vector units of mobile accelerators.

    Args:
      value: the scaled channel count, e.g. 32 * 0.35.
      divisor: the multiple to round to; also the minimum.

    Returns:
      An int multiple of `divisor`, at least `divisor` and at least 90% of `value`.

    Raises:
      ValueError: when `value` is not a finite positive number or `divisor` not a positive int.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"`value` must be a finite number > 0. Received: {value=!r}")
    check_positive_int("divisor", divisor)
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _blocks():
    """Yields (stage, block name, expansion, channels, stride) for blocks 1..17 in order."""
    index = 0
    for stage, (expansion, channels, repeats, first_stride) in enumerate(STAGES, start=1):
        for repeat in range(repeats):
            index += 1
            yield stage, f"block{index}", expansion, channels, first_stride if repeat == 0 else 1


CUT_POINTS, CUT_LAYERS = residual_cuts(
    [(stage, block) for stage, block, _, _, _ in _blocks()], top=True
)


def _inverted_residual(x, expansion, filters, strides, name):
    """Expand (1x1), filter (3x3 depthwise), project (linear 1x1); add the input if shapes agree."""
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = conv_bn_relu(y, in_channels * expansion, 1, f"{name}_expand", max_value=RELU6)
    y = keras.layers.DepthwiseConv2D(
        3, strides=strides, padding="same", use_bias=False, name=f"{name}_depthwise_conv"
    )(y)
    y = batch_norm(y, f"{name}_depthwise_bn")
    y = keras.layers.ReLU(RELU6, name=f"{name}_depthwise_relu")(y)
    y = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project_conv")(y)
    y = batch_norm(y, f"{name}_project_bn")
    if strides == 1 and in_channels == filters:
        return keras.layers.Add(name=f"{name}_out")([x, y])
    return keras.layers.Identity(name=f"{name}_out")(y)


def build_mobilenetv2(
    num_classes=10, input_shape=(32, 32, 3), width_multiplier=1.0, classifier="cifar"
):
    """Builds the 32x32 MobileNetV2 as a functional Keras model, `image` -> `logits`.

    Arguments and errors as `tfsplit.backbones.build_backbone`. `width_multiplier` scales every
    channel count (rounded by `make_divisible`) except the final convolution's 1280, which only
    grows; tests use 0.25 for speed. `classifier` takes only "cifar" (global average pool,
    dropout, dense): the research code's ImageNet-style head belongs to VGG.

    Returns:
      An uncompiled `keras.Model` named "mobilenetv2".
    """
    check_backbone_arguments(
        num_classes, input_shape, width_multiplier, classifier, CLASSIFIERS, _FAMILY
    )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    stem_channels = make_divisible(STEM_CHANNELS * width_multiplier)
    x = conv_bn_relu(inputs, stem_channels, 3, "stem", STEM_STRIDE, max_value=RELU6)
    for _, block, expansion, channels, strides in _blocks():
        filters = make_divisible(channels * width_multiplier)
        x = _inverted_residual(x, expansion, filters, strides, block)
    top_channels = make_divisible(TOP_CHANNELS * max(1.0, width_multiplier))
    x = conv_bn_relu(x, top_channels, 1, "top", max_value=RELU6)
    logits = pooled_logits(x, num_classes, DROPOUT_RATE)
    return keras.Model(inputs, logits, name="mobilenetv2")
