"""The device half of U-shaped split training: the head and the top here, the middle remote.

Each training step makes two calls. FORWARD sends the head's k channels (no labels) and gets the
middle's output; the top computes the logits and the loss here, with the labels; TRAIN sends the
top's gradient up and gets the head's gradient back. The server runs the middle's forward pass
again for TRAIN (its FORWARD changed nothing), so both halves train on the one forward pass the
top saw. Evaluation and batch norm calibration get the middle's output and finish on the top.
"""

import types

import grpc
import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit.codec import wire as tf_wire
from tfsplit.engine.ushaped import UShapedSplitModel
from tfsplit.layers.batch_norm import BatchNormAverage
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.training.client import RemoteSplitModel
from tfsplit.training.messages import decode_second_cut, encode_second_cut


@keras.utils.register_keras_serializable(package="tfsplit")
class RemoteUShapedSplitModel(RemoteSplitModel, UShapedSplitModel):
    """A `UShapedSplitModel` whose middle trains on a server; `connect` it before `fit`.

    No message it sends carries a label: the activations go up without them, and so does the
    top's gradient.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._forward = types.SimpleNamespace(sent=None)  # the last FORWARD's (values, indices)
        self.check_networkable()

    # ------------------------------------------------------------------ the calls, in numpy
    def _middle(self, kind, values, indices, begin=False, finish=False):
        """The middle's output for the k channels `values`, from a FORWARD (the training step's
        own), an EVALUATE or a CALIBRATE call; and the call's wire bytes."""
        step = 0
        if kind == pb.StepRequest.FORWARD:
            step, self._forward.sent = int(self.remote_step.numpy()), (values, indices)
        reply, wire = self._forward_exchange(kind, values, indices, begin, finish, step)
        if reply.step != step:
            raise RuntimeError(f"The server answered step {reply.step} to step {step}.")
        output = decode_second_cut(
            reply.payload,
            self,
            self.top_activation_dtype,
            "activations",
            batch=int(values.shape[0]),
        )
        return output, wire

    def _top_train_call(self, top_gradient, indices, learning_rate):
        payload = encode_second_cut(
            top_gradient.numpy(), self, self.top_gradient_dtype, "gradients"
        )
        try:
            reply, wire = self._send_train(payload, learning_rate, tf.constant(False))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION or self._forward.sent is None:
                raise
            if "comes after its FORWARD" not in (error.details() or ""):
                raise
            # A server restarted since this step's FORWARD: its tail is where the FORWARD found
            # it (the checkpoint and the replayed log), so the same FORWARD gives the same output.
            logging.warning("The server lost this step's FORWARD (a restart): sending it again.")
            _, again = self._middle(pb.StepRequest.FORWARD, *self._forward.sent)
            reply, wire = self._send_train(payload, learning_rate, tf.constant(False))
            wire = wire + again
        return self._returned_gradient(reply, indices), wire

    def _middle_output(self, kind, values, indices):
        output, wire = tf.py_function(
            lambda v, i: self._middle(kind, v, i), [values, indices], [tf.float32, tf.float64]
        )
        return tf.ensure_shape(output, (None,) + self.top_shape), wire

    # ----------------------------------------------------------------------- keras steps
    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        indices = self.channel_indices()
        with tf.GradientTape() as tape:
            values, penalty, local = self.device_step(images, labels, indices)
            device_loss = penalty + local
        middle, wire_down = self._middle_output(pb.StepRequest.FORWARD, values, indices)
        top_variables = self.top.trainable_variables
        with tf.GradientTape() as top_tape:
            top_tape.watch(middle)
            logits = self.top(middle, training=True)
            loss = self.compute_loss(images, labels, logits)
        top_gradients, middle_gradient = top_tape.gradient(loss, [top_variables, middle])
        middle_gradient = tf_wire.perturb(middle_gradient, self.top_gradient_noise)
        gradient, wire_up = tf.py_function(
            self._top_train_call,
            [middle_gradient, indices, self._learning_rate()],
            [tf.float32, tf.float64],
        )
        gradient = tf.ensure_shape(gradient, values.shape)
        variables = [
            v for v in self.device_trainable_variables if all(v is not t for t in top_variables)
        ]
        gradients = tape.gradient(
            [values, device_loss], variables, output_gradients=[gradient, tf.ones([])]
        )
        self.apply_gradients(list(gradients) + list(top_gradients), variables + list(top_variables))
        self._count_wire(wire_down + wire_up)
        return self.update_metrics(labels, logits, penalty, self.budget, training=True, local=local)

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        indices = self.channel_indices()
        values = self.send(images, indices, training=False)
        middle, wire = self._middle_output(pb.StepRequest.EVALUATE, values, indices)
        logits = self.top(middle, training=False)
        self.compute_loss(images, labels, logits)
        self._count_wire(wire)
        return self.update_metrics(labels, logits, tf.constant(0.0), self.budget, training=False)

    def calibrate_batch_norm(self, dataset, batches):
        """As `SplitModel.calibrate_batch_norm`: the head's and the top's norms here, the
        middle's on the server (the first pass begins its calibration, the last finishes it)."""
        batches = list(dataset.take(batches))
        if not batches:
            raise ValueError("Batch norm calibration needs at least one batch; none was given.")
        indices = self.channel_indices()
        norms = [BatchNormAverage.of(part) for part in (self.head, self.top)]
        with BatchNormAverage([n for part in norms if part for n in part.norms]) as average:
            for i, (images, _) in enumerate(batches):
                values = tf_wire.fake_quantize(
                    self.send(images, indices, training=True), self.activation_dtype
                )
                middle, _ = self._middle(
                    pb.StepRequest.CALIBRATE, values, indices, i == 0, i == len(batches) - 1
                )
                self.top(middle, training=True)
                average.record()
