"""Prediction at a budget: what the server computes from what the device sends.

One implementation for the trainer's per-epoch evaluation and the accuracy-versus-budget curve, so
both measure the same thing: the top-k channels by gate importance, quantized to the wire dtype,
scattered back (zeros elsewhere) and run through the tail.
"""

import tensorflow as tf

from tfsplit import budget as budget_lib
from tfsplit import codec


def build_predict_fn(split, wire_dtype):
    """A compiled `(images, k) -> logits`; k is a tensor, so any budget reuses one trace.

    Args:
      split: a `tfsplit.models.SplitModel`; without an encoder every channel is sent.
      wire_dtype: the activations' wire dtype (see `tfsplit.codec.WIRE_DTYPES`).
    """

    @tf.function(reduce_retracing=True)
    def predict(images, k):
        activations = split.head(images, training=False)
        if split.encoder is not None:
            indices = budget_lib.top_k_channels(split.encoder.gate_logits, k)
            activations = activations * budget_lib.channel_mask(indices, split.channels)
        return split.tail(codec.fake_quantize(activations, wire_dtype), training=False)

    return predict


def accuracy(predict, dataset, k):
    """Top-1 accuracy of `predict` at budget k over a dataset of (images, labels) batches."""
    k = tf.constant(k, tf.int32)
    correct = total = 0
    for images, labels in dataset:
        predictions = tf.argmax(predict(images, k), axis=-1, output_type=tf.int32)
        correct += int(tf.reduce_sum(tf.cast(predictions == labels, tf.int32)))
        total += int(tf.shape(labels)[0])
    if total == 0:
        raise ValueError("The evaluation dataset is empty; expected at least one batch.")
    return correct / total
