"""Compression-aware split learning (CA-SL): the masked bottleneck at one fixed budget throughout.

The second baseline: trained from scratch at deprune's final budget for deprune's total epochs.

Default (embedded dataset, budget 32 of 128 channels, 30 epochs): a few minutes on 2 CPU cores.
Variants (comma-separated, e.g. `:hard,smoke`; see tfsplit/training/config.py):
  paper: VGG-11, CIFAR-10, budget 16 of 512, 40 epochs; a GPU.
  hard, small, local, smoke: the harder embedded set (local classifier at half weight); 1500
    images, 5x epochs; the device-side local classifier (tfsplit/layers/local_classifier.py);
    seconds.

  tfsplit-train --config=configs/casl.py --workdir=/tmp/tfsplit/casl
"""

from tfsplit.training.config import apply_variant, base_config, parse_variants, phase


def get_config(arg=None):
    variants = parse_variants(arg)
    config = base_config("casl")
    # Schedule: one phase at the final budget from the first step.
    config.phases = [phase(budget=32, epochs=30, learning_rate=0.02, anneal_epochs=9)]
    if "paper" in variants:
        config.phases = [phase(budget=16, epochs=40, learning_rate=0.01)]
    return apply_variant(config, arg)
