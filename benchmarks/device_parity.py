"""Why the Keras device and the LiteRT device end an epoch apart: one measurement per suspect.

  python -m benchmarks.device_parity --out=results/device_training/parity.json

The smoke deprune config (no augmentation), the same starting model and batches, each device
against a fresh `tfsplit-train-server` on 127.0.0.1 (`tfsplit.eval.device_parity`). Measures:
- the epoch: the heads' relative L2 distance at its end;
- the runtime: each LiteRT `train` step replayed from the weights it started from, with the same
  inputs, by the exported graph run in TensorFlow (in the changed configs below, also which
  head variables the farthest such step moved apart);
- the server: the LiteRT run's calls sent again to two fresh servers (identical replies?);
- the wire: per training step, how many activations differ on the wire and how far apart the
  server's gradients are, and where that difference sits; step 1 again with step 0's payload
  made the Keras device's;
- the gates: the LiteRT head's gate logits after each step;
- the same gradients: the LiteRT device trained on the gradients the Keras device received,
  over 4 steps and over the whole epoch;
- each device against itself: the epoch run again, each device's head against its first run's;
  and again from the starting weights with one value one float32 step up (the first value of
  the head's first weight variable, then of its middle one): the training's own sensitivity to a
  single last-bit difference, in the head after the epoch and in the server's gradients per step;
- LiteRT's kernel sets: the first batch's sent values from each of the interpreter's op
  resolvers against TensorFlow's run of the same exported graph (float32 values and float16
  roundings that differ);
- the config changed one way at a time, each epoch, same-gradients and nudged run again: the
  gates at a fixed Adam rate of `gate_learning_rate` (not the smoke phase's travel rate), a
  float32 wire, and both. Diagnostics only: the parity test keeps the smoke config.
"""

import argparse
import json
import os
import tempfile

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import numpy as np
import tensorflow as tf
from ai_edge_litert import interpreter as litert

from tfsplit import codec
from tfsplit.device.training import TrainableHead
from tfsplit.device.training import head as device_head
from tfsplit.eval import device_parity
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.schedule.phases import GATE_LOGIT_CLOSED
from tfsplit.training.config import load_config_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordedHead(TrainableHead):
    """A LiteRT head that keeps, for every `train` step, the weights before and after it and
    its inputs."""

    def __init__(self, model_dir):
        super().__init__(model_dir)
        self.steps = []

    def train(self, images, labels, gradient, budget, rates, penalty_weight):
        before = self.get_weights().copy()
        out = super().train(images, labels, gradient, budget, rates, penalty_weight)
        inputs = (images, labels, gradient, budget, rates, penalty_weight)
        self.steps.append((before, self.get_weights().copy(), inputs))
        return out


