"""The tail's compiled step functions on the server, each traced once for any batch and budget.

A trace per new shape would grow the server's memory with every batch size a device (or an
attacker) sends. `compute` returns a training step's gradients, loss and reply values without
changing the tail's weights; `apply` then updates them, and `put_back` undoes what `compute`'s
forward pass changed (batch norm's moving statistics, the nested budgets' fill and draws) when
the step is refused. For a U-shaped split the tail is the middle: a step's targets are the top's
gradient at the middle's output rather than labels, and `forward_unchanged` gives the output a
training step's forward pass computes, changing nothing.
"""

import functools
import time

import tensorflow as tf
from absl import logging

from tfsplit.engine import randomness
from tfsplit.layers import batch_norm
from tfsplit.training.server import distributed


class CompiledTail:
    """`compute[rank]`, `apply`, `forward(values, indices, training)` and
    `forward_unchanged[rank]` of `split`'s tail.

    The rank of the indices picks the placement: (k,) for a device's step, (N, k) for devices'
    steps batched (a selection per sample). Under a `strategy` (made in its scope, as the
    split), a training step's batch is split across its replicas (`distributed`); the forward
    passes (evaluation, calibration, a U-shaped FORWARD) run whole.
    """

    def __init__(self, split, draws=(), strategy=None):
        variables = split.tail.trainable_variables
        split.optimizer.build(variables)  # its slots exist before the first (compiled) update
        # What the forward pass itself changes (batch norm's moving statistics, the nested
        # budgets' fill and draws, the dropout's `draws`): kept before each step, put back if
        # the step fails.
        draw_states = randomness.states([split.budget_draws, *draws])
        changed = list(split.tail.non_trainable_variables) + draw_states
        if split.nesting is not None:
            changed.append(split.nesting.fill)
        self._changed = list({id(v): v for v in changed}.values())
        self._kept = [tf.Variable(v, trainable=False) for v in self._changed]

        ushaped = hasattr(split, "top")

        def loss_and_outputs(values, indices, targets, gradient_scale):
            if not ushaped:
                return split.server_loss(None, targets, values, indices)
            # U-shaped: the targets are the top's gradient at the middle's output. <output, g>
            # has the middle's gradient for that upstream gradient; each step of a joined batch
            # weighs by its share of the batch (1 / scale), as the plain split's mean loss does.
            output = split.middle_output(values, indices, training=True)
            share = tf.reshape(1.0 / gradient_scale, [-1] + [1] * (len(output.shape) - 1))
            return tf.reduce_sum(output * targets * share), output

        def gradients(values, indices, targets, gradient_scale, weight=1.0):
            """(tail gradients, value gradient, outputs, loss) of `weight` times the loss."""
            with tf.GradientTape() as tape:
                tape.watch(values)
                loss, outputs = loss_and_outputs(values, indices, targets, gradient_scale)
                loss *= weight
            tail_gradients, value_gradient = tape.gradient(loss, [variables, values])
            return tail_gradients, value_gradient, outputs, loss

        def replica_gradients(values, indices, targets, gradient_scale):
            """A replica's part of the batch; the sums and the joins are the whole batch's."""
            batch = tf.shape(values)[0]
            begin, end, copied = distributed.replica_part(batch)
            if indices.shape.rank == 2:  # a selection per sample
                indices = indices[begin:end]
            # The whole batch's mean loss is the sum of each part's mean weighted by its share
            # (Keras divides each replica's mean by the replicas: undone here); copies of the
            # whole batch keep Keras's division, and together weigh one.
            replicas = tf.cast(distributed.replicas_in_sync(), tf.float32)
            share = tf.cast(end - begin, tf.float32) / tf.cast(batch, tf.float32)
            weight = tf.where(copied, 1.0, share * replicas)
            tail_gradients, value_gradient, outputs, loss = gradients(
                values[begin:end], indices, targets[begin:end], gradient_scale[begin:end], weight
            )
            value_gradient = distributed.joined(value_gradient, batch, copied, add_copies=True)
            outputs = distributed.joined(outputs, batch, copied, add_copies=False)
            tail_gradients, (loss,) = distributed.summed(tail_gradients), distributed.summed([loss])
            return tail_gradients, value_gradient, outputs, loss

        def compute(values, indices, targets, gradient_scale, learning_rate, nesting):
            self._keep()
            split.step_nesting.assign(nesting)
            inputs = (values, indices, targets, gradient_scale)
            if strategy is None:
                results = gradients(*inputs)
            else:
                results = distributed.first_result(
                    strategy, strategy.run(replica_gradients, args=inputs)
                )
            tail_gradients, value_gradient, outputs, loss = results
            norm = tf.linalg.global_norm([g for g in tail_gradients if g is not None])
            # The update is finite: a finite loss, gradient and rate times gradient.
            finite = tf.reduce_all(tf.math.is_finite([loss, norm, learning_rate * norm]))
            scaled = value_gradient * gradient_scale[:, None, None, None]
            return tail_gradients, scaled, outputs, loss, finite

        def apply(tail_gradients, learning_rate):
            split.optimizer.learning_rate.assign(learning_rate)
            if strategy is None:
                split.optimizer.apply_gradients(zip(tail_gradients, variables))
                return
            # Every replica holds the summed gradients: each updates its copy, adding nothing.
            strategy.run(
                lambda summed: split.optimizer.apply_gradients(
                    zip(summed, variables), skip_gradients_aggregation=True
                ),
                args=(tail_gradients,),
            )

        height, width = split.tail.input.shape[1:3]
        values = tf.TensorSpec([None, height, width, None], tf.float32)
        per_sample = tf.TensorSpec([None], tf.float32)
        scalar_rate, flag = tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.bool)
        if ushaped:
            targets = tf.TensorSpec((None,) + split.top_shape, tf.float32)
        else:
            targets = tf.TensorSpec([None], tf.int32)  # the labels
        self.compute = {
            rank: tf.function(
                compute,
                input_signature=[
                    values,
                    tf.TensorSpec([None] * rank, tf.int32),
                    targets,
                    per_sample,
                    scalar_rate,
                    flag,
                ],
            )
            for rank in (1, 2)
        }
        self.apply = tf.function(apply, reduce_retracing=True)  # one shape: the tail's weights
        # The tail's forward pass: the logits; a U-shaped split's middle: its output.
        tail_forward = split.middle_output if ushaped else split.receive

        norms = batch_norm.norms_of(split.tail)

        def calibration_forward(values, indices):
            """A calibration's training-mode forward pass: it leaves exactly its batch's
            statistics in the moving ones, whenever it was traced (a warm-up traces it before
            any calibration), and the draws where they were: training's masks do not depend on
            when the device calibrated."""
            kept = [state.read_value() for state in draw_states]
            with batch_norm.zero_momentum(norms):
                output = tail_forward(values, indices, training=True)
            with tf.control_dependencies([output]):
                for state, value in zip(draw_states, kept):
                    state.assign(value)
            return tf.identity(output)

        forwards = {
            training: tf.function(
                function, input_signature=[values, tf.TensorSpec([None], tf.int32)]
            )
            for training, function in (
                (False, functools.partial(tail_forward, training=False)),
                (True, calibration_forward),
            )
        }
        self.forward = lambda values, indices, training: forwards[bool(training)](values, indices)

        def forward_unchanged(values, indices):
            self._keep()
            output = tail_forward(values, indices, training=True)
            with tf.control_dependencies([output]):
                self.put_back()
            return tf.identity(output)

        # U-shaped FORWARD: the training step's forward pass, as its TRAIN will run it again.
        self.forward_unchanged = {
            rank: tf.function(
                forward_unchanged, input_signature=[values, tf.TensorSpec([None] * rank, tf.int32)]
            )
            for rank in (1, 2)
        }
        self._split, self._ushaped = split, ushaped

    def warm_up(self, max_batch_size):
        """Runs every function a device's steps reach at each batch size 1..`max_batch_size`,
        and puts back what they changed (the weights are never touched).

        TensorFlow's oneDNN kernels compile and keep a primitive per layer and batch size, so a
        server otherwise grows with every new size that devices (or an attacker) send, up to
        that cache's bound, and a size's first step is slow: TF Serving warms a model up for the
        same reason. Afterwards the memory stays where the warm-up left it. Parallel mode's
        joined steps are traced at `max_batch_size`; joined batches of other sizes are not
        warmed.
        """
        started = time.monotonic()
        height, width = self._split.tail.input.shape[1:3]
        self._keep()
        nestings = (False, True) if self._split.nesting is not None else (False,)
        for batch in range(1, max_batch_size + 1):
            values, indices = tf.zeros([batch, height, width, 1]), tf.zeros([1], tf.int32)
            if self._ushaped:
                targets = tf.zeros((batch,) + self._split.top_shape)
            else:
                targets = tf.zeros([batch], tf.int32)
            for nesting in nestings:
                self.compute[1](
                    values, indices, targets, tf.ones([batch]), tf.constant(0.0), nesting
                )
                self.put_back()
            for training in (False, True):  # evaluation; calibration (U: the FORWARD)
                self.forward(values, indices, training)
                self.put_back()
        # Parallel mode's joined steps (a selection per sample), traced once here rather than at
        # the run's first joined step.
        per_sample = tf.zeros([max_batch_size, 1], tf.int32)
        self.compute[2](values, per_sample, targets, tf.ones([max_batch_size]), 0.0, False)
        self.put_back()
        logging.info(
            "Warmed up the tail's steps at batch sizes 1 to %d in %.1f s.",
            max_batch_size,
            time.monotonic() - started,
        )

    def _keep(self):
        """Keeps what a forward pass changes, for `put_back` (eagerly, or inside a function)."""
        for kept, variable in zip(self._kept, self._changed):
            kept.assign(variable)

    def put_back(self):
        """What the last `compute` changed in its forward pass, as it was before."""
        for kept, variable in zip(self._kept, self._changed):
            variable.assign(kept)
