"""Split training and evaluation steps.

Two interchangeable implementations of one step:
- `FusedSteps`: one compiled `tf.function` for head, channel selection, wire quantization (both
  directions, straight-through), tail and budget loss. Bytes are counted by the ledger from the
  codec's exact size formula.
- `CodecSteps`: the same step cut where a device and a server would cut it: the head's output is
  encoded to real bytes by the codec, decoded, run through the tail, and the tail's gradient is
  encoded and decoded again before the head sees it. This is the path that bytes take when they
  leave the process; tests use it to prove the fused path and the ledger are exact.
"""

import dataclasses

import tensorflow as tf
import tf_keras as keras

from tfsplit import budget as budget_lib
from tfsplit import codec, inference


def make_wire(activation_dtype, gradient_dtype):
    """Quantize what crosses the cut both ways: activations forward, their gradient backward.

    Only the masked (selected) channels carry values, in both directions, exactly as the codec
    sends them; the rest are zero by construction.
    """

    @tf.custom_gradient
    def wire(activations, mask):
        sent = codec.fake_quantize(activations * mask, activation_dtype)

        def backward(upstream):
            return codec.fake_quantize(upstream * mask, gradient_dtype), tf.zeros_like(mask)

        return sent, backward

    return wire


@dataclasses.dataclass
class StepResult:
    """Per-step numbers the trainer logs and the ledger counts."""

    cross_entropy: float
    budget_loss: float
    correct: int
    batch_size: int
    bytes_up: int
    bytes_down: int


class _StepsBase:
    """State shared by both step implementations.

    Args:
      split: a `tfsplit.models.SplitModel`.
      optimizer: a tf_keras optimizer.
      activation_dtype, gradient_dtype: wire dtypes (see `tfsplit.codec.WIRE_DTYPES`).
      budget_eps, budget_delta: weights of the budget loss.
      gate_optimizer: optional optimizer for the gate logits alone; None trains them with
        `optimizer` like every other weight.
      sampling_probability, min_budget: nested budget sampling for adaptive inference: with this
        probability a masked step sends the top k' channels, k' uniform in [min_budget, k], so the
        tail learns to work from any prefix of the gate ranking. 0 always sends k.
      seed: seeds the budget draws.
    """

    def __init__(self, split, optimizer, activation_dtype, gradient_dtype, budget_eps, budget_delta,
                 gate_optimizer=None, sampling_probability=0.0, min_budget=1, seed=0):
        if not 0.0 <= sampling_probability <= 1.0:
            raise ValueError("sampling_probability must be in [0, 1]. Received: "
                             f"{sampling_probability!r}")
        if not isinstance(min_budget, int) or min_budget < 1:
            raise ValueError(f"min_budget must be a positive integer. Received: {min_budget!r}")
        self.split = split
        self.optimizer = optimizer
        self.gate_optimizer = gate_optimizer if split.encoder is not None else None
        self.activation_dtype = activation_dtype
        self.gradient_dtype = gradient_dtype
        self.budget_eps = float(budget_eps)
        self.budget_delta = float(budget_delta)
        self.height, self.width, self.channels = split.wire_shape
        # Variables, not Python values, so a new phase does not retrace the compiled step.
        self.k = tf.Variable(self.channels, dtype=tf.int32, trainable=False, name="budget")
        self.penalty_weight = tf.Variable(0.0, trainable=False, name="penalty_weight")
        self.sampling_probability = float(sampling_probability)
        self.min_budget = min_budget
        self.step_sampling = tf.Variable(0.0, trainable=False, name="step_sampling")
        self.budget_draws = tf.random.Generator.from_seed(seed)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        # Both halves update through one optimizer; it must know every variable up front.
        gates = self._gate_variables()
        self.optimizer.build([v for v in split.head.trainable_variables
                              + split.tail.trainable_variables if v.ref() not in gates])
        if self.gate_optimizer is not None:
            self.gate_optimizer.build([split.encoder.gate_logits])
        self._predict = inference.build_predict_fn(split, activation_dtype)

    def _gate_variables(self):
        return {self.split.encoder.gate_logits.ref()} if self.gate_optimizer is not None else set()

    def _apply(self, grads, variables):
        """Applies gradients, the gate logits' through their own optimizer when there is one."""
        gates = self._gate_variables()
        pairs = list(zip(grads, variables))
        self.optimizer.apply_gradients([(g, v) for g, v in pairs if v.ref() not in gates])
        if gates:
            self.gate_optimizer.apply_gradients([(g, v) for g, v in pairs if v.ref() in gates])

    def set_budget(self, k, masking):
        """k channels are sent; `masking` turns the budget loss on (off for unmasked phases)."""
        self.k.assign(k)
        self.penalty_weight.assign(self.budget_eps if masking else 0.0)
        self.step_sampling.assign(self.sampling_probability if masking else 0.0)

    def _step_budget(self):
        """k, or with probability `step_sampling` a budget drawn uniformly from [min_budget, k]."""
        low = tf.minimum(self.min_budget, self.k)
        drawn = self.budget_draws.uniform([], low, self.k + 1, dtype=tf.int32)
        sample = self.budget_draws.uniform([]) < self.step_sampling
        return tf.where(sample, drawn, self.k)

    def bytes_for(self, batch_size, k):
        up = codec.payload_nbytes(batch_size, self.height, self.width, k, self.activation_dtype,
                                  with_labels=True, channels=self.channels)
        down = codec.payload_nbytes(batch_size, self.height, self.width, k, self.gradient_dtype,
                                    with_labels=False, channels=self.channels)
        return up, down

    def _selection(self, k):
        encoder = self.split.encoder
        if encoder is None:
            return tf.range(self.channels, dtype=tf.int32), tf.ones([self.channels])
        indices = budget_lib.top_k_channels(encoder.gate_logits, k)
        return indices, budget_lib.channel_mask(indices, self.channels)

    def _budget_penalty(self):
        if self.split.encoder is None:
            return tf.constant(0.0)
        return self.penalty_weight * budget_lib.budget_loss(
            self.split.encoder.gate_logits, self.k, 1.0, self.budget_delta
        )

    def evaluate(self, dataset):
        """Top-1 accuracy on `dataset` at the budget in force, sending what inference would send."""
        return inference.accuracy(self._predict, dataset, int(self.k.numpy()))


