"""`PhaseSchedule`: SL, CA-SL, deprune and prune as one list of phases walked epoch by epoch.

Each epoch the schedule does a few separate jobs, each a function or small class here: find the
epoch's phase (`locate`), reset the gates on entering a phase (`reset_gates`), turn nested budgets
on once the final phase's channels are chosen (`nesting_starts`), and set the rates the phase asks
for (`RateSetter`, with `gate_travel_rate` for a gate optimizer). `PhaseSchedule` composes them and
puts what it did in the epoch's logs (`epoch_logs`).
"""

import numpy as np
import tf_keras as keras
from absl import logging

from tfsplit.engine import budget as budget_lib
from tfsplit.schedule.phases import (  # noqa: F401
    GATE_TRAVEL,
    gate_travel_rate,
    locate,
    nesting_starts,
)


def reset_gates(model, number, phase, seed):
    """Applies `phase`'s gate reset on entering it (phase `number`); returns what the logs get."""
    encoder = model.encoder
    if encoder is None or phase.reset == "none":
        return {}
    before = encoder.gate_logits.numpy()
    sent = model.channel_indices().numpy()  # at the budget of the phase that ends
    rng = np.random.default_rng([seed, number])
    encoder.gate_logits.assign(phase.apply_reset(before, sent, rng))
    if phase.reset == "deprune":
        encoder.seniority.assign(budget_lib.promote(encoder.seniority.numpy(), sent))
    open_count = int(np.sum(before >= phase.reset_threshold))
    logging.info(
        "Phase %d: %s reset after sending %d channels; %d of %d gates were open (logit >= %g)",
        number,
        phase.reset,
        sent.size,
        open_count,
        before.size,
        phase.reset_threshold,
    )
    return dict(gates_open_at_reset=open_count)


def learning_rate_schedule(optimizer):
    """The optimizer's `LearningRateSchedule`, or None when its rate is a value."""
    # tf_keras's optimizers hand out the schedule's last value as `learning_rate`; the schedule
    # itself is `_learning_rate` (the legacy optimizers give the schedule as `learning_rate`).
    for rate in (getattr(optimizer, "_learning_rate", None), optimizer.learning_rate):
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return rate
    return None


def current_learning_rate(optimizer):
    """The rate the optimizer's next step uses."""
    schedule = learning_rate_schedule(optimizer)
    if schedule is not None:
        return float(keras.backend.get_value(schedule(optimizer.iterations)))
    return float(keras.backend.get_value(optimizer.learning_rate))


class RateSetter:
    """Sets an optimizer's learning rate where a phase asks for one, and only then.

    The asked rate is written on entering a phase (or at the start of `fit`) and when it changes
    within the phase (from the boost epochs to the base rate, through the annealing epochs); on
    the epochs in between the rate is left alone, so that what else moves it (`ReduceLROnPlateau`)
    sticks. A phase that asks for none leaves it to the optimizer's schedule or to callbacks.
    """

    def __init__(self):
        self.asked = None  # the rate last written, None when none was

    def restart(self):
        """At the start of `fit`: the next asked rate is written whatever it is."""
        self.asked = None

    def apply(self, optimizer, rate, entering):
        """Writes `rate` (None: nothing) when `entering` a phase or it changed; returns the rate
        in force, as asked when the optimizer holds it."""
        if rate is None:
            self.asked = None
            return current_learning_rate(optimizer)
        if entering or rate != self.asked:
            keras.backend.set_value(optimizer.learning_rate, rate)
            self.asked = rate
        current = current_learning_rate(optimizer)
        return rate if np.float32(current) == np.float32(rate) else current


def check_settable(optimizer, what, remedy):
    """Fails when the phases ask for a rate but `optimizer`'s rate is a `LearningRateSchedule`."""
    if learning_rate_schedule(optimizer) is not None:
        raise ValueError(
            f"The {what}'s learning rate is a LearningRateSchedule, which sets it at every step, "
            f"but the phase schedule asks for rates of its own. Either {remedy}, or give the "
            f"{what} a float learning rate."
        )


def epoch_logs(model, current):
    """What an epoch's logs gain: what the schedule did, the soft channel count and, in a masked
    phase, the gates' separation."""
    logs = dict(current, soft_channels=model.soft_channels())
    if model.encoder is not None and current["budget"] < model.channels:
        logs["gate_separation"] = budget_lib.gate_separation(
            model.encoder.gate_logits, current["budget"]
        )
    return logs


