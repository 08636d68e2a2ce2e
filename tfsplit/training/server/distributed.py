"""The server's tail under a `tf.distribute` strategy: each training step's batch split across
the replicas (GPUs, or logical CPU devices where there are none).

The step stays one step: every replica takes a contiguous slice of the batch, batch norm
computes the whole batch's statistics (synchronized across the replicas), the tail's gradients
are summed, and the gradient sent back to the devices and the logits are gathered in the batch's
order. So a tail trained under `mirrored` equals the tail trained without a strategy, to float
rounding. What differs: a tail with dropout draws each replica's masks from its own stream, as
`tf.distribute` does.
"""

import contextlib
import functools
import threading

import tensorflow as tf
import tf_keras as keras
from absl import logging

STRATEGIES = ("none", "mirrored")
# What a replica's trace knows that its batch norm layers need: whether its part of the batch is
# a copy of the whole (`replica_part`), and each layer's count. A strategy traces each replica in
# a thread of its own.
_replica = threading.local()


def split_cpu(replicas):
    """Makes the machine's CPU `replicas` logical devices, for a mirrored tail without GPUs.

    TensorFlow fixes its devices at its first op, so this runs before any.
    """
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"`replicas` must be a positive integer. Received: {replicas!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot split the CPU into {replicas} devices: TensorFlow has started already "
            f"({error}). Choose the strategy before the process runs any TensorFlow op."
        ) from None


def make_strategy(name, cpu_replicas=2):
    """The strategy `name` names (None for "none"): `mirrored` over the local GPUs, or over
    `cpu_replicas` logical CPU devices where there is no GPU."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}.")
    if name == "none":
        return None
    if tf.config.list_physical_devices("GPU"):
        strategy = tf.distribute.MirroredStrategy()
    else:
        split_cpu(cpu_replicas)
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        # NCCL is for GPUs; on CPU devices the sums go through one device.
        strategy = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    logging.info(
        "Training steps split across %d replicas: %s",
        strategy.num_replicas_in_sync,
        ", ".join(strategy.extended.worker_devices),
    )
    return strategy


def scope(strategy):
    """`strategy`'s scope, or nothing without one: the tail's variables are made in it."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def synchronize_batch_norm(model):
    """Has `model`'s batch norm layers compute the statistics of the whole batch across the
    replicas, as one device would, instead of each replica's part.

    The synchronized layer is not fused, and Keras's unfused layer moves its moving variance
    towards the batch's biased variance where the fused one (one device) uses the unbiased one:
    the layers here use the unbiased one too, from the whole batch's count.
    """
    for layer in model.submodules:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized, layer.fused = True, False
            layer._sync_calculate_mean_and_var = functools.partial(
                _counted_moments, layer, layer._sync_calculate_mean_and_var
            )
            layer._assign_moving_average = functools.partial(
                _unbiased_moving_average, layer, layer._assign_moving_average
            )


def _counted_moments(layer, moments, x, reduction_axes, keep_dims, mask=None):
    """The whole batch's mean and (biased) variance per channel, added up over the replicas;
    notes the whole batch's count of values per channel for the moving variance.

    The variance is the mean squared difference from the whole batch's mean, as one device
    computes it; Keras's synchronized layer takes E[x^2] - E[x]^2, which loses the precision of
    a channel of small variance.
    """
    if mask is not None:
        raise ValueError(f"{layer.name}: a masked batch norm is not synchronized here.")
    context = tf.distribute.get_replica_context()
    spread = context is not None and context.num_replicas_in_sync > 1

    def whole_batch_sum(local):
        if not spread:
            return local
        # Replicas that each hold the whole batch count it once.
        return context.all_reduce(tf.distribute.ReduceOp.SUM, local) / _replica.copies

    count = whole_batch_sum(tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype))
    _replica.counts = dict(getattr(_replica, "counts", {}), **{layer.name: count})
    mean = whole_batch_sum(tf.reduce_sum(x, axis=reduction_axes, keepdims=True)) / count
    # As tf.nn.moments: the squares' gradient through the mean is zero at the mean.
    squares = tf.math.squared_difference(x, tf.stop_gradient(mean))
    variance = whole_batch_sum(tf.reduce_sum(squares, axis=reduction_axes, keepdims=True)) / count
    if not keep_dims:
        mean, variance = tf.squeeze(mean, reduction_axes), tf.squeeze(variance, reduction_axes)
    return mean, variance


def _unbiased_moving_average(layer, assign, variable, value, momentum, inputs_size):
    value = tf.stop_gradient(value)  # the moving statistics take no gradient
    if variable is layer.moving_variance:
        count = _replica.counts[layer.name]
        value = value * count / tf.maximum(count - 1.0, 1.0)
    return assign(variable, value, momentum, inputs_size)


def check_distributable(split):
    """Fails for what the strategy does not split: nested budgets keep one fill of the whole
    batch's channel means; a U-shaped split's middle has not been checked under one."""
    if hasattr(split, "top"):
        raise ValueError(
            "A U-shaped split (config.model.top) trains its middle without a strategy here. Use "
            "--strategy=none."
        )
    if split.nesting is not None:
        raise ValueError(
            "A run with nested budgets (config.budget_sampling.nested) trains its tail without a "
            "strategy: its distillation keeps the channel means of the whole batch. Use "
            "--strategy=none."
        )


def replica_part(batch):
    """(begin, end, copied) of this replica's part of a batch of `batch` samples: a contiguous
    slice; or, for a batch smaller than the replicas, all of it on every replica (`copied`): a
    replica without samples breaks the synchronized batch norm's sums."""
    context = tf.distribute.get_replica_context()
    replica, replicas = context.replica_id_in_sync_group, context.num_replicas_in_sync
    copied = batch < replicas
    # Copies count once in the synchronized batch norm's count (`_counted_moments`).
    _replica.copies = tf.where(copied, float(replicas), 1.0)
    begin = tf.where(copied, 0, batch * replica // replicas)
    end = tf.where(copied, batch, batch * (replica + 1) // replicas)
    return begin, end, copied


def joined(tensor, batch, copied, add_copies):
    """The whole batch's `tensor` from each replica's part: the parts in replica order; or, where
    every replica had the whole batch, the sum of their copies (`add_copies`: a gradient each
    replica computed a share of) or the first copy."""
    context = tf.distribute.get_replica_context()
    parts = context.all_gather(tensor, axis=0)
    copies = tf.reshape(parts, tf.concat([[-1, batch], tf.shape(tensor)[1:]], 0))
    first = tf.reduce_sum(copies, 0) if add_copies else copies[0]
    return tf.cond(copied, lambda: first, lambda: parts)


def summed(tensors):
    """`tensors` summed over the replicas (None stays None: a variable the loss never reached)."""
    context = tf.distribute.get_replica_context()
    present = [tensor for tensor in tensors if tensor is not None]
    totals = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present) if present else [])
    return [None if tensor is None else next(totals) for tensor in tensors]


def replicas_in_sync():
    """How many replicas the strategy in force divides a loss by (Keras's convention)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def first_result(strategy, values):
    """The value every replica computed alike (sums, gathers), from the first replica."""
    return tf.nest.map_structure(
        lambda value: None if value is None else strategy.experimental_local_results(value)[0],
        values,
    )
