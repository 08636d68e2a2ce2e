"""The U-shaped split over gRPC: a device (`RemoteUShapedSplitModel`) holding the head, the top and
the labels, and a training server holding the middle. It trains the in-process model, no message
that reaches the server carries a label, and its steps keep the plain protocol's guarantees."""

# isort: off
import tfsplit  # (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import concurrent.futures
import types

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tensorflow.core.framework import tensor_pb2

from tfsplit import backbones, codec
from tfsplit.device.training.channel import TrainingClient
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol import split_training_pb2_grpc as pb_grpc
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase
from tfsplit.training.messages import (
    decode_second_cut,
    encode_second_cut,
    model_digest,
    weights_to_protos,
)
from tfsplit.training.server import service as service_lib
from tfsplit.training.server import tail_trainer

INFO = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)


def ushaped_config(dtype="float32"):
    """ResNet-18 (no dropout) at 1/8 width, the top after its last block's pooling."""
    config = base_config("deprune")
    config.model.backbone = "resnet18"
    config.model.cut = "stage2"
    config.model.width_multiplier = 0.125
    config.model.top = "classifier"
    for key in ("activation_dtype", "gradient_dtype", "top_activation_dtype", "top_gradient_dtype"):
        config.wire[key] = dtype
    config.phases = [phase(budget=4, epochs=1, learning_rate=0.05)]
    return config


def _servicer(config, state_dir=None, **options):
    def build_split(image_shape, num_classes):
        info = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
        return trainer.build_split_model(config, info)

    return service_lib.TrainingServicer(build_split, state_dir, **options)


class RecordingInterceptor(grpc.ServerInterceptor):
    """Keeps every request message that reaches the server's handlers."""

    def __init__(self):
        self.received = []

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        def recorded(request, context):
            self.received.append(request)
            return behaviour(request, context)

        return handler._replace(unary_unary=recorded)


@pytest.fixture
def serving():
    servers = []

    def start(config, state_dir=None, interceptors=(), **options):
        servicer = _servicer(config, state_dir, **options)
        server, port = service_lib.serve(servicer, 0, interceptors=interceptors)
        servers.append(server)
        return servicer, port

    yield start
    for server in servers:
        server.stop(0)


def _data(count=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, count)


def _pair(config, port, device_id="device-0"):
    """An in-process U-shaped model and a networked one with the same weights, connected."""
    keras.utils.set_random_seed(0)
    local = trainer.build_split_model(config, INFO)
    remote = trainer.build_split_model(config, INFO, remote=True)
    for part in ("head", "tail", "top"):
        getattr(remote, part).set_weights(getattr(local, part).get_weights())
    remote.connect(TrainingClient(f"127.0.0.1:{port}"), device_id=device_id)
    return local, remote


def test_a_networked_ushaped_fit_trains_the_in_process_model(serving):
    config = ushaped_config()
    servicer, port = serving(config)
    local, remote = _pair(config, port)
    images, labels = _data()
    logs = []
    for model in (local, remote):
        model.set_budget(4)
        history = model.fit(images, labels, batch_size=16, epochs=1, verbose=0, shuffle=False)
        logs.append({key: values[-1] for key, values in history.history.items()})
    for key in ("loss", "accuracy", "payload_bytes_up", "top_payload_bytes_down"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-5), key
    pairs = [
        (local.head.get_weights(), remote.head.get_weights()),
        (local.top.get_weights(), remote.top.get_weights()),
        (local.tail.get_weights(), servicer.trainer.split.tail.get_weights()),
    ]
    for expected, trained in pairs:
        for x, y in zip(expected, trained):
            np.testing.assert_allclose(y, x, atol=1e-5)
    evaluated = [m.evaluate(images, labels, batch_size=16, verbose=0) for m in (local, remote)]
    np.testing.assert_allclose(evaluated[1][:2], evaluated[0][:2], rtol=1e-5)


