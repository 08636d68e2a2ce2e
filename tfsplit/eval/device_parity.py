"""The same run on both devices: the Keras device (`RemoteSplitModel`) and the LiteRT device
(`DeviceTrainer`), from the same starting model, on the same batches, each against a fresh
`tfsplit-train-server` of the config on 127.0.0.1. What the parity tests and
`benchmarks/device_parity.py` compare."""

import dataclasses
import types

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfsplit import callbacks as callbacks_lib
from tfsplit import data
from tfsplit.device.training import DeviceTrainer, TrainableHead, TrainingClient
from tfsplit.export import trainable, trainable_export
from tfsplit.records import holdout
from tfsplit.training import trainer
from tfsplit.training.server import service as service_lib

# The layout's kinds that are the head itself (not the optimizers' state).
HEAD_KINDS = ("weight", "local_classifier", "state")


def head_values(layout, weights):
    """The head's own variables in a flat weight vector of `layout`, one after the other."""
    return np.concatenate(
        [
            weights[e["offset"] : e["offset"] + e["size"]]
            for e in layout["variables"]
            if e["kind"] in HEAD_KINDS
        ]
    )


class StepLog(TrainingClient):
    """A client that keeps every call (method, request, reply) and each training step's request
    and reply payloads by step id. Given `replay` (another log's `steps`), its training steps,
    still served by the real server, hand the head the gradient that log received for the same
    step id instead of the server's own."""

    def __init__(self, address, replay=None, **kwargs):
        super().__init__(address, **kwargs)
        self.calls, self.steps, self.replay = [], {}, replay

    def call(self, method, request, deadline_s=None):
        reply = super().call(method, request, deadline_s)
        self.calls.append((method, request, reply))
        if method == "Step" and request.kind == request.TRAIN:
            self.steps[request.step] = (request.payload, reply.payload)
            if self.replay is not None:
                reply.payload = self.replay[request.step][1]
        return reply


def serve(config, state_dir=None, make_client=TrainingClient):
    """A training server of `config` on 127.0.0.1 and a client of it: (server, client)."""

    def build_split(image_shape, num_classes):
        info = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
        return trainer.build_split_model(config, info)

    server, port = service_lib.serve(service_lib.TrainingServicer(build_split, state_dir), 0)
    return server, make_client(f"127.0.0.1:{port}", deadline_s=60, retry_for_s=10)


def batches(images, labels, info, batch_size):
    """The same batches, in the stored order, for both devices: numpy and tf.data."""
    dataset = data.pipeline.build_eval_dataset(images, labels, info, batch_size)
    return [(x.numpy(), y.numpy()) for x, y in dataset], dataset


def starting_model(config, info):
    """The config's networked split model as a seeded build makes it: the same weights again."""
    keras.utils.set_random_seed(config.seed)
    return trainer.build_split_model(config, info, remote=True)


def exported_graph(split):
    """The trainable head's exported graph over `split`'s variables, run by TensorFlow."""
    return trainable.TrainableHead(split, *trainable_export.optimizer_settings(split))


def prepare(config, head_dir):
    """`config`'s training data as fixed batches, its validation split held out of them as the
    runs' training does (`config.data.validation_fraction`), and its starting model exported
    trainable to `head_dir` (a seeded build gives the same weights again)."""
    keras.utils.set_random_seed(config.seed)
    (images, labels), _, info = trainer.load_run_arrays(config)
    kept, held = holdout.held_out(len(images), config.data.validation_fraction, config.seed)
    train, _ = batches(images[kept], labels[kept], info, config.data.batch_size)
    validation, validation_ds = batches(
        images[held], labels[held], info, config.data.eval_batch_size
    )
    split = starting_model(config, info)
    trainable_export.export_trainable_head(split, head_dir, config)
    return types.SimpleNamespace(
        config=config,
        info=info,
        split=split,
        train=train,
        validation=validation,
        validation_ds=validation_ds,
        head=head_dir,
    )


@dataclasses.dataclass
class BothRuns:
    """What `train_both` returns: the Keras run's history and head (in the layout's order), the
    LiteRT run's summary and head, and each run's `StepLog`."""

    history: dict
    keras_weights: list
    summary: dict
    head: TrainableHead
    keras_log: StepLog
    litert_log: StepLog

    def head_pairs(self):
        """(LiteRT, Keras, name) values of the head's own variables."""
        got = self.head.get_weights()
        return [
            (got[e["offset"] : e["offset"] + e["size"]], value, e["name"])
            for e, (kind, value) in zip(self.head.layout["variables"], self.keras_weights)
            if kind in HEAD_KINDS
        ]

    def relative_distance(self):
        """The relative L2 distance of the LiteRT head's variables from the Keras head's."""
        pairs = self.head_pairs()
        distance = sum(float(np.sum((got - want) ** 2)) for got, want, _ in pairs)
        return float(np.sqrt(distance / sum(float(np.sum(want**2)) for _, want, _ in pairs)))


def nudged(weights, offset):
    """A copy of the flat float32 `weights` with the value at `offset` one float32 step up."""
    weights = np.array(weights, np.float32)
    weights[offset] = np.nextafter(weights[offset], np.float32(np.inf))
    return weights


def train_both(setup, train, epochs=1, same_gradients=False, head_class=TrainableHead, nudge=None):
    """The Keras device, then the LiteRT device (a `head_class` of `setup.head`), each trained on
    the batches `train` for `epochs` epochs of the config's schedule against a fresh server.
    With `same_gradients` the LiteRT device trains on the gradients the server returned to the
    Keras device at each step, not on its own: the wire and the tail cannot come between them.
    With `nudge` (an offset in the weight layout) both start from the starting weights `nudged`
    there: how far one last-bit difference carries each device from its own unnudged run."""
    config = setup.config
    split = starting_model(config, setup.info)  # as setup.head's
    module = exported_graph(split)
    if nudge is not None:
        module.set_weights(tf.constant(nudged(module.get_weights()["weights"].numpy(), nudge)))
    train_ds = tf.data.Dataset.from_generator(
        lambda: iter(train),
        output_signature=(
            tf.TensorSpec((None,) + tuple(setup.info.image_shape), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ),
    ).apply(tf.data.experimental.assert_cardinality(len(train)))
    server, keras_log = serve(config, make_client=StepLog)
    try:
        split.connect(keras_log)
        schedule = trainer.phase_schedule(config)
        calibration = callbacks_lib.BatchNormCalibration(train_ds, config.calibration_batches)
        history = split.fit(
            train_ds,
            epochs=epochs,
            validation_data=setup.validation_ds,
            callbacks=[schedule, calibration],
            verbose=0,
        ).history
    finally:
        server.stop(0)
    replay = keras_log.steps if same_gradients else None
    server, litert_log = serve(
        config, make_client=lambda address, **kw: StepLog(address, replay, **kw)
    )
    try:
        head = head_class(setup.head)
        if nudge is not None:
            head.set_weights(nudged(head.get_weights(), nudge))
        device = DeviceTrainer(head, litert_log)
        device.connect()
        summary = device.fit(
            lambda epoch: train, len(train), lambda: setup.validation, epochs=epochs
        )
    finally:
        server.stop(0)
    keras_weights = [(kind, v.numpy().ravel()) for kind, v in module.state]
    return BothRuns(history, keras_weights, summary, head, keras_log, litert_log)
