"""The validation split: a seeded fraction of a training set, held out and never trained on.

Every source takes it the same way, with or without TensorFlow: the in-memory sets, an image
folder's listed training files, and `tfsplit-prepare-data`, which writes it as shards of its own.
Choices (schedules, targets, the "best" of anything) are made on it; the test set is evaluated
once, at the end of a run.
"""

import numbers

import numpy as np

VALIDATION_FRACTION = 0.1  # The configs' default share of the training set.


def check_validation_fraction(fraction):
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not 0 <= fraction < 1
    ):
        raise ValueError(
            "`validation_fraction` must be a number in [0, 1): the share of the training set "
            f"held out for validation (0: none). Received: {fraction!r}"
        )


def held_out(count, fraction, seed):
    """(kept, held) sorted indices of `count` training items: `held` is round(count x
    `fraction`) of them (at least 1 when `fraction` > 0), drawn with `seed`; both keep the
    stored order.

    Raises:
      ValueError: on a bad fraction or seed, or a set too small to keep anything to train on.
    """
    check_validation_fraction(fraction)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0. Received: {seed!r}")
    size = 0 if fraction == 0 else max(1, round(count * fraction))
    if size >= count and size:
        raise ValueError(
            f"Holding out {fraction:g} of {count} training samples for validation leaves none "
            "to train on; lower `validation_fraction` or use more samples."
        )
    # Its own stream of the seed, apart from the shuffling and the synthetic set's draws.
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x7A11,)))
    held = np.sort(order.permutation(count)[:size])
    kept = np.setdiff1d(np.arange(count), held, assume_unique=True)
    return kept, held
