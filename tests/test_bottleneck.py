"""Tests for tfsplit.layers.bottleneck: MaskedEncoder and Decoder as Keras layers, and their math."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfsplit.engine import budget
from tfsplit.layers.bottleneck import Decoder, MaskedEncoder

BN_SCALE = 1 / math.sqrt(1 + 1e-3)  # Fresh batch norm in inference: (x - 0) / sqrt(1 + eps).


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def check_layer(make_layer, input_shape, tmp_path):
    """What Keras's own layer tests check, for a custom layer made by `make_layer()`.

    Output shape equals compute_output_shape; get_config/from_config gives a layer with identical
    outputs once the weights are copied; weights set and read back; a model holding the layer saves
    to .keras and reloads with identical outputs; eager and tf.function agree; train_on_batch runs.
    """
    rng = np.random.RandomState(0)
    inputs = rng.rand(2, *input_shape).astype("float32")
    layer = make_layer()
    outputs = layer(inputs, training=False)
    assert tuple(outputs.shape) == tuple(layer.compute_output_shape((2, *input_shape)))

    clone = type(layer).from_config(layer.get_config())
    clone.build((None, *input_shape))
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    np.testing.assert_array_equal(clone(inputs, training=False).numpy(), outputs.numpy())

    fresh = [rng.rand(*w.shape).astype("float32") + 0.5 for w in layer.get_weights()]
    layer.set_weights(fresh)
    for got, want in zip(layer.get_weights(), fresh):
        np.testing.assert_array_equal(got, want)

    model = keras.Sequential([keras.Input(input_shape), layer])
    expected = model(inputs, training=False).numpy()
    graph = tf.function(lambda x: model(x, training=False))(tf.constant(inputs)).numpy()
    np.testing.assert_allclose(graph, expected, rtol=1e-6, atol=1e-6)
    path = str(tmp_path / "layer.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded.layers[0]) is type(layer)
    np.testing.assert_array_equal(reloaded(inputs, training=False).numpy(), expected)

    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    loss = model.train_on_batch(inputs, np.zeros_like(expected))
    assert np.isfinite(loss)


@pytest.mark.parametrize(
    "make_layer, input_shape",
    [
        (lambda: MaskedEncoder(4), (6, 6, 3)),
        (
            lambda: MaskedEncoder(2, resolution_factor=2, kernel_size=1, gate_init_max=1.0),
            (4, 6, 5),
        ),
        (lambda: Decoder(3), (4, 4, 2)),
        (lambda: Decoder(5, resolution_factor=2, kernel_size=2), (3, 2, 4)),
    ],
    ids=["encoder", "encoder_stride2", "decoder", "decoder_stride2"],
)
def test_layer_contract(make_layer, input_shape, tmp_path):
    check_layer(make_layer, input_shape, tmp_path)


def test_encoder_output_shape_divides_resolution_by_stride():
    encoder = MaskedEncoder(7, resolution_factor=3)
    assert tuple(encoder(tf.zeros((1, 9, 10, 2))).shape) == (1, 3, 4, 7)
    assert tuple(Decoder(2, resolution_factor=3)(tf.zeros((1, 3, 4, 7))).shape) == (1, 9, 12, 2)


def _set_encoder(encoder, input_shape, gate_logits):
    encoder.build(input_shape)
    encoder.conv.kernel.assign(tf.ones_like(encoder.conv.kernel))
    encoder.conv.bias.assign(tf.zeros_like(encoder.conv.bias))
    encoder.gate_logits.assign(gate_logits)


def test_encoder_math_with_ones_kernel():
    encoder = MaskedEncoder(2, gate_init_max=0.0)
    _set_encoder(encoder, (1, 3, 3, 1), [0.0, math.log(3.0)])  # gates 0.5 and 0.75
    out = encoder(tf.fill((1, 3, 3, 1), 0.1), training=False).numpy()
    # A 3x3 ones kernel with "same" padding sums 4 pixels at corners, 6 at edges, 9 in the middle.
    counts = np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]])
    features = _sigmoid(0.1 * counts * BN_SCALE)
    np.testing.assert_allclose(out[0, ..., 0], 0.5 * features, rtol=1e-5)
    np.testing.assert_allclose(out[0, ..., 1], 0.75 * features, rtol=1e-5)
    np.testing.assert_allclose(tf.sigmoid(encoder.gate_logits).numpy(), [0.5, 0.75], rtol=1e-6)
    np.testing.assert_allclose(
        budget.channel_importance(encoder.gate_logits).numpy(), [0.25, 0.5625], rtol=1e-6
    )


def test_encoder_math_with_stride_two():
    encoder = MaskedEncoder(1, resolution_factor=2)
    _set_encoder(encoder, (1, 4, 4, 2), [100.0])  # gate sigmoid(100) == 1 in float32
    out = encoder(tf.ones((1, 4, 4, 2)), training=False).numpy()
    # "same" with stride 2 on 4 pixels pads 0 before and 1 after: windows of 3 then 2 pixels,
    # times 2 input channels.
    counts = 2 * np.array([[9, 6], [6, 4]])
    np.testing.assert_allclose(out[0, ..., 0], _sigmoid(counts * BN_SCALE), rtol=1e-6)


def test_encoder_gate_logits_start_in_range():
    encoder = MaskedEncoder(64, gate_init_max=2.0)
    encoder.build((None, 2, 2, 3))
    logits = encoder.gate_logits.numpy()
    assert logits.min() >= 0.0 and logits.max() <= 2.0 and logits.std() > 0


def test_decoder_math_with_stride_two():
    decoder = Decoder(1, resolution_factor=2, kernel_size=1)
    decoder.build((1, 2, 2, 2))
    decoder.deconv.kernel.assign(tf.ones_like(decoder.deconv.kernel))
    decoder.deconv.bias.assign(tf.zeros_like(decoder.deconv.bias))
    inputs = np.array([[[1.0, 2.0], [0.5, -3.0]], [[-1.0, 0.0], [4.0, 1.0]]]).reshape(1, 2, 2, 2)
    out = decoder(tf.constant(inputs, tf.float32), training=False).numpy()
    # A 1x1 transposed conv with stride 2 puts the channel sum at even positions, 0 elsewhere;
    # the ReLU clips the negative sum (0.5 - 3).
    expected = np.array([[3, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5, 0], [0, 0, 0, 0]]) * BN_SCALE
    np.testing.assert_allclose(out[0, ..., 0], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"channels": 0}, "channels"),
        ({"channels": 2.0}, "channels"),
        ({"channels": True}, "channels"),
        ({"channels": 2, "resolution_factor": 0}, "resolution_factor"),
        ({"channels": 2, "kernel_size": 1.5}, "kernel_size"),
    ],
)
def test_constructors_reject_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}.*Received"):
        MaskedEncoder(**kwargs)
    with pytest.raises(ValueError, match=f"{name}.*Received"):
        Decoder(**kwargs)


@pytest.mark.parametrize("gate_init_max", [-1.0, 15.5, float("nan")])
def test_encoder_rejects_bad_gate_init_max(gate_init_max):
    with pytest.raises(ValueError, match="gate_init_max"):
        MaskedEncoder(2, gate_init_max=gate_init_max)
