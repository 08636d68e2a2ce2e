"""SplitModel: a user's own Keras model cut, trained with fit, evaluated, called and saved."""

import zipfile

import h5py
import numpy as np
import pytest
import tensorflow as tf

import tfsplit
from tfsplit import codec
from tfsplit.codec import wire
from tfsplit.engine.nesting import FILL_MOMENTUM
from tfsplit.layers.bottleneck import GATE_LOGIT_OPEN
from tfsplit.training import CodecSplitModel

keras = tf.keras
BOTTLENECK = dict(feature_compression=1, resolution_compression=1, gate_init_max=15.0)


def user_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x), name="mine")


def data(count=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, 8, 8, 3)).astype(np.float32)
    labels = (images[..., 0].mean(axis=(1, 2)) > 0).astype(np.int32) * 2
    return images, labels


def split(bottleneck=BOTTLENECK, **options):
    keras.utils.set_random_seed(0)
    model = tfsplit.split_model(user_model(), "conv_b", bottleneck=bottleneck, **options)
    model.compile(keras.optimizers.SGD(0.05), gate_optimizer=keras.optimizers.Adam(0.05))
    return model


def test_split_model_returns_a_keras_model_with_the_bottleneck():
    model = split()
    assert isinstance(model, keras.Model)
    assert model.encoder is not None and model.decoder is not None
    assert model.wire_shape == (8, 8, 16)
    assert int(model.budget.numpy()) == 16


SCHEDULES = {
    "sl": (None, [dict(budget=0, epochs=1, learning_rate=0.05)]),
    "casl": (BOTTLENECK, [dict(budget=4, epochs=2, learning_rate=0.05)]),
    "deprune": (
        BOTTLENECK,
        [
            tfsplit.Phase(budget=2, epochs=1, learning_rate=0.05),
            tfsplit.Phase(budget=8, epochs=1, learning_rate=0.05, reset="deprune"),
        ],
    ),
    "prune": (
        BOTTLENECK,
        [
            dict(budget=0, epochs=1, learning_rate=0.05),
            dict(
                budget=4,
                epochs=1,
                learning_rate=0.05,
                boost_learning_rate=0.1,
                boost_epochs=1,
                reset="prune",
            ),
        ],
    ),
}


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_fit_trains_every_method_with_a_phase_schedule(method):
    bottleneck, phases = SCHEDULES[method]
    model = split(bottleneck)
    schedule = tfsplit.PhaseSchedule(phases)
    images, labels = data()
    history = model.fit(
        images, labels, batch_size=16, epochs=schedule.epochs, callbacks=[schedule], verbose=0
    )
    final_budget = phases[-1]["budget"] if isinstance(phases[-1], dict) else phases[-1].budget
    final_budget = final_budget or model.channels
    assert history.history["budget"][-1] == final_budget
    # 4 steps of 16 samples per epoch; bytes by the codec's own formula.
    per_step = codec.payload_nbytes(16, 8, 8, final_budget, "float16", True, model.channels)
    assert history.history["payload_bytes_up"][-1] == 4 * per_step
    result = model.evaluate(images, labels, batch_size=32, return_dict=True, verbose=0)
    assert {"accuracy", "loss", "payload_bytes_up", "payload_bytes_down"} <= set(result)
    inference = codec.payload_nbytes(32, 8, 8, final_budget, "float16", False, model.channels)
    assert result["payload_bytes_up"] == 2 * inference
    assert result["payload_bytes_down"] == 0


