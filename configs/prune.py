"""Prune (transfer learning): start from an unmasked model, close channels, fine-tune at a budget.

By default the run first trains its own starting model (an unmasked phase with the bottleneck in
place), then the prune reset closes every weak gate and the open ones compete for budget 32 over 6
epochs, at a learning rate falling from 0.01 to 0 over all six (no boost: the start model has
learned already, and a boost only shakes it; see docs/experiments.md). To start from an earlier
run instead, drop the first phase with the `:finetune` variant and point `init_from` at that run's
workdir:

  tfsplit-train --config=configs/sl.py --config.model.bottleneck.enabled=True \
      --workdir=/tmp/tfsplit/start
  tfsplit-train --config=configs/prune.py:finetune --config.init_from=/tmp/tfsplit/start \
      --workdir=/tmp/tfsplit/prune

Default (embedded dataset, 30 + 6 epochs): a few minutes on 2 CPU cores. Variants (comma-separated,
e.g. `:steps,smoke`; see tfsplit/training/config.py):
  paper: VGG-11, CIFAR-10; 20 epochs SGD 1e-3 momentum 0.9, then budget 16 for 5; a GPU.
  steps: the research code's prune 32 -> 4: 30 epochs, 4 at 32, 4 at 4 (paper 30, 10, 10).
  finetune: drops the pretraining phase (start from `init_from`).
  hard, small, local, smoke: the harder embedded set (local classifier at half weight); 1500
    images, 5x epochs; the device-side local classifier (tfsplit/layers/local_classifier.py);
    seconds.

  tfsplit-train --config=configs/prune.py --workdir=/tmp/tfsplit/prune
"""

from tfsplit.training.config import apply_variant, base_config, parse_variants, phase

METHOD_VARIANTS = ("finetune", "steps")


def prune_phases(
    pretrain_epochs,
    pretrain_anneal_epochs,
    pretrain_learning_rate,
    steps,
    learning_rate,
    boost_epochs,
    anneal_epochs,
):
    """Unmasked pretraining, the prune reset into the first (budget, epochs) step, then the rest.

    The later steps keep the gates as they are (no reset): the open ones compete for less. The
    last phase anneals its learning rate over its last `anneal_epochs` epochs.
    """
    (budget, epochs), *later = steps
    phases = [
        phase(
            budget=0,
            epochs=pretrain_epochs,
            learning_rate=pretrain_learning_rate,
            anneal_epochs=pretrain_anneal_epochs,
        ),
        phase(
            budget=budget,
            epochs=epochs,
            learning_rate=learning_rate,
            boost_epochs=boost_epochs,
            reset="prune",
            reset_threshold=0.9,
            reset_range=3.0,
        ),
    ]
    phases += [phase(budget=b, epochs=e, learning_rate=learning_rate) for b, e in later]
    phases[-1].anneal_epochs = anneal_epochs
    return phases


def get_config(arg=None):
    variants = parse_variants(arg, METHOD_VARIANTS)
    config = base_config("prune")
    # Schedule: unmasked pretraining (a start model trained as long as SL), then prune. By
    # (paper, steps): (pretraining epochs, its anneal epochs and learning rate, [(budget, epochs),
    # ...], learning rate, boost epochs, anneal epochs).
    schedules = {
        (False, False): (30, 9, 0.02, [(32, 6)], 0.01, 0, 6),
        (False, True): (30, 9, 0.02, [(32, 4), (4, 4)], 0.02, 2, 2),
        (True, False): (20, 0, 0.001, [(16, 5)], 0.01, 2, 0),
        (True, True): (30, 0, 0.001, [(32, 10), (4, 10)], 0.01, 2, 0),
    }
    config.phases = prune_phases(*schedules["paper" in variants, "steps" in variants])
    if "finetune" in variants:  # the starting model comes from `init_from`.
        config.phases = config.phases[1:]
    config = apply_variant(config, arg, METHOD_VARIANTS)
    if "paper" in variants:
        config.optimizer.momentum = 0.9  # the reference pretrains with momentum 0.9.
    return config
