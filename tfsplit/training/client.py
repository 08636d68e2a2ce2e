"""The device half of split training: data, head, encoder, gates and schedule; the tail is remote.

`RemoteSplitModel` is a `SplitModel` whose training step sends the head's k channels to a
`tfsplit-train-server` as a codec payload and applies the gradient payload it gets back to the
head, inside the compiled step (one `tf.py_function` makes the call). Evaluation and batch norm
calibration send payloads the same way. `fit`, the callbacks, the phases and the byte ledger are
those of the in-process trainer; the ledger also counts the gRPC message bytes each way.
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit import codec
from tfsplit.callbacks.phase_schedule import learning_rate_schedule
from tfsplit.codec import wire as tf_wire
from tfsplit.engine.split_model import SplitModel
from tfsplit.layers.batch_norm import BatchNormAverage
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol.framing import reply_logits
from tfsplit.training.messages import model_digest, weights_from_protos, weights_to_protos


@keras.utils.register_keras_serializable(package="tfsplit")
class RemoteSplitModel(SplitModel):
    """A `SplitModel` whose tail trains on a server; `connect` it before `fit` or `evaluate`.

    Saved, it is a plain `SplitModel` file (`get_config` is the parent's), with the tail the
    server trained once `fetch_tail` has run (`RemoteTail` does it at the end of `fit`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client, self.device_id = None, None
        self.parallel = False  # Whether the server trains devices in parallel (set by connect).
        self.digest = model_digest(self)
        self.wire_bytes_up = keras.metrics.Sum(name="wire_bytes_up", dtype="float64")
        self.wire_bytes_down = keras.metrics.Sum(name="wire_bytes_down", dtype="float64")
        # The next training step id; kept with the weights so that a resumed device continues.
        self.remote_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="remote_step")

    @property
    def metrics(self):
        return super().metrics + [self.wire_bytes_up, self.wire_bytes_down]

    def connect(self, client, device_id="device-0"):
        """Joins the run on the server as `device_id` (a new run starts from this model's tail
        weights; a device that joins a started run trains the tail as it is)."""
        reply = client.call(
            "Hello",
            pb.HelloRequest(
                model_digest=self.digest,
                image_shape=list(self.head.input.shape[1:]),
                num_classes=self.num_classes,
                tail_weights=weights_to_protos(self.tail.get_weights()),
                device_id=device_id,
            ),
        )
        self.client, self.device_id, self.parallel = client, device_id, reply.parallel
        self.remote_step.assign(reply.next_step)
        logging.info(
            "Connected to %s (%s mode); its next step is %d.",
            client.address,
            "parallel" if reply.parallel else "sequential",
            reply.next_step,
        )

    def resume(self):
        """After a restore from the backup: returns the server to this model's step."""
        reply = self._client().call(
            "Hello",
            pb.HelloRequest(
                model_digest=self.digest,
                image_shape=list(self.head.input.shape[1:]),
                num_classes=self.num_classes,
                device_id=self.device_id,
                resume=True,
                resume_step=int(self.remote_step.numpy()),
            ),
        )
        self.remote_step.assign(reply.next_step)

    def checkpoint_remote(self):
        """Tells the server that this half is backed up at its current step."""
        self._client().call(
            "Checkpoint",
            pb.CheckpointRequest(
                model_digest=self.digest,
                device_id=self.device_id,
                step=int(self.remote_step.numpy()),
            ),
        )

    def average_heads(self, round_id, samples, deadline_s=600):
        """Replaces this device's head by the average of the run's heads for `round_id` (the
        server answers once every device has sent its own, SplitFed)."""
        reply = self._client().call(
            "AverageHeads",
            pb.AverageHeadsRequest(
                model_digest=self.digest,
                device_id=self.device_id,
                round=round_id,
                weights=weights_to_protos(self.head.get_weights()),
                samples=samples,
            ),
            deadline_s=deadline_s,
        )
        self.head.set_weights(weights_from_protos(reply.weights, self.head.get_weights(), "head"))
        return reply.devices

    def leave(self):
        """Tells the server that this device is done: its slot is free for another device.
        Returns whether the server still counted it in the run."""
        reply = self._client().call(
            "Leave", pb.LeaveRequest(model_digest=self.digest, device_id=self.device_id)
        )
        return reply.left

    def fetch_tail(self):
        """Copies the server's tail weights into this model (before saving it)."""
        reply = self._client().call("TailWeights", pb.TailWeightsRequest(model_digest=self.digest))
        self.tail.set_weights(weights_from_protos(reply.weights, self.tail.get_weights()))

    def _client(self):
        if self.client is None:
            raise RuntimeError("RemoteSplitModel is not connected; call connect(client) first.")
        return self.client

    # ------------------------------------------------------------------ the calls, in numpy
    def _payload(self, values, indices, labels=None):
        return codec.encode(
            values.numpy(),
            indices.numpy(),
            self.channels,
            self.activation_dtype,
            kind="activations",
            labels=None if labels is None else labels.numpy(),
        )

    def _exchange(self, request):
        client = self._client()
        before = list(client.wire_bytes)
        reply = client.call("Step", request)
        sent = [after - start for after, start in zip(client.wire_bytes, before)]
        return reply, np.array(sent, np.float64)

    def _train_call(self, values, indices, labels, learning_rate, nesting):
        reply, wire = self._send_train(
            self._payload(values, indices, labels), learning_rate, nesting
        )
        return self._returned_gradient(reply, indices), reply_logits(reply), wire

    def _send_train(self, payload, learning_rate, nesting):
        """The TRAIN of this device's next step; returns (its reply, the wire bytes)."""
        step = int(self.remote_step.numpy())
        reply, wire = self._exchange(
            pb.StepRequest(
                kind=pb.StepRequest.TRAIN,
                model_digest=self.digest,
                device_id=self.device_id,
                step=step,
                payload=payload,
                learning_rate=float(learning_rate.numpy()),
                nesting=bool(nesting.numpy()),
            )
        )
        if reply.step != step:
            raise RuntimeError(f"The server answered step {reply.step} to step {step}.")
        self.remote_step.assign(step + 1)
        return reply, wire

    @staticmethod
    def _returned_gradient(reply, indices):
        returned = codec.decode(reply.payload, expect_kind="gradients")
        # In the channels' order sent (a payload of every channel comes back in channel order).
        return returned.scatter()[..., indices.numpy()]

    def _learning_rate(self):
        """The rate this step uses, also when a LearningRateSchedule drives it (the server
        applies it)."""
        schedule = learning_rate_schedule(self.optimizer)
        if schedule is None:
            return self.optimizer.learning_rate
        return schedule(self.optimizer.iterations)

    def _forward_call(self, values, indices, calibrate=False, begin=False, finish=False):
        reply, wire = self._forward_exchange(
            pb.StepRequest.CALIBRATE if calibrate else pb.StepRequest.EVALUATE,
            values,
            indices,
            begin,
            finish,
        )
        return reply_logits(reply), wire

    def _forward_exchange(self, kind, values, indices, begin=False, finish=False, step=0):
        return self._exchange(
            pb.StepRequest(
                kind=kind,
                step=step,
                model_digest=self.digest,
                device_id=self.device_id,
                payload=self._payload(values, indices),
                calibration_begin=begin,
                calibration_finish=finish,
            )
        )

    # ----------------------------------------------------------------------- keras steps
    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        indices = self.channel_indices()
        with tf.GradientTape() as tape:
            values, penalty, local = self.device_step(images, labels, indices)
            device_loss = penalty + local
        gradient, logits, wire = tf.py_function(
            self._train_call,
            [values, indices, labels, self._learning_rate(), self.step_nesting],
            [tf.float32, tf.float32, tf.float64],
        )
        gradient = tf.ensure_shape(gradient, values.shape)
        logits = tf.ensure_shape(logits, [None, self.num_classes])
        variables = self.device_trainable_variables
        gradients = tape.gradient(
            [values, device_loss], variables, output_gradients=[gradient, tf.ones([])]
        )
        self.apply_gradients(gradients, variables)
        self.compute_loss(images, labels, logits)  # the loss metric, as the server computed it
        self._count_wire(wire)
        return self.update_metrics(labels, logits, penalty, self.budget, training=True, local=local)

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        indices = self.channel_indices()
        values = self.send(images, indices, training=False)
        logits, wire = tf.py_function(
            self._forward_call, [values, indices], [tf.float32, tf.float64]
        )
        logits = tf.ensure_shape(logits, [None, self.num_classes])
        self.compute_loss(images, labels, logits)
        self._count_wire(wire)
        return self.update_metrics(labels, logits, tf.constant(0.0), self.budget, training=False)

    def _count_wire(self, wire):
        self.wire_bytes_up.update_state(wire[0])
        self.wire_bytes_down.update_state(wire[1])

    def calibrate_batch_norm(self, dataset, batches):
        """As `SplitModel.calibrate_batch_norm`: the head's norms here, the tail's on the server
        (the first pass begins its calibration, the last finishes it)."""
        batches = list(dataset.take(batches))
        if not batches:
            raise ValueError("Batch norm calibration needs at least one batch; none was given.")
        indices = self.channel_indices()
        with BatchNormAverage.of(self.head) or BatchNormAverage([]) as norms:
            for i, (images, _) in enumerate(batches):
                values = tf_wire.fake_quantize(
                    self.send(images, indices, training=True), self.activation_dtype
                )
                self._forward_call(values, indices, True, i == 0, i == len(batches) - 1)
                norms.record()


class RemoteTail(keras.callbacks.Callback):
    """At the end of `fit`, copies the server's trained tail into the device's model, so that
    what the run saves (placed before `RunRecords`) is the whole trained model."""

    def on_train_end(self, logs=None):
        self.model.fetch_tail()


class HeadAveraging(keras.callbacks.Callback):
    """Parallel mode: after the last training batch of every epoch (before its evaluation), or
    every `every_steps` training steps, the device's head becomes the average of the run's heads
    (weighted by their training samples).

    Args:
      samples: this device's training samples.
      every_steps: average every this many steps (counted by the optimizer's iterations, so a
        resumed run keeps the rounds' numbers), round r after step (r + 1) * every_steps;
        0: after every epoch, round e after epoch e.
    """

    def __init__(self, samples, every_steps=0):
        super().__init__()
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"`samples` must be a positive integer. Received: {samples!r}")
        if not isinstance(every_steps, int) or isinstance(every_steps, bool) or every_steps < 0:
            raise ValueError(
                f"`every_steps` must be an integer >= 0 (0: every epoch). Received: {every_steps!r}"
            )
        self.samples, self.every_steps, self._epoch, self._step = samples, every_steps, 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        # The optimizer's count, read once an epoch (after a resume's restore), then counted here:
        # no read of a device variable at every step.
        self._epoch, self._step = epoch, int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.every_steps:
            if self._step % self.every_steps == 0:
                self._average(self._step // self.every_steps - 1, f"Step {self._step}")
        elif batch + 1 == self.params.get("steps"):
            self._average(self._epoch, f"Epoch {self._epoch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_steps and not self.params.get("steps"):  # of unknown length
            self._average(self._epoch, f"Epoch {self._epoch + 1}")

    def _average(self, round_id, when):
        devices = self.model.average_heads(round_id, self.samples)
        logging.info("%s: head averaged over %d devices.", when, devices)


class RemoteCheckpoint(keras.callbacks.Callback):
    """Keeps the server's state in step with the device's `BackupAndRestore` (place it after).

    At the start of `fit` (after the backup was restored) the server returns to the restored
    step; each time the backup is written (every `save_freq` batches, as `BackupAndRestore`
    counts them) the server saves its state too. So a device killed and restarted loses the
    steps since its last backup, no more, and both halves agree on where they are.
    """

    def __init__(self, save_freq):
        super().__init__()
        if not isinstance(save_freq, int) or save_freq < 1:
            raise ValueError(f"`save_freq` must be a positive integer. Received: {save_freq!r}")
        self.save_freq, self._batches = save_freq, 0

    def on_train_begin(self, logs=None):
        self.model.resume()

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches >= self.save_freq:
            self._batches = 0
            self.model.checkpoint_remote()
