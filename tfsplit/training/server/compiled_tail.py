"""The tail's compiled step functions on the server, each traced once for any batch and budget.

A trace per new shape would grow the server's memory with every batch size a device (or an
attacker) sends. `compute` returns a training step's gradients, loss and reply values without
changing the tail's weights; `apply` then updates them, and `put_back` undoes what `compute`'s
forward pass changed (batch norm's moving statistics, the nested budgets' fill and draws) when
the step is refused.
"""

import functools

import tensorflow as tf


class CompiledTail:
    """`compute[rank]`, `apply` and `forward(values, indices, training)` of `split`'s tail.

    The rank of the indices picks the placement: (k,) for a device's step, (N, k) for devices'
    steps batched (a selection per sample).
    """

    def __init__(self, split):
        variables = split.tail.trainable_variables
        split.optimizer.build(variables)  # its slots exist before the first (compiled) update
        # What the forward pass itself changes (batch norm's moving statistics, the nested
        # budgets' fill and draws): kept before each step, put back if the step fails.
        changed = list(split.tail.non_trainable_variables) + [split.budget_draws.state]
        if split.nesting is not None:
            changed.append(split.nesting.fill)
        self._changed = list({id(v): v for v in changed}.values())
        self._kept = [tf.Variable(v, trainable=False) for v in self._changed]

        def compute(values, indices, labels, gradient_scale, learning_rate, nesting):
            for kept, variable in zip(self._kept, self._changed):
                kept.assign(variable)
            split.step_nesting.assign(nesting)
            with tf.GradientTape() as tape:
                tape.watch(values)
                loss, logits = split.server_loss(None, labels, values, indices)
            tail_gradients, value_gradient = tape.gradient(loss, [variables, values])
            norm = tf.linalg.global_norm([g for g in tail_gradients if g is not None])
            # The update is finite: a finite loss, gradient and rate times gradient.
            finite = tf.reduce_all(tf.math.is_finite([loss, norm, learning_rate * norm]))
            scaled = value_gradient * gradient_scale[:, None, None, None]
            return tail_gradients, scaled, logits, loss, finite

        def apply(tail_gradients, learning_rate):
            split.optimizer.learning_rate.assign(learning_rate)
            split.optimizer.apply_gradients(zip(tail_gradients, variables))

        height, width = split.tail.input.shape[1:3]
        values = tf.TensorSpec([None, height, width, None], tf.float32)
        per_sample = tf.TensorSpec([None], tf.float32)
        scalar_rate, flag = tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.bool)
        labels = tf.TensorSpec([None], tf.int32)
        self.compute = {
            rank: tf.function(
                compute,
                input_signature=[
                    values,
                    tf.TensorSpec([None] * rank, tf.int32),
                    labels,
                    per_sample,
                    scalar_rate,
                    flag,
                ],
            )
            for rank in (1, 2)
        }
        self.apply = tf.function(apply, reduce_retracing=True)  # one shape: the tail's weights
        forwards = {
            training: tf.function(
                functools.partial(split.receive, training=training),
                input_signature=[values, tf.TensorSpec([None], tf.int32)],
            )
            for training in (False, True)
        }
        self.forward = lambda values, indices, training: forwards[bool(training)](values, indices)

    def put_back(self):
        """What the last `compute` changed in its forward pass, as it was before."""
        for kept, variable in zip(self._kept, self._changed):
            variable.assign(kept)