def test_no_message_that_reaches_the_server_carries_labels(serving):
    """Every request the server's handlers receive during fit, evaluation and calibration: no
    codec payload holds labels, and no message has a field for them."""
    recorder = RecordingInterceptor()
    config = ushaped_config(dtype="float16")
    _, port = serving(config, interceptors=[recorder])
    _, remote = _pair(config, port)
    images, labels = _data()
    remote.set_budget(4)
    remote.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    remote.evaluate(images, labels, batch_size=16, verbose=0)
    remote.calibrate_batch_norm(tf.data.Dataset.from_tensor_slices((images, labels)).batch(16), 2)
    remote.fetch_tail()
    kinds = [r.kind for r in recorder.received if isinstance(r, pb.StepRequest)]
    assert kinds.count(pb.StepRequest.FORWARD) == kinds.count(pb.StepRequest.TRAIN) == 2
    assert pb.StepRequest.EVALUATE in kinds and pb.StepRequest.CALIBRATE in kinds
    for request in recorder.received:
        assert not any("label" in field.name for field, _ in request.ListFields())
        if isinstance(request, pb.StepRequest):
            assert codec.decode(request.payload).labels is None
            assert not request.top_gradient


def _hello_request(model, device_id="device-0", **fields):
    return pb.HelloRequest(
        model_digest=model_digest(model),
        image_shape=[32, 32, 3],
        num_classes=10,
        device_id=device_id,
        **fields,
    )


@pytest.fixture
def opened(serving, tmp_path):
    """A U-shaped server with an open run (its state in tmp_path/state); yields (stub, device
    model, servicer)."""
    config = ushaped_config()
    servicer, port = serving(config, state_dir=str(tmp_path / "state"))
    keras.utils.set_random_seed(0)
    model = trainer.build_split_model(config, INFO)
    stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    stub.Hello(_hello_request(model), timeout=60)
    # A checkpoint before the first step: the state a restarted server replays its log from.
    stub.Checkpoint(
        pb.CheckpointRequest(model_digest=model_digest(model), device_id="device-0", step=0)
    )
    return stub, model, servicer


def _step(model, kind, step, batch=4, labels=None, **fields):
    values = np.random.default_rng(step).normal(size=(batch,) + model.wire_shape[:-1] + (4,))
    if kind == pb.StepRequest.TRAIN and "payload" not in fields:
        middle = np.random.default_rng(step + 100).normal(size=(batch,) + model.top_shape)
        fields["payload"] = encode_second_cut(middle * 1e-3, model, "float32", "gradients")
    else:
        fields.setdefault(
            "payload",
            codec.encode(
                values.astype(np.float32), [3, 1, 2, 0], model.channels, "float32", labels=labels
            ),
        )
    return pb.StepRequest(
        kind=kind,
        model_digest=model_digest(model),
        device_id="device-0",
        step=step,
        learning_rate=0.05 if kind == pb.StepRequest.TRAIN else 0.0,
        **fields,
    )


def tail_after(servicer):
    return servicer.trainer.split.tail.get_weights()


