"""tfsplit.export.builtin_grads: each op's gradient equals TensorFlow's own, and each converts to
a LiteRT model of builtin ops only that computes the same gradient without TensorFlow."""

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import interpreter as litert

from tfsplit.export import builtin_grads

RNG = np.random.default_rng(0)


def _images(shape):
    return tf.constant(RNG.normal(size=shape).astype(np.float32))


def _gradients(function, inputs):
    """(output, gradient of sum(output * weights) w.r.t. each input) with fixed output weights."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        output = function(*inputs)
        weights = tf.constant(RNG.normal(size=output.shape).astype(np.float32))
        loss = tf.reduce_sum(output * weights)
    return output, tape.gradient(loss, inputs)


def _assert_same_gradients(ours, reference, inputs):
    state = RNG.bit_generator.state
    got, got_grads = _gradients(ours, inputs)
    RNG.bit_generator.state = state
    want, want_grads = _gradients(reference, inputs)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("size", [(9, 9), (8, 10)])
def test_conv2d_gradients_are_tensorflows(strides, padding, size):
    x, kernel = _images((2, *size, 3)), _images((3, 3, 3, 5))
    _assert_same_gradients(
        lambda x, k: builtin_grads.conv2d(x, k, strides, padding),
        lambda x, k: tf.nn.conv2d(x, k, (1, *strides, 1), padding),
        [x, kernel],
    )


def test_conv2d_gradients_of_a_one_by_one_kernel():
    x, kernel = _images((2, 8, 8, 4)), _images((1, 1, 4, 6))
    _assert_same_gradients(
        lambda x, k: builtin_grads.conv2d(x, k, (2, 2), "SAME"),
        lambda x, k: tf.nn.conv2d(x, k, (1, 2, 2, 1), "SAME"),
        [x, kernel],
    )


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_depthwise_conv2d_gradients_are_tensorflows(strides, padding):
    x, kernel = _images((2, 9, 8, 4)), _images((3, 3, 4, 1))
    _assert_same_gradients(
        lambda x, k: builtin_grads.depthwise_conv2d(x, k, strides, padding),
        lambda x, k: tf.nn.depthwise_conv2d(x, k, (1, *strides, 1), padding),
        [x, kernel],
    )


@pytest.mark.parametrize(
    "pool, strides, padding", [((2, 2), (2, 2), "VALID"), ((3, 3), (2, 2), "SAME")]
)
def test_max_pool_gradients_are_tensorflows(pool, strides, padding):
    x = _images((2, 9, 8, 3))
    _assert_same_gradients(
        lambda x: builtin_grads.max_pool2d(x, pool, strides, padding),
        lambda x: tf.nn.max_pool2d(x, pool, strides, padding),
        [x],
    )


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_max_pool_over_tiles_routes_as_tensorflow(padding):
    """2x2 windows at stride 2 over an even input take the whole-tensor route, ties included:
    a plateau sends each window's gradient to its first value, as TensorFlow does."""
    x = _images((2, 8, 6, 3))
    plateau = tf.concat([x[:1], tf.ones_like(x[:1])], 0)
    for images in (x, plateau):
        _assert_same_gradients(
            lambda x: builtin_grads.max_pool2d(x, (2, 2), (2, 2), padding),
            lambda x: tf.nn.max_pool2d(x, (2, 2), (2, 2), padding),
            [images],
        )


def test_max_pool_after_relu_sends_ties_to_one_zero():
    x = builtin_grads.relu(_images((1, 4, 4, 2)))
    _assert_same_gradients(
        lambda x: builtin_grads.max_pool2d(x, (2, 2), (2, 2)),
        lambda x: tf.nn.max_pool2d(x, (2, 2), (2, 2), "VALID"),
        [x],
    )


@pytest.mark.parametrize("max_value", [None, 6.0])
def test_relu_gradients_are_tensorflows(max_value):
    x = _images((2, 4, 4, 3)) * 5.0
    reference = tf.nn.relu if max_value is None else tf.nn.relu6
    _assert_same_gradients(lambda x: builtin_grads.relu(x, max_value), reference, [x])


def test_batch_norm_matches_the_fused_kernel():
    x, gamma, beta = _images((4, 5, 5, 3)), _images((3,)), _images((3,))

    def fused(x, gamma, beta):
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-3)
        return y

    _assert_same_gradients(
        lambda x, g, b: builtin_grads.batch_norm_train(x, g, b, 1e-3)[0], fused, [x, gamma, beta]
    )
    _, mean, variance = builtin_grads.batch_norm_train(x, gamma, beta, 1e-3)
    _, fused_mean, fused_variance = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-3)
    np.testing.assert_allclose(mean, fused_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, fused_variance, rtol=1e-5, atol=1e-6)


class _Step(tf.Module):
    """Every op in a chain, its gradient w.r.t. the input and the weights as one signature."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(RNG.normal(size=(3, 3, 3, 4)).astype(np.float32))
        self.depthwise = tf.Variable(RNG.normal(size=(3, 3, 4, 1)).astype(np.float32))
        self.gamma = tf.Variable(np.ones(4, np.float32))
        self.beta = tf.Variable(np.zeros(4, np.float32))

    def forward(self, x):
        y = builtin_grads.conv2d(x, self.kernel, (2, 2), "SAME")
        y, _, _ = builtin_grads.batch_norm_train(y, self.gamma, self.beta, 1e-3)
        y = builtin_grads.relu(y)
        y = builtin_grads.depthwise_conv2d(y, self.depthwise, (1, 1), "SAME")
        y = builtin_grads.relu(y, 6.0)
        y = builtin_grads.max_pool2d(y, (2, 2), (2, 2))  # windows that tile the input
        return builtin_grads.max_pool2d(y, (3, 3), (2, 2), "SAME")  # windows that overlap

    @tf.function(input_signature=[tf.TensorSpec([2, 8, 8, 3]), tf.TensorSpec([2, 1, 1, 4])])
    def gradients(self, x, upstream):
        variables = [self.kernel, self.depthwise, self.gamma, self.beta]
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self.forward(x)
        grads = tape.gradient(y, [x] + variables, output_gradients=upstream)
        return {f"g{i}": g for i, g in enumerate(grads)}


def test_the_ops_convert_to_builtins_only_and_run_in_litert():
    step = _Step()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [step.gradients.get_concrete_function()], step
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    model = converter.convert()  # fails on any op that needs Flex
    x, upstream = _images((2, 8, 8, 3)), _images((2, 1, 1, 4))
    interpreter = litert.Interpreter(model_content=model)
    runner = interpreter.get_signature_runner()
    got = runner(x=x.numpy(), upstream=upstream.numpy())
    want = step.gradients(x, upstream)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-4, atol=1e-4)