def test_call_at_a_budget_sends_only_the_top_channels():
    model = split()
    images, _ = data(4)
    gates = np.arange(16, dtype=np.float32) - 8.0
    model.encoder.gate_logits.assign(gates)
    np.testing.assert_array_equal(model.channel_indices(3).numpy(), [15, 14, 13])
    full = model.head(images, training=False).numpy()
    kept = np.zeros_like(full)
    kept[..., [15, 14, 13]] = full[..., [15, 14, 13]]
    expected = model.tail(wire.fake_quantize(kept, "float16"), training=False)
    np.testing.assert_allclose(model(images, budget=3).numpy(), expected.numpy(), atol=1e-5)
    model.set_budget(3)
    np.testing.assert_allclose(model(images).numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("budget", [0, 17, 2.5, True])
def test_a_budget_outside_the_cut_is_rejected(budget):
    with pytest.raises(ValueError, match="budget must be an integer in"):
        split()(data(2)[0], budget=budget)


def test_plain_split_learning_sends_every_channel():
    model = split(bottleneck=None)
    assert model.encoder is None
    with pytest.raises(ValueError, match="all 16 channels are sent"):
        model.set_budget(4)
    images, labels = data()
    result = model.evaluate(images, labels, batch_size=64, return_dict=True, verbose=0)
    # No index list when every channel crosses.
    assert result["payload_bytes_up"] == codec.HEADER_NBYTES + 64 * 8 * 8 * 16 * 2


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = split(activation_dtype="int8")
    images, labels = data()
    model.set_budget(5)
    model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "split.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tfsplit.SplitModel)
    assert loaded.activation_dtype == "int8" and int(loaded.budget.numpy()) == 5
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())
    np.testing.assert_array_equal(loaded(images, budget=2).numpy(), model(images, budget=2).numpy())