def _code(call):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_a_step_is_forward_then_train_and_a_retry_gets_the_kept_reply(opened):
    stub, model, servicer = opened
    FORWARD, TRAIN = pb.StepRequest.FORWARD, pb.StepRequest.TRAIN  # noqa: N806
    failed = grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: stub.Step(_step(model, TRAIN, 0))) == failed  # no FORWARD yet
    tail = servicer.trainer.split.tail.get_weights()
    first = stub.Step(_step(model, FORWARD, 0))
    assert first == stub.Step(_step(model, FORWARD, 0))  # a FORWARD changes nothing
    for x, y in zip(tail, servicer.trainer.split.tail.get_weights()):
        np.testing.assert_array_equal(x, y)
    reply = stub.Step(_step(model, TRAIN, 0))
    assert codec.decode(reply.payload, expect_kind="gradients").values.shape == (
        4,
    ) + model.wire_shape[:-1] + (4,)
    assert not reply.logits and servicer.trainer.devices["device-0"].next_step == 1
    assert stub.Step(_step(model, TRAIN, 0)) == reply  # a retry: the kept reply
    other = _step(model, TRAIN, 0, payload=_step(model, TRAIN, 5).payload)
    assert _code(lambda: stub.Step(other)) == failed  # the same id with another gradient
    assert _code(lambda: stub.Step(_step(model, FORWARD, 3))) == failed  # not the next step
    # A restarted server replays the logged step, and finds the FORWARD that a retry of its
    # TRAIN (its answer lost) came after.
    restarted = _servicer(ushaped_config(), servicer.trainer._state.directory)
    for x, y in zip(restarted.trainer.split.tail.get_weights(), tail_after(servicer)):
        np.testing.assert_array_equal(x, y)
    assert restarted.trainer.step(_step(model, TRAIN, 0)) == reply


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: _step(m, pb.StepRequest.FORWARD, 0, labels=np.arange(4)),
        lambda m: _step(m, pb.StepRequest.FORWARD, 0, top_gradient=b"x"),
        lambda m: _step(m, pb.StepRequest.FORWARD, 0, nesting=True),
    ],
    ids=["labels", "top_gradient", "nesting"],
)
def test_labels_and_log_only_fields_are_refused(opened, mutate):
    stub, model, _ = opened
    assert _code(lambda: stub.Step(mutate(model))) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_top_gradient_is_refused_and_changes_nothing(opened):
    stub, model, servicer = opened
    stub.Step(_step(model, pb.StepRequest.FORWARD, 0))
    tail = servicer.trainer.split.tail.get_weights()
    middle = np.zeros((3,) + model.top_shape, np.float32)  # a batch of 3 for 4 activations
    for payload in (
        encode_second_cut(middle, model, "float32", "gradients"),
        encode_second_cut(np.zeros((4,) + model.top_shape), model, "float16", "gradients"),
        encode_second_cut(np.full((4,) + model.top_shape, 3e38), model, "float32", "gradients"),
    ):
        request = _step(model, pb.StepRequest.TRAIN, 0, payload=payload)
        assert _code(lambda: stub.Step(request)) == grpc.StatusCode.INVALID_ARGUMENT
    for x, y in zip(tail, servicer.trainer.split.tail.get_weights()):
        np.testing.assert_array_equal(x, y)
    assert servicer.trainer.devices["device-0"].next_step == 0


def test_what_a_networked_ushape_cannot_train_is_refused_clearly(serving):
    keras.utils.set_random_seed(0)
    vgg = backbones.build_backbone("vgg11", 10, (32, 32, 3), 0.125, classifier="imagenet")
    split = tfsplit.split_model(vgg, "conv5_relu", top="fc2_relu")  # fc1's dropout: the middle
    with pytest.raises(ValueError, match=r"random layers \['fc1_dropout'\]"):
        tail_trainer.TailTrainer(split)
    config = ushaped_config()
    config.budget_sampling.nested = True
    with pytest.raises(ValueError, match="without nested budgets"):
        trainer.build_split_model(config, INFO, remote=True)


