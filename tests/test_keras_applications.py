"""keras.applications models, which end in a softmax, cut and trained with their loss right."""

import logging
import math
import warnings

import numpy as np
import pytest
import tensorflow as tf

import tfsplit

keras = tf.keras
CLASSES = 10
SOFTMAX_WARNING = "produced by a Softmax"


def _data(count=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, 32, 32, 3)).astype(np.float32)
    return images, np.arange(count) % CLASSES


def test_the_capture_sees_keras_warn_about_logits_from_a_softmax():
    """What the tests below check is absent: Keras's warning on the uncut model's output."""
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=CLASSES)
    images, labels = _data(2)
    loss = tf.function(
        lambda x: keras.losses.sparse_categorical_crossentropy(labels, model(x), from_logits=True)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(images)
    assert any(SOFTMAX_WARNING in str(warning.message) for warning in caught)


@pytest.mark.parametrize(
    "application, cut",
    [
        (keras.applications.MobileNetV2, "block_3_project_BN"),
        (keras.applications.ResNet50, "conv2_block3_out"),
    ],
)
def test_an_application_trains_on_its_logits(application, cut, caplog):
    keras.utils.set_random_seed(0)
    model = application(weights=None, input_shape=(32, 32, 3), classes=CLASSES)
    images, labels = _data()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        split = tfsplit.split_model(model, cut, bottleneck=True)
        split.compile(keras.optimizers.SGD(0.01))
        history = split.fit(images, labels, batch_size=8, epochs=1, verbose=0)
        loss = split.evaluate(images, labels, batch_size=8, verbose=0)[0]
    assert not [w for w in caught if "from_logits" in str(w.message)]
    assert "softmax" not in caplog.text.lower()
    assert math.isfinite(history.history["loss"][0]) and math.isfinite(loss)
    # The model's outputs are logits; the loss is -log of the probability (their softmax, taken
    # in float64 here so that no probability rounds to 0) that each image's label gets.
    logits = split.predict(images, batch_size=8, verbose=0)
    assert not np.allclose(logits.sum(axis=-1), 1.0)
    log_probabilities = tf.nn.log_softmax(logits.astype(np.float64)).numpy()
    expected = -np.mean(log_probabilities[np.arange(len(labels)), labels])
    assert loss == pytest.approx(expected, rel=1e-4)
    # The user's model keeps its softmax.
    assert np.allclose(model(images[:2]).numpy().sum(axis=-1), 1.0, atol=1e-5)
