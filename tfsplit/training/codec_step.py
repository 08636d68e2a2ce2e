"""The split step with real bytes between the halves: the oracle for the compiled step.

`CodecSplitModel.train_step` does what a device and a server do: the head's k channels are encoded
by the codec, decoded, run through the tail, and the tail's gradient is encoded and decoded again
before the head sees it. It runs eagerly (bytes leave the graph), and tests prove that it trains
the same model and counts the same bytes as `SplitModel`'s compiled step.
"""

import tensorflow as tf
import tf_keras as keras

from tfsplit import codec
from tfsplit.engine.split_model import SplitModel


@keras.utils.register_keras_serializable(package="tfsplit")
class CodecSplitModel(SplitModel):
    """A `SplitModel` whose training step moves encoded payloads; `compile` runs it eagerly."""

    def compile(self, *args, **kwargs):
        super().compile(*args, **dict(kwargs, run_eagerly=True))

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        indices = self.channel_indices()
        device_variables = self.device_trainable_variables
        # The tape spans the byte round trip, as the device keeps its graph while it waits.
        with tf.GradientTape() as device_tape:
            values, penalty, local = self.device_step(images, labels, indices)
            device_loss = penalty + local
        upstream = codec.encode(
            values.numpy(),
            indices.numpy(),
            self.channels,
            self.activation_dtype,
            kind="activations",
            labels=labels.numpy(),
        )
        received = codec.decode(upstream, expect_kind="activations")
        received_values = tf.constant(received.dequantized(), tf.float32)
        received_indices = tf.constant(received.indices, tf.int32)
        tail_variables = self.tail.trainable_variables
        with tf.GradientTape() as server_tape:
            server_tape.watch(received_values)
            loss, logits = self.server_loss(
                images, tf.constant(received.labels), received_values, received_indices
            )
        tail_gradients, value_gradient = server_tape.gradient(
            loss, [tail_variables, received_values]
        )
        downstream = codec.encode(
            value_gradient.numpy(),
            received.indices,
            self.channels,
            self.gradient_dtype,
            kind="gradients",
        )
        returned = codec.decode(downstream, expect_kind="gradients")
        device_gradients = device_tape.gradient(
            [values, device_loss],
            device_variables,
            # In the order sent: a payload of every channel comes back in channel order.
            output_gradients=[tf.constant(returned.scatter()[..., indices.numpy()]), tf.ones([])],
        )
        self.apply_gradients(
            list(device_gradients) + list(tail_gradients), device_variables + tail_variables
        )
        self.compiled_metrics.update_state(labels, logits)
        self.track_device_losses(penalty, local)
        self.count_sent(len(upstream), len(downstream))
        return self.get_metrics_result()