def test_a_parallel_server_joins_concurrent_ushaped_steps_into_one_batch(serving, tmp_path):
    """Two devices send a U-shaped step at the same time. Their FORWARDs run as one batch and
    their TRAINs train together: what one device sending both batches as one step gets, each
    device's gradient scaled to its own batch's mean loss. A restarted server replays the
    joined step as one batch."""
    config = ushaped_config()
    keras.utils.set_random_seed(0)
    model = trainer.build_split_model(config, INFO)
    FORWARD, TRAIN = pb.StepRequest.FORWARD, pb.StepRequest.TRAIN  # noqa: N806
    start = weights_to_protos(model.tail.get_weights())
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 4) + model.wire_shape[:-1] + (4,)).astype(np.float32)
    gradients = rng.normal(size=(2, 4) + model.top_shape).astype(np.float32) * 1e-3

    def step(stub, device, kind, values, gradient=None):
        fields = {}
        if kind == TRAIN:
            fields["payload"] = encode_second_cut(gradient, model, "float32", "gradients")
        else:
            fields["payload"] = codec.encode(values, [3, 1, 2, 0], model.channels, "float32")
        request = _step(model, kind, 0, batch=len(values), **fields)
        request.device_id = device
        return stub.Step(request, timeout=60)

    def device_step(stub, device, i):
        forward = step(stub, device, FORWARD, values[i])
        output = decode_second_cut(forward.payload, model, "float32", "activations", batch=4)
        trained = step(stub, device, TRAIN, values[i], gradients[i])
        return output, codec.decode(trained.payload, expect_kind="gradients").dequantized()

    state_dir = str(tmp_path / "state")
    servicer, port = serving(config, state_dir, parallel=True, gather_timeout_s=30.0)
    stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for device in ("device-0", "device-1"):
        stub.Hello(_hello_request(model, device, tail_weights=start), timeout=60)
    # A checkpoint before the first step: the state a restarted server replays its log from.
    stub.Checkpoint(
        pb.CheckpointRequest(model_digest=model_digest(model), device_id="device-0", step=0)
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        joined = list(pool.map(device_step, [stub] * 2, ["device-0", "device-1"], [0, 1]))
    alone_servicer, alone_port = serving(config)
    alone = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{alone_port}"))
    alone.Hello(_hello_request(model, tail_weights=start), timeout=60)
    both = values.reshape((8,) + values.shape[2:])
    forward = step(alone, "device-0", FORWARD, both)
    output = decode_second_cut(forward.payload, model, "float32", "activations", batch=8)
    # One device's top gradient is that of its mean loss over all 8 samples.
    trained = step(alone, "device-0", TRAIN, both, gradients.reshape((8,) + model.top_shape) / 2)
    gradient = codec.decode(trained.payload, expect_kind="gradients").dequantized()
    for i, (device_output, device_gradient) in enumerate(joined):
        rows = slice(4 * i, 4 * i + 4)
        np.testing.assert_allclose(device_output, output[rows], atol=1e-6)
        np.testing.assert_allclose(device_gradient, 2 * gradient[rows], rtol=1e-5, atol=1e-9)
    for x, y in zip(tail_after(servicer), tail_after(alone_servicer)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    group = servicer.trainer.devices["device-0"].forward_group
    assert sorted(group) == [("device-0", 0), ("device-1", 0)]
    (logged,) = list(servicer.trainer._state.logged_steps())
    assert sorted(r.device_id for r in logged.requests) == ["device-0", "device-1"]
    restarted = _servicer(config, state_dir, parallel=True)
    assert {d: v.next_step for d, v in restarted.trainer.devices.items()} == {
        "device-0": 1,
        "device-1": 1,
    }
    for x, y in zip(tail_after(restarted), tail_after(servicer)):
        np.testing.assert_array_equal(x, y)


def test_a_parallel_server_trains_ushaped_steps_as_they_come_and_averages_heads(serving):
    """Two devices against a parallel server, their steps sent one after the other: each trains
    alone, as on a sequential server given the same steps in the same order, and the heads are
    averaged (SplitFed)."""
    config = ushaped_config()
    keras.utils.set_random_seed(0)
    model = trainer.build_split_model(config, INFO)
    FORWARD, TRAIN = pb.StepRequest.FORWARD, pb.StepRequest.TRAIN  # noqa: N806
    tails, stubs = {}, {}
    for mode in ("sequential", "parallel"):
        options = dict(parallel=True, average_timeout_s=30.0) if mode == "parallel" else {}
        servicer, port = serving(config, **options)
        stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        start = weights_to_protos(model.tail.get_weights())  # both servers' tails start alike
        for device in ("device-0", "device-1"):
            stub.Hello(_hello_request(model, device, tail_weights=start), timeout=60)
        for step, device in ((0, "device-0"), (0, "device-1"), (1, "device-0")):
            for kind in (FORWARD, TRAIN):
                request = _step(model, kind, step, batch=4 + step)
                request.device_id = device
                stub.Step(request)
        tails[mode], stubs[mode] = servicer.trainer.split.tail.get_weights(), stub
    for x, y in zip(tails["sequential"], tails["parallel"]):
        np.testing.assert_array_equal(x, y)
    heads = [[np.full_like(w, value) for w in model.head.get_weights()] for value in (1.0, 3.0)]
    requests = [
        pb.AverageHeadsRequest(
            model_digest=model_digest(model),
            device_id=f"device-{i}",
            round=0,
            weights=weights_to_protos(head),
            samples=samples,
        )
        for i, (head, samples) in enumerate(zip(heads, (1, 3)))
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(stubs["parallel"].AverageHeads, requests))
    assert [reply.devices for reply in replies] == [2, 2]
    average = tf.make_ndarray(tensor_pb2.TensorProto.FromString(replies[0].weights[0]))
    np.testing.assert_allclose(average, 2.5)  # (1 x 1 + 3 x 3) / 4
