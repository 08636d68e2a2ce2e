"""Logits where a model ends in a softmax: what `split_model` makes the tail output.

A `SplitModel`'s tail outputs logits: its default loss, the nested budgets' distillation, the
networked server and the exported tail (which adds the softmax) all take them so. Models such as
keras.applications' end in a softmax instead, either as a layer of its own (`Softmax`,
`Activation("softmax")`) or as the activation of their last layer (`Dense(..., activation=
"softmax")`). The splitter leaves the former out of the tail and calls the latter through
`Logits`, which runs the very same layer (its weights shared with the user's model) without its
softmax.
"""

import inspect

import tf_keras as keras


def is_softmax(activation):
    """Whether `activation` (a function, a string or None) is a softmax."""
    if activation is None:
        return False
    if isinstance(activation, str):
        return activation == "softmax"
    return getattr(activation, "__name__", None) == "softmax"


def is_softmax_layer(layer):
    """Whether `layer` does nothing but a softmax over the last axis."""
    if isinstance(layer, keras.layers.Softmax):
        return layer.axis in (-1, [-1], (-1,))
    return type(layer) is keras.layers.Activation and is_softmax(layer.activation)


def has_softmax_activation(layer):
    """Whether `layer` computes something and then applies a softmax (e.g. a softmax Dense)."""
    return not is_softmax_layer(layer) and is_softmax(getattr(layer, "activation", None))


def ends_in_softmax(model):
    """Whether the (single-output) functional `model`'s output comes out of a softmax."""
    if len(getattr(model, "output_names", None) or ()) != 1:
        return False
    layer = model.get_layer(model.output_names[0])
    return is_softmax_layer(layer) or has_softmax_activation(layer)


def loss_expects_probabilities(loss):
    """Whether `loss`, as `keras.Model.compile` takes it, is a cross-entropy on probabilities."""
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return False  # not a loss Keras knows by name: `compile` says so itself
    if isinstance(loss, keras.losses.Loss):
        return loss.get_config().get("from_logits") is False
    if not callable(loss):
        return False
    try:
        from_logits = inspect.signature(loss).parameters.get("from_logits")
    except (TypeError, ValueError):  # a callable without a signature to read
        return False
    return from_logits is not None and from_logits.default is False


@keras.utils.register_keras_serializable(package="tfsplit")
class Logits(keras.layers.Wrapper):
    """Calls `layer`, whose activation is a softmax, without it: the logits of its probabilities.

    The wrapped layer is the user's own object, so training the split trains the user's model;
    the user's model itself keeps its softmax. For the duration of each call the layer's
    activation is linear, then restored.

    Args:
      layer: a layer with an `activation` attribute that is a softmax (e.g. the classifier
        `Dense` of a keras.applications model).
    """

    def __init__(self, layer, **kwargs):
        if not has_softmax_activation(layer):
            raise ValueError(
                "`Logits` wraps a layer whose activation is a softmax. Received: "
                f"{layer.name!r} with activation {getattr(layer, 'activation', None)!r}"
            )
        super().__init__(layer, **kwargs)

    def call(self, inputs, *args, **kwargs):
        activation = self.layer.activation
        self.layer.activation = keras.activations.linear
        try:
            return self.layer(inputs, *args, **kwargs)
        finally:
            self.layer.activation = activation

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)
