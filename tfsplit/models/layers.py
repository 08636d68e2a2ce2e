"""Layers the backbones need that Keras 2 does not ship.

`AdaptiveAveragePooling2D` reproduces PyTorch's `nn.AdaptiveAvgPool2d`, which the research code's
ImageNet-style VGG classifier puts in front of its 25088-wide dense layer. On a 32x32 image VGG's
features are 1x1, and PyTorch replicates that pixel into a 7x7 grid; without the same semantics the
paper's network cannot be run as it was.
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras


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
        pooled_rows = tf.einsum("ih,nhwc->niwc", rows, inputs)
        return tf.einsum("jw,niwc->nijc", cols, pooled_rows)

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        return tf.TensorShape([input_shape[0], *self.output_size, input_shape[3]])

    def get_config(self):
        config = super().get_config()
        config.update(output_size=self.output_size)
        return config
