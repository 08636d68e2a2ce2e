"""The device's phase plan: what `PhaseSchedule` sets on the Keras model each epoch, from the run
description the export wrote (`tfsplit.schedule`'s rules, no TensorFlow)."""

from tfsplit import schedule as schedule_lib
from tfsplit.device.spec import DeviceError


def build_phases(run):
    """The run's validated phases; every one must set its learning rate (the device has no
    optimizer of its own to leave a rate to)."""
    phases = schedule_lib.build_phases(run["phases"], run["channels"], run["masked"])
    for number, phase in enumerate(phases, start=1):
        if phase.learning_rate is None:
            raise DeviceError(
                f"Phase {number} leaves its learning rate to the optimizer; a device without "
                "TensorFlow needs every phase to set one."
            )
    return phases


def epoch_plan(run, phases, epoch, steps_per_epoch):
    """What `PhaseSchedule` sets for the 0-based `epoch`: phase, budget, masking, nesting and
    the rates (the gates' rate in force: the travel rate of the last phase that set one)."""
    number, phase, in_phase = schedule_lib.locate(phases, epoch)
    fraction = run["gate_travel_fraction"]
    masking = phase.budget != 0 and run["masked"]
    gate_rate = run["gate_learning_rate"]
    if run["gate_optimizer"] and fraction:
        for earlier in phases[:number]:
            if earlier.budget:
                gate_rate = schedule_lib.gate_travel_rate(earlier, steps_per_epoch, fraction)
    return dict(
        phase=number,
        budget=phase.effective_budget(run["channels"]),
        learning_rate=phase.learning_rate_at(in_phase),
        gate_learning_rate=float(gate_rate),
        penalty_weight=run["budget_eps"] if masking else 0.0,
        nesting=bool(
            masking
            and run["nested_budgets"]
            and number == len(phases)
            and in_phase >= schedule_lib.nesting_starts(phase, fraction)
        ),
    )
