"""Differentiable layers whose forward and backward passes are TFLite builtin ops only.

A head trained on the device runs as a LiteRT model without the Flex delegate, so its gradient
graph may hold nothing but builtins. TensorFlow's own gradients of a convolution
(`Conv2DBackpropFilter`), a depthwise convolution, max pooling (`MaxPoolGrad`), fused batch norm
(`FusedBatchNormGradV3`) and ReLU (`ReluGrad`) have no builtin. Each function here keeps the
builtin forward op and writes its gradient from builtins, gathering the kernel's taps as strided
slices of the padded input (one slice per tap, built when the graph is traced), so that a weight
gradient is one matmul or one reduction over whole tensors. A convolution is itself a matmul of
its patch rows (every window's values, gathered by a depthwise convolution with constant one-hot
kernels) with the kernel: LiteRT's XNNPACK runs such a matmul with weights that change, but not a
CONV_2D (measured: a training step 2.0x faster at batch 32).
Its weight gradient gathers the patch rows again, in the taps' reverse order so that the
converter does not merge them with the forward's: kept from the forward pass, every layer's rows
stayed alive until its backward, and the interpreter's tensors for the step peaked 46 MiB higher
at batch 64 (for about 5% of the step's time at batch 32). Its input gradient is the same kind
of matmul on the output gradient with the flipped kernel (stride 1), or a transposed convolution.
A max pool whose windows tile its input (2x2, stride 2) routes its gradient on whole tensors
(SPACE_TO_DEPTH, a cumulative sum, DEPTH_TO_SPACE) instead of a slice, a mask and a placement
per tap, which took a large share of a training step (docs/results.md); other pools keep them.

Tests compare every gradient with TensorFlow's own, and convert each op to a builtins-only
LiteRT model.
"""

import numpy as np
import tensorflow as tf


def same_padding(size, kernel, stride):
    """TensorFlow's SAME padding of one spatial axis: (before, after, output size)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def _paddings(x, kernel, strides, padding):
    """((top, bottom), (left, right)) and the output's (height, width) for a window op on x."""
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"`padding` must be 'SAME' or 'VALID'. Received: {padding!r}")
    pads, outs = [], []
    for size, k, s in zip(x.shape[1:3], kernel, strides):
        if size is None:
            raise ValueError("A trainable head needs static image sizes; got an unknown one.")
        if padding == "SAME":
            before, after, out = same_padding(size, k, s)
        else:
            before, after, out = 0, 0, (size - k) // s + 1
        pads.append((before, after))
        outs.append(out)
    return pads, outs


def _taps(padded, kernel, strides, outs):
    """The (kh * kw) strided slices of `padded` that meet each kernel tap, row-major."""
    slices = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            slices.append(
                padded[
                    :,
                    i : i + (outs[0] - 1) * strides[0] + 1 : strides[0],
                    j : j + (outs[1] - 1) * strides[1] + 1 : strides[1],
                    :,
                ]
            )
    return slices


def _patch_rows(padded, kernel, strides, outs, flipped=False):
    """The (N * ho * wo, C * kh * kw) matrix of every window of `padded`, channels then taps
    row-major (`flipped`: the taps in reverse order): one matmul with `_kernel_rows(kernel)` is
    the convolution. A depthwise convolution with constant one-hot kernels gathers the taps,
    which XNNPACK runs; slices and a concatenation ran in LiteRT's own kernels (8.5 to 9.5%
    slower per step at batch 32)."""
    channels, taps = padded.shape[-1], kernel[0] * kernel[1]
    one_hot = np.zeros((kernel[0], kernel[1], channels, taps), np.float32)
    for tap in range(taps):
        one_hot[tap // kernel[1], tap % kernel[1], :, tap] = 1.0
    if flipped:
        one_hot = np.ascontiguousarray(one_hot[::-1, ::-1])
    windows = tf.nn.depthwise_conv2d(
        padded, tf.constant(one_hot), (1,) + tuple(strides) + (1,), "VALID"
    )
    return tf.reshape(windows, [-1, channels * taps])


def _kernel_rows(kernel):
    """A (kh, kw, C, C_out) kernel as the (C * kh * kw, C_out) matrix of `_patch_rows`' order."""
    return tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]), [-1, kernel.shape[-1]])