def _as_older_versions_saved(path, layer, keys):
    """Rewrites a saved model as a version that did not have `layer`'s own variables `keys`."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    weights = path.parent / "model.weights.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as f:
        found = []
        f.visit(lambda name: found.append(name) if name.endswith(f"{layer}/vars") else None)
        assert len(found) == 1
        for key in keys:
            del f[found[0]][key]
    members["model.weights.h5"] = weights.read_bytes()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data_bytes in members.items():
            archive.writestr(name, data_bytes)


def test_a_model_saved_before_the_tail_kept_fill_values_loads_with_zeros(tmp_path):
    model = split(nested_budgets=True)
    model.decoder.fill.assign(np.full(model.channels, 0.5, np.float32))
    path = tmp_path / "split.keras"
    model.save(str(path))
    _as_older_versions_saved(path, "decoder", ["0"])  # the decoder had no variable of its own
    loaded = keras.models.load_model(str(path))
    assert not loaded.decoder.fill.numpy().any()
    images, _ = data(8)
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-6)


def test_a_model_saved_before_the_head_kept_seniority_loads_its_gates(tmp_path):
    model = split()
    model.encoder.gate_logits.assign(np.linspace(-3.0, 3.0, model.channels, dtype=np.float32))
    model.encoder.seniority.assign(np.ones(model.channels, np.float32))
    path = tmp_path / "split.keras"
    model.save(str(path))
    _as_older_versions_saved(path, "encoder", ["1"])  # the gate logits only
    loaded = keras.models.load_model(str(path))
    assert not loaded.encoder.seniority.numpy().any()
    np.testing.assert_array_equal(
        loaded.encoder.gate_logits.numpy(), model.encoder.gate_logits.numpy()
    )
    np.testing.assert_array_equal(loaded.channel_indices(4), model.channel_indices(4))


def test_wire_quantizes_both_directions():
    quantized_wire = wire.make_wire("float16", "float16")
    x = tf.constant([[1.0 + 2**-12, 3.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(quantized_wire(x) * tf.constant([[1.0 + 2**-13, 7.0]]))
    np.testing.assert_array_equal(
        quantized_wire(x).numpy(), [[1.0, 3.0]]
    )  # 1 + 2^-12 rounds in float16.
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), [[1.0, 7.0]])


def test_unselected_channels_get_no_gradient():
    model = split()
    model.set_budget(2)
    images, _ = data(4)
    indices = model.channel_indices()
    with tf.GradientTape() as tape:
        activations = model.head(images, training=False)
        tape.watch(activations)
        values = tf.gather(activations, indices, axis=-1)
        logits = model.receive(model.wire(values), indices)
    gradient = tape.gradient(logits, activations).numpy()
    unselected = np.setdiff1d(np.arange(16), indices.numpy())
    assert np.all(gradient[..., unselected] == 0)
    assert np.any(gradient[..., indices.numpy()] != 0)


def test_receive_takes_a_selection_per_sample_for_devices_batched_together():
    model = split()
    values = tf.random.stateless_normal((4, 8, 8, 3), seed=[1, 2])
    first, second = tf.constant([5, 0, 9]), tf.constant([2, 15, 7])
    per_sample = tf.stack([first, first, second, second])
    together = model.receive(values, per_sample).numpy()
    apart = [model.receive(values[:2], first), model.receive(values[2:], second)]
    np.testing.assert_allclose(together, np.concatenate(apart), atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(activation_dtype="bfloat16"), "activation_dtype"),
        (dict(min_budget_fraction=0.0), "min_budget_fraction"),
        (dict(min_budget_fraction=1.5), "min_budget_fraction"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        split(**options)


@pytest.mark.parametrize("nested_budgets", [False, True])
def test_the_compiled_step_trains_as_the_step_that_moves_real_bytes(nested_budgets):
    """CodecSplitModel encodes and decodes every payload; fit gives the same model and bytes."""
    fused = split(activation_dtype="int8", nested_budgets=nested_budgets)
    real = CodecSplitModel.from_config(fused.get_config())
    real.set_weights(fused.get_weights())
    real.compile(keras.optimizers.SGD(0.05), gate_optimizer=keras.optimizers.Adam(0.05))
    images, labels = data()
    results = []
    for model in (fused, real):
        schedule = tfsplit.PhaseSchedule([dict(budget=4, epochs=2, learning_rate=0.05)])
        history = model.fit(
            images, labels, batch_size=16, epochs=2, callbacks=[schedule], shuffle=False, verbose=0
        )
        results.append(history.history)
    for key in ("payload_bytes_up", "payload_bytes_down"):
        assert results[0][key] == results[1][key]
    np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-4)
    for a, b in zip(fused.weights, real.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)


def test_the_byte_step_keeps_the_channel_order_when_every_channel_is_sent():
    """A payload of every channel travels in channel order; the gradient must come back to the
    order the head sent (gates that rank the channels out of index order)."""
    fused = split(activation_dtype="float32", gradient_dtype="float32")
    fused.encoder.gate_logits.assign(np.random.default_rng(1).normal(size=16).astype(np.float32))
    real = CodecSplitModel.from_config(fused.get_config())
    real.set_weights(fused.get_weights())
    real.compile(keras.optimizers.SGD(0.05), gate_optimizer=keras.optimizers.Adam(0.05))
    assert sorted(fused.channel_indices().numpy()) != list(fused.channel_indices().numpy())
    images, labels = data(16)
    for model in (fused, real):
        model.set_budget(16, masking=True, nesting=False)
        model.train_on_batch(images, labels)
    for a, b in zip(fused.weights, real.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_deprune_reset_keeps_the_channels_phase_one_sent():
    model = split()
    schedule = tfsplit.PhaseSchedule(SCHEDULES["deprune"][1])
    selections = {}
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: selections.setdefault(
            epoch, set(model.channel_indices().numpy())
        ),
        on_epoch_end=lambda epoch, logs: selections.setdefault(
            f"end {epoch}", set(model.channel_indices().numpy())
        ),
    )
    images, labels = data()
    history = model.fit(
        images, labels, batch_size=16, epochs=2, callbacks=[schedule, record], verbose=0
    )
    assert len(selections["end 0"]) == 2 and len(selections[1]) == 8
    assert selections["end 0"] <= selections[1]
    assert "gate_separation" in history.history
    # Promoted at the reset, phase one's channels rank first among the open gates: the
    # smaller budget's selection is the larger one's prefix.
    np.testing.assert_array_equal(
        np.flatnonzero(model.encoder.seniority.numpy()), sorted(selections["end 0"])
    )
    model.encoder.gate_logits.assign(np.full(model.channels, GATE_LOGIT_OPEN, np.float32))
    assert set(model.channel_indices(2).numpy()) == selections["end 0"]


def test_gate_travel_fraction_sets_the_gate_rate_from_the_phase_length():
    model = split()
    phases = [dict(budget=4, epochs=2, learning_rate=0.05)]
    schedule = tfsplit.PhaseSchedule(phases, gate_travel_fraction=0.5)
    images, labels = data()
    history = model.fit(images, labels, batch_size=16, epochs=2, callbacks=[schedule], verbose=0)
    # 4 steps per epoch, 2 epochs: a gate may cross 15 logits in half of 8 steps.
    expected = 15.0 / (0.5 * 8)
    assert history.history["gate_learning_rate"] == [expected, expected]
    assert float(model.gate_optimizer.learning_rate.numpy()) == pytest.approx(expected)
    with pytest.raises(ValueError, match="gate_travel_fraction"):
        tfsplit.PhaseSchedule(phases, gate_travel_fraction=1.5)


def test_nested_budgets_train_in_the_final_phase_once_its_channels_are_chosen():
    model = split(nested_budgets=True)
    phases = [
        dict(budget=2, epochs=1, learning_rate=0.05),
        dict(
            budget=8,
            epochs=4,
            learning_rate=0.05,
            boost_learning_rate=0.1,
            boost_epochs=1,
            reset="deprune",
        ),
    ]
    schedule = tfsplit.PhaseSchedule(phases, gate_travel_fraction=0.5)
    nesting = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: nesting.append(bool(model.step_nesting.numpy()))
    )
    images, labels = data()
    model.fit(images, labels, batch_size=16, epochs=5, callbacks=[schedule, record], verbose=0)
    # Phase 1: never; phase 2: after its boost epoch and half its epochs of gate travel.
    assert nesting == [False, False, False, True, True]


def test_nested_steps_keep_each_sent_channels_mean_for_the_prefixes_that_leave_it_out():
    images, labels = data()
    plain, nested = split(), split(nested_budgets=True)
    for model in (plain, nested):
        model.set_budget(4)
        model.fit(images, labels, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert not plain.decoder.fill.numpy().any()  # without nesting: zeros, as before
    indices = nested.channel_indices().numpy()
    fill = nested.decoder.fill.numpy()
    assert (fill[indices] > 0).all()
    assert not np.delete(fill, indices).any()
    # One nested step moves the fill towards this batch's means of the sent channels.
    sent = nested.send(images, indices).numpy()
    nested.nesting.distillation_loss(nested.receive, sent, indices, nested.receive(sent, indices))
    means = sent.mean(axis=(0, 1, 2))
    expected = FILL_MOMENTUM * fill[indices] + (1 - FILL_MOMENTUM) * means
    np.testing.assert_allclose(nested.decoder.fill.numpy()[indices], expected, rtol=1e-5)
    # At a smaller budget the channels left out stand in as their fill values.
    fill = nested.decoder.fill.numpy()
    served = nested.receive(sent[..., :2], indices[:2])
    stand_in = np.broadcast_to(fill, sent.shape[:3] + fill.shape).copy()
    stand_in[..., indices[:2]] = sent[..., :2]
    np.testing.assert_allclose(served, nested.tail(stand_in), rtol=1e-5, atol=1e-5)


def test_distillation_averages_the_prefix_passes():
    # min_budget_fraction 1: both prefixes are the full budget, so the average is one pass's loss
    # (a sum would be twice it and outweigh the full budget's own loss).
    images, _ = data()
    model = split(nested_budgets=True, min_budget_fraction=1.0)
    model.set_budget(4)
    indices = model.channel_indices()
    sent = model.send(images, indices)
    teacher = model.receive(sent, indices, training=True)
    student = model.receive(sent, indices, training=False)
    expected = keras.losses.categorical_crossentropy(
        tf.nn.softmax(teacher), student, from_logits=True
    )
    loss = model.nesting.distillation_loss(model.receive, sent, indices, teacher)
    np.testing.assert_allclose(loss.numpy(), np.mean(expected.numpy()), rtol=1e-5)


def test_nested_budgets_draw_each_halving_of_the_budget_as_often():
    model = split(nested_budgets=True, min_budget_fraction=0.125)
    draws = []
    for _ in range(2000):
        smallest, drawn = model.nesting.budget_range(tf.constant(64))
        draws.append(int(drawn))
    assert int(smallest) == 8 and min(draws) == 8 and max(draws) == 64
    octaves = np.histogram(draws, bins=[8, 16, 32, 65])[0] / len(draws)
    np.testing.assert_allclose(octaves, 1 / 3, atol=0.05)  # uniform draws: 0.14, 0.28, 0.58


def test_polarization_adds_the_distance_of_the_gates_from_zero_or_one():
    model = split(polarization=0.5)
    model.set_budget(4)
    gates = np.zeros(16, np.float32)  # m = 0.25 everywhere: sum 4 = k, so the cosh term is 2.
    model.encoder.gate_logits.assign(gates)
    expected = 1000.0 * (2.0 + 0.5 * 16 * 0.25 * 0.75)
    assert float(model.budget_penalty()) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="polarization"):
        split(polarization=-1.0)


def test_batch_norm_calibration_measures_the_selection_in_force():
    """After calibration the moving statistics are those of the data at the current budget."""
    model = split()
    model.set_budget(4)
    images, labels = data(128)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)
    norm = model.decoder.norm
    momentum = norm.momentum
    model.calibrate_batch_norm(dataset, batches=4)
    assert norm.momentum == momentum  # restored for training.
    # The decoder's input at budget 4: the head's top-4 channels scattered back into 16.
    indices = model.channel_indices()
    received = tf.tensordot(
        wire.fake_quantize(model.send(images, indices, training=True), "float16"),
        tf.one_hot(indices, model.channels),
        axes=1,
    )
    before_norm = model.decoder.deconv(received).numpy()
    np.testing.assert_allclose(norm.moving_mean.numpy(), before_norm.mean((0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), before_norm.var((0, 1, 2)), rtol=1e-3, atol=1e-5
    )


def test_calibration_callback_runs_only_when_the_sent_channels_changed():
    model = split()
    images, labels = data(64)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)
    calibration = tfsplit.BatchNormCalibration(dataset, batches=1)
    calibration.set_model(model)
    norm = model.decoder.norm
    model.set_budget(4)
    calibration.on_test_begin()
    calibrated = norm.moving_mean.numpy()
    norm.moving_mean.assign(np.zeros_like(calibrated))
    calibration.on_test_begin()  # same channels, same gates: nothing to redo.
    assert not norm.moving_mean.numpy().any()
    model.set_budget(8)
    calibration.on_test_begin()
    assert norm.moving_mean.numpy().any()
    with pytest.raises(ValueError, match="batches"):
        tfsplit.BatchNormCalibration(dataset, batches=0)


def test_nesting_is_a_part_the_model_owns_whose_draws_are_backed_up(tmp_path):
    assert split().nesting is None
    model = split(nested_budgets=True)
    assert model.nesting.draws is model.budget_draws
    assert model.nesting.fill is model.decoder.fill
    checkpoint = tf.train.Checkpoint(model=model)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    first = [int(model.nesting.budget_range(tf.constant(64))[1]) for _ in range(5)]
    checkpoint.restore(path)
    assert [int(model.nesting.budget_range(tf.constant(64))[1]) for _ in range(5)] == first


def test_compile_takes_the_users_loss_as_keras_does():
    def doubled(labels, logits):
        return 2.0 * keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    images, labels = data(32)
    evaluated, trained = [], []
    for loss in (None, doubled):
        model = split()
        model.compile(keras.optimizers.SGD(0.0), loss=loss)
        evaluated.append(model.evaluate(images, labels, batch_size=32, verbose=0)[0])
        trained.append(model.fit(images, labels, batch_size=32, verbose=0).history["loss"][0])
    assert evaluated[1] == pytest.approx(2.0 * evaluated[0], rel=1e-5)
    assert trained[1] == pytest.approx(2.0 * trained[0], rel=1e-5)


@pytest.mark.parametrize(
    "loss",
    [
        "sparse_categorical_crossentropy",
        "SparseCategoricalCrossentropy",
        keras.losses.SparseCategoricalCrossentropy(),
        keras.losses.sparse_categorical_crossentropy,
    ],
)
def test_compile_refuses_a_cross_entropy_on_probabilities(loss):
    with pytest.raises(ValueError, match="from_logits=True"):
        split().compile("sgd", loss=loss)


def test_a_tail_that_ends_in_a_softmax_is_flagged(caplog):
    model = split(bottleneck=None)
    inputs = keras.Input(model.wire_shape)
    tail = keras.Model(inputs, keras.layers.Softmax()(model.tail(inputs)))
    tfsplit.SplitModel(model.head, tail)
    assert "ends in a softmax" in caplog.text
