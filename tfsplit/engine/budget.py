"""Channel budgets: top-k selection, the budget loss, gate resets and phase schedules.

A budget k says how many bottleneck channels may cross the cut. The k channels with the largest
importance `sigmoid(g)^2` are sent; ties go to the channel kept through more deprune resets (its
seniority), then to the lower channel index, so device and server always agree and exactly k
channels cross (never more, unlike a threshold from a partition).
"""

import dataclasses
import math
import typing

import numpy as np
import tensorflow as tf

from tfsplit.layers.bottleneck import GATE_LOGIT_CLOSED, GATE_LOGIT_OPEN

RESETS = ("none", "deprune", "prune")


def channel_importance(gate_logits):
    return tf.square(tf.sigmoid(gate_logits))


def top_k_channels(gate_logits, k, seniority=None):
    """Indices of the k most important channels, most important first.

    Ranked by the logits themselves: importance sigmoid(g)^2 is monotonic in g, so the order is the
    same, but in float32 it rounds to exactly 1.0 for every g above ~16 and ties gates that the
    logits still tell apart. Polarized gates do tie, at the top logit; among them the more senior
    channel comes first, so after deprune's reset the channels of the smaller budget stay a prefix
    of the larger selection (what nested budgets send at smaller budgets). Remaining ties go to the
    lower index (`tf.math.top_k` and a stable sort are documented to keep it first), which makes
    the choice deterministic and identical on device and server.

    Args:
      gate_logits: (C,) gate logits.
      k: number of channels to keep, 1 <= k <= C (Python int or scalar tensor).
      seniority: optional (C,) tie-breaker, larger first (see `promote`).

    Returns:
      (k,) int32 channel indices.
    """
    if seniority is None:
        return tf.math.top_k(gate_logits, k=k, sorted=True).indices
    by_seniority = tf.argsort(seniority, direction="DESCENDING", stable=True)
    ranked = tf.math.top_k(tf.gather(gate_logits, by_seniority), k=k, sorted=True).indices
    return tf.gather(by_seniority, ranked)


def gate_separation(gate_logits, k):
    """min(m) of the k sent channels minus max(m) of the others, m = sigmoid(g)^2.

    Near 1 when the gates have polarized (the sent channels open, the rest closed); near 0 or
    negative when they sit together and the choice of k hangs on small differences.
    """
    ranked = tf.sort(channel_importance(gate_logits), direction="DESCENDING")
    return float(ranked[k - 1] - ranked[k])


COSH_LINEAR_BEYOND = 20.0


def budget_loss(gate_logits, k, eps, delta):
    """eps * (exp(delta*(sum(m) - k)) + exp(-delta*(sum(m) - k))), with m = sigmoid(g)^2.

    A cosh-shaped pull of the soft channel count towards the budget k. Its floor is 2*eps, so report
    it apart from the cross-entropy. Beyond |delta*(sum(m) - k)| = 20 it continues as a straight line
    with cosh's slope there: at the paper's scale (512 open channels, k = 4) the plain formula's
    gradient (~1e22) squares to inf in an optimizer's moments and turns the gates to NaN.
    """
    excess = tf.reduce_sum(channel_importance(gate_logits)) - tf.cast(k, tf.float32)
    z = tf.abs(delta * excess)
    c = COSH_LINEAR_BEYOND
    # Both branches are evaluated; min() keeps the unused cosh finite, and no term cancels another.
    inner = tf.minimum(z, c)
    curve = tf.exp(inner) + tf.exp(-inner)
    line = (math.exp(c) + math.exp(-c)) + (math.exp(c) - math.exp(-c)) * (z - c)
    return eps * tf.where(z <= c, curve, line)


def gate_penalty(gate_logits, k, delta, polarization=0.0):
    """The gates' penalty before its schedule's weight: the budget loss at eps 1, plus
    `polarization` * sum(m * (1 - m)).

    The polarization term is zero only when every gate is fully open or closed: with the sum held
    at k by the budget loss, it pushes k gates open and the rest shut instead of all to k / C.
    """
    penalty = budget_loss(gate_logits, k, 1.0, delta)
    if polarization:
        importance = channel_importance(gate_logits)
        penalty += polarization * tf.reduce_sum(importance * (1.0 - importance))
    return penalty


def deprune_reset(gate_logits, sent, reset_range, rng):
    """Pin the channels the previous phase sent fully open; every other one must earn its place.

    Pinned at the top, the sent channels stay in every larger top-k, so the new phase builds on
    what the previous one learned instead of redrawing its choice (a threshold on the logits finds
    nothing when the budget loss has settled every gate near the same small value).

    Args:
      gate_logits: (C,) array of gate logits.
      sent: indices of the channels the previous phase sent.
      reset_range: the others get a fresh logit uniform in [0, reset_range].
      rng: `np.random.Generator`, so a resumed run redraws the same logits.

    Returns:
      (C,) float32 array of new logits.
    """
    gate_logits = np.asarray(gate_logits, np.float32)
    fresh = rng.uniform(0.0, reset_range, size=gate_logits.shape).astype(np.float32)
    fresh[np.asarray(sent, np.int64)] = GATE_LOGIT_OPEN
    return fresh


def promote(seniority, sent):
    """Seniority after a deprune reset: every channel the ending phase sent gains one.

    A channel kept through more resets ranks first among equal gates (`top_k_channels`), so each
    earlier, smaller selection is a prefix of the later one.
    """
    seniority = np.array(seniority, np.float32)
    seniority[np.asarray(sent, np.int64)] += 1.0
    return seniority


