"""Top-k selection, budget loss, gate resets and phase validation against hand-computed cases."""

import math

import numpy as np
import pytest
import tensorflow as tf

import tfsplit  # noqa: F401
from tfsplit.engine import budget
from tfsplit.layers.bottleneck import GATE_LOGIT_CLOSED, GATE_LOGIT_OPEN


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_top_k_orders_by_importance_and_breaks_ties_by_lower_index():
    logits = tf.constant([0.5, 3.0, 3.0, -1.0, 3.0, 2.0])
    np.testing.assert_array_equal(budget.top_k_channels(logits, 2).numpy(), [1, 2])
    np.testing.assert_array_equal(budget.top_k_channels(logits, 4).numpy(), [1, 2, 4, 5])


def test_top_k_sends_exactly_k_when_many_gates_saturate():
    # The research code's partition threshold let 21 channels through at budget 16 when many
    # gates sat at 1.0; here exactly k come out, and always the same ones.
    logits = tf.constant([15.0] * 21 + [1.0] * 11)
    indices = budget.top_k_channels(logits, 16).numpy()
    np.testing.assert_array_equal(indices, np.arange(16))


def test_top_k_breaks_ties_by_seniority_then_by_lower_index():
    logits = tf.constant([15.0, 15.0, 2.0, 15.0, 15.0, 3.0])
    seniority = tf.constant([0.0, 1.0, 5.0, 0.0, 1.0, 0.0])
    # Seniority orders equal gates only: channel 2's seniority does not lift its lower logit.
    np.testing.assert_array_equal(
        budget.top_k_channels(logits, 5, seniority).numpy(), [1, 4, 0, 3, 5]
    )
    np.testing.assert_array_equal(
        budget.top_k_channels(logits, 5, tf.zeros(6)).numpy(),
        budget.top_k_channels(logits, 5).numpy(),
    )
    compiled = tf.function(lambda k: budget.top_k_channels(logits, k, seniority))
    np.testing.assert_array_equal(compiled(tf.constant(3)).numpy(), [1, 4, 0])


def test_promote_raises_the_sent_channels_seniority():
    seniority = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    np.testing.assert_array_equal(budget.promote(seniority, [1, 3]), [0.0, 2.0, 0.0, 1.0])
    np.testing.assert_array_equal(seniority, [0.0, 1.0, 0.0, 0.0])  # the input is not changed


def test_top_k_eager_and_compiled_agree_with_a_tensor_budget():
    logits = tf.random.stateless_normal([64], seed=[1, 2])
    k = tf.Variable(10)
    compiled = tf.function(lambda: budget.top_k_channels(logits, k))
    np.testing.assert_array_equal(compiled().numpy(), budget.top_k_channels(logits, 10).numpy())
    expected = np.argsort(-((1 / (1 + np.exp(-logits.numpy()))) ** 2), kind="stable")[:10]
    np.testing.assert_array_equal(compiled().numpy(), expected)


def test_budget_loss_value():
    logits = tf.constant([0.0, 1.0, 2.0])
    soft = sum(sigmoid(v) ** 2 for v in (0.0, 1.0, 2.0))
    excess = soft - 1
    expected = 1000 * (math.exp(0.1 * excess) + math.exp(-0.1 * excess))
    np.testing.assert_allclose(
        budget.budget_loss(logits, 1, 1000.0, 0.1).numpy(), expected, rtol=1e-6
    )
    # At sum(m) == k the penalty sits on its floor 2*eps.
    at_budget = tf.constant([15.0, 15.0, -15.0])
    np.testing.assert_allclose(
        budget.budget_loss(at_budget, 2, 1000.0, 0.1).numpy(), 2000.0, rtol=1e-5
    )


@pytest.mark.parametrize("k, sign", [(1, +1.0), (3, -1.0)])
def test_budget_loss_gradient_pulls_soft_count_towards_budget(k, sign):
    # sum(m) ~ 2.2 here: above budget 1 the gradient is positive (gradient descent closes gates),
    # below budget 3 it is negative (gradient descent opens them).
    logits = tf.Variable([0.0, 1.0, 2.0, 3.0])
    with tf.GradientTape() as tape:
        loss = budget.budget_loss(logits, k, 1000.0, 0.1)
    grad = tape.gradient(loss, logits).numpy()
    assert np.all(np.sign(grad) == sign)


def test_deprune_reset_pins_the_sent_channels_and_reopens_the_rest():
    logits = np.array([0.05, 0.06, 0.2, -3.0, 0.01], np.float32)
    new = budget.deprune_reset(logits, [4, 1], 3.0, np.random.default_rng(0))
    np.testing.assert_array_equal(new[[1, 4]], [GATE_LOGIT_OPEN] * 2)
    assert np.all((new[[0, 2, 3]] >= 0) & (new[[0, 2, 3]] <= 3.0))
    again = budget.deprune_reset(logits, [4, 1], 3.0, np.random.default_rng(0))
    np.testing.assert_array_equal(new, again)


def test_deprune_reset_keeps_the_previous_selection_inside_the_larger_one():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 0.01, size=64).astype(np.float32)  # no gate stands out
    sent = budget.top_k_channels(logits, 8).numpy()
    new = budget.deprune_reset(logits, sent, 3.0, rng)
    assert set(sent) <= set(budget.top_k_channels(new, 32).numpy())


