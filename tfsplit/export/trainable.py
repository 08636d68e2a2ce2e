"""The head's training step as a LiteRT model: a device trains its half without TensorFlow.

`tfsplit.export.trainable_export.export_trainable_head` writes `head_train.tflite`, built from TFLite builtin ops only (the LiteRT
wheel has no Flex delegate), with these signatures over resource variables:

- `forward(images, budget)`: the top-`budget` channels of the head's output with batch
  statistics, (N, h, w, k) float32, and their indices (k,): what a training step sends (the
  device's codec encodes them to the wire dtype, as for the TensorFlow device); and `moments`,
  every batch norm's batch mean and variance (batch norm calibration averages them over
  batches, as `BatchNormAverage` does);
- `train(images, labels, upstream_gradient, budget, learning_rate, gate_learning_rate,
  penalty_weight)`: one step of the head for the gradient the server returned, with the gates'
  penalty (budget loss and polarization) and the local classifier where the model has them;
  batch norm updates its moving statistics as Keras does, SGD with momentum and weight decay
  (and Adam for the gates, when the run has a gate optimizer) keep their state in variables;
- `infer(images, budget)`: as `forward`, with the moving statistics (evaluation, deployment);
- `get_weights()` / `set_weights(weights)`: every variable as one flat float32 vector, in the
  order of the layout `layout_json` describes (`head_train.json`).

`budget`, the rates and `penalty_weight` are one-element vectors.

The head is re-expressed layer by layer from the Keras model's own variables, with the ops of
`tfsplit.export.builtin_grads`; a layer it cannot express fails the export with one line that
names it.
"""

import numpy as np
import tensorflow as tf

from tfsplit.backbones.splitter import topological_nodes
from tfsplit.engine import budget as budget_lib
from tfsplit.export import builtin_grads
from tfsplit.layers.bottleneck import MaskedEncoder

SUPPORTED_LAYERS = (
    "Conv2D",
    "DepthwiseConv2D",
    "BatchNormalization",
    "ReLU",
    "MaxPooling2D",
    "Add",
    "Identity",
    "MaskedEncoder",
)


class UnsupportedLayerError(ValueError):
    """A head layer that the builtins-only training graph cannot express."""


def _unsupported(layer, why):
    return UnsupportedLayerError(
        f"The trainable head cannot express layer {layer.name!r} ({type(layer).__name__}): {why}"
    )


def _check(layer, condition, why):
    if not condition:
        raise _unsupported(layer, why)


def _activation_name(layer):
    return getattr(layer.activation, "__name__", repr(layer.activation))


