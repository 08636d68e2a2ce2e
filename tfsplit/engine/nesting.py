"""Nested budgets (the sandwich rule with in-place distillation): what one model needs to serve
every budget up to the one it was trained for. Mixed into `tfsplit.SplitModel`, whose `send`,
`receive`, `decoder`, `channels`, `min_budget_fraction` and `budget_draws` it uses.
"""

import tensorflow as tf
import tf_keras as keras

from tfsplit.layers import placement

# The tail's per-channel fill values follow each nested step's means as batch norm's moving
# statistics follow its batches; 0.98 leaves 0.2% of the start after 300 steps (two epochs of the
# embedded set's final phase).
FILL_MOMENTUM = 0.98


class NestedBudgets:
    """The smaller budgets a nested step trains, and the loss that teaches them."""

    def nested_budget_range(self, k):
        """(smallest, drawn): the sandwich rule's two smaller budgets below k.

        The drawn budget is log-uniform in [smallest, k]: every halving of the budget is trained
        as often, as the budget curve's points (k/8, k/4, k/2, k) are spaced. Uniform draws spent
        16 of 29 steps above k/2; on 1,500 images the model then fell to 70.75% at k/4 (79.40%
        log-uniform) against CA-SL's 88.15%.
        """
        k_float = tf.cast(k, tf.float32)
        scaled = tf.math.ceil(self.min_budget_fraction * k_float)
        smallest = tf.maximum(1, tf.cast(scaled, tf.int32))
        log_k = self.budget_draws.uniform(
            [], tf.math.log(tf.cast(smallest, tf.float32)), tf.math.log(k_float + 1.0)
        )
        drawn = tf.cast(tf.math.floor(tf.exp(log_k)), tf.int32)
        return smallest, tf.clip_by_value(drawn, smallest, k)

    def distillation_loss(self, values, indices, teacher_logits):
        """The tail on prefixes of the sent channels, each taught by the full budget's softmax.

        Batch norm runs on its moving statistics here, so the smaller budgets neither pollute
        the statistics inference uses nor see statistics of their own that inference would lack.
        The channels a prefix leaves out stand in as their mean in this batch, and the tail keeps
        a moving average of it (`Decoder.fill`) for inference at smaller budgets: with zeros
        instead, one channel more or less in a prefix cost up to 25 points on 1,500 images.
        The prefixes' losses are averaged, so together they weigh as much as the full budget's
        own: summed, they outweighed it two to one, and nesting cost 1.57 points at the full
        budget on the embedded set (0.42 averaged; README).
        """
        fill = tf.stop_gradient(placement.sent_channel_means(values, indices, self.channels))
        self.decoder.fill.assign(
            FILL_MOMENTUM * self.decoder.fill + (1.0 - FILL_MOMENTUM) * tf.cast(fill, tf.float32)
        )
        target = tf.nn.softmax(tf.stop_gradient(teacher_logits))
        loss = tf.constant(0.0)
        budgets = self.nested_budget_range(tf.shape(indices)[-1])
        for k in budgets:
            logits = self.receive(values[..., :k], indices[..., :k], training=False, fill=fill)
            loss += tf.reduce_mean(
                keras.losses.categorical_crossentropy(target, logits, from_logits=True)
            )
        return loss / len(budgets)
