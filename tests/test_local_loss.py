"""The device's local classifier: trained with the head on its own labels, never on the wire."""

import numpy as np
import pytest
import tensorflow as tf
from test_model import BOTTLENECK, user_model  # the same small user model

import tfsplit
from tfsplit.layers.local_classifier import LocalClassifier
from tfsplit.training import CodecSplitModel
from tfsplit.training.messages import model_digest

keras = tf.keras


def data(count=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=count).astype(np.int32)
    return images, labels


def split(local_loss_weight, model_class=None, bottleneck=BOTTLENECK, cut="conv_b"):
    keras.utils.set_random_seed(0)
    model = tfsplit.split_model(
        user_model(), cut, bottleneck=bottleneck, local_loss_weight=local_loss_weight
    )
    if model_class is not None:
        model = model_class.from_config(model.get_config())
    model.compile(keras.optimizers.SGD(0.05), gate_optimizer=keras.optimizers.Adam(0.05))
    return model


def one_step(model, budget=5):
    images, labels = data()
    model.set_budget(budget)
    return model.train_on_batch(images, labels, return_dict=True)


def test_the_local_loss_trains_the_head_and_not_the_tail():
    """From the same weights, one step with and one without: the tail learns only from the
    server's loss, so it moves the same; the head also follows its own classifier."""
    plain, local = split(0.0), split(1.0)
    local.head.set_weights(plain.head.get_weights())
    local.tail.set_weights(plain.tail.get_weights())
    classifier_before = [w.copy() for w in local.local_classifier.get_weights()]
    logs = one_step(local)
    one_step(plain)
    for a, b in zip(plain.tail.get_weights(), local.tail.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    conv = [(a, b) for a, b in zip(plain.head.get_weights(), local.head.get_weights())][0]
    assert not np.allclose(*conv)
    assert not np.allclose(classifier_before[0], local.local_classifier.get_weights()[0])
    assert logs["local_loss"] > 0


def test_the_local_loss_sends_no_byte_more():
    plain_logs, local_logs = one_step(split(0.0)), one_step(split(1.0))
    for key in ("payload_bytes_up", "payload_bytes_down"):
        assert plain_logs[key] == local_logs[key]
    assert "local_loss" not in plain_logs


def test_the_local_classifier_reads_the_features_the_encoder_receives():
    model = split(1.0)
    assert model.device_features.outputs[0].shape[1:] == model.encoder.input.shape[1:]
    plain_sl = split(1.0, bottleneck=None)
    assert plain_sl.device_features.outputs[0].shape[1:] == plain_sl.head.output.shape[1:]
    one_step(plain_sl, budget=16)


def test_a_flat_cut_is_classified_as_it_is():
    model = split(0.5, bottleneck=None, cut="pool")
    assert model.wire_shape == (16,)
    assert one_step(model, budget=16)["local_loss"] > 0


def test_the_byte_step_and_the_compiled_step_agree_with_a_local_loss():
    fused = split(0.5)
    real = split(0.5, CodecSplitModel)
    real.set_weights(fused.get_weights())
    logs = [one_step(model) for model in (fused, real)]
    np.testing.assert_allclose(logs[0]["local_loss"], logs[1]["local_loss"], rtol=1e-5)
    for a, b in zip(fused.weights, real.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)


def test_saved_and_loaded_with_its_classifier(tmp_path):
    model = split(0.5)
    one_step(model)
    path = str(tmp_path / "split.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.local_loss_weight == 0.5
    features = model.device_features(data()[0])[0]
    np.testing.assert_allclose(
        loaded.local_classifier(features).numpy(), model.local_classifier(features).numpy()
    )
    np.testing.assert_array_equal(loaded(data()[0]).numpy(), model(data()[0]).numpy())


def test_device_and_server_agree_on_the_model_whatever_the_device_trains_alone():
    assert model_digest(split(1.0)) == model_digest(split(0.0))


@pytest.mark.parametrize("weight", [-0.5, float("nan")])
def test_a_bad_weight_is_rejected(weight):
    with pytest.raises(ValueError, match="local_loss_weight"):
        split(weight)


@pytest.mark.parametrize("num_classes", [1, 2.0, True])
def test_a_bad_class_count_is_rejected(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        LocalClassifier(num_classes)


def test_features_of_another_rank_are_rejected():
    with pytest.raises(ValueError, match=r"\(N, h, w, C\) or \(N, C\)"):
        LocalClassifier(3).build((None, 4, 5))
