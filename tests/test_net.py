"""Split training over gRPC: a device (`RemoteSplitModel`) and a `tfsplit-train-server`.

The service runs for real on 127.0.0.1, in this process (a thread) for the model-level tests and
as two processes (`tfsplit-train-server` and `tfsplit-train --server`) end to end.
"""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import types

import grpc
import numpy as np
import pytest

from tfsplit import codec
from tfsplit.auth import credentials
from tfsplit.auth import grpc_server as security
from tfsplit.device.training.channel import TrainingClient
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol import split_training_pb2_grpc as pb_grpc
from tfsplit.training import trainer
from tfsplit.training.config import base_config, load_config_file, phase
from tfsplit.training.messages import model_digest, weights_from_protos, weights_to_protos
from tfsplit.training.server import service as service_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fuzzed training steps in CI; `python -m benchmarks.fuzz_servers` sends 20,000 of all kinds.
FUZZED_STEPS = 1_000


def tiny_config():
    """ResNet-18 (no dropout: both halves draw no random masks) at 1/8 width, 2 short phases."""
    config = base_config("deprune")
    config.model.backbone = "resnet18"
    config.model.cut = "stage2"
    config.model.width_multiplier = 0.125
    config.data.train_size = 128
    config.data.test_size = 64
    config.data.batch_size = 32
    config.data.eval_batch_size = 32
    config.calibration_batches = 2
    config.phases = [
        phase(budget=4, epochs=1, learning_rate=0.05),
        phase(budget=8, epochs=1, learning_rate=0.05, reset="deprune"),
    ]
    return config


def _servicer(config, state_dir=None, **trainer_options):
    def build_split(image_shape, num_classes):
        info = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
        return trainer.build_split_model(config, info)

    return service_lib.TrainingServicer(build_split, state_dir, **trainer_options)


@pytest.fixture
def serving():
    """Starts a servicer on 127.0.0.1 (a free port) and stops it after the test."""
    servers = []

    def start(config, state_dir=None, trainer_options=None, **kwargs):
        servicer = _servicer(config, state_dir, **(trainer_options or {}))
        server, port = service_lib.serve(servicer, 0, **kwargs)
        servers.append(server)
        return servicer, port

    yield start
    for server in servers:
        server.stop(0)


def _hello(stub, servicer_model, device_id="device-0", **fields):
    request = pb.HelloRequest(
        model_digest=model_digest(servicer_model),
        image_shape=list(servicer_model.head.input.shape[1:]),
        num_classes=int(servicer_model.tail.output.shape[-1]),
        device_id=device_id,
        **fields,
    )
    return stub.Hello(request, timeout=60)


@pytest.fixture
def opened(serving):
    """A server with an open run and a stub to it; yields (stub, device model, servicer)."""
    config = tiny_config()
    servicer, port = serving(config)
    info = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    model = trainer.build_split_model(config, info)
    stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    assert _hello(stub, model).next_step == 0
    return stub, model, servicer


def _train_request(model, step, batch=4, labels=None, **fields):
    height, width = model.tail.input.shape[1:3]
    values = np.random.default_rng(step).normal(size=(batch, height, width, 4)).astype(np.float32)
    labels = np.arange(batch) % 10 if labels is None else labels
    payload = codec.encode(values, [3, 1, 2, 0], model.channels, "float16", labels=labels)
    return pb.StepRequest(
        kind=pb.StepRequest.TRAIN,
        model_digest=model_digest(model),
        step=step,
        payload=payload,
        learning_rate=0.05,
        device_id="device-0",
        **fields,
    )