def prune_reset(gate_logits, threshold, reset_range):
    """Close the weak channels for good; the open ones compete again, in the start model's order.

    Open channels (logit >= threshold; all of them when none is) are mapped onto [0, reset_range]
    by an increasing affine map, so they can move again but keep their ranking; all others are
    closed (logit -15).

    Returns:
      (C,) float32 array of new logits.
    """
    gate_logits = np.asarray(gate_logits, np.float32)
    is_open = gate_logits >= threshold
    if not is_open.any():
        is_open[:] = True
    low, high = gate_logits[is_open].min(), gate_logits[is_open].max()
    spread = (gate_logits - low) / (high - low) if high > low else np.ones_like(gate_logits)
    return np.where(is_open, reset_range * spread, GATE_LOGIT_CLOSED).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of training at a fixed budget.

    budget: channels sent per sample position; 0 means no masking (all channels are sent).
    epochs: epochs in this phase.
    learning_rate: base learning rate, set on entering the phase; None leaves the optimizer's
      rate alone, to its `LearningRateSchedule` or to a callback such as `ReduceLROnPlateau`.
    boost_learning_rate, boost_epochs: a higher rate for the first `boost_epochs` epochs.
    anneal_epochs: the last `anneal_epochs` epochs run at a rate falling along a half cosine
      towards 0, so the phase ends on weights that have settled instead of on one noisy step.
      Boost and anneal epochs need a `learning_rate`.
    reset: gate reset applied on entering the phase: "none", "deprune" or "prune".
    reset_threshold: logits >= it count as open (prune keeps those; logged for every reset).
    reset_range: reopened gates start in [0, reset_range].
    """

    budget: int
    epochs: int
    learning_rate: typing.Optional[float]
    boost_learning_rate: float = 0.0
    boost_epochs: int = 0
    anneal_epochs: int = 0
    reset: str = "none"
    reset_threshold: float = 0.9
    reset_range: float = 3.0

    def learning_rate_at(self, epoch_in_phase):
        """The rate this phase asks for in its epoch `epoch_in_phase` (None: none)."""
        if self.learning_rate is None:
            return None
        if epoch_in_phase < self.boost_epochs:
            return self.boost_learning_rate
        annealed = epoch_in_phase - (self.epochs - self.anneal_epochs) + 1
        if annealed > 0:
            return (
                self.learning_rate
                * 0.5
                * (1 + math.cos(math.pi * annealed / (self.anneal_epochs + 1)))
            )
        return self.learning_rate

    def effective_budget(self, channels):
        return channels if self.budget == 0 else self.budget

    def apply_reset(self, gate_logits, sent, rng):
        """The gate logits on entering this phase; `sent`: what the previous phase sent."""
        if self.reset == "deprune":
            return deprune_reset(gate_logits, sent, self.reset_range, rng)
        if self.reset == "prune":
            return prune_reset(gate_logits, self.reset_threshold, self.reset_range)
        return np.asarray(gate_logits, np.float32)


def build_phases(phase_configs, channels, has_bottleneck):
    """Validated `Phase`s from config entries (dicts or ConfigDicts with Phase's fields).

    Raises:
      ValueError: naming the phase and field when a value is out of range, or when a phase masks
        channels but the model has no bottleneck to mask.
    """
    if not phase_configs:
        raise ValueError("The schedule needs at least one phase. Received: phases=[]")
    field_names = {f.name for f in dataclasses.fields(Phase)}
    phases = []
    for number, entry in enumerate(phase_configs, start=1):
        entry = dict(entry)
        unknown = set(entry) - field_names
        if unknown:
            raise ValueError(
                f"Phase {number} has unknown keys {sorted(unknown)}; expected a subset of "
                f"{sorted(field_names)}."
            )
        phase = Phase(**entry)
        _check_phase(phase, number, channels, has_bottleneck)
        phases.append(phase)
    return phases


def _check_phase(phase, number, channels, has_bottleneck):
    def fail(what):
        raise ValueError(f"Phase {number}: {what}. Received: {phase}")

    if not isinstance(phase.budget, (int, np.integer)) or not 0 <= phase.budget <= channels:
        fail(f"budget must be an integer in [0, {channels}] (0 = all channels, no masking)")
    if phase.budget and not has_bottleneck:
        fail("a budget needs the masked bottleneck (model.bottleneck.enabled=True)")
    if phase.reset != "none" and not has_bottleneck:
        fail("a gate reset needs the masked bottleneck")
    if not isinstance(phase.epochs, (int, np.integer)) or phase.epochs < 1:
        fail("epochs must be a positive integer")
    if phase.learning_rate is None:
        if phase.boost_epochs or phase.anneal_epochs:
            fail("boost and anneal epochs need a learning_rate (None leaves the optimizer's alone)")
    elif not phase.learning_rate > 0:
        fail("learning_rate must be > 0, or None to leave the optimizer's rate alone")
    if not 0 <= phase.boost_epochs <= phase.epochs:
        fail("boost_epochs must be in [0, epochs]")
    if phase.boost_epochs and not phase.boost_learning_rate > 0:
        fail("boost_learning_rate must be > 0 when boost_epochs > 0")
    if not 0 <= phase.anneal_epochs <= phase.epochs - phase.boost_epochs:
        fail("anneal_epochs must be in [0, epochs - boost_epochs]")
    if phase.reset not in RESETS:
        fail(f"reset must be one of {RESETS}")
    if not phase.reset_range > 0:
        fail("reset_range must be > 0")
