"""Deprune: train cheaply at a small budget, then reopen channels and finish at a larger one.

Phase 1 sends 8 of 128 bottleneck channels for 6 epochs; on entering phase 2 the de-prune reset
pins the open gates and reopens the rest, which train at budget 32 for 4 epochs with a
learning-rate boost in the first epoch. Compare with configs/sl.py (same epochs, all channels) and
configs/casl.py (budget 32 throughout).

Default (embedded dataset, 10 epochs): a few minutes on 2 CPU cores. Variants: `:smoke`
(seconds) and `:paper` (VGG-11, CIFAR-10, budget 4 -> 16 of 512 channels, 25 + 15 epochs, SGD
1e-2 with a 5e-2 boost for 3 epochs, batch 16; a GPU).

  tfsplit-train --config=configs/deprune.py --workdir=/tmp/tfsplit/deprune
"""

from tfsplit.config import apply_variant, base_config, phase


def get_config(arg=None):
    config = base_config("deprune")
    # Schedule: small budget first, then the de-prune reset and a larger budget.
    config.phases = [
        phase(budget=8, epochs=6, learning_rate=0.02),
        phase(
            budget=32,
            epochs=4,
            learning_rate=0.02,
            boost_learning_rate=0.05,
            boost_epochs=1,
            reset="deprune",
            reset_threshold=0.9,
            reset_range=3.0,
        ),
    ]
    if arg == "paper":
        config.phases = [
            phase(budget=4, epochs=25, learning_rate=0.01),
            phase(
                budget=16,
                epochs=15,
                learning_rate=0.01,
                boost_learning_rate=0.05,
                boost_epochs=3,
                reset="deprune",
                reset_threshold=0.9,
                reset_range=3.0,
            ),
        ]
    return apply_variant(config, arg or "")
