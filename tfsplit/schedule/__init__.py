"""The phase schedule in numpy: budgets, learning rates and gate resets, epoch by epoch."""

from tfsplit.schedule.phases import (
    GATE_LOGIT_CLOSED,
    GATE_LOGIT_OPEN,
    GATE_TRAVEL,
    RESETS,
    Phase,
    build_phases,
    deprune_reset,
    gate_travel_rate,
    locate,
    nesting_starts,
    promote,
    prune_reset,
)

__all__ = [
    "GATE_LOGIT_CLOSED",
    "GATE_LOGIT_OPEN",
    "GATE_TRAVEL",
    "RESETS",
    "Phase",
    "build_phases",
    "deprune_reset",
    "gate_travel_rate",
    "locate",
    "nesting_starts",
    "promote",
    "prune_reset",
]