def _as_dict(phase):
    if isinstance(phase, budget_lib.Phase):
        return vars(phase)
    return dict(phase)


class PhaseSchedule(keras.callbacks.Callback):
    """Sets each epoch's budget and learning rate, and resets the gates on entering a phase.

    Args:
      phases: `tfsplit.Phase`s, or dicts / ConfigDicts with its fields, in order; budget 0 sends
        every channel without the budget loss. A phase's `learning_rate` is set on entering it
        and where its boost or annealing epochs change it, never in between (so
        `ReduceLROnPlateau` can lower it within the phase); None leaves the optimizer's rate to
        its `LearningRateSchedule` or to other callbacks.
      seed: seeds the gate resets, so a resumed run redraws the same logits.
      gate_travel_fraction: when > 0 and the model has a gate optimizer, its learning rate in a
        masked phase is set so that a gate can cross `GATE_TRAVEL` logits within this fraction of
        the phase's steps: the gates then move at a pace set in epochs, whatever the dataset's
        size (a fixed per-step rate takes most of a short phase on a small dataset).

    Use `epochs` as `fit`'s epochs. Each epoch's logs gain `phase`, `budget`, `learning_rate` (the
    rate in force at the epoch's start), `soft_channels`, `gate_separation` (masked phases) and, on
    a reset, `gates_open_at_reset`.

    Raises:
      ValueError: at the start of `fit`, when a phase asks for a rate but the optimizer's rate is
        a `LearningRateSchedule`.
    """

    def __init__(self, phases, seed=0, gate_travel_fraction=0.0):
        super().__init__()
        if not 0.0 <= gate_travel_fraction <= 1.0:
            raise ValueError(
                f"`gate_travel_fraction` must be in [0, 1]. Received: {gate_travel_fraction!r}"
            )
        self.phase_configs = list(phases)
        self.seed = seed
        self.gate_travel_fraction = gate_travel_fraction
        self.phases = None
        self.epochs = sum(int(dict(p)["epochs"]) for p in map(_as_dict, self.phase_configs))
        self.rates, self.gate_rates = RateSetter(), RateSetter()
        self._entered = None  # the phase this fit last entered
        self._current = None

    def set_model(self, model):
        super().set_model(model)
        self.phases = budget_lib.build_phases(
            [_as_dict(p) for p in self.phase_configs], model.channels, model.encoder is not None
        )

    def locate(self, epoch):
        """(phase number from 1, its Phase, epoch within the phase) of a 0-based `epoch`."""
        return locate(self.phases, epoch)

    def _drives_gate_rate(self, phase):
        has_gate_optimizer = self.model.gate_optimizer is not None
        return bool(self.gate_travel_fraction and has_gate_optimizer and phase.budget)

    def on_train_begin(self, logs=None):
        if any(phase.learning_rate is not None for phase in self.phases):
            check_settable(self.model.optimizer, "optimizer", "give every phase learning_rate=None")
        if any(self._drives_gate_rate(phase) for phase in self.phases):
            check_settable(
                self.model.gate_optimizer, "gate optimizer", "use gate_travel_fraction=0"
            )
        self.rates.restart()
        self.gate_rates.restart()
        self._entered = None

    def on_epoch_begin(self, epoch, logs=None):
        number, phase, epoch_in_phase = self.locate(epoch)
        model = self.model
        entering, self._entered = number != self._entered, number
        reset = {}
        if int(model.phase.numpy()) != number:  # not on resuming inside a phase
            reset = reset_gates(model, number, phase, self.seed)
            model.phase.assign(number)
        k = phase.effective_budget(model.channels)
        nesting = number == len(self.phases) and epoch_in_phase >= nesting_starts(
            phase, self.gate_travel_fraction
        )
        model.set_budget(k, masking=phase.budget != 0, nesting=nesting)
        rate = self.rates.apply(model.optimizer, phase.learning_rate_at(epoch_in_phase), entering)
        self._current = dict(phase=number, budget=k, learning_rate=rate, **reset)
        if self._drives_gate_rate(phase):
            gate_rate = gate_travel_rate(phase, self.params["steps"], self.gate_travel_fraction)
            self.gate_rates.apply(model.gate_optimizer, gate_rate, entering)
            self._current["gate_learning_rate"] = gate_rate

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            logs.update(epoch_logs(self.model, self._current))
