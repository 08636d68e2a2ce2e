"""Split learning (SL) baseline: the plain cut, every channel crosses in float16.

No bottleneck; the device sends the cut activations (and labels) up, the server sends their
gradients down. The reference point for deprune's network savings.

Default (embedded dataset, VGG-11 width 1/4 cut after conv 5, 30 epochs): a few minutes on 2 CPU
cores. Variants (comma-separated, e.g. `:hard,smoke`; see tfsplit/training/config.py):
  paper: VGG-11, CIFAR-10, 40 epochs; a GPU.
  hard, small, local, smoke: the harder embedded set (local classifier at half weight); 1500
    images, 5x epochs; the device-side local classifier (tfsplit/layers/local_classifier.py);
    seconds.

  tfsplit-train --config=configs/sl.py --workdir=/tmp/tfsplit/sl
"""

from tfsplit.training.config import apply_variant, base_config, parse_variants, phase


def get_config(arg=None):
    variants = parse_variants(arg)
    config = base_config("sl")
    # Model: no bottleneck at the cut.
    config.model.bottleneck.enabled = False
    # Schedule: one unmasked phase, as long as deprune's two phases together.
    config.phases = [phase(budget=0, epochs=30, learning_rate=0.02, anneal_epochs=9)]
    if "paper" in variants:
        config.phases = [phase(budget=0, epochs=40, learning_rate=0.01)]
    return apply_variant(config, arg)