def _relative(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def tensorflow_steps(setup, head):
    """Each recorded LiteRT step again as the exported graph's step in TensorFlow, from the same
    weights with the same inputs: per step, (TensorFlow's weights after it, LiteRT's)."""
    module = device_parity.exported_graph(device_parity.starting_model(setup.config, setup.info))
    step = tf.function(module.train)
    pairs = []
    for before, after, (images, labels, gradient, budget, rates, penalty) in head.steps:
        module.set_weights(tf.constant(before))
        step(
            images=tf.constant(images, tf.float32),
            labels=tf.constant(labels, tf.int32),
            upstream_gradient=tf.constant(gradient, tf.float32),
            budget=tf.constant([budget], tf.int32),
            learning_rate=tf.constant([rates[0]], tf.float32),
            gate_learning_rate=tf.constant([rates[1]], tf.float32),
            penalty_weight=tf.constant([penalty], tf.float32),
        )
        pairs.append((module.get_weights()["weights"].numpy(), after))
    return pairs


def runtime_distances(layout, pairs):
    """The head's relative distance after each step of `tensorflow_steps`' `pairs`."""
    return [
        _relative(device_parity.head_values(layout, got), device_parity.head_values(layout, after))
        for got, after in pairs
    ]


# How far apart a value of the head must be, after one step, to count as moved by it.
STEP_APART = 1e-6


def farthest_step_values(layout, pairs):
    """At the step of `tensorflow_steps`' `pairs` whose heads end farthest apart: per head
    variable, how many of its values are more than STEP_APART apart (variables with none left
    out)."""
    step = int(np.argmax(runtime_distances(layout, pairs)))
    got, after = pairs[step]
    counts = {}
    for e in layout["variables"]:
        if e["kind"] in device_parity.HEAD_KINDS:
            where = slice(e["offset"], e["offset"] + e["size"])
            apart = int(np.sum(np.abs(got[where] - after[where]) > STEP_APART))
            if apart:
                counts[e["name"]] = apart
    return dict(step=step, values_apart=counts)


def gate_steps(head):
    """The gate logits after each step: the lowest, the highest, and how many are closed."""
    gates = head.layout["gates"]
    rows = []
    for _, after, _ in head.steps:
        logits = after[gates["offset"] : gates["offset"] + gates["size"]]
        closed = int(np.sum(logits <= GATE_LOGIT_CLOSED + 1e-3))
        rows.append(dict(min=float(logits.min()), max=float(logits.max()), closed=closed))
    return rows


def _values(payload, kind):
    return np.asarray(codec.decode(payload, expect_kind=kind).scatter(), np.float32)


def wire_steps(runs):
    """Per training step: activations that differ on the wire, and the gradients' distance."""
    rows = []
    for step in sorted(runs.keras_log.steps):
        (sent_k, got_k), (sent_l, got_l) = runs.keras_log.steps[step], runs.litert_log.steps[step]
        activations = _values(sent_k, "activations") != _values(sent_l, "activations")
        keras_gradient, litert_gradient = _values(got_k, "gradients"), _values(got_l, "gradients")
        squared = (keras_gradient - litert_gradient) ** 2
        ranked = np.sort(squared.ravel())[::-1]
        per_sample = squared.reshape(len(squared), -1).sum(1)
        above_median = np.abs(keras_gradient) > np.median(np.abs(keras_gradient))
        change = np.abs(keras_gradient - litert_gradient) / np.maximum(
            np.abs(keras_gradient), 1e-30
        )
        rows.append(
            dict(
                step=step,
                activations_differing=int(activations.sum()),
                activations=int(activations.size),
                gradient_relative_l2=_relative(litert_gradient, keras_gradient),
                largest_percent_share=float(
                    ranked[: len(ranked) // 100].sum() / max(ranked.sum(), 1e-30)
                ),
                one_sample_share=float(per_sample.max() / max(per_sample.sum(), 1e-30)),
                largest_change_above_median=float(np.max(change * above_median)),
            )
        )
    return rows


def same_channels(runs):
    """Whether both devices sent the same channel indices at every training step."""
    return all(
        np.array_equal(
            codec.decode(runs.keras_log.steps[step][0], expect_kind="activations").indices,
            codec.decode(runs.litert_log.steps[step][0], expect_kind="activations").indices,
        )
        for step in runs.keras_log.steps
    )


def _replay(config, calls):
    server, client = device_parity.serve(config)
    try:
        return [client.call(method, request) for method, request, _ in calls]
    finally:
        server.stop(0)


def server_checks(setup, runs):
    """The LiteRT run's calls to two fresh servers; then step 1 with step 0's payload made the
    Keras device's: its gradient's distance from the Keras device's step 1."""
    calls = runs.litert_log.calls
    first, second = _replay(setup.config, calls), _replay(setup.config, calls)
    same = all(a.SerializeToString() == b.SerializeToString() for a, b in zip(first, second))
    swapped = []
    for method, request, reply in calls:
        if method == "Step" and request.kind == request.TRAIN and request.step == 0:
            request = pb.StepRequest.FromString(request.SerializeToString())
            request.payload = runs.keras_log.steps[0][0]
        swapped.append((method, request, reply))
    replies = _replay(setup.config, swapped)
    gap = None
    for (method, request, _), reply in zip(swapped, replies):
        if method == "Step" and request.kind == request.TRAIN and request.step == 1:
            want = _values(runs.keras_log.steps[1][1], "gradients")
            gap = _relative(_values(reply.payload, "gradients"), want)
    return dict(identical_replies=same, step1_gradient_gap_with_step0_the_same=gap)


def repeat_distances(first, second):
    """How far each device's head ends from its own first run's: (Keras, LiteRT)."""
    keras_first = np.concatenate([want for _, want, _ in first.head_pairs()])
    keras_second = np.concatenate([want for _, want, _ in second.head_pairs()])
    litert_first = np.concatenate([got for got, _, _ in first.head_pairs()])
    litert_second = np.concatenate([got for got, _, _ in second.head_pairs()])
    return _relative(keras_second, keras_first), _relative(litert_second, litert_first)


def nudge_offsets(layout):
    """Where the sensitivity runs nudge a starting weight: the first value of the head's first
    weight variable and of its middle one, by name."""
    weights = [e for e in layout["variables"] if e["kind"] == "weight"]
    return {e["name"]: e["offset"] for e in (weights[0], weights[len(weights) // 2])}


def sensitivity(setup, base):
    """Each device's epoch from the starting weights with one value one float32 step up (at each
    of `nudge_offsets`), against its own run `base` from the unnudged ones: how far a single
    last-bit difference carries the same runtime."""
    rows = {}
    for name, offset in nudge_offsets(base.head.layout).items():
        nudged = device_parity.train_both(setup, setup.train, nudge=offset)
        keras_distance, litert_distance = repeat_distances(base, nudged)
        rows[name] = dict(
            keras_relative_l2=keras_distance,
            litert_relative_l2=litert_distance,
            keras_gradient_steps=gradient_distances(base.keras_log, nudged.keras_log),
            litert_gradient_steps=gradient_distances(base.litert_log, nudged.litert_log),
        )
    return rows


def gradient_distances(first, second):
    """Per training step, the relative distance of the gradients the server returned in two
    `StepLog`s."""
    return [
        _relative(
            _values(second.steps[step][1], "gradients"), _values(first.steps[step][1], "gradients")
        )
        for step in sorted(first.steps)
    ]


def kernel_sets(setup):
    """The first batch's sent values from the LiteRT forward, once per op resolver, against
    TensorFlow's run of the exported graph from the same weights: how many float32 values and
    float16 roundings differ."""
    module = device_parity.exported_graph(device_parity.starting_model(setup.config, setup.info))
    images, _ = setup.train[0]
    budget = setup.config.phases[0].budget
    want = module.forward(tf.constant(images), tf.constant(budget))["values"].numpy()
    with open(os.path.join(setup.head, device_head.MODEL_FILE), "rb") as f:
        model = f.read()
    rows = {}
    for name in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "BUILTIN_REF"):
        interpreter = litert.Interpreter(
            model_content=model, experimental_op_resolver_type=litert.OpResolverType[name]
        )
        forward = interpreter.get_signature_runner("forward")
        got = forward(images=images, budget=np.array([budget], np.int32))["values"]
        rows[name] = dict(
            float32_differing=int(np.sum(got != want)),
            float16_differing=int(np.sum(got.astype(np.float16) != want.astype(np.float16))),
            values=int(want.size),
        )
    return rows


# Each diagnostic variant: its name and what it changes in the smoke config.
VARIANTS = (
    ("gates_at_fixed_rate", dict(gate_travel_fraction=0.0)),
    ("float32_wire", dict(wire="float32")),
    ("gates_at_fixed_rate_and_float32_wire", dict(gate_travel_fraction=0.0, wire="float32")),
)


def smoke_config(gate_travel_fraction=None, wire=None):
    config = load_config_file(os.path.join(REPO_ROOT, "configs", "deprune.py"), "smoke")
    config.data.augment = False  # both devices must see the same batches
    if gate_travel_fraction is not None:
        config.optimizer.gate_travel_fraction = gate_travel_fraction
    if wire is not None:
        config.wire.activation_dtype = config.wire.gradient_dtype = wire
    return config


def variant_distances(scratch):
    """Per variant: the epoch's and the same-gradients epoch's relative L2 distances, each
    device's `sensitivity`, the same-gradients run's runtime steps (`runtime_distances`) and
    where its farthest one moved the head (`farthest_step_values`), and whether both devices
    sent the same channels at every step of it."""
    rows = {}
    for name, changes in VARIANTS:
        setup = device_parity.prepare(smoke_config(**changes), os.path.join(scratch, name))
        same = device_parity.train_both(
            setup, setup.train, same_gradients=True, head_class=RecordedHead
        )
        epoch = device_parity.train_both(setup, setup.train)
        steps = tensorflow_steps(setup, same.head)
        rows[name] = dict(
            epoch_relative_l2=epoch.relative_distance(),
            one_weight_nudged=sensitivity(setup, epoch),
            same_gradients_epoch_relative_l2=same.relative_distance(),
            same_gradients_runtime_step_relative_l2=runtime_distances(same.head.layout, steps),
            same_gradients_farthest_step=farthest_step_values(same.head.layout, steps),
            same_gradients_same_channels=same_channels(same),
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Write the measurements here as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        setup = device_parity.prepare(smoke_config(), os.path.join(scratch, "head"))
        epoch = device_parity.train_both(setup, setup.train, head_class=RecordedHead)
        same_4 = device_parity.train_both(setup, setup.train[:4], same_gradients=True)
        same_epoch = device_parity.train_both(setup, setup.train, same_gradients=True)
        keras_again, litert_again = repeat_distances(
            epoch, device_parity.train_both(setup, setup.train)
        )
        result = dict(
            config="configs/deprune.py:smoke, no augmentation",
            steps_per_epoch=len(setup.train),
            epoch_relative_l2=epoch.relative_distance(),
            runtime_step_relative_l2=runtime_distances(
                epoch.head.layout, tensorflow_steps(setup, epoch.head)
            ),
            server=server_checks(setup, epoch),
            wire=wire_steps(epoch),
            gates=gate_steps(epoch.head),
            same_gradients_4_steps_relative_l2=same_4.relative_distance(),
            same_gradients_epoch_relative_l2=same_epoch.relative_distance(),
            keras_run_again_relative_l2=keras_again,
            litert_run_again_relative_l2=litert_again,
            one_weight_nudged=sensitivity(setup, epoch),
            kernel_sets=kernel_sets(setup),
            config_changes=variant_distances(scratch),
        )
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