class FusedSteps(_StepsBase):
    """The whole split step as one compiled function (the fast path)."""

    def __init__(self, *args, jit_compile=False, **kwargs):
        super().__init__(*args, **kwargs)
        self._wire = make_wire(self.activation_dtype, self.gradient_dtype)
        self._compiled = tf.function(self._step, jit_compile=jit_compile, reduce_retracing=True)

    def _step(self, images, labels):
        variables = self.split.head.trainable_variables + self.split.tail.trainable_variables
        k = self._step_budget()
        with tf.GradientTape() as tape:
            _, mask = self._selection(k)
            sent = self._wire(self.split.head(images, training=True), mask)
            logits = self.split.tail(sent, training=True)
            cross_entropy = self.loss_fn(labels, logits)
            penalty = self._budget_penalty()
            loss = cross_entropy + penalty
        self._apply(tape.gradient(loss, variables), variables)
        correct = tf.reduce_sum(
            tf.cast(tf.argmax(logits, -1, output_type=tf.int32) == labels, tf.int32)
        )
        return cross_entropy, penalty, correct, k

    def train_step(self, images, labels):
        cross_entropy, penalty, correct, k = self._compiled(images, labels)
        batch_size = int(labels.shape[0])
        up, down = self.bytes_for(batch_size, int(k))
        return StepResult(float(cross_entropy), float(penalty), int(correct), batch_size, up, down)


class CodecSteps(_StepsBase):
    """The split step with real bytes between device and server halves.

    Slower than `FusedSteps` (two extra host round trips per step) but it is literally what a
    networked device and server do, and the bytes it reports are `len()` of encoded payloads.
    """

    @tf.function(reduce_retracing=True)
    def _device_forward(self, images):
        indices, _ = self._selection(self._step_budget())
        return self.split.head(images, training=True), self._budget_penalty(), indices

    @tf.function(reduce_retracing=True)
    def _server_step(self, received, labels):
        variables = self.split.tail.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(received)
            logits = self.split.tail(received, training=True)
            cross_entropy = self.loss_fn(labels, logits)
        grads = tape.gradient(cross_entropy, variables)
        received_gradient = tape.gradient(cross_entropy, received)
        self.optimizer.apply_gradients(zip(grads, variables))
        correct = tf.reduce_sum(
            tf.cast(tf.argmax(logits, -1, output_type=tf.int32) == labels, tf.int32)
        )
        return cross_entropy, correct, received_gradient

    def train_step(self, images, labels):
        head_variables = self.split.head.trainable_variables
        # The tape spans the byte round trip, as the device keeps its graph while it waits.
        with tf.GradientTape() as tape:
            activations, penalty, indices = self._device_forward(images)
        indices = indices.numpy()
        upstream = codec.encode(
            activations.numpy()[..., indices], indices, self.channels, self.activation_dtype,
            kind="activations", labels=labels.numpy(),
        )
        received = codec.decode(upstream, expect_kind="activations")
        cross_entropy, correct, received_gradient = self._server_step(
            tf.constant(received.scatter()), tf.constant(received.labels)
        )
        downstream = codec.encode(
            received_gradient.numpy()[..., received.indices], received.indices, self.channels,
            self.gradient_dtype, kind="gradients",
        )
        returned = codec.decode(downstream, expect_kind="gradients")
        grads = tape.gradient(
            [activations, penalty], head_variables,
            output_gradients=[tf.constant(returned.scatter()), tf.ones([])],
        )
        self._apply(grads, head_variables)
        return StepResult(float(cross_entropy), float(penalty), int(correct), int(labels.shape[0]),
                          len(upstream), len(downstream))


STEPS = {"fused": FusedSteps, "codec": CodecSteps}
