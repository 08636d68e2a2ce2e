"""Phase schedules and the gate resets between phases, in numpy: what both trainers follow.

The Keras trainer (`tfsplit.callbacks.PhaseSchedule`) and the device that trains without
TensorFlow (`tfsplit.device.training`) walk the same phases epoch by epoch: the budget and
learning rate of each epoch, the reset on entering a phase, when nested budgets start and the
gates' travel rate.
"""

import dataclasses
import math
import typing

import numpy as np

GATE_LOGIT_OPEN = 15.0  # sigmoid(15) = 1 - 3e-7: a channel that is pinned fully open.
GATE_LOGIT_CLOSED = -15.0
# Logit distance a gate may have to cover in a masked phase: from fully open to undecided.
GATE_TRAVEL = GATE_LOGIT_OPEN
RESETS = ("none", "deprune", "prune")


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


def locate(phases, epoch):
    """(phase number from 1, its Phase, epoch within the phase) of a 0-based `epoch`."""
    start = 0
    for number, phase in enumerate(phases, start=1):
        if epoch < start + phase.epochs:
            return number, phase, epoch - start
        start += phase.epochs
    raise ValueError(
        f"The schedule has {start} epochs; fit asked for epoch {epoch + 1}. Pass "
        "epochs=schedule.epochs to fit."
    )


def nesting_starts(phase, gate_travel_fraction):
    """The epoch of the final `phase` from which nested budgets train.

    Nested budgets serve the deployed budget, once its channels are chosen: after the phase's
    boost epochs and the gates' travel. While the selection still moves, its prefixes are not the
    ones inference will send (measured: docs/experiments.md).
    """
    return max(phase.boost_epochs, math.ceil(gate_travel_fraction * phase.epochs))


def gate_travel_rate(phase, steps_per_epoch, gate_travel_fraction):
    """The gate optimizer's rate at which a gate crosses `GATE_TRAVEL` logits within
    `gate_travel_fraction` of the phase's steps, so gates move at a pace set in epochs."""
    return GATE_TRAVEL / (phase.epochs * steps_per_epoch * gate_travel_fraction)
