"""The top of a U-shaped split as a LiteRT training model: the device without TensorFlow holds
the last layers and the labels as it holds the head.

`export_trainable_ushaped` writes the head as `export_trainable_head` does, and beside it
`top_train.tflite` (TFLite builtins only) with `top_train.json`, the layout of its weight vector
and what the device needs of the second cut. Its signatures, over resource variables:

- `train(middle, labels, keep, learning_rate)`: one step of the top on the middle's output: the
  logits, the mean cross-entropy `loss`, and its `gradient` at the middle's output (what goes up
  to the server); the top's weights take the run's SGD step. `keep` is the dropout layer's mask,
  drawn on the device (0, or 1 / (1 - rate)): LiteRT has no seeded random op a device could
  replay after a restart;
- `forward(middle)`: the logits with batch statistics, and the top's batch norms' batch moments
  (what batch norm calibration averages, as the head's `forward` gives them; none without);
- `infer(middle)`: the logits with the moving statistics (evaluation);
- `get_weights()` / `set_weights(weights)`: every variable as one flat float32 vector.
"""

import json
import os
import types

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfsplit.backbones.splitter import topological_nodes
from tfsplit.device.training.head import LAYOUT_FILE
from tfsplit.device.training.top import TOP_LAYOUT_FILE, TOP_MODEL_FILE
from tfsplit.export import builtin_grads
from tfsplit.export.run import load_run
from tfsplit.export.trainable import TrainableHead, _activation_name, _check, _unsupported
from tfsplit.export.trainable_export import (
    _write_atomically,
    convert,
    export_trainable_head,
    optimizer_settings,
)
from tfsplit.training import trainer

TOP_LAYERS = ("GlobalAveragePooling2D", "Flatten", "Dropout", "Dense")


