"""The Keras device's half of a training step, compiled, timed as `tfsplit-bench-head
--trainable` times the LiteRT head's: what the TensorFlow device spends per batch."""

import time

import numpy as np
import tensorflow as tf


def keras_device_step_ms(split, batch_sizes, runs=20, warmup=3):
    """p50 milliseconds of `RemoteSplitModel.train_step`'s device half (head forward at the full
    budget, the gradient of the sent values and the gates' penalty, the optimizers' update) per
    batch size, with a random upstream gradient in place of the server's."""
    split.set_budget(split.channels)
    variables = split.device_trainable_variables

    @tf.function(reduce_retracing=True)
    def step(images, labels, upstream):
        indices = split.channel_indices()
        with tf.GradientTape() as tape:
            values, penalty, local = split.device_step(images, labels, indices)
            device_loss = penalty + local
        gradients = tape.gradient(
            [values, device_loss], variables, output_gradients=[upstream, tf.ones([])]
        )
        split.apply_gradients(gradients, variables)
        return values

    rng, rows = np.random.default_rng(0), []
    shape, classes = tuple(split.head.input.shape[1:]), int(split.tail.output.shape[-1])
    for batch in batch_sizes:
        images = tf.constant(rng.normal(size=(batch, *shape)).astype(np.float32))
        labels = tf.constant(rng.integers(0, classes, batch).astype(np.int32))
        upstream = tf.zeros((batch, split.height, split.width, split.channels))
        seconds = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            step(images, labels, upstream).numpy()
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
        rows.append(dict(batch=batch, keras_step_ms=1e3 * float(np.median(seconds))))
    return rows
