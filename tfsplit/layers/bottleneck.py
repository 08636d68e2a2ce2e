"""The masked bottleneck inserted at the cut: a gated encoder on the device, a decoder on the server.

The encoder squashes each channel into (0, 1) with a sigmoid and scales it by a learnable gate
`sigmoid(g)`. Channel importance is `sigmoid(g)^2`; the budget logic in `tfsplit.engine.budget` picks the
top-k channels by it. The decoder maps the (scattered back) channels to the tail's width again.
"""

import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from tfsplit.schedule.phases import GATE_LOGIT_CLOSED, GATE_LOGIT_OPEN  # noqa: F401


@keras.utils.register_keras_serializable(package="tfsplit")
class GateRange(keras.constraints.Constraint):
    """Keeps gate logits in [-15, 15]: past that the sigmoid is flat, so a gate pushed beyond it by
    a large budget-loss step would lose its gradient and could never reopen."""

    def __call__(self, w):
        return tf.clip_by_value(w, GATE_LOGIT_CLOSED, GATE_LOGIT_OPEN)


class _ConvNorm(keras.layers.Layer):
    """What both ends of the bottleneck share: a strided (transposed) conv, then batch norm.

    Subclasses create their convolution and then `self.norm` in `__init__`, and name the
    convolution's attribute in `RESAMPLE`; the attribute names (`conv`, `deconv`, `norm`) are what
    checkpoints and the QAT config refer to, so they stay as they are.
    """

    RESAMPLE = "conv"

    def __init__(self, channels, resolution_factor=1, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        for name, value in [
            ("channels", channels),
            ("resolution_factor", resolution_factor),
            ("kernel_size", kernel_size),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        self.channels = channels
        self.resolution_factor = resolution_factor
        self.kernel_size = kernel_size

    def _resample(self):
        return getattr(self, self.RESAMPLE)

    def build(self, input_shape):
        self._resample().build(input_shape)
        self.norm.build(self._resample().compute_output_shape(input_shape))
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        return self._resample().compute_output_shape(input_shape)

    def load_own_variables(self, store):
        """Also loads a file saved before the layer gained a variable (the encoder's seniority, the
        decoder's fill): variables are only ever added at the end, so such a file holds the first
        ones, and the rest keep their initial values (zeros: what that older version computed)."""
        own = self._trainable_weights + self._non_trainable_weights  # the order Keras saves
        if len(store.keys()) > len(own):
            super().load_own_variables(store)  # Keras's own error for a file that does not fit
            return
        for index, variable in enumerate(own[: len(store.keys())]):
            variable.assign(store[str(index)])

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            resolution_factor=self.resolution_factor,
            kernel_size=self.kernel_size,
        )
        return config


@keras.utils.register_keras_serializable(package="tfsplit")
class MaskedEncoder(_ConvNorm):
    """Device-side end of the bottleneck: conv, batch norm, sigmoid, then a per-channel gate.

    Args:
      channels: number of channels C' that can cross the cut.
      resolution_factor: spatial stride of the conv; 1 keeps the resolution, r divides H and W by r.
      kernel_size: size of the square conv kernel.
      gate_init_max: gate logits start uniform in [0, gate_init_max] (15 = nearly all open).

    Call arguments:
      inputs: float tensor (batch, H, W, C).
      training: whether batch norm uses batch statistics.

    Input shape: (batch, H, W, C). Output shape: (batch, ceil(H/r), ceil(W/r), channels).
    """

    def __init__(self, channels, resolution_factor=1, kernel_size=3, gate_init_max=15.0, **kwargs):
        super().__init__(channels, resolution_factor, kernel_size, **kwargs)
        if not 0 <= gate_init_max <= GATE_LOGIT_OPEN:
            raise ValueError(
                f"`gate_init_max` must be in [0, {GATE_LOGIT_OPEN}]. "
                f"Received: gate_init_max={gate_init_max!r}"
            )
        self.gate_init_max = float(gate_init_max)
        self.conv = keras.layers.Conv2D(
            channels, kernel_size, strides=resolution_factor, padding="same", name="conv"
        )
        self.norm = keras.layers.BatchNormalization(name="norm")

    def build(self, input_shape):
        super().build(input_shape)  # The conv and norm first: initial values follow this order.
        self.gate_logits = self.add_weight(
            name="gate_logits",
            shape=(self.channels,),
            initializer=keras.initializers.RandomUniform(0.0, self.gate_init_max),
            constraint=GateRange(),
            trainable=True,
        )
        # How many deprune resets kept each channel: breaks ties between equal gates
        # (`tfsplit.engine.budget.top_k_channels`). Saved with the head; zeros until a reset.
        self.seniority = self.add_weight(
            name="seniority", shape=(self.channels,), initializer="zeros", trainable=False
        )

    def call(self, inputs, training=None):
        features = tf.sigmoid(self.norm(self.conv(inputs), training=training))
        return features * tf.sigmoid(self.gate_logits)

    def get_config(self):
        config = super().get_config()
        config.update(gate_init_max=self.gate_init_max)
        return config


@keras.utils.register_keras_serializable(package="tfsplit")
class Decoder(_ConvNorm):
    """Server-side start of the bottleneck: transposed conv, batch norm, ReLU.

    Args:
      channels: number of channels C the tail expects.
      resolution_factor: spatial stride of the transposed conv; undoes the encoder's stride.
      kernel_size: size of the square kernel.

    Call arguments:
      inputs: float tensor (batch, h, w, C') with unselected channels set to zero.
      training: whether batch norm uses batch statistics.

    Input shape: (batch, h, w, C'). Output shape: (batch, h*r, w*r, channels).
    """

    RESAMPLE = "deconv"

    def __init__(self, channels, resolution_factor=1, kernel_size=3, **kwargs):
        super().__init__(channels, resolution_factor, kernel_size, **kwargs)
        self.deconv = keras.layers.Conv2DTranspose(
            channels, kernel_size, strides=resolution_factor, padding="same", name="deconv"
        )
        self.norm = keras.layers.BatchNormalization(name="norm")

    def build(self, input_shape):
        super().build(input_shape)
        # What stands in for each of the C' channels when it is not sent (see tfsplit.layers.placement):
        # zeros, until nested budgets train it to each channel's mean. Saved and exported with
        # the tail; `SplitModel.receive` applies it.
        self.fill = self.add_weight(
            name="fill", shape=(input_shape[-1],), initializer="zeros", trainable=False
        )

    def call(self, inputs, training=None):
        return tf.nn.relu(self.norm(self.deconv(inputs), training=training))


@keras.utils.register_keras_serializable(package="tfsplit")
class MaskedEncoderQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """How quantization-aware training sees a `MaskedEncoder`: as TFLite's int8 kernels will run it.

    tfmot has no built-in config for a custom layer, so this one names what gets fake-quantized:
    the conv kernel, per output channel and symmetric like TFLite's int8 conv weights; and the
    layer's output, the wire values, with an asymmetric 8-bit range tracked as a moving average,
    which becomes the int8 head's output scale and zero point. Batch norm, sigmoid and gate stay
    in float while training (the converter folds batch norm into the conv). Use it with
    `tfmot.quantization.keras.quantize_annotate_layer(encoder, MaskedEncoderQuantizeConfig())`
    inside `quantize_scope({"MaskedEncoder": ..., "MaskedEncoderQuantizeConfig": ...})`.
    """

    def get_weights_and_quantizers(self, layer):
        quantizer = tfmot.quantization.keras.quantizers.LastValueQuantizer(
            num_bits=8, per_axis=True, symmetric=True, narrow_range=True
        )
        return [(layer.conv.kernel, quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != 1:
            raise ValueError(
                "MaskedEncoderQuantizeConfig quantizes one weight, the conv kernel. "
                f"Received: {len(quantize_weights)} weights"
            )
        layer.conv.kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        if quantize_activations:
            raise ValueError(
                "MaskedEncoderQuantizeConfig quantizes no inner activation. "
                f"Received: {len(quantize_activations)} activations"
            )

    def get_output_quantizers(self, layer):
        return [
            tfmot.quantization.keras.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False
            )
        ]

    def get_config(self):
        return {}
