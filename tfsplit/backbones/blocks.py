"""Layers and layer stacks the backbones share, including one that Keras 2 does not ship.

The stacks (`conv_bn`, `conv_bn_relu`, `pooled_logits`) hold the conventions every backbone
follows in one place: "same" padding, batch norm with PyTorch's defaults (the research code's
networks behave as they did there), and the layer names that cut points and checkpoints rely on.

`AdaptiveAveragePooling2D` reproduces PyTorch's `nn.AdaptiveAvgPool2d`, which the research code's
ImageNet-style VGG classifier puts in front of its 25088-wide dense layer. On a 32x32 image VGG's
features are 1x1, and PyTorch replicates that pixel into a 7x7 grid; without the same semantics the
paper's network cannot be run as it was.
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1 written the Keras way.
BN_EPSILON = 1e-5


def scaled(channels, width_multiplier):
    """`channels` times the width multiplier, rounded and at least 1 (VGG's and ResNet's rule)."""
    return max(1, round(channels * width_multiplier))


def batch_norm(x, name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)


def conv_bn(x, filters, kernel_size, names, strides=1, use_bias=False):
    """A "same" convolution then batch norm, named `names` = (conv name, batch norm name).

    Convolutions have no bias by default, since the batch norm after them has its own offset.
    """
    x = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=use_bias, name=names[0]
    )(x)
    return batch_norm(x, names[1])


def conv_bn_relu(x, filters, kernel_size, name, strides=1, max_value=None):
    """`conv_bn` then ReLU (ReLU6 with `max_value=6`), named `{name}_conv`, `_bn` and `_relu`."""
    x = conv_bn(x, filters, kernel_size, (f"{name}_conv", f"{name}_bn"), strides)
    return keras.layers.ReLU(max_value, name=f"{name}_relu")(x)


def pooled_logits(x, num_classes, dropout_rate=None):
    """The CIFAR classifier: global average pool `avg_pool`, `dropout` (given a rate), `logits`."""
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout_rate is not None:
        x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    return keras.layers.Dense(num_classes, name="logits")(x)


def residual_cuts(blocks, top=False):
    """(cut points, cut layers) of a stem, residual blocks and an optional top convolution.

    A skip connection crosses every layer inside its block, so a cut can only follow the stem, a
    block (`{block}_out`) or the top convolution: "stem", each block's name, "stage{s}" for the
    last block of stage s, and "top" name them; the stem's and top's layers may be named too.

    Args:
      blocks: (stage, block name) of every block, in order.
      top: whether `top_conv`, `top_bn`, `top_relu` end the features (MobileNetV2).

    Returns:
      (dict from cut name to layer name, tuple of the layer names a cut may sit behind).
    """
    cuts = {"stem": "stem_relu"}
    cuts.update((block, f"{block}_out") for _, block in blocks)
    cuts.update((f"stage{stage}", f"{block}_out") for stage, block in blocks)  # The last one wins.
    layers = ("stem_conv", "stem_bn", "stem_relu", *(f"{block}_out" for _, block in blocks))
    if top:
        cuts["top"] = "top_relu"
        layers += ("top_conv", "top_bn", "top_relu")
    return cuts, layers


def _bin_matrix(in_size, out_size):
    """Averaging matrix (out_size, in_size) whose row i averages PyTorch's adaptive bin i.

    Bin i spans [floor(i * in / out), ceil((i + 1) * in / out)); bins overlap when `in_size` is not
    a multiple of `out_size`, and repeat a pixel when `in_size < out_size`.
    """
    bins = np.arange(out_size)
    starts = (bins * in_size) // out_size
    ends = -((-(bins + 1) * in_size) // out_size)
    pixels = np.arange(in_size)
    member = (pixels[None, :] >= starts[:, None]) & (pixels[None, :] < ends[:, None])
    return member / (ends - starts)[:, None]


def _normalize_output_size(output_size):
    is_pair = isinstance(output_size, (tuple, list))
    sizes = tuple(output_size) if is_pair else (output_size, output_size)
    valid = len(sizes) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in sizes
    )
    if not valid:
        raise ValueError(
            "`output_size` must be a positive integer or a pair of positive integers. "
            f"Received: output_size={output_size!r}"
        )
    return tuple(int(s) for s in sizes)


@keras.utils.register_keras_serializable(package="tfsplit")
class AdaptiveAveragePooling2D(keras.layers.Layer):
    """Average pooling to a fixed output grid with PyTorch's `AdaptiveAvgPool2d` bins.

    Each output bin (i, j) averages the input rows [floor(i*H/h), ceil((i+1)*H/h)) and columns
    [floor(j*W/w), ceil((j+1)*W/w)). The pooling is two matrix products built once from the static
    H and W, so it runs as whole-tensor ops for any batch size.

    Args:
      output_size: int or (h, w), the output grid.

    Call arguments:
      inputs: float tensor (batch, H, W, C), channels last, with static H and W.

    Input shape: (batch, H, W, C). Output shape: (batch, h, w, C).
    """

    def __init__(self, output_size, **kwargs):
        super().__init__(**kwargs)
        self.output_size = _normalize_output_size(output_size)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        height, width = tf.TensorShape(input_shape)[1:3]
        if height is None or width is None:
            raise ValueError(
                "AdaptiveAveragePooling2D needs static height and width. "
                f"Received: input_shape={input_shape}"
            )
        self._rows = _bin_matrix(height, self.output_size[0])
        self._cols = _bin_matrix(width, self.output_size[1])
        super().build(input_shape)

    def call(self, inputs):
        rows = tf.constant(self._rows, dtype=inputs.dtype)
        cols = tf.constant(self._cols, dtype=inputs.dtype)
        return tf.einsum("jw,niwc->nijc", cols, tf.einsum("ih,nhwc->niwc", rows, inputs))

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        return tf.TensorShape([input_shape[0], *self.output_size, input_shape[3]])

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size}