def _rows_to_map(rows, x, outs):
    """(N * ho * wo, C) rows back to the (N, ho, wo, C) map of batch `x`."""
    return tf.reshape(rows, tf.concat([tf.shape(x)[:1], list(outs), rows.shape[-1:]], 0))


def _pad(x, pads, value=0.0):
    return tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]], constant_values=value)


def _spread(per_tap, kernel, strides, pads, shape):
    """The adjoint of `_taps`: each tap's (N, ho, wo, C) tensor put back where its slice came
    from in the padded input, summed, and the padding cropped: (N, H, W, C)."""
    height, width = shape[1] + sum(pads[0]), shape[2] + sum(pads[1])
    total = None
    for index, values in enumerate(per_tap):
        i, j = divmod(index, kernel[1])
        dilated = _dilate(values, strides)
        rows, cols = dilated.shape[1], dilated.shape[2]
        placed = tf.pad(dilated, [[0, 0], [i, height - i - rows], [j, width - j - cols], [0, 0]])
        total = placed if total is None else total + placed
    return total[:, pads[0][0] : pads[0][0] + shape[1], pads[1][0] : pads[1][0] + shape[2], :]


def _dilate(x, strides):
    """(N, h, w, C) -> (N, (h - 1) * sh + 1, (w - 1) * sw + 1, C): zeros between the values."""
    for axis, stride in ((1, strides[0]), (2, strides[1])):
        if stride == 1:
            continue
        size = x.shape[axis]
        spaced = tf.stack([x] + [tf.zeros_like(x)] * (stride - 1), axis=axis + 1)
        shape = tf.concat([tf.shape(x)[:axis], [size * stride], tf.shape(x)[axis + 1 :]], 0)
        x = tf.reshape(spaced, shape)
        keep = (size - 1) * stride + 1
        x = x[:, :keep] if axis == 1 else x[:, :, :keep]
    return x


def conv2d(x, kernel, strides=(1, 1), padding="SAME"):
    """`tf.nn.conv2d` (NHWC, no dilation) with a builtins-only gradient."""
    strides, size = tuple(strides), tuple(kernel.shape[:2])

    @tf.custom_gradient
    def forward(x, kernel):
        pads, outs = _paddings(x, size, strides, padding)
        rows = _patch_rows(_pad(x, pads), size, strides, outs)
        y = _rows_to_map(tf.matmul(rows, _kernel_rows(kernel)), x, outs)

        def backward(dy):
            flipped_rows = _patch_rows(_pad(x, pads), size, strides, outs, flipped=True)
            flat_dy = tf.reshape(dy, [-1, dy.shape[-1]])
            by_channel = tf.matmul(flipped_rows, flat_dy, transpose_a=True)  # (C * kh * kw, C_out)
            shape = [kernel.shape[2], size[0], size[1], kernel.shape[-1]]
            by_tap = tf.reverse(tf.reshape(by_channel, shape), [1, 2])  # the taps back in order
            dkernel = tf.transpose(by_tap, [1, 2, 0, 3])
            if strides != (1, 1):
                dx = tf.nn.conv2d_transpose(dy, kernel, tf.shape(x), (1,) + strides + (1,), padding)
                return dx, dkernel
            # Stride 1: the input's gradient is the correlation of dy with the flipped kernel.
            full = [(k - 1 - before, k - 1 - after) for k, (before, after) in zip(size, pads)]
            flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
            drows = _patch_rows(_pad(dy, full), size, (1, 1), x.shape[1:3])
            dx = tf.matmul(drows, _kernel_rows(flipped))
            return _rows_to_map(dx, x, x.shape[1:3]), dkernel

        return y, backward

    return forward(x, kernel)