def _code(call):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_steps_are_idempotent_and_in_order(opened):
    stub, model, servicer = opened
    first = stub.Step(_train_request(model, 0))
    weights = servicer.trainer.split.tail.get_weights()
    again = stub.Step(_train_request(model, 0))  # a retry after a lost answer
    assert again == first
    for x, y in zip(weights, servicer.trainer.split.tail.get_weights()):
        np.testing.assert_array_equal(x, y)  # no second update
    assert _code(lambda: stub.Step(_train_request(model, 5))) == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.Step(_train_request(model, 1)).step == 1


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda r: setattr(r, "payload", b"junk"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: setattr(r, "payload", r.payload[:-3]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: setattr(r, "model_digest", "0" * 64), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda r: setattr(r, "kind", 7), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: setattr(r, "learning_rate", float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_messages_are_refused_and_the_server_keeps_serving(opened, mutate, code):
    stub, model, servicer = opened
    request = _train_request(model, 0)
    mutate(request)
    assert _code(lambda: stub.Step(request)) == code
    assert servicer.trainer.next_step == 0  # nothing changed
    assert stub.Step(_train_request(model, 0)).step == 0


def test_labels_out_of_range_and_missing_labels_are_refused(opened):
    stub, model, _ = opened
    bad = _train_request(model, 0, labels=np.array([0, 1, 2, 99]))
    assert _code(lambda: stub.Step(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    no_labels = _train_request(model, 0)
    decoded = codec.decode(no_labels.payload)
    no_labels.payload = codec.encode(
        decoded.dequantized(), decoded.indices, model.channels, "float16"
    )
    assert _code(lambda: stub.Step(no_labels)) == grpc.StatusCode.INVALID_ARGUMENT


def test_fuzzed_training_steps_are_trained_or_refused_and_change_only_what_they_train(
    opened, serving
):
    """Random bit flips, truncations and field values in training steps sent at the device's
    next step id: each is trained (OK, one step further, a gradient of its batch's shape) or
    refused as INVALID_ARGUMENT or FAILED_PRECONDITION with a short message, never a crash; and
    the tail ends as a clean server's does after the same accepted steps."""
    stub, model, servicer = opened
    start = servicer.trainer.split.tail.get_weights()
    rng = np.random.default_rng(0)
    good = _train_request(model, 0).SerializeToString()
    deadline = time.monotonic() + 120
    codes, accepted = {}, []
    refusals = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
    for i in range(FUZZED_STEPS):
        message = bytearray(good)
        for _ in range(rng.integers(1, 6)):
            message[rng.integers(len(message))] = rng.integers(256)
        if i % 3 == 0:
            message = message[: rng.integers(len(message))]
        try:
            request = pb.StepRequest.FromString(bytes(message))
        except Exception:  # noqa: BLE001  (not even a message: send raw bytes below)
            request = pb.StepRequest(payload=bytes(message))
        before = servicer.trainer.next_step
        request.step = before  # a step id the server would train
        try:
            reply = stub.Step(request, timeout=10)
        except grpc.RpcError as error:
            assert error.code() in refusals, (error.code(), error.details())
            assert len(error.details().encode()) < 1024
            assert servicer.trainer.next_step == before
            codes[error.code().name] = codes.get(error.code().name, 0) + 1
        else:
            assert reply.step == before and servicer.trainer.next_step == before + 1
            sent = codec.decode(request.payload)
            assert codec.decode(reply.payload).values.shape == sent.values.shape
            accepted.append(request)
            codes["OK"] = codes.get("OK", 0) + 1
        assert time.monotonic() < deadline
    assert sum(codes.values()) == FUZZED_STEPS, codes
    assert min(codes.values()) > 20 and len(codes) == 3, codes  # every path, often
    # A clean server given the accepted steps, in order, trains the same tail.
    clean, port = serving(tiny_config())
    clean_stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    _hello(clean_stub, model, tail_weights=weights_to_protos(start))
    for request in accepted:
        clean_stub.Step(request)
    for x, y in zip(
        clean.trainer.split.tail.get_weights(), servicer.trainer.split.tail.get_weights()
    ):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    assert stub.Step(_train_request(model, servicer.trainer.next_step)).step == len(accepted)


def test_a_call_without_the_token_is_refused_and_changes_nothing(serving):
    config = tiny_config()
    servicer, port = serving(config, interceptors=[security.TokenInterceptor("s3cret")])
    info = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    model = trainer.build_split_model(config, info)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.SplitTrainingStub(channel)
    for metadata in ((), credentials.call_metadata("wrong")):
        code = _code(lambda: stub.Hello(pb.HelloRequest(), metadata=metadata, timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.trainer is None  # no run was opened
    request = _hello_request(model)
    assert (
        stub.Hello(request, metadata=credentials.call_metadata("s3cret"), timeout=60).next_step == 0
    )


def _hello_request(model):
    return pb.HelloRequest(
        model_digest=model_digest(model),
        image_shape=[32, 32, 3],
        num_classes=10,
        device_id="device-0",
    )


def test_tls_with_a_self_signed_test_pair(serving, tmp_path):
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    config = tiny_config()
    _, port = serving(config, credentials=security.server_credentials(str(cert), str(key)))
    model = trainer.build_split_model(
        config, types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    )
    client = TrainingClient(
        f"127.0.0.1:{port}", root_certificates=credentials.read_pem(str(cert), "TLS CA")
    )
    assert client.call("Hello", _hello_request(model)).next_step == 0
    plain = TrainingClient(f"127.0.0.1:{port}", retry_for_s=0, deadline_s=5)
    with pytest.raises(grpc.RpcError):
        plain.call("Hello", _hello_request(model))


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11"])
def test_a_resumed_device_takes_the_server_back_and_a_restarted_server_replays(
    serving, tmp_path, backbone
):
    """Exactly: VGG's tail draws dropout masks, which the server's checkpoint keeps with it."""
    config = tiny_config()
    if backbone == "vgg11":
        config.model.backbone, config.model.cut = "vgg11", "conv5"
    servicer, port = serving(config, state_dir=str(tmp_path / "state"))
    model = trainer.build_split_model(
        config, types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    )
    stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    _hello(stub, model)
    digest = model_digest(model)
    tail = lambda: servicer.trainer.split.tail.get_weights()  # noqa: E731
    for step in range(2):
        stub.Step(_train_request(model, step))
    checkpoint = pb.CheckpointRequest(model_digest=digest, device_id="device-0", step=2)
    assert stub.Checkpoint(checkpoint).step == 2
    stub.Step(_train_request(model, 2))
    after_step_2 = tail()
    replies = {3: stub.Step(_train_request(model, 3))}
    # A restarted server (a new servicer on the same state) replays the log: steps 2 and 3.
    restarted = _servicer(config, str(tmp_path / "state"))
    assert restarted.trainer.devices["device-0"].next_step == 4
    assert restarted.trainer.devices["device-0"].last_reply == replies[3]
    for x, y in zip(restarted.trainer.split.tail.get_weights(), tail()):
        np.testing.assert_array_equal(x, y)
    # The device restarted from a backup at step 3: the server goes back to step 3.
    back = _hello(stub, model, resume=True, resume_step=3)
    assert back.next_step == 3 and servicer.trainer.devices["device-0"].next_step == 3
    for x, y in zip(tail(), after_step_2):
        np.testing.assert_array_equal(x, y)
    assert stub.Step(_train_request(model, 3)) == replies[3]  # the same step, trained again
    code = _code(lambda: _hello(stub, model, resume=True, resume_step=1))  # before the checkpoint
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_two_devices_keep_their_own_step_ids_and_share_the_tail(opened):
    stub, model, servicer = opened
    _hello(stub, model, device_id="device-1")
    assert stub.Step(_train_request(model, 0)).step == 0
    weights = servicer.trainer.split.tail.get_weights()
    second = _train_request(model, 0)
    second.device_id = "device-1"
    assert stub.Step(second).step == 0  # its own first step, not a retry of device-0's
    changed = [
        not np.array_equal(x, y) for x, y in zip(weights, servicer.trainer.split.tail.get_weights())
    ]
    assert any(changed)  # one shared tail, trained by both
    assert {d: v.next_step for d, v in servicer.trainer.devices.items()} == {
        "device-0": 1,
        "device-1": 1,
    }
    unknown = _train_request(model, 0)
    unknown.device_id = "device-9"
    assert _code(lambda: stub.Step(unknown)) == grpc.StatusCode.FAILED_PRECONDITION
    bad_id = pb.HelloRequest()
    bad_id.CopyFrom(_hello_request(model))
    bad_id.device_id = "no spaces"
    assert _code(lambda: stub.Hello(bad_id)) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_device_trains_its_local_classifier_against_a_server_without_one(serving):
    """The local classifier stays on the device: a server built without it accepts the device's
    model, and fit trains both the classifier (on the device) and the tail (on the server)."""
    servicer, port = serving(tiny_config())
    config = tiny_config()
    config.model.local_loss_weight = 1.0
    info = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    model = trainer.build_split_model(config, info, remote=True)
    model.connect(TrainingClient(f"127.0.0.1:{port}"))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(32, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=32)
    classifier = model.local_classifier.get_weights()
    tail = servicer.trainer.split.tail.get_weights()
    model.set_budget(4)
    history = model.fit(images, labels, batch_size=16, epochs=1, verbose=0).history
    assert history["local_loss"][0] > 0
    assert not np.array_equal(classifier[0], model.local_classifier.get_weights()[0])
    after = servicer.trainer.split.tail.get_weights()
    assert any(not np.array_equal(x, y) for x, y in zip(tail, after))


# ----------------------------------------------------------------------------------------------
# Parallel mode: concurrent devices' steps trained as one batch, heads averaged (SplitFed).
# ----------------------------------------------------------------------------------------------


def _parallel_run(serving, state_dir=None, devices=("device-0", "device-1"), model=None, **options):
    """A parallel-mode server with `devices` joined, its tail `model`'s (by default a new
    model's); returns (stub, device model, servicer)."""
    config = tiny_config()
    options = dict(dict(parallel=True, gather_timeout_s=30.0), **options)
    servicer, port = serving(config, state_dir, trainer_options=options)
    if model is None:
        model = trainer.build_split_model(
            config, types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
        )
    stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for device in devices:
        assert _hello(stub, model, device, tail_weights=weights_to_protos(model.tail.get_weights()))
    return stub, model, servicer


def _at_once(call, requests):
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(call, requests))


def _as_device(request, device_id):
    copy = pb.StepRequest()
    copy.CopyFrom(request)
    copy.device_id = device_id
    return copy


def test_parallel_steps_of_two_devices_train_as_one_batch(serving):
    """Two devices sending the same batch at once move the tail as that batch alone would, and
    each gets the gradient of its own batch's mean loss."""
    stub, model, servicer = _parallel_run(serving)
    alone_stub, _, alone = _parallel_run(serving, devices=["device-0"], model=model)
    reference = alone_stub.Step(_train_request(model, 0))
    replies = _at_once(
        stub.Step, [_as_device(_train_request(model, 0), d) for d in ("device-0", "device-1")]
    )
    tails = servicer.trainer.split.tail, alone.trainer.split.tail
    for x, y in zip(*(t.trainable_weights for t in tails)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    for x, y in zip(*(t.non_trainable_weights for t in tails)):
        # Batch norm's moving variance is unbiased by the batch's size (n / (n - 1)): about 1e-3
        # apart here (measured up to 1.01e-3, which failed one run in three at rtol 1e-3).
        np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-6)
    for reply in replies:
        assert reply.step == 0
        np.testing.assert_allclose(
            codec.decode(reply.payload).dequantized(),
            codec.decode(reference.payload).dequantized(),
            atol=1e-3,
        )
    assert {d: v.next_step for d, v in servicer.trainer.devices.items()} == {
        "device-0": 1,
        "device-1": 1,
    }
    # A step retried after its answer was lost gets the same answer, trained once.
    assert stub.Step(_as_device(_train_request(model, 0), "device-1")) == replies[1]


def test_a_joined_batch_larger_than_its_bound_trains_in_parts(serving, tmp_path):
    """Three devices' steps of 4 samples at once, at most 8 samples a joined batch: the first two
    arrived train as one batch, the third as another, and every device gets its reply."""
    devices = ["device-0", "device-1", "device-2"]
    stub, model, servicer = _parallel_run(
        serving, str(tmp_path), devices=devices, max_joined_batch=8
    )
    replies = _at_once(stub.Step, [_as_device(_train_request(model, 0), d) for d in devices])
    assert [reply.step for reply in replies] == [0, 0, 0]
    groups = [len(group.requests) for group in servicer.trainer._state.logged_steps()]
    assert groups == [2, 1]
    assert {d: v.next_step for d, v in servicer.trainer.devices.items()} == dict.fromkeys(
        devices, 1
    )


def test_parallel_steps_keep_each_devices_channel_selection(serving):
    """Two devices with their own batch sizes and channel selections, trained as one batch, move
    the tail as one step of both batches with every channel sent (zeros where a device sent
    none) would; each device's gradient is its own rows and channels of that step's, scaled to
    its own batch's mean loss."""
    stub, model, servicer = _parallel_run(serving)
    alone_stub, _, alone = _parallel_run(serving, devices=["device-0"], model=model)
    height, width, channels = model.wire_shape
    rng = np.random.default_rng(7)
    sent = {"device-0": (4, [3, 1, 2, 0]), "device-1": (6, [5, 2, 7, 1])}
    requests, full, labels = [], [], []
    for device, (batch, indices) in sent.items():
        values = rng.normal(size=(batch, height, width, 4)).astype(np.float16)
        label = rng.integers(0, 10, batch)
        request = _train_request(model, 0)
        request.device_id = device
        request.payload = codec.encode(values, indices, channels, "float16", labels=label)
        requests.append(request)
        placed = np.zeros((batch, height, width, channels), np.float16)
        placed[..., indices] = values
        full.append(placed)
        labels.append(label)
    replies = _at_once(stub.Step, requests)
    reference = _train_request(model, 0)
    reference.payload = codec.encode(
        np.concatenate(full),
        np.arange(channels),
        channels,
        "float16",
        labels=np.concatenate(labels),
    )
    whole = codec.decode(alone_stub.Step(reference).payload).scatter()
    tails = servicer.trainer.split.tail, alone.trainer.split.tail
    for x, y in zip(*(t.trainable_weights for t in tails)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    start, total = 0, sum(batch for batch, _ in sent.values())
    for reply, (batch, indices) in zip(replies, sent.values()):
        rows = whole[start : start + batch][..., indices] * (total / batch)
        got = codec.decode(reply.payload).dequantized()
        np.testing.assert_allclose(got, rows, rtol=2e-3, atol=1e-6)
        start += batch


def test_a_parallel_step_does_not_wait_again_for_a_device_that_stopped_sending(serving):
    stub, model, servicer = _parallel_run(serving, gather_timeout_s=0.05)
    assert stub.Step(_train_request(model, 0)).step == 0  # device-1 sent nothing in time
    assert servicer.trainer._idle == {"device-1"}
    assert stub.Step(_train_request(model, 1)).step == 1
    assert stub.Step(_as_device(_train_request(model, 0), "device-1")).step == 0  # back again
    assert servicer.trainer._idle == {"device-0"}


def test_a_restarted_parallel_server_replays_the_batched_steps(serving, tmp_path):
    stub, model, servicer = _parallel_run(serving, str(tmp_path / "state"))
    digest = model_digest(model)
    stub.Checkpoint(pb.CheckpointRequest(model_digest=digest, device_id="device-0", step=0))
    for step in range(2):
        labels = np.arange(4) % 3
        _at_once(
            stub.Step,
            [
                _as_device(_train_request(model, step), "device-0"),
                _as_device(_train_request(model, step, labels=labels), "device-1"),
            ],
        )
    restarted = _servicer(tiny_config(), str(tmp_path / "state"), parallel=True)
    assert {d: v.next_step for d, v in restarted.trainer.devices.items()} == {
        "device-0": 2,
        "device-1": 2,
    }
    for x, y in zip(
        restarted.trainer.split.tail.get_weights(), servicer.trainer.split.tail.get_weights()
    ):
        np.testing.assert_array_equal(x, y)


def _average_request(model, device_id, round_id, weights, samples):
    return pb.AverageHeadsRequest(
        model_digest=model_digest(model),
        device_id=device_id,
        round=round_id,
        weights=weights_to_protos(weights),
        samples=samples,
    )


def test_heads_are_averaged_by_samples_once_every_device_sent(serving):
    stub, model, servicer = _parallel_run(serving, average_timeout_s=1.0)
    ones = [np.ones_like(w) for w in model.head.get_weights()]
    requests = [
        _average_request(model, "device-0", 0, ones, 3),
        _average_request(model, "device-1", 0, [4 * w for w in ones], 1),
    ]
    replies = _at_once(stub.AverageHeads, requests)
    for reply in replies:
        assert reply.devices == 2
        for averaged, one in zip(weights_from_protos(reply.weights, ones, "head"), ones):
            np.testing.assert_allclose(averaged, 1.75 * one)  # (3 * 1 + 1 * 4) / 4
    assert stub.AverageHeads(requests[1]) == replies[1]  # a retry of a finished round
    # A round that a device misses ends at its timeout with the heads that came.
    alone = stub.AverageHeads(_average_request(model, "device-0", 1, ones, 3))
    assert alone.devices == 1
    assert servicer.trainer._rounds.absent == {"device-1"}
    wrong = _average_request(model, "device-0", 2, ones[:-1], 3)
    assert _code(lambda: stub.AverageHeads(wrong)) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_sequential_server_refuses_to_average_heads(opened):
    stub, model, _ = opened
    request = _average_request(model, "device-0", 0, model.head.get_weights(), 1)
    assert _code(lambda: stub.AverageHeads(request)) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, every_steps", [("none", 0), ("mirrored", 2)], ids=["epochs", "mirrored-steps"]
)
def test_a_server_and_two_device_processes_train_the_smoke_config_in_parallel(
    tmp_path, strategy, every_steps
):
    """Each device reads its own half of the data and trains its head; their steps train one
    tail as one batch (split across the server's two replicas with `--strategy=mirrored` on two
    logical CPU devices), and after the last averaging (after every epoch, or every 2 steps)
    their heads agree."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    (tmp_path / "token").write_text("t0ken\n")
    config = [
        "--config=configs/deprune.py:smoke",
        f"--token_file={tmp_path / 'token'}",
        f"--config.average_every_steps={every_steps}",
        # A strategy trains a tail without nested budgets (deprune's default).
        f"--config.budget_sampling.nested={strategy == 'none'}",
    ]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfsplit_tools.train_server",
            *config,
            "--port=0",
            "--mode=parallel",
            f"--strategy={strategy}",
            f"--workdir={tmp_path / 'server'}",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "server.log").open("w"),
        text=True,
    )
    try:
        line = server.stdout.readline()
        match = re.match(r"listening on (127\.0\.0\.1:\d+)", line)
        assert match, line
        devices = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tfsplit_tools.train",
                    *config,
                    f"--server={match.group(1)}",
                    f"--config.data.shard_index={i}",
                    "--config.data.num_shards=2",
                    f"--workdir={tmp_path / f'device{i}'}",
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        logs = []
        for device in devices:
            _, stderr = device.communicate(timeout=300)
            assert device.returncode == 0, stderr[-3000:]
            logs.append(stderr)
        heads = []
        for i in range(2):
            summary = json.loads((tmp_path / f"device{i}" / "summary.json").read_text())
            assert summary["train_payload_bytes_up"] > 0
            heads.append(trainer.load_model(str(tmp_path / f"device{i}")).head)
        for x, y in zip(*(h.trainable_weights for h in heads)):
            np.testing.assert_array_equal(x, y)
        split_across = (
            "Training steps split across 2 replicas" in (tmp_path / "server.log").read_text()
        )
        assert split_across == (strategy == "mirrored")
        rounds = [
            re.findall(r"(Epoch|Step) (\d+): head averaged over 2 devices", log) for log in logs
        ]
        expected = [("Step", "2"), ("Step", "4"), ("Step", "6"), ("Step", "8")]
        if not every_steps:
            expected = [("Epoch", "1"), ("Epoch", "2")]
        assert rounds == [expected, expected], logs[0][-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)


# ----------------------------------------------------------------------------------------------
# kill -9 of either side, then a restart: the run carries on.
# ----------------------------------------------------------------------------------------------

TINY_OVERRIDES = [
    "--config=configs/deprune.py",
    "--config.model.backbone=resnet18",
    "--config.model.cut=stage2",
    "--config.model.width_multiplier=0.125",
    "--config.data.train_size=256",
    "--config.data.test_size=64",
    "--config.data.batch_size=32",
    "--config.data.eval_batch_size=32",
    "--config.calibration_batches=2",
    "--config.phases[0].epochs=1",
    "--config.phases[1].epochs=1",
    "--config.phases[1].budget=8",
    "--config.phases[1].anneal_epochs=0",
]


def _tiny_from_overrides():
    """`TINY_OVERRIDES` as a config in this process (for the uninterrupted reference run)."""
    config = load_config_file(os.path.join(REPO_ROOT, "configs", "deprune.py"))
    config.model.backbone, config.model.cut, config.model.width_multiplier = (
        "resnet18",
        "stage2",
        0.125,
    )
    config.data.train_size, config.data.test_size = 256, 64
    config.data.batch_size = config.data.eval_batch_size = 32
    config.calibration_batches = 2
    config.phases[0].epochs = config.phases[1].epochs = 1
    config.phases[1].budget, config.phases[1].anneal_epochs = 8, 0
    return config


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(workdir, port, env):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfsplit_tools.train_server",
            *TINY_OVERRIDES,
            f"--port={port}",
            f"--workdir={workdir}",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _start_device(workdir, port, env, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfsplit_tools.train",
            *TINY_OVERRIDES,
            *extra,
            f"--server=127.0.0.1:{port}",
            f"--workdir={workdir}",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path, process, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert process.poll() is None, "the process ended before the fault was injected"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_of_the_server_mid_epoch_then_a_restart_loses_nothing(tmp_path):
    """The device retries until the restarted server has replayed its log; the model and the
    bytes equal an uninterrupted in-process run's (no dropout in ResNet-18: both runs draw the
    same numbers)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    port, server_dir = _free_port(), tmp_path / "server"
    server = _start_server(server_dir, port, env)
    device = _start_device(tmp_path / "device", port, env, "--config.checkpoint_every_steps=2")
    try:
        _wait_for(server_dir / "state.json", server)  # the first checkpoint: step 2 of 8
        server.kill()
        server.wait(timeout=30)
        server = _start_server(server_dir, port, env)
        _, stderr = device.communicate(timeout=300)
        assert device.returncode == 0, stderr[-3000:]
    finally:
        for process in (server, device):
            process.kill()
    remote = json.loads((tmp_path / "device" / "summary.json").read_text())
    local = trainer.train(_tiny_from_overrides(), str(tmp_path / "local"), 0)
    for key in ("train_payload_bytes_up", "train_payload_bytes_down", "final_test_accuracy"):
        assert remote[key] == local[key], key
    a, b = trainer.load_model(str(tmp_path / "device")), trainer.load_model(str(tmp_path / "local"))
    for part in ("head", "tail"):  # the device saved the tail the server trained
        for x, y in zip(getattr(a, part).get_weights(), getattr(b, part).get_weights()):
            np.testing.assert_allclose(x, y, atol=1e-5)
    records = [json.loads(line) for line in (tmp_path / "device" / "metrics.jsonl").open()]
    for record in records:  # gRPC messages carry the payloads plus a little framing
        assert record["wire_bytes_up"] > record["payload_bytes_up"]
        assert record["wire_bytes_down"] > record["payload_bytes_down"]
        assert record["wire_bytes_up"] < 1.05 * record["payload_bytes_up"] + 50_000


@pytest.mark.slow
def test_kill_9_of_the_device_mid_epoch_then_a_restart_resumes_from_its_backup(tmp_path):
    """Backed up every step, the restarted device and the server go back to the backup's step
    together and finish the run."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    port, device_dir = _free_port(), tmp_path / "device"
    server = _start_server(tmp_path / "server", port, env)
    extra = ("--config.checkpoint_every_steps=1",)
    device = _start_device(device_dir, port, env, *extra)
    try:
        _wait_for(tmp_path / "server" / "state.json", device)
        time.sleep(0.3)  # a few more steps
        device.kill()
        device.wait(timeout=30)
        device = _start_device(device_dir, port, env, *extra)
        _, stderr = device.communicate(timeout=300)
        assert device.returncode == 0, stderr[-3000:]
    finally:
        for process in (server, device):
            process.kill()
    summary = json.loads((device_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (device_dir / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2] and summary["train_payload_bytes_up"] > 0