class TrainableHead(tf.Module):
    """The head of `split` as a module whose signatures are those of the module docstring.

    Args:
      split: a `SplitModel`; the module computes with its head's own variables.
      momentum, weight_decay: the run's SGD (Keras's update: decay, then momentum).
      gate_optimizer: None (the gates train with the SGD) or dict(beta_1, beta_2, epsilon) of
        the gates' Adam.
    """

    def __init__(self, split, momentum=0.0, weight_decay=0.0, gate_optimizer=None):
        super().__init__(name="trainable_head")
        self._split_config = dict(
            budget_delta=split.budget_delta,
            polarization=split.polarization,
            local_loss_weight=split.local_loss_weight,
        )
        head = split.head
        self._head_input, self._head_output = head.input, head.output
        self._nodes = topological_nodes(head)
        self._encoder = split.encoder
        self._local = split.local_classifier
        self._features = None if self._local is None else split.device_features.outputs[0]
        for node in self._nodes:
            self._check_layer(node.layer)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay or 0.0)
        self.adam = None if gate_optimizer is None or self._encoder is None else gate_optimizer
        trainable = list(split.device_trainable_variables)
        self.gates = None if self._encoder is None else self._encoder.gate_logits
        self.sgd_variables = [v for v in trainable if self.adam is None or v is not self.gates]
        self.velocities = [
            tf.Variable(tf.zeros_like(v), name="velocity") for v in self.sgd_variables
        ]
        if self.adam is not None:
            self.gate_moments = [tf.Variable(tf.zeros_like(self.gates), name=n) for n in "mv"]
            self.gate_steps = tf.Variable(0.0, name="gate_steps")
        head_state = [v for v in head.weights if not any(v is t for t in trainable)]
        local = [] if self._local is None else self._local.trainable_weights
        self.state = (
            [("weight", v) for v in trainable if not any(v is w for w in local)]
            + [("local_classifier", v) for v in local]
            + [("state", v) for v in head_state]
            + [("velocity", v) for v in self.velocities]
        )
        if self.adam is not None:
            self.state += [("gate_moment", v) for v in self.gate_moments]
            self.state += [("gate_steps", self.gate_steps)]
        self.all_variables = [v for _, v in self.state]  # tracked: the converter keeps them

    # --------------------------------------------------------------------------- the layers
    def _check_layer(self, layer):
        kind = type(layer).__name__
        _check(layer, kind in SUPPORTED_LAYERS, f"supported are {', '.join(SUPPORTED_LAYERS)}")
        if isinstance(layer, MaskedEncoder):
            self._check_layer(layer.conv)
            self._check_layer(layer.norm)
        if kind in ("Conv2D", "DepthwiseConv2D"):
            _check(layer, tuple(layer.dilation_rate) == (1, 1), "dilation is not supported")
            _check(layer, layer.data_format == "channels_last", "channels_first")
            _check(layer, _activation_name(layer) in ("linear", "relu"), "its activation")
            _check(layer, layer.padding in ("same", "valid"), f"padding {layer.padding!r}")
        if kind == "Conv2D":
            _check(layer, layer.groups == 1, "grouped convolution is not supported")
        if kind == "DepthwiseConv2D":
            _check(layer, layer.depth_multiplier == 1, "a depth multiplier other than 1")
        if kind == "BatchNormalization":
            _check(layer, list(layer.axis) in ([3], [-1]), "it normalizes another axis than -1")
            _check(layer, not layer.renorm and layer.virtual_batch_size is None, "renorm")
        if kind == "ReLU":
            _check(
                layer,
                float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0,
                "a leaky or thresholded ReLU",
            )
            _check(layer, layer.max_value in (None, 6.0), "a cap other than 6")

    def _apply(self, layer, inputs, training, updates):
        """`layer` on `inputs` (a list) with builtins-only ops; batch norm's moving statistics
        go to `updates` as (variable, batch value, momentum)."""
        kind = type(layer).__name__
        x = inputs[0]
        if kind == "Add":
            return builtin_grads.add_n(inputs)
        if kind == "Identity":
            return x
        if kind == "ReLU":
            return builtin_grads.relu(x, layer.max_value)
        if kind == "MaxPooling2D":
            return builtin_grads.max_pool2d(
                x, layer.pool_size, layer.strides, layer.padding.upper()
            )
        if kind == "MaskedEncoder":
            x = self._apply(layer.conv, [x], training, updates)
            x = self._apply(layer.norm, [x], training, updates)
            return builtin_grads.scale_channels(tf.sigmoid(x), tf.sigmoid(layer.gate_logits))
        if kind == "BatchNormalization":
            return self._batch_norm(layer, x, training, updates)
        if kind == "Conv2D":
            y = builtin_grads.conv2d(x, layer.kernel, layer.strides, layer.padding.upper())
        else:
            y = builtin_grads.depthwise_conv2d(
                x, layer.depthwise_kernel, layer.strides, layer.padding.upper()
            )
        if layer.use_bias:
            y = builtin_grads.bias_add(y, layer.bias)
        return builtin_grads.relu(y) if _activation_name(layer) == "relu" else y

    @staticmethod
    def _batch_norm(layer, x, training, updates):
        channels = x.shape[-1]
        gamma = layer.gamma if layer.scale else tf.ones([channels])
        beta = layer.beta if layer.center else tf.zeros([channels])
        if not training:
            return builtin_grads.batch_norm_infer(
                x, gamma, beta, layer.moving_mean, layer.moving_variance, layer.epsilon
            )
        y, mean, variance = builtin_grads.batch_norm_train(x, gamma, beta, layer.epsilon)
        updates.append((layer.moving_mean, mean, layer.momentum))
        updates.append((layer.moving_variance, variance, layer.momentum))
        return y

    def _moving_statistics(self):
        """The variables of `forward`'s moments, in their order: each norm's mean, then its
        variance."""
        norms = []
        for node in self._nodes:
            layer = node.layer
            if isinstance(layer, MaskedEncoder):
                layer = layer.norm
            if type(layer).__name__ == "BatchNormalization":
                norms += [layer.moving_mean, layer.moving_variance]
        return norms

    def _run(self, images, training):
        """(the head's output, its features at the cut, the moving statistics' updates)."""
        tensors, updates = {id(self._head_input): images}, []
        for node in self._nodes:
            inputs = [tensors[id(t)] for t in node.keras_inputs]
            (output,) = tf.nest.flatten(node.outputs)
            tensors[id(output)] = self._apply(node.layer, inputs, training, updates)
        features = None if self._features is None else tensors[id(self._features)]
        return tensors[id(self._head_output)], features, updates

    def _indices(self, budget):
        if self._encoder is None:
            return tf.range(self._head_output.shape[-1])
        return budget_lib.top_k_channels(self.gates, budget, self._encoder.seniority)

    # ---------------------------------------------------------------------- the signatures
    def forward(self, images, budget, training=True):
        indices = self._indices(budget)
        output, _, updates = self._run(images, training)
        sent = {"values": tf.gather(output, indices, axis=-1), "indices": indices}
        if training:  # the batch statistics too: what batch norm calibration averages
            moments = [tf.reshape(value, [-1]) for _, value, _ in updates]
            sent["moments"] = tf.concat(moments or [tf.zeros([0])], 0)
        return sent

    def train(
        self,
        images,
        labels,
        upstream_gradient,
        budget,
        learning_rate,
        gate_learning_rate,
        penalty_weight,
    ):
        """The numbers come as one-element vectors (see `signatures`)."""
        budget, learning_rate = budget[0], learning_rate[0]
        gate_learning_rate, penalty_weight = gate_learning_rate[0], penalty_weight[0]
        indices = self._indices(budget)
        trainable = self.sgd_variables + ([self.gates] if self.adam is not None else [])
        with tf.GradientTape() as tape:
            output, features, updates = self._run(images, training=True)
            values = tf.gather(output, indices, axis=-1)
            penalty, local = tf.constant(0.0), tf.constant(0.0)
            if self._encoder is not None:
                penalty = penalty_weight * budget_lib.gate_penalty(
                    self.gates,
                    budget,
                    self._split_config["budget_delta"],
                    self._split_config["polarization"],
                )
            if self._local is not None:
                pooled = (
                    tf.reduce_mean(features, axis=[1, 2]) if features.shape.rank == 4 else features
                )
                dense = self._local.dense
                logits = builtin_grads.bias_add(tf.matmul(pooled, dense.kernel), dense.bias)
                cross_entropy = builtin_grads.sparse_cross_entropy(logits, labels)
                local = self._split_config["local_loss_weight"] * cross_entropy
            device_loss = penalty + local  # on the tape: the gates' and local losses' gradient
        gradients = tape.gradient(
            [values, device_loss],
            trainable,
            output_gradients=[upstream_gradient, tf.ones([])],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        for variable, value, momentum in updates:  # Keras: moving -= (moving - value) * (1 - m)
            variable.assign_sub((variable - value) * (1.0 - momentum))
        by_variable = {id(v): g for v, g in zip(trainable, gradients)}
        self._sgd([by_variable[id(v)] for v in self.sgd_variables], learning_rate)
        if self.adam is not None:
            self._adam(by_variable[id(self.gates)], gate_learning_rate)
        return {"penalty": penalty, "local_loss": local}

    def _sgd(self, gradients, learning_rate):
        """Keras's SGD: weight decay (lr * decay * w), then v = m * v - lr * g, w += v."""
        for variable, velocity, gradient in zip(self.sgd_variables, self.velocities, gradients):
            if self.weight_decay:
                variable.assign_sub(variable * (learning_rate * self.weight_decay))
            velocity.assign(velocity * self.momentum - gradient * learning_rate)
            variable.assign_add(velocity)
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))

    def _adam(self, gradient, learning_rate):
        """Keras's Adam on the gate logits, then their range constraint."""
        beta_1, beta_2 = self.adam["beta_1"], self.adam["beta_2"]
        step = self.gate_steps + 1.0
        first, second = self.gate_moments
        first.assign_add((gradient - first) * (1.0 - beta_1))
        second.assign_add((gradient * gradient - second) * (1.0 - beta_2))
        alpha = learning_rate * tf.sqrt(1.0 - tf.pow(beta_2, step)) / (1.0 - tf.pow(beta_1, step))
        self.gates.assign_sub(first * alpha / (tf.sqrt(second) + self.adam["epsilon"]))
        self.gates.assign(self.gates.constraint(self.gates))
        self.gate_steps.assign(step)

    def get_weights(self):
        return {"weights": tf.concat([tf.reshape(v, [-1]) for v in self.all_variables], 0)}

    def set_weights(self, weights):
        offset = 0
        for variable in self.all_variables:
            size = int(np.prod(variable.shape))
            variable.assign(tf.reshape(weights[offset : offset + size], variable.shape))
            offset += size
        return {"size": tf.constant(offset)}

    def layout(self):
        """What `get_weights` returns, slice by slice: name, kind, shape, offset, size."""
        entries, offset = [], 0
        for kind, variable in self.state:
            size = int(np.prod(variable.shape))
            entries.append(
                dict(
                    name=variable.name,
                    kind=kind,
                    shape=[int(d) for d in variable.shape],
                    offset=offset,
                    size=size,
                )
            )
            offset += size
        at = {id(v): entry for (_, v), entry in zip(self.state, entries)}

        def where(variable):
            if variable is None:
                return None
            return dict(offset=at[id(variable)]["offset"], size=at[id(variable)]["size"])

        return dict(
            size=offset,
            variables=entries,
            gates=where(self.gates),
            seniority=where(None if self._encoder is None else self._encoder.seniority),
            moments=[where(v) for v in self._moving_statistics()],  # forward's, in order
        )

    def signatures(self):
        """The module's concrete functions for the converter, by signature name."""
        image_shape = [None] + [int(d) for d in self._head_input.shape[1:]]
        wire = [None] + [int(d) for d in self._head_output.shape[1:-1]] + [None]
        images = tf.TensorSpec(image_shape, tf.float32, name="images")
        # Every number goes in as a one-element vector: a 0-d input crashes the aarch64 LiteRT
        # wheel's signature runner (ai-edge-litert 2.1.6 and 2.3.0 under qemu 7.2 and 10.0).
        budget = tf.TensorSpec([1], tf.int32, name="budget")
        scalar = lambda name: tf.TensorSpec([1], tf.float32, name=name)  # noqa: E731
        size = self.layout()["size"]

        functions = dict(
            forward=tf.function(lambda images, budget: self.forward(images, budget[0], True)),
            infer=tf.function(lambda images, budget: self.forward(images, budget[0], False)),
            train=tf.function(self.train),
            get_weights=tf.function(self.get_weights),
            set_weights=tf.function(self.set_weights),
        )
        return dict(
            forward=functions["forward"].get_concrete_function(images, budget),
            infer=functions["infer"].get_concrete_function(images, budget),
            train=functions["train"].get_concrete_function(
                images,
                tf.TensorSpec([None], tf.int32, name="labels"),
                tf.TensorSpec(wire, tf.float32, name="upstream_gradient"),
                budget,
                scalar("learning_rate"),
                scalar("gate_learning_rate"),
                scalar("penalty_weight"),
            ),
            get_weights=functions["get_weights"].get_concrete_function(),
            set_weights=functions["set_weights"].get_concrete_function(
                tf.TensorSpec([size], tf.float32, name="weights")
            ),
        )
