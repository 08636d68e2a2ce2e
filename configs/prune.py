"""Prune (transfer learning): start from an unmasked model, close channels, fine-tune at a budget.

By default the run first trains its own starting model (an unmasked phase with the bottleneck in
place), then the prune reset closes every weak gate and the open ones compete for budget 32 over 3
epochs (learning-rate boost in the first). To start from an earlier run instead, drop the first
phase with the `:finetune` variant and point `init_from` at that run's workdir:

  tfsplit-train --config=configs/sl.py --config.model.bottleneck.enabled=True \
      --workdir=/tmp/tfsplit/start
  tfsplit-train --config=configs/prune.py:finetune --config.init_from=/tmp/tfsplit/start \
      --workdir=/tmp/tfsplit/prune

Default (embedded dataset, 6 + 3 epochs): a few minutes on 2 CPU cores. Variants: `:smoke`,
`:finetune` and `:paper` (VGG-11, CIFAR-10; pretraining with SGD 1e-3 momentum 0.9, then budget 16
for 5 epochs; a GPU).

  tfsplit-train --config=configs/prune.py --workdir=/tmp/tfsplit/prune
"""

from tfsplit.config import apply_variant, base_config, phase


def get_config(arg=None):
    config = base_config("prune")
    pretrain = phase(budget=0, epochs=6, learning_rate=0.02)
    finetune = [
        phase(
            budget=32,
            epochs=3,
            learning_rate=0.02,
            boost_learning_rate=0.05,
            boost_epochs=1,
            reset="prune",
            reset_threshold=0.9,
            reset_range=3.0,
        )
    ]
    if arg == "paper":
        pretrain = phase(budget=0, epochs=20, learning_rate=0.001)
        finetune = [
            phase(
                budget=16,
                epochs=5,
                learning_rate=0.01,
                boost_learning_rate=0.05,
                boost_epochs=2,
                reset="prune",
                reset_threshold=0.9,
                reset_range=3.0,
            )
        ]
    # Schedule: unmasked pretraining (unless starting from `init_from`), then prune.
    config.phases = finetune if arg == "finetune" else [pretrain] + finetune
    config = apply_variant(config, "" if arg == "finetune" else arg or "")
    if arg == "paper":
        config.optimizer.momentum = 0.9  # the reference pretrains with momentum 0.9.
    return config