def depthwise_conv2d(x, kernel, strides=(1, 1), padding="SAME"):
    """`tf.nn.depthwise_conv2d` (depth multiplier 1) with a builtins-only gradient."""
    if kernel.shape[3] != 1:
        raise ValueError(
            f"Only a depth multiplier of 1 is supported. Received: kernel shape {kernel.shape}"
        )
    strides, size = tuple(strides), tuple(kernel.shape[:2])

    @tf.custom_gradient
    def forward(x, kernel):
        y = tf.nn.depthwise_conv2d(x, kernel, (1,) + strides + (1,), padding)

        def backward(dy):
            pads, outs = _paddings(x, size, strides, padding)
            taps = tf.stack(_taps(_pad(x, pads), size, strides, outs), axis=3)
            dkernel = tf.reshape(
                tf.reduce_sum(taps * dy[:, :, :, None, :], [0, 1, 2]), kernel.shape
            )
            weights = tf.reshape(kernel, [-1, kernel.shape[2]])  # (kh * kw, C)
            per_tap = [dy * weights[t] for t in range(size[0] * size[1])]
            return _spread(per_tap, size, strides, pads, x.shape), dkernel

        return y, backward

    return forward(x, kernel)


def max_pool2d(x, pool_size, strides, padding="VALID"):
    """`tf.nn.max_pool2d` whose gradient goes to the first maximum of each window, as TF's."""
    pool_size, strides = tuple(pool_size), tuple(strides)

    @tf.custom_gradient
    def forward(x):
        y = tf.nn.max_pool2d(x, pool_size, strides, padding)

        def backward(dy):
            pads, outs = _paddings(x, pool_size, strides, padding)
            if _tiles(x, pool_size, strides, pads):
                return _max_pool_tile_gradient(x, y, dy, pool_size[0])
            taps = _taps(_pad(x, pads, float("-inf")), pool_size, strides, outs)
            taken = tf.zeros_like(dy)
            per_tap = []
            for tap in taps:
                first = tf.cast(tf.equal(tap, y), dy.dtype) * (1.0 - taken)
                taken += first
                per_tap.append(dy * first)
            return _spread(per_tap, pool_size, strides, pads, x.shape)

        return y, backward

    return forward(x)


def _tiles(x, pool_size, strides, pads):
    """Whether the windows are square, unpadded and tile the input exactly (2x2, stride 2)."""
    size = pool_size[0]
    return (
        pool_size == strides == (size, size)
        and pads == [(0, 0), (0, 0)]
        and x.shape[1] % size == 0
        and x.shape[2] % size == 0
    )


def _max_pool_tile_gradient(x, y, dy, size):
    """The gradient of a max pool whose windows tile the input, on whole tensors: each window's
    values as one row of `size * size` (SPACE_TO_DEPTH), the first that equals the maximum takes
    the window's gradient (an exclusive cumulative sum finds the first), DEPTH_TO_SPACE puts it
    back. The same routing as the taps' loop."""
    channels = x.shape[3]
    blocks = tf.nn.space_to_depth(x, size)
    rows = tf.reshape(blocks, [-1, size * size, channels])
    hits = tf.cast(tf.equal(rows, tf.reshape(y, [-1, 1, channels])), dy.dtype)
    first = hits * tf.cast(tf.equal(tf.cumsum(hits, axis=1, exclusive=True), 0.0), dy.dtype)
    spread = first * tf.reshape(dy, [-1, 1, channels])
    return tf.nn.depth_to_space(tf.reshape(spread, tf.shape(blocks)), size)


