"""UShapedSplitModel: a model cut twice, so that the labels never leave the device.

The device holds the head and the top (the last layers and the loss); the server holds the
middle. Each step crosses the network four times: the head's selected channels go up at the first
cut (without labels), the middle's output comes down at the second, the top's gradient goes up,
and the head's gradient comes down. The masked bottleneck, budgets, nested budgets and the byte
ledger work at the first cut as in `SplitModel`; the second cut carries every channel in its own
wire dtypes.
"""

import tensorflow as tf
import tf_keras as keras

from tfsplit import codec
from tfsplit.codec import wire
from tfsplit.engine import randomness
from tfsplit.engine.split_model import SplitModel


@keras.utils.register_keras_serializable(package="tfsplit")
class UShapedSplitModel(SplitModel):
    """A `SplitModel` whose server part (`tail`, the middle) hands its output back to the device's
    `top`, which computes the logits and the loss: no labels go up.

    Args:
      head, tail: as `SplitModel`'s; `tail` is the middle: wire activations -> the second cut.
      top: functional model, the second cut's activations -> logits; runs on the device.
      top_cut: name of the original model's layer whose output is the second cut (recorded).
      top_activation_dtype, top_gradient_dtype: what the second cut carries down (the middle's
        output) and up (the top's gradient); `codec.WIRE_DTYPES`.
      top_gradient_noise: the top's gradient is perturbed before it goes up, as `SplitModel`'s
        `gradient_noise` perturbs the first cut's.
      **kwargs: `SplitModel`'s.

    Metrics: `SplitModel`'s (`payload_bytes_up` and `payload_bytes_down` are the first cut's,
    without labels), plus `top_payload_bytes_down` and `top_payload_bytes_up`, the second cut's.
    """

    labels_go_up = False

    def __init__(
        self,
        head,
        tail,
        top,
        top_cut=None,
        top_activation_dtype="float16",
        top_gradient_dtype="float16",
        top_gradient_noise=0.0,
        local_loss_weight=0.0,
        **kwargs,
    ):
        # The local classifier predicts the top's classes: it is built once the top is known.
        super().__init__(head, tail, local_loss_weight=0.0, **kwargs)
        for name, value in (
            ("top_activation_dtype", top_activation_dtype),
            ("top_gradient_dtype", top_gradient_dtype),
        ):
            if value not in codec.WIRE_DTYPES:
                raise ValueError(
                    f"`{name}` must be one of {codec.WIRE_DTYPES}. Received: {value!r}"
                )
        if tuple(tail.output.shape[1:]) != tuple(top.input.shape[1:]):
            raise ValueError(
                f"The top must take what the middle outputs: {tuple(tail.output.shape[1:])}. "
                f"Received: a top whose input is {tuple(top.input.shape[1:])}"
            )
        self.top, self.top_cut = top, top_cut
        self._build_local_classifier(local_loss_weight)
        self.top_activation_dtype, self.top_gradient_dtype = (
            top_activation_dtype,
            top_gradient_dtype,
        )
        if not top_gradient_noise >= 0.0:
            raise ValueError(f"`top_gradient_noise` must be >= 0. Received: {top_gradient_noise!r}")
        self.top_gradient_noise = float(top_gradient_noise)
        self.top_wire = wire.make_wire(
            top_activation_dtype, top_gradient_dtype, self.top_gradient_noise
        )
        # The second cut's tensor without its batch; (h, w, C), or (C,) after a pooling.
        self.top_shape = tuple(int(d) for d in tail.output.shape[1:])
        self.top_channels = self.top_shape[-1]
        self.top_height, self.top_width = (self.top_shape[:-1] + (1, 1))[:2]
        self.sent_top_payload_bytes = tf.Variable(
            [0, 0], dtype=tf.int64, trainable=False, name="sent_top_payload_bytes"
        )
        self.top_payload_bytes_down = keras.metrics.Sum(
            name="top_payload_bytes_down", dtype="float64"
        )
        self.top_payload_bytes_up = keras.metrics.Sum(name="top_payload_bytes_up", dtype="float64")
        self.build((None,) + tuple(head.input.shape[1:]))

    def _build_for_input(self):
        """Deferred: the top is not attached when `SplitModel.__init__` would build."""

    @property
    def num_classes(self):
        return int(self.top.output.shape[-1])

    @property
    def device_trainable_variables(self):
        return super().device_trainable_variables + self.top.trainable_variables

    @property
    def device_only_weights(self):
        return super().device_only_weights + self.top.weights

    def middle_output(self, values, indices, training=False, fill=None):
        """The server's half: the k channels placed back, then the middle; what goes down."""
        return super().receive(values, indices, training, fill)

    def check_networkable(self):
        """Raises ValueError unless this split can train over the network: its middle must give
        the same output when run twice on the same input (the server runs the forward pass again
        to train on the top's gradient, and a random layer, dropout or noise, would draw other
        values), and it trains without nested budgets (their distillation needs the top)."""
        if self.nesting is not None:
            raise ValueError(
                "A U-shaped split over the network trains without nested budgets (their "
                "distillation needs the top, which the server does not hold); set "
                "config.budget_sampling.nested = False."
            )
        random = [layer.name for layer in randomness.random_layers(self.tail)]
        if random:
            raise ValueError(
                f"The middle holds random layers {random}: over the network the server runs the "
                "middle's forward pass again for the top's gradient, and these would draw "
                "other values. Start the top before them (config.model.top)."
            )

    def receive(self, values, indices, training=False, fill=None):
        """The middle on the k channels, then its output through the second cut's wire and the
        top: the logits, as `SplitModel.receive` gives them."""
        middle = self.middle_output(values, indices, training, fill)
        return self.top(self.top_wire(middle), training=training)

    def top_payload_bytes(self, batch, training):
        """The second cut's bytes, (down, up): the middle's output every step, the top's gradient
        in training."""
        return wire.step_nbytes(
            batch,
            self.top_channels,
            (self.top_activation_dtype, self.top_gradient_dtype),
            training,
            with_labels=False,
            height=self.top_height,
            width=self.top_width,
            channels=self.top_channels,
        )

    def update_metrics(self, labels, logits, penalty, k, training, local=None):
        down, up = self.top_payload_bytes(tf.shape(labels)[0], training)
        if training:
            self.sent_top_payload_bytes.assign_add(tf.cast(tf.stack([down, up]), tf.int64))
        self.top_payload_bytes_down.update_state(down)
        self.top_payload_bytes_up.update_state(up)
        return super().update_metrics(labels, logits, penalty, k, training, local)

    def get_config(self):
        return dict(
            super().get_config(),
            top=keras.layers.serialize(self.top),
            top_cut=self.top_cut,
            top_activation_dtype=self.top_activation_dtype,
            top_gradient_dtype=self.top_gradient_dtype,
            top_gradient_noise=self.top_gradient_noise,
        )

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["top"] = keras.layers.deserialize(config["top"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects)