class TrainableTop(TrainableHead):
    """The top of a `UShapedSplitModel` as a module with the signatures of the module docstring;
    the head's layers (convolutions, batch norm, ReLU, pooling) and its SGD, plus the
    classifier's layers (`TOP_LAYERS`).

    Args:
      split: a compiled `UShapedSplitModel`; the module computes with its top's own variables.
      momentum, weight_decay: the run's SGD, as the head's.
    """

    def __init__(self, split, momentum=0.0, weight_decay=0.0):
        tf.Module.__init__(self, name="trainable_top")
        top = split.top
        self._head_input, self._head_output = top.input, top.output
        self._nodes = topological_nodes(top)
        self._encoder, self._local, self._features, self.gates, self.adam = (None,) * 5
        dropouts = [n.layer for n in self._nodes if isinstance(n.layer, keras.layers.Dropout)]
        if len(dropouts) > 1:
            raise _unsupported(dropouts[1], "a top holds one dropout layer at most")
        self.dropout = dropouts[0] if dropouts else None
        self._mask = types.SimpleNamespace(keep=None)  # the traced step's dropout mask
        self._loss_check(split)
        for node in self._nodes:
            self._check_layer(node.layer)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay or 0.0)
        self.sgd_variables = list(top.trainable_variables)
        self.velocities = [
            tf.Variable(tf.zeros_like(v), name="velocity") for v in self.sgd_variables
        ]
        state = [v for v in top.weights if not any(v is t for t in self.sgd_variables)]
        self.state = (
            [("weight", v) for v in self.sgd_variables]
            + [("state", v) for v in state]
            + [("velocity", v) for v in self.velocities]
        )
        self.all_variables = [v for _, v in self.state]

    @staticmethod
    def _loss_check(split):
        loss = split.loss
        sparse = isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
        if not sparse or not loss.get_config().get("from_logits"):
            raise ValueError(
                "The trainable top computes the run's loss, SparseCategoricalCrossentropy("
                f"from_logits=True). Received: {loss!r}"
            )

    def _check_layer(self, layer):
        kind = type(layer).__name__
        if kind not in TOP_LAYERS:
            return super()._check_layer(layer)
        if kind == "Dense":
            _check(layer, _activation_name(layer) in ("linear", "relu"), "its activation")
        if kind == "GlobalAveragePooling2D":
            _check(layer, layer.data_format == "channels_last", "channels_first")
            _check(layer, not layer.keepdims, "keepdims")

    def _apply(self, layer, inputs, training, updates):
        kind, x = type(layer).__name__, inputs[0]
        if kind == "GlobalAveragePooling2D":
            return tf.reduce_mean(x, axis=[1, 2])
        if kind == "Flatten":
            return tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
        if kind == "Dropout":
            return _dropped(x, self._mask.keep) if training and self._mask.keep is not None else x
        if kind == "Dense":
            y = tf.matmul(x, layer.kernel)
            if layer.use_bias:
                y = builtin_grads.bias_add(y, layer.bias)
            return builtin_grads.relu(y) if _activation_name(layer) == "relu" else y
        return super()._apply(layer, inputs, training, updates)

    def _logits(self, middle, training, keep=None):
        self._mask.keep = keep
        try:
            logits, _, updates = self._run(middle, training)
        finally:
            self._mask.keep = None
        return logits, updates

    # ---------------------------------------------------------------------- the signatures
    def forward_top(self, middle, training):
        logits, updates = self._logits(middle, training)
        out = {"logits": logits}
        if training and updates:  # a top without batch norm has nothing to calibrate
            out["moments"] = tf.concat([tf.reshape(value, [-1]) for _, value, _ in updates], 0)
        return out

    def train_top(self, middle, labels, keep, learning_rate):
        with tf.GradientTape() as tape:
            tape.watch(middle)
            logits, updates = self._logits(middle, True, keep)
            loss = builtin_grads.sparse_cross_entropy(logits, labels)
        gradients = tape.gradient(
            loss,
            [middle] + self.sgd_variables,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        for variable, value, momentum in updates:
            variable.assign_sub((variable - value) * (1.0 - momentum))
        self._sgd(gradients[1:], learning_rate[0])
        return {"loss": loss, "logits": logits, "gradient": gradients[0]}

    def _dropout_features(self):
        """The width of the dropout layer's input: the `keep` mask's (1 without dropout)."""
        return 1 if self.dropout is None else int(self.dropout.input.shape[-1])

    def layout(self):
        layout = super().layout()
        layout["dropout"] = None
        if self.dropout is not None:
            rate = float(self.dropout.rate)
            layout["dropout"] = dict(rate=rate, features=self._dropout_features())
        return layout

    def signatures(self):
        middle = tf.TensorSpec(
            [None] + [int(d) for d in self._head_input.shape[1:]], tf.float32, name="middle"
        )
        size = self.layout()["size"]
        functions = dict(
            forward=tf.function(lambda middle: self.forward_top(middle, True)),
            infer=tf.function(lambda middle: self.forward_top(middle, False)),
            train=tf.function(self.train_top),
            get_weights=tf.function(self.get_weights),
            set_weights=tf.function(self.set_weights),
        )
        return dict(
            forward=functions["forward"].get_concrete_function(middle),
            infer=functions["infer"].get_concrete_function(middle),
            train=functions["train"].get_concrete_function(
                middle,
                tf.TensorSpec([None], tf.int32, name="labels"),
                tf.TensorSpec([None, self._dropout_features()], tf.float32, name="keep"),
                tf.TensorSpec([1], tf.float32, name="learning_rate"),
            ),
            get_weights=functions["get_weights"].get_concrete_function(),
            set_weights=functions["set_weights"].get_concrete_function(
                tf.TensorSpec([size], tf.float32, name="weights")
            ),
        )


def _dropped(x, keep):
    """`x * keep` for a mask of x's shape; the gradient flows to `x` only (without it, the
    gradient of a product of two unknown batch sizes needs `BroadcastGradientArgs`, no builtin)."""

    @tf.custom_gradient
    def forward(x):
        return x * keep, lambda upstream: upstream * keep

    return forward(x)


class _HeadOnly:
    """`split` as the head's exporter reads it: the top's variables are not the head's."""

    def __init__(self, split):
        self._split = split

    def __getattr__(self, name):
        return getattr(self._split, name)

    @property
    def device_trainable_variables(self):
        top = self._split.top.trainable_variables
        return [v for v in self._split.device_trainable_variables if all(v is not t for t in top)]


def top_description(split):
    """What the device must know of the second cut: its shape and wire, and its noise."""
    return dict(
        top_shape=[int(d) for d in split.top_shape],
        top_activation_dtype=split.top_activation_dtype,
        top_gradient_dtype=split.top_gradient_dtype,
        top_gradient_noise=float(split.top_gradient_noise),
        num_classes=int(split.num_classes),
    )


def export_trainable_ushaped(split, out_dir, config=None):
    """The head of a compiled U-shaped `split` as `export_trainable_head` writes it (its run
    description naming the top's classes), and `top_train.tflite` with `top_train.json`;
    returns (head path, top path)."""
    head_path = export_trainable_head(_HeadOnly(split), out_dir, config)
    if config is not None:  # the run's classes are the top's, not the middle's channels
        layout_path = os.path.join(out_dir, LAYOUT_FILE)
        with open(layout_path) as f:
            layout = json.load(f)
        layout["run"]["num_classes"] = int(split.num_classes)
        _write_atomically(layout_path, json.dumps(layout, indent=1).encode())
    momentum, weight_decay, _ = optimizer_settings(split)
    module = TrainableTop(split, momentum, weight_decay)
    model = convert(module)
    top_path = os.path.join(out_dir, TOP_MODEL_FILE)
    _write_atomically(top_path, model)
    layout = dict(module.layout(), top=top_description(split))
    _write_atomically(os.path.join(out_dir, TOP_LAYOUT_FILE), json.dumps(layout, indent=1).encode())
    return head_path, top_path


def export_trainable_ushaped_run(workdir, out_dir):
    """`export_trainable_ushaped` of the U-shaped run in `workdir`, with its config's
    optimizers."""
    run = load_run(workdir)
    return export_trainable_ushaped(
        trainer.compile_split(run.split, run.config), out_dir, run.config
    )


def export_trainable_ushaped_start(config, out_dir):
    """`export_trainable_ushaped` of the model a new U-shaped run of `config` starts from, as
    `export_trainable_start` builds the plain split's."""
    keras.utils.set_random_seed(config.seed)
    info = trainer.build_data(config).info
    split = trainer.build_split_model(config, info, remote=True)
    return export_trainable_ushaped(split, out_dir, config)
