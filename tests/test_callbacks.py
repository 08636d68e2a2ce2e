"""PhaseSchedule beside Keras's own rate drivers: a LearningRateSchedule and ReduceLROnPlateau."""

import math

import numpy as np
import pytest
import tensorflow as tf

import tfsplit
from tfsplit import callbacks

keras = tf.keras
STEPS_PER_EPOCH = 4


def _split():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="scores")(x), name="small")
    return tfsplit.split_model(model, "features", bottleneck=True)


def _fit(model, phases, *others):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8 * STEPS_PER_EPOCH, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 3, len(images))
    schedule = tfsplit.PhaseSchedule(phases)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(
            callbacks.phase_schedule.current_learning_rate(model.optimizer)
        )
    )
    history = model.fit(
        images,
        labels,
        batch_size=8,
        epochs=schedule.epochs,
        callbacks=[schedule, record, *others],
        shuffle=False,
        verbose=0,
    )
    return history.history, seen


def test_a_learning_rate_schedule_drives_phases_that_ask_for_no_rate():
    model = _split()
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    model.compile(keras.optimizers.SGD(decay))
    phases = [
        tfsplit.Phase(budget=4, epochs=2, learning_rate=None),
        tfsplit.Phase(budget=8, epochs=1, learning_rate=None, reset="deprune"),
    ]
    history, seen = _fit(model, phases)
    expected = [0.1 * 0.5 ** (epoch * STEPS_PER_EPOCH / 2) for epoch in range(3)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-6)
    assert history["budget"] == [4, 4, 8]
    assert all(math.isfinite(loss) for loss in history["loss"])
    assert int(model.optimizer.iterations.numpy()) == 3 * STEPS_PER_EPOCH


def test_a_phase_that_asks_for_a_rate_refuses_a_learning_rate_schedule():
    model = _split()
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    model.compile(keras.optimizers.SGD(decay))
    phases = [
        dict(budget=4, epochs=1, learning_rate=None),
        dict(budget=8, epochs=1, learning_rate=0.1),
    ]
    with pytest.raises(ValueError, match="LearningRateSchedule.*learning_rate=None"):
        _fit(model, phases)


def test_reduce_lr_on_plateau_keeps_its_reduction_within_a_phase():
    model = _split()
    model.compile(keras.optimizers.SGD(0.5))
    phases = [
        dict(budget=4, epochs=4, learning_rate=0.1),
        dict(budget=8, epochs=2, learning_rate=0.2),
    ]
    # No epoch improves on the first by min_delta: the rate halves after every epoch but the first.
    plateau = keras.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=1, min_delta=1e9)
    history, seen = _fit(model, phases, plateau)
    # Entering a phase sets its rate; within it, the halvings stick.
    np.testing.assert_allclose(seen, [0.1, 0.1, 0.05, 0.025, 0.2, 0.1], rtol=1e-6)
    np.testing.assert_allclose(history["learning_rate"], seen, rtol=1e-6)


def test_boost_and_anneal_epochs_set_the_rate_each_epoch_they_change_it():
    model = _split()
    model.compile(keras.optimizers.SGD(0.5))
    phase = tfsplit.Phase(
        budget=4,
        epochs=5,
        learning_rate=0.1,
        boost_learning_rate=0.3,
        boost_epochs=1,
        anneal_epochs=2,
    )
    history, seen = _fit(model, [phase])
    expected = [phase.learning_rate_at(epoch) for epoch in range(5)]
    assert expected == pytest.approx([0.3, 0.1, 0.1, 0.075, 0.025])
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    assert history["learning_rate"] == expected  # as the phase asked, not as float32 holds it


@pytest.mark.parametrize("field", ["boost_epochs", "anneal_epochs"])
def test_boost_or_anneal_epochs_need_a_rate(field):
    model = _split()
    model.compile(keras.optimizers.SGD(0.1))
    phase = dict(budget=4, epochs=2, learning_rate=None, boost_learning_rate=0.2, **{field: 1})
    with pytest.raises(ValueError, match="need a learning_rate"):
        tfsplit.PhaseSchedule([phase]).set_model(model)


def test_the_package_exports_each_job_under_its_old_name():
    assert callbacks.PhaseSchedule is callbacks.phase_schedule.PhaseSchedule
    assert callbacks.BatchNormCalibration is callbacks.calibration.BatchNormCalibration
    assert callbacks.RunRecords is callbacks.records.RunRecords
    assert callbacks.read_records is callbacks.records.read_records
    assert callbacks.write_summary is callbacks.records.write_summary
    assert (callbacks.METRICS_FILE, callbacks.SUMMARY_FILE) == ("metrics.jsonl", "summary.json")
    assert tfsplit.PhaseSchedule is callbacks.PhaseSchedule