def test_prune_reset_closes_weak_gates_and_keeps_the_ranking_of_open_ones():
    logits = np.array([0.95, 0.5, 10.0, -2.0, 4.0], np.float32)
    new = budget.prune_reset(logits, 0.9, 5.0)
    np.testing.assert_array_equal(new[[1, 3]], [GATE_LOGIT_CLOSED] * 2)
    np.testing.assert_allclose(new[[0, 4, 2]], [0.0, 5.0 * 3.05 / 9.05, 5.0], rtol=1e-6)
    order = budget.top_k_channels(logits, 5).numpy()
    np.testing.assert_array_equal(budget.top_k_channels(new, 5).numpy()[:3], order[:3])


def test_prune_reset_with_no_open_gate_keeps_every_channel_in_order():
    logits = np.array([0.1, -1.0, 0.5], np.float32)
    new = budget.prune_reset(logits, 0.9, 3.0)
    np.testing.assert_array_equal(np.argsort(new), np.argsort(logits))


def test_phase_learning_rate_boost_and_budget():
    phase = budget.Phase(
        budget=0, epochs=4, learning_rate=0.01, boost_learning_rate=0.05, boost_epochs=2
    )
    assert [phase.learning_rate_at(e) for e in range(4)] == [0.05, 0.05, 0.01, 0.01]
    assert phase.effective_budget(128) == 128
    assert budget.Phase(budget=16, epochs=1, learning_rate=0.1).effective_budget(128) == 16


def test_phase_anneals_its_last_epochs_along_a_half_cosine():
    phase = budget.Phase(
        budget=8,
        epochs=5,
        learning_rate=0.02,
        boost_learning_rate=0.05,
        boost_epochs=1,
        anneal_epochs=3,
    )
    rates = [phase.learning_rate_at(e) for e in range(5)]
    np.testing.assert_allclose(rates, [0.05, 0.02, 0.02 * 0.853553, 0.01, 0.02 * 0.146447], 1e-5)
    with pytest.raises(ValueError, match="anneal_epochs must be in"):
        budget.build_phases(
            [dict(budget=8, epochs=2, learning_rate=0.1, anneal_epochs=3)], 16, True
        )


def test_build_phases_accepts_a_valid_schedule():
    phases = budget.build_phases(
        [
            dict(budget=4, epochs=2, learning_rate=0.01),
            dict(budget=16, epochs=1, learning_rate=0.01, reset="deprune"),
        ],
        channels=32,
        has_bottleneck=True,
    )
    assert [p.budget for p in phases] == [4, 16]


@pytest.mark.parametrize(
    "entry, has_bottleneck, message",
    [
        (
            dict(budget=40, epochs=1, learning_rate=0.1),
            True,
            "budget must be an integer in [0, 32]",
        ),
        (dict(budget=-1, epochs=1, learning_rate=0.1), True, "budget must be"),
        (dict(budget=4, epochs=1, learning_rate=0.1), False, "needs the masked bottleneck"),
        (dict(budget=0, epochs=1, learning_rate=0.1, reset="prune"), False, "reset needs"),
        (dict(budget=4, epochs=0, learning_rate=0.1), True, "epochs must be a positive integer"),
        (dict(budget=4, epochs=1, learning_rate=0.0), True, "learning_rate must be > 0"),
        (dict(budget=4, epochs=1, learning_rate=0.1, boost_epochs=2), True, "boost_epochs"),
        (dict(budget=4, epochs=2, learning_rate=0.1, boost_epochs=1), True, "boost_learning_rate"),
        (dict(budget=4, epochs=1, learning_rate=0.1, reset="grow"), True, "reset must be one of"),
        (dict(budget=4, epochs=1, learning_rate=0.1, speed=3), True, "unknown keys ['speed']"),
    ],
)
def test_build_phases_rejects_bad_entries(entry, has_bottleneck, message):
    with pytest.raises(ValueError, match="Phase 1") as error:
        budget.build_phases([entry], channels=32, has_bottleneck=has_bottleneck)
    assert message in str(error.value)


def test_build_phases_rejects_an_empty_schedule():
    with pytest.raises(ValueError, match="at least one phase"):
        budget.build_phases([], channels=8, has_bottleneck=True)


def test_budget_loss_stays_finite_far_from_the_budget():
    # 512 nearly open gates against budget 4: delta*excess ~ 51, where cosh overflows float32's
    # squared gradients. Past 20 the loss continues with cosh's slope at 20, so it is continuous and
    # still pulls the right way.
    logits = tf.Variable(tf.fill([512], 15.0))
    with tf.GradientTape() as tape:
        loss = budget.budget_loss(logits, 4, 1000.0, 0.1)
    grad = tape.gradient(loss, logits).numpy()
    assert np.isfinite(loss.numpy()) and np.all(np.isfinite(grad)) and np.all(grad > 0)
    assert np.all(np.isfinite(grad.astype(np.float64) ** 2))

    def at(z):
        soft = 4 + z / 0.1  # sum(m) for a given delta*excess; m = 1 on saturated gates.
        return budget.budget_loss(tf.fill([int(round(soft))], 30.0), 4, 1.0, 0.1).numpy()

    np.testing.assert_allclose(at(20.0), 2 * math.cosh(20.0), rtol=1e-5)
    np.testing.assert_allclose(at(21.0) - at(20.0), 2 * math.sinh(20.0), rtol=1e-4)


def test_gate_separation_is_the_gap_at_the_budget():
    logits = np.array([15.0, -15.0, 15.0, 0.0], np.float32)
    assert budget.gate_separation(logits, 2) == pytest.approx(1.0 - 0.25, abs=1e-6)
    assert budget.gate_separation(logits, 3) == pytest.approx(0.25, abs=1e-6)
