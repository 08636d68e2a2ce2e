"""Channel budgets: top-k selection, the budget loss and the gates' separation, in TensorFlow.

A budget k says how many bottleneck channels may cross the cut. The k channels with the largest
importance `sigmoid(g)^2` are sent; ties go to the channel kept through more deprune resets (its
seniority), then to the lower channel index, so device and server always agree and exactly k
channels cross (never more, unlike a threshold from a partition).
"""

import math

import tensorflow as tf

# What a phase schedule is, and the gate resets between phases, need no TensorFlow: a device that
# trains without it follows the same schedule.
from tfsplit.schedule.phases import (  # noqa: F401  (part of this module's API)
    RESETS,
    Phase,
    build_phases,
    deprune_reset,
    promote,
    prune_reset,
)


def channel_importance(gate_logits):
    return tf.square(tf.sigmoid(gate_logits))


def top_k_channels(gate_logits, k, seniority=None):
    """Indices of the k most important channels, most important first.

    Ranked by the logits themselves: importance sigmoid(g)^2 is monotonic in g, so the order is the
    same, but in float32 it rounds to exactly 1.0 for every g above ~16 and ties gates that the
    logits still tell apart. Polarized gates do tie, at the top logit; among them the more senior
    channel comes first, so after deprune's reset the channels of the smaller budget stay a prefix
    of the larger selection (what nested budgets send at smaller budgets). Remaining ties go to the
    lower index (`tf.math.top_k` and a stable sort are documented to keep it first), which makes
    the choice deterministic and identical on device and server.

    Args:
      gate_logits: (C,) gate logits.
      k: number of channels to keep, 1 <= k <= C (Python int or scalar tensor).
      seniority: optional (C,) tie-breaker, larger first (see `promote`).

    Returns:
      (k,) int32 channel indices.
    """
    if seniority is None:
        return tf.math.top_k(gate_logits, k=k, sorted=True).indices
    by_seniority = tf.argsort(seniority, direction="DESCENDING", stable=True)
    ranked = tf.math.top_k(tf.gather(gate_logits, by_seniority), k=k, sorted=True).indices
    return tf.gather(by_seniority, ranked)


def gate_separation(gate_logits, k):
    """min(m) of the k sent channels minus max(m) of the others, m = sigmoid(g)^2.

    Near 1 when the gates have polarized (the sent channels open, the rest closed); near 0 or
    negative when they sit together and the choice of k hangs on small differences.
    """
    ranked = tf.sort(channel_importance(gate_logits), direction="DESCENDING")
    return float(ranked[k - 1] - ranked[k])


COSH_LINEAR_BEYOND = 20.0


def budget_loss(gate_logits, k, eps, delta):
    """eps * (exp(delta*(sum(m) - k)) + exp(-delta*(sum(m) - k))), with m = sigmoid(g)^2.

    A cosh-shaped pull of the soft channel count towards the budget k. Its floor is 2*eps, so report
    it apart from the cross-entropy. Beyond |delta*(sum(m) - k)| = 20 it continues as a straight line
    with cosh's slope there: at the paper's scale (512 open channels, k = 4) the plain formula's
    gradient (~1e22) squares to inf in an optimizer's moments and turns the gates to NaN.
    """
    excess = tf.reduce_sum(channel_importance(gate_logits)) - tf.cast(k, tf.float32)
    z = tf.abs(delta * excess)
    c = COSH_LINEAR_BEYOND
    # Both branches are evaluated; min() keeps the unused cosh finite, and no term cancels another.
    inner = tf.minimum(z, c)
    curve = tf.exp(inner) + tf.exp(-inner)
    line = (math.exp(c) + math.exp(-c)) + (math.exp(c) - math.exp(-c)) * (z - c)
    return eps * tf.where(z <= c, curve, line)


def gate_penalty(gate_logits, k, delta, polarization=0.0):
    """The gates' penalty before its schedule's weight: the budget loss at eps 1, plus
    `polarization` * sum(m * (1 - m)).

    The polarization term is zero only when every gate is fully open or closed: with the sum held
    at k by the budget loss, it pushes k gates open and the rest shut instead of all to k / C.
    """
    penalty = budget_loss(gate_logits, k, 1.0, delta)
    if polarization:
        importance = channel_importance(gate_logits)
        penalty += polarization * tf.reduce_sum(importance * (1.0 - importance))
    return penalty