def relu(x, max_value=None):
    """ReLU (or ReLU6 with `max_value=6`): a maximum (and a minimum) forward, and a mask of where
    the input was inside the range backward (ReLU's own gradient is `ReluGrad`)."""

    @tf.custom_gradient
    def forward(x):
        zero = tf.zeros_like(x)
        y = tf.maximum(x, zero)
        inside = tf.greater(x, zero)
        if max_value is not None:
            cap = tf.fill(tf.shape(x), float(max_value))
            y = tf.minimum(y, cap)
            inside = tf.logical_and(inside, tf.less(x, cap))

        def backward(dy):
            return dy * tf.cast(inside, dy.dtype)

        return y, backward

    return forward(x)


def batch_norm_train(x, gamma, beta, epsilon):
    """Batch norm over (N, H, W) with the batch's statistics: (y, mean, unbiased variance).

    The variance that normalizes is the biased one, as TensorFlow's fused kernel; the unbiased
    one is what Keras folds into the moving variance.
    """

    @tf.custom_gradient
    def forward(x, gamma, beta):
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), x.dtype)
        mean = tf.reduce_mean(x, [0, 1, 2])
        centered = x - mean
        variance = tf.reduce_mean(centered * centered, [0, 1, 2])
        inverse = 1.0 / tf.sqrt(variance + epsilon)
        normalized = centered * inverse
        y = normalized * gamma + beta
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)

        def backward(dy, _dmean, _dvariance):
            dgamma = tf.reduce_sum(dy * normalized, [0, 1, 2])
            dbeta = tf.reduce_sum(dy, [0, 1, 2])
            dx = (gamma * inverse / count) * (count * dy - dbeta - normalized * dgamma)
            return dx, dgamma, dbeta

        return (y, mean, unbiased), backward

    return forward(x, gamma, beta)


def batch_norm_infer(x, gamma, beta, moving_mean, moving_variance, epsilon):
    """Batch norm with the moving statistics (inference)."""
    scale = gamma / tf.sqrt(moving_variance + epsilon)
    return x * scale + (beta - moving_mean * scale)


# Broadcasting ops: with a batch size unknown when the graph is traced, TensorFlow's gradients of
# `+` and `*` compute their reduction axes with `BroadcastGradientArgs`, which has no builtin.
# These know the axes: a per-channel vector broadcasts over every axis but the last.


def scale_channels(x, scale):
    """x * scale for a (C,) `scale` over (..., C) `x`."""

    @tf.custom_gradient
    def forward(x, scale):
        def backward(dy):
            axes = list(range(len(x.shape) - 1))
            return dy * scale, tf.reduce_sum(dy * x, axes)

        return x * scale, backward

    return forward(x, scale)


def bias_add(x, bias):
    """x + bias for a (C,) `bias` over (..., C) `x`."""

    @tf.custom_gradient
    def forward(x, bias):
        def backward(dy):
            return dy, tf.reduce_sum(dy, list(range(len(x.shape) - 1)))

        return x + bias, backward

    return forward(x, bias)


def add_n(tensors):
    """The sum of same-shaped tensors (a residual connection)."""

    @tf.custom_gradient
    def forward(*tensors):
        def backward(dy):
            return [dy] * len(tensors)

        return tf.add_n(list(tensors)), backward

    return forward(*tensors)


def sparse_cross_entropy(logits, labels):
    """Mean cross-entropy of integer `labels` from (N, classes) `logits`; its gradient is
    (softmax - one-hot) / N (TensorFlow's fused op for it has no builtin)."""

    @tf.custom_gradient
    def forward(logits):
        one_hot = tf.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        count = tf.cast(tf.shape(logits)[0], logits.dtype)
        picked = tf.reduce_sum(one_hot * logits, axis=-1)
        loss = tf.reduce_sum(tf.reduce_logsumexp(logits, axis=-1) - picked) / count

        def backward(dloss):
            return (tf.nn.softmax(logits) - one_hot) * (dloss / count)

        return loss, backward

    return forward(logits)
