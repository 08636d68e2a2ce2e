"""ResNet-18, CIFAR variant, as a functional Keras model with stable layer names and block cuts.

The ResNet-18 of He et al. (2016) as the widely used PyTorch CIFAR code (kuangliu/pytorch-cifar)
adapts it: ImageNet's 7x7 stride-2 stem and max pool become one 3x3 convolution with stride 1, so
a 32x32 image keeps its resolution through stage 1 and ends at 4x4. Four stages of two BasicBlocks
have 64/128/256/512 channels; the first block of stages 2-4 has stride 2. A block is conv 3x3 - BN -
ReLU - conv 3x3 - BN, added to its shortcut, then ReLU; the shortcut is the identity, or a 1x1 conv
+ BN projection where the shape changes. Convolutions have no bias (batch norm follows each) and
use "same" padding; batch norm uses PyTorch's defaults (momentum 0.9 in Keras terms, epsilon 1e-5)
as in `tfsplit.backbones.blocks`. Channels are `max(1, round(c * width_multiplier))`, VGG's rule. At
width 1.0 with 10 classes the model has 11,173,962 trainable weights, the PyTorch code's count
(Keras's `count_params` adds the 9,600 batch-norm moving statistics).

Layer names (stable; cut points and checkpoints rely on them):
  `image` (input); stem `stem_conv`, `stem_bn`, `stem_relu`; block b of stage s is `block{s}_{b}`
  with layers `{block}_conv1`, `{block}_bn1`, `{block}_relu1`, `{block}_conv2`, `{block}_bn2`,
  `{block}_shortcut_conv`, `{block}_shortcut_bn` (projection blocks only), `{block}_add`,
  `{block}_out` (the ReLU after the add); classifier `avg_pool` (global average pool), `logits`.

Cut points. A cut must be a tensor that carries everything the rest of the network needs, so a
cut inside a block, which its shortcut crosses, is impossible (`split_model` rejects it). Cuts are
therefore the stem's output and block outputs: `CUT_POINTS["block{s}_{b}"]` is `block{s}_{b}_out`,
"stage{s}" aliases the last block of stage s, and "stem" is `stem_relu`. `CUT_LAYERS` lists every
layer `resolve_cut` accepts by name (the stem layers and the block outputs).

ResNet-18, 32x32 input, width 1.0:

  | cut               | layer         | output shape |
  |-------------------|---------------|--------------|
  | stem              | stem_relu     | 32x32x64     |
  | block1_1          | block1_1_out  | 32x32x64     |
  | block1_2 / stage1 | block1_2_out  | 32x32x64     |
  | block2_1          | block2_1_out  | 16x16x128    |
  | block2_2 / stage2 | block2_2_out  | 16x16x128    |
  | block3_1          | block3_1_out  | 8x8x256      |
  | block3_2 / stage3 | block3_2_out  | 8x8x256      |
  | block4_1          | block4_1_out  | 4x4x512      |
  | block4_2 / stage4 | block4_2_out  | 4x4x512      |
"""

import tf_keras as keras

from tfsplit.backbones.blocks import conv_bn, conv_bn_relu, pooled_logits, residual_cuts, scaled
from tfsplit.backbones.checks import check_backbone_arguments

STEM_CHANNELS = 64
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the stage's first block)
BLOCKS_PER_STAGE = 2
CLASSIFIERS = ("cifar",)
_FAMILY = "ResNet-18 is the CIFAR variant"  # How errors about the classifier start.


def _blocks():
    """Yields (stage, block name, channels, stride) for each BasicBlock in order."""
    for stage, (channels, first_stride) in enumerate(STAGES, start=1):
        for index in range(1, BLOCKS_PER_STAGE + 1):
            yield stage, f"block{stage}_{index}", channels, first_stride if index == 1 else 1


CUT_POINTS, CUT_LAYERS = residual_cuts([(stage, block) for stage, block, _, _ in _blocks()])


def _basic_block(x, filters, strides, name):
    """Two 3x3 convs added to the (projected where the shape changes) input, then ReLU."""
    y = conv_bn(x, filters, 3, (f"{name}_conv1", f"{name}_bn1"), strides)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = conv_bn(y, filters, 3, (f"{name}_conv2", f"{name}_bn2"))
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_bn(x, filters, 1, (f"{name}_shortcut_conv", f"{name}_shortcut_bn"), strides)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def build_resnet18(
    num_classes=10, input_shape=(32, 32, 3), width_multiplier=1.0, classifier="cifar"
):
    """Builds the CIFAR ResNet-18 as a functional Keras model, `image` -> `logits`.

    Arguments and errors as `tfsplit.backbones.build_backbone`. `classifier` takes only "cifar"
    (global average pool, dense): the research code's ImageNet-style head belongs to VGG. Tests
    use width 0.125 for speed.

    Returns:
      An uncompiled `keras.Model` named "resnet18".
    """
    check_backbone_arguments(
        num_classes, input_shape, width_multiplier, classifier, CLASSIFIERS, _FAMILY
    )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = conv_bn_relu(inputs, scaled(STEM_CHANNELS, width_multiplier), 3, "stem")
    for _, block, channels, strides in _blocks():
        x = _basic_block(x, scaled(channels, width_multiplier), strides, block)
    return keras.Model(inputs, pooled_logits(x, num_classes), name="resnet18")
