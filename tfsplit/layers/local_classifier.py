"""A classifier on the device's own features at the cut, trained on labels the device already has.

In split learning the head learns only from the gradient the server returns through the sent
channels: k of them at budget k. A small classifier on the head's features at the cut (global
average pool, then one dense layer) gives the head a loss of its own, computed on the device from
the labels it sends with every batch anyway, so it costs no bytes. On the embedded sets at ten
epochs it made every method take off sooner (measured: docs/results.md). It trains with the head and is never
exported: inference runs head and tail only.
"""

import tensorflow as tf
import tf_keras as keras


@keras.utils.register_keras_serializable(package="tfsplit")
class LocalClassifier(keras.layers.Layer):
    """Logits from the cut's features: (N, h, w, C) average-pooled, or (N, C) as they are.

    Args:
      num_classes: the classes the tail predicts.
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(
                f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes!r}"
            )
        self.num_classes = num_classes
        self.dense = keras.layers.Dense(num_classes, name="dense")

    def build(self, input_shape):
        if len(input_shape) not in (2, 4):
            raise ValueError(
                "A local classifier reads (N, h, w, C) or (N, C) features at the cut. "
                f"Received: shape {tuple(input_shape)}"
            )
        self.dense.build((input_shape[0], input_shape[-1]))
        super().build(input_shape)

    @classmethod
    def for_features(cls, features_model, num_classes):
        """One built for the first output of `features_model` (see `cut_features`)."""
        classifier = cls(num_classes, name="local_classifier")
        classifier.build(features_model.outputs[0].shape)
        return classifier

    def call(self, features):
        if features.shape.rank == 4:
            features = tf.reduce_mean(features, axis=[1, 2])
        return self.dense(features)

    def cross_entropy(self, features, labels):
        """Mean cross-entropy of its predictions from `features` against integer `labels`."""
        return tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(labels, self(features), from_logits=True)
        )

    def get_config(self):
        return dict(super().get_config(), num_classes=self.num_classes)


def cut_features(head, encoder=None):
    """The head as a model of (its features at the cut, what it sends), both from one pass.

    The features are the encoder's input when the head ends with one (`encoder`), else the
    head's output: what the head has learned, before the gates choose what crosses.
    """
    cut = head.output if encoder is None else encoder.input
    return keras.Model(head.input, [cut, head.output], name=f"{head.name}_features")
