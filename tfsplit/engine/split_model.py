"""SplitModel: a Keras model cut into a device head and a server tail, trained with `fit`.

Every forward pass at a budget goes through one pair of methods: `send` (the device half: head,
then the k selected channels) and `receive` (the server half: the k channels scattered back into
the bottleneck's width, then the tail). Training, evaluation, the budget curve, QAT and export all
use them, so what is measured is what is deployed.
"""

import numbers

import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit import codec
from tfsplit.codec import wire
from tfsplit.engine import budget as budget_lib
from tfsplit.engine.ledger import StepLedger
from tfsplit.engine.nesting import NestedBudgets
from tfsplit.layers import local_classifier as local_loss
from tfsplit.layers import logits as logits_lib
from tfsplit.layers import placement
from tfsplit.layers.batch_norm import BatchNormAverage
from tfsplit.layers.bottleneck import Decoder, MaskedEncoder


def _only_layer(model, layer_type):
    found = [layer for layer in model.layers if isinstance(layer, layer_type)]
    if len(found) > 1:
        raise ValueError(
            f"{model.name} holds {len(found)} {layer_type.__name__} layers; expected at most one."
        )
    return found[0] if found else None


@keras.utils.register_keras_serializable(package="tfsplit")
class SplitModel(StepLedger, keras.Model):
    """A classifier cut at a masked bottleneck; `fit` trains it as device and server would.

    Args:
      head: functional model image -> wire activations (N, h, w, C'); ends with a `MaskedEncoder`
        when the cut is compressed, otherwise every channel is sent (plain split learning).
      tail: functional model wire activations -> logits (not probabilities: `split_model` leaves a
        final softmax out); starts with a `Decoder` when masked.
      cut: name of the original model's layer at the cut (recorded, not used).
      activation_dtype, gradient_dtype: what the wire carries each way (`codec.WIRE_DTYPES`).
      gradient_noise: the gradient sent back down is perturbed with Gaussian noise of this many
        times its root mean square (`tfsplit.codec.wire.perturb`; a label-leakage defence).
      budget_eps, budget_delta: the budget loss `eps * cosh-like(delta * (sum(m) - k))`.
      nested_budgets: one model for every budget (the sandwich rule). While nesting is on (see
        `set_budget`; `PhaseSchedule` turns it on late in the final phase), each masked step also
        runs the tail on the top ceil(k * min_budget_fraction) channels and on the top k' (k'
        log-uniform in between), each distilled from the full budget's predictions. The smaller sets
        are prefixes of what was sent, so the bytes on the wire do not change. The model owns a
        `tfsplit.engine.nesting.NestedBudgets` for it (`self.nesting`; None without nesting).
      min_budget_fraction: the smallest nested budget as a fraction of k, in (0, 1].
      seed: seeds the nested budget draws.
      polarization: weight of sum(m * (1 - m)) added to the budget loss in masked phases, which
        drives each gate fully open or closed (0 = off).
      local_loss_weight: weight of a device-side classifier's loss on the features at the cut
        (the encoder's input; see `tfsplit.layers.local_classifier`), added to the head's; 0 = none.

    Call arguments:
      images: float32 (N, H, W, C) normalized images.
      budget: channels to send, 1 <= k <= C'; None sends the budget in force (`self.budget`).
      training: whether batch norm uses batch statistics.

    Metrics: besides the compiled ones, `budget_loss` (the penalty, reported apart from the
    cross-entropy), `local_loss` (the weighted local classifier's, when there is one),
    `payload_bytes_up` and `payload_bytes_down` (the codec's exact encoded size of
    what crossed the cut each way; evaluation counts what inference would send up, nothing down).
    """

    labels_go_up = True  # with each training batch, for the server's loss

    def __init__(
        self,
        head,
        tail,
        cut=None,
        activation_dtype="float16",
        gradient_dtype="float16",
        gradient_noise=0.0,
        budget_eps=1000.0,
        budget_delta=0.1,
        nested_budgets=False,
        min_budget_fraction=0.125,
        seed=0,
        polarization=0.0,
        local_loss_weight=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("activation_dtype", activation_dtype),
            ("gradient_dtype", gradient_dtype),
        ):
            if value not in codec.WIRE_DTYPES:
                raise ValueError(
                    f"`{name}` must be one of {codec.WIRE_DTYPES}. Received: {value!r}"
                )
        if not 0.0 < min_budget_fraction <= 1.0:
            raise ValueError(
                f"`min_budget_fraction` must be in (0, 1]. Received: {min_budget_fraction!r}"
            )
        self.head, self.tail, self.cut = head, tail, cut
        self.encoder = _only_layer(head, MaskedEncoder)
        self.decoder = _only_layer(tail, Decoder)
        self.activation_dtype, self.gradient_dtype = activation_dtype, gradient_dtype
        self.budget_eps, self.budget_delta = float(budget_eps), float(budget_delta)
        self.min_budget_fraction, self.seed = float(min_budget_fraction), seed
        if not polarization >= 0.0:
            raise ValueError(f"`polarization` must be >= 0. Received: {polarization!r}")
        self.polarization = float(polarization)
        self._build_local_classifier(local_loss_weight)
        self.wire_shape = tuple(int(d) for d in head.output.shape[1:])
        self.channels = self.wire_shape[-1]
        # A flat cut (N, C) is sent as one position: the codec's (N, 1, 1, C).
        self.height, self.width = (self.wire_shape[:-1] + (1, 1))[:2]
        # Variables, so a callback can change them between steps without retracing the step.
        self.budget = tf.Variable(self.channels, trainable=False, name="budget")
        self.penalty_weight = tf.Variable(0.0, trainable=False, name="penalty_weight")
        self.step_nesting = tf.Variable(False, trainable=False, name="step_nesting")
        # The phase a PhaseSchedule last entered; backed up with the weights so a resumed run
        # does not reset its gates twice.
        self.phase = tf.Variable(0, trainable=False, name="phase")
        # Bytes sent up and down by every training step so far: backed up with the weights, so a
        # resumed run's ledger counts what was really sent, the steps it redoes included.
        self.sent_payload_bytes = tf.Variable(
            [0, 0], dtype=tf.int64, trainable=False, name="sent_payload_bytes"
        )
        # Backed up with the weights, so a resumed run draws the same nested budgets.
        self.budget_draws = tf.random.Generator.from_seed(seed)
        self.nesting = None
        self.nested_budgets = nested_budgets
        if logits_lib.ends_in_softmax(tail):
            logging.warning(
                "The tail of %s ends in a softmax, but a SplitModel's tail outputs logits (its "
                "losses take them so); `tfsplit.split_model` leaves a final softmax out.",
                self.name,
            )
        if not gradient_noise >= 0.0:
            raise ValueError(f"`gradient_noise` must be >= 0. Received: {gradient_noise!r}")
        self.gradient_noise = float(gradient_noise)
        self.wire = wire.make_wire(activation_dtype, gradient_dtype, self.gradient_noise)
        self.budget_loss_tracker = keras.metrics.Mean(name="budget_loss")
        self.payload_bytes_up = keras.metrics.Sum(name="payload_bytes_up", dtype="float64")
        self.payload_bytes_down = keras.metrics.Sum(name="payload_bytes_down", dtype="float64")
        self.gate_optimizer = None
        self._calibration_pass = None
        self._build_for_input()

    def _build_for_input(self):
        self.build((None,) + tuple(self.head.input.shape[1:]))

    def _build_local_classifier(self, weight):
        if not weight >= 0.0:
            raise ValueError(f"`local_loss_weight` must be >= 0. Received: {weight!r}")
        self.local_loss_weight, self.local_classifier = float(weight), None
        if weight:
            self.device_features = local_loss.cut_features(self.head, self.encoder)
            self.local_classifier = local_loss.LocalClassifier.for_features(
                self.device_features, self.num_classes
            )
            self.local_loss_tracker = keras.metrics.Mean(name="local_loss")

    @property
    def num_classes(self):
        return int(self.tail.output.shape[-1])

    @property
    def device_trainable_variables(self):
        """What the device trains: the head, and its local classifier when there is one."""
        own = self.local_classifier.trainable_variables if self.local_classifier else []
        return self.head.trainable_variables + own

    @property
    def device_only_weights(self):
        """What the server's half never holds: the local classifier and its loss metric."""
        if self.local_classifier is None:
            return []
        return self.local_classifier.weights + self.local_loss_tracker.variables

    # ----------------------------------------------------------------------------- the budget
    @property
    def nested_budgets(self):
        """Whether the model serves every budget up to the one it trains (it owns `nesting`)."""
        return self.nesting is not None

    @nested_budgets.setter
    def nested_budgets(self, on):
        self.nesting = None
        if on and self.encoder is not None:  # nothing to nest without a bottleneck
            self.nesting = NestedBudgets(
                self.channels, self.decoder.fill, self.budget_draws, self.min_budget_fraction
            )

    def set_budget(self, k, masking=True, nesting=True):
        """Sends k channels from now on.

        `masking` turns the budget loss on; `nesting` the nested budgets (with masking, when the
        model was built with them).
        """
        self.check_budget(k)
        self.budget.assign(int(k))
        self.penalty_weight.assign(self.budget_eps if masking and self.encoder else 0.0)
        self.step_nesting.assign(bool(masking and nesting and self.nested_budgets))

    def check_budget(self, k):
        if (
            not isinstance(k, numbers.Integral)
            or isinstance(k, bool)
            or not 1 <= k <= self.channels
        ):
            raise ValueError(
                f"A budget must be an integer in [1, {self.channels}] (the channels at the cut)."
                f" Received: budget={k!r}"
            )
        if self.encoder is None and k != self.channels:
            raise ValueError(
                f"Without a masked bottleneck all {self.channels} channels are sent. "
                f"Received: budget={k!r}"
            )

    def channel_indices(self, budget=None):
        """The k channels to send, most important first (all of them, in order, unmasked)."""
        if self.encoder is None:
            return tf.range(self.channels)
        if budget is None:
            budget = self.budget
        elif not tf.is_tensor(budget):
            self.check_budget(budget)
        return budget_lib.top_k_channels(self.encoder.gate_logits, budget, self.encoder.seniority)

    def soft_channels(self):
        """The soft channel count sum(m) that the budget loss pulls towards k."""
        if self.encoder is None:
            return float(self.channels)
        return float(tf.reduce_sum(budget_lib.channel_importance(self.encoder.gate_logits)))

    # -------------------------------------------------------------------- the one forward path
    def send(self, images, indices, training=False):
        """Device half: the head's activations of channels `indices`, (N, h, w, k)."""
        return tf.gather(self.head(images, training=training), indices, axis=-1)

    def receive(self, values, indices, training=False, fill=None):
        """Server half: k channels placed back among C' (see `tfsplit.layers.placement`), then the tail.

        `indices` is (k,) for a batch from one device, or (N, k) per sample for a batch that
        joins several devices' steps. A channel not sent gets `fill` (C',); by default zero, and
        in a model trained with nested budgets the tail's own (`Decoder.fill`, each channel's mean).
        """
        if fill is None and self.nesting is not None:
            fill = self.nesting.fill
        placed = placement.place(values, indices, self.channels, fill)
        return self.tail(placed, training=training)

    def call(self, images, budget=None, training=None):
        indices = self.channel_indices(budget)
        values = wire.fake_quantize(self.send(images, indices, training), self.activation_dtype)
        return self.receive(values, indices, training)

    # ------------------------------------------------------------------------------- training
    def compile(self, optimizer="sgd", loss=None, metrics=None, gate_optimizer=None, **kwargs):
        """As `keras.Model.compile`, with a loss and accuracy by default.

        Args:
          loss: what `keras.Model.compile` takes (a name, a `keras.losses.Loss` or a callable
            `(labels, logits) -> loss`), applied to the tail's logits by `train_step`, `test_step`
            and the server's loss; None is the sparse cross-entropy from logits. A cross-entropy
            that expects probabilities (`from_logits=False`, as the name
            "sparse_categorical_crossentropy" gives) is refused: the outputs are logits.
          gate_optimizer: optional optimizer for the gate logits alone (e.g. Adam, whose steps
            stay bounded whatever the budget loss's scale); None trains them with `optimizer`.
        """
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        elif logits_lib.loss_expects_probabilities(loss):
            raise ValueError(
                "A SplitModel outputs logits (`split_model` leaves a final softmax out), so its "
                "cross-entropy must take from_logits=True, e.g. "
                "keras.losses.SparseCategoricalCrossentropy(from_logits=True), or loss=None for "
                f"that one. Received: loss={loss!r}, which expects probabilities"
            )
        super().compile(
            optimizer=optimizer,
            loss=loss,
            metrics=["accuracy"] if metrics is None else metrics,
            **kwargs,
        )
        if gate_optimizer is not None and self.encoder is not None:
            self.gate_optimizer = keras.optimizers.get(gate_optimizer)

    def device_step(self, images, labels, indices):
        """The device's half of a training step: (the channels `indices` sent, budget penalty,
        weighted local classifier loss; 0 without one), to differentiate on the device."""
        penalty = self.budget_penalty()
        if self.local_classifier is None:
            return self.send(images, indices, training=True), penalty, tf.constant(0.0)
        features, activations = self.device_features(images, training=True)
        local = self.local_loss_weight * self.local_classifier.cross_entropy(features, labels)
        return tf.gather(activations, indices, axis=-1), penalty, local

    def server_loss(self, images, labels, values, indices):
        """What the server computes from the k channels it received: (loss, logits)."""
        logits = self.receive(values, indices, training=True)
        loss = self.compute_loss(images, labels, logits)
        if self.nesting is not None:
            loss += tf.cond(
                self.step_nesting,
                lambda: self.nesting.distillation_loss(self.receive, values, indices, logits),
                lambda: tf.constant(0.0),
            )
        return loss, logits

    def budget_penalty(self):
        if self.encoder is None:
            return tf.constant(0.0)
        return self.penalty_weight * budget_lib.gate_penalty(
            self.encoder.gate_logits, self.budget, self.budget_delta, self.polarization
        )

    def apply_gradients(self, gradients, variables):
        """Updates the weights; the gate logits through their own optimizer when there is one."""
        pairs = list(zip(gradients, variables))
        if self.gate_optimizer is None:
            self.optimizer.apply_gradients(pairs)
            return
        gates = self.encoder.gate_logits
        self.optimizer.apply_gradients([(g, v) for g, v in pairs if v is not gates])
        self.gate_optimizer.apply_gradients([(g, v) for g, v in pairs if v is gates])

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        indices = self.channel_indices()
        with tf.GradientTape() as tape:
            values, penalty, local = self.device_step(images, labels, indices)
            loss, logits = self.server_loss(images, labels, self.wire(values), indices)
            loss += penalty + local
        variables = self.trainable_variables
        self.apply_gradients(tape.gradient(loss, variables), variables)
        return self.update_metrics(labels, logits, penalty, self.budget, training=True, local=local)

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self(images, training=False)
        self.compute_loss(images, labels, logits)
        return self.update_metrics(labels, logits, tf.constant(0.0), self.budget, training=False)

    def calibrate_batch_norm(self, dataset, batches):
        """Recomputes every batch norm's statistics at the budget in force, weights unchanged.

        The moving averages mix the steps of a run in which the gates, and so the values the tail
        saw, kept moving; this replaces them with the plain mean over `batches` batches of
        `dataset` ((images, labels) batches, augmented as in training) as the model is now.
        """
        norms = BatchNormAverage.of(self)
        if norms is None:
            return
        if self._calibration_pass is None:
            self._calibration_pass = tf.function(lambda images: self(images, training=True))
        with norms:
            for images, _ in dataset.take(batches):
                self._calibration_pass(images)
                norms.record()

    # ------------------------------------------------------------------------------- saving
    def get_config(self):
        return dict(
            name=self.name,
            head=keras.layers.serialize(self.head),
            tail=keras.layers.serialize(self.tail),
            cut=self.cut,
            activation_dtype=self.activation_dtype,
            gradient_dtype=self.gradient_dtype,
            gradient_noise=self.gradient_noise,
            budget_eps=self.budget_eps,
            budget_delta=self.budget_delta,
            nested_budgets=self.nested_budgets,
            min_budget_fraction=self.min_budget_fraction,
            seed=self.seed,
            polarization=self.polarization,
            local_loss_weight=self.local_loss_weight,
        )

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for part in ("head", "tail"):
            config[part] = keras.layers.deserialize(config[part], custom_objects=custom_objects)
        return cls(**config)
