"""Nested budgets (the sandwich rule with in-place distillation): what one model needs to serve
every budget up to the one it was trained for.

`SplitModel` builds a `NestedBudgets` when it is made with `nested_budgets=True` and adds its
`distillation_loss` to the server's loss on the steps where nesting is on.
"""

import tensorflow as tf
import tf_keras as keras

from tfsplit.layers import placement

# The tail's per-channel fill values follow each nested step's means as batch norm's moving
# statistics follow its batches; 0.98 leaves 0.2% of the start after 300 steps (two epochs of the
# embedded set's final phase).
FILL_MOMENTUM = 0.98


class NestedBudgets:
    """The smaller budgets a nested step trains, and the loss that teaches them.

    Args:
      channels: C', the channels at the cut.
      fill: the tail's (C',) fill values (`Decoder.fill`), which this keeps at each channel's mean.
      draws: `tf.random.Generator` of the drawn budgets (the model backs it up with its weights,
        so a resumed run draws the same budgets).
      min_budget_fraction: the smallest nested budget as a fraction of k, in (0, 1] (checked by
        `SplitModel`).
    """

    def __init__(self, channels, fill, draws, min_budget_fraction):
        self.channels = int(channels)
        self.fill = fill
        self.draws = draws
        self.min_budget_fraction = float(min_budget_fraction)

    def budget_range(self, k):
        """(smallest, drawn): the sandwich rule's two smaller budgets below k.

        The drawn budget is log-uniform in [smallest, k]: every halving of the budget is trained
        as often, as the budget curve's points (k/8, k/4, k/2, k) are spaced. Uniform draws spend
        most steps above k/2 and leave the smaller budgets undertrained (measured:
        docs/experiments.md).
        """
        k_float = tf.cast(k, tf.float32)
        scaled = tf.math.ceil(self.min_budget_fraction * k_float)
        smallest = tf.maximum(1, tf.cast(scaled, tf.int32))
        log_k = self.draws.uniform(
            [], tf.math.log(tf.cast(smallest, tf.float32)), tf.math.log(k_float + 1.0)
        )
        drawn = tf.cast(tf.math.floor(tf.exp(log_k)), tf.int32)
        return smallest, tf.clip_by_value(drawn, smallest, k)

    def distillation_loss(self, receive, values, indices, teacher_logits):
        """The tail on prefixes of the sent channels, each taught by the full budget's softmax.

        `receive(values, indices, training, fill)` is the model's server half. Batch norm runs on
        its moving statistics here, so the smaller budgets neither pollute the statistics
        inference uses nor see statistics of their own that inference would lack. The channels a
        prefix leaves out stand in as their mean in this batch, and the tail keeps a moving
        average of it (`Decoder.fill`) for inference at smaller budgets: zeros would be far from
        any value a sent channel takes. The prefixes' losses are averaged, so together they weigh
        as much as the full budget's own; summed, they would outweigh it (measured:
        docs/experiments.md).
        """
        fill = tf.stop_gradient(placement.sent_channel_means(values, indices, self.channels))
        self.fill.assign(
            FILL_MOMENTUM * self.fill + (1.0 - FILL_MOMENTUM) * tf.cast(fill, tf.float32)
        )
        target = tf.nn.softmax(tf.stop_gradient(teacher_logits))
        loss = tf.constant(0.0)
        budgets = self.budget_range(tf.shape(indices)[-1])
        for k in budgets:
            logits = receive(values[..., :k], indices[..., :k], training=False, fill=fill)
            loss += tf.reduce_mean(
                keras.losses.categorical_crossentropy(target, logits, from_logits=True)
            )
        return loss / len(budgets)
