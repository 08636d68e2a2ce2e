"""The training server against a hostile or broken client (issue 25): per-device identity, bounds
on everything a request can make the server hold, atomic and idempotent steps, short errors.

Each test runs the service for real on 127.0.0.1, in this process.
"""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import logging as python_logging
import os
import struct
import time
import tracemalloc
import types

import grpc
import numpy as np
import pytest
import tensorflow as tf

from tfsplit import codec
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol import split_training_pb2_grpc as pb_grpc
from tfsplit.serving import validation
from tfsplit.serving.grpc_service import answer_or_abort
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase
from tfsplit.training.messages import model_digest, weights_from_protos, weights_to_protos
from tfsplit.training.server import batching
from tfsplit.training.server import service as service_lib
from tfsplit.training.server import tail_trainer

SHAPES = ((32, 32, 3), 10)
DEVICE_KEY = "x-test-device"  # the fake identity: the device a call's metadata names


def tiny_config():
    """ResNet-18 at 1/8 width (no dropout: steps are deterministic)."""
    config = base_config("deprune")
    config.model.backbone = "resnet18"
    config.model.cut = "stage2"
    config.model.width_multiplier = 0.125
    config.data.batch_size = 32
    config.data.eval_batch_size = 48
    config.phases = [
        phase(budget=4, epochs=1, learning_rate=0.05),
        phase(budget=8, epochs=1, learning_rate=0.02, boost_epochs=1),
    ]
    return config


def build_split(image_shape, num_classes):
    info = types.SimpleNamespace(image_shape=tuple(image_shape), num_classes=num_classes)
    return trainer.build_split_model(tiny_config(), info)


@pytest.fixture(scope="module")
def model():
    """The device's model (its digest and tail weights are what a real device sends)."""
    return build_split(*SHAPES)


@pytest.fixture
def serving():
    """start(**servicer options) -> (servicer, stub) on a free port; stopped after the test."""
    servers, channels = [], []

    def start(state_dir=None, **options):
        servicer = service_lib.TrainingServicer(build_split, state_dir, **options)
        server, port = service_lib.serve(servicer, 0)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        servers.append(server)
        channels.append(channel)
        stub = pb_grpc.SplitTrainingStub(channel)
        stub.channel = channel  # for raw calls
        return servicer, stub

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(0)


def hello_request(model, device_id="device-0", **fields):
    return pb.HelloRequest(
        model_digest=model_digest(model),
        image_shape=list(SHAPES[0]),
        num_classes=SHAPES[1],
        device_id=device_id,
        **fields,
    )


def train_request(model, step, batch=4, device_id="device-0", seed=None, **fields):
    rng = np.random.default_rng(step if seed is None else seed)
    values = rng.normal(size=(batch, 16, 16, 4)).astype(np.float32)
    payload = codec.encode(
        values, [3, 1, 2, 0], model.channels, "float16", labels=np.arange(batch) % 10
    )
    fields = dict(dict(kind=pb.StepRequest.TRAIN, learning_rate=0.05), **fields)
    return pb.StepRequest(
        model_digest=model_digest(model),
        step=step,
        payload=payload,
        device_id=device_id,
        **fields,
    )


def refusal(call):
    """(code, details) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def all_weights(servicer):
    """Every tail variable (batch norm's moving statistics too) and the optimizer's slots."""
    split = servicer.trainer.split
    return [v.numpy() for v in split.tail.variables + split.optimizer.variables()]


def assert_identical(before, after):
    assert len(before) == len(after)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


def as_device(device_id):
    return ((DEVICE_KEY, device_id),)


def identify_from_metadata(context):
    """A fake per-device identity: the device named by the call's metadata (None: no identity)."""
    return dict(context.invocation_metadata()).get(DEVICE_KEY)


# ------------------------------------------------------------------------------------- identity
def test_an_authenticated_device_acts_only_as_itself(serving, model):
    servicer, stub = serving(identify=identify_from_metadata, parallel=True, average_timeout_s=1)
    me, other = as_device("device-0"), as_device("device-1")
    stub.Hello(hello_request(model, device_id=""), metadata=me)  # an empty id: the caller's
    assert set(servicer.trainer.devices) == {"device-0"}
    code, details = refusal(lambda: stub.Hello(hello_request(model), metadata=other))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'device-1' may act only as itself" in details
    step = train_request(model, 0)
    assert refusal(lambda: stub.Step(step, metadata=other))[0] == grpc.StatusCode.PERMISSION_DENIED
    checkpoint = pb.CheckpointRequest(model_digest=model_digest(model), device_id="device-0")
    assert (
        refusal(lambda: stub.Checkpoint(checkpoint, metadata=other))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    average = pb.AverageHeadsRequest(
        model_digest=model_digest(model),
        device_id="device-0",
        weights=weights_to_protos(model.head.get_weights()),
        samples=1,
    )
    assert (
        refusal(lambda: stub.AverageHeads(average, metadata=other))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert servicer.trainer.devices["device-0"].next_step == 0  # nothing was done for it
    step.device_id = ""  # acts as the caller
    assert stub.Step(step, metadata=me).step == 0
    assert stub.Step(train_request(model, 1), metadata=me).step == 1  # its own id, named
    checkpoint.step = 2
    assert stub.Checkpoint(checkpoint, metadata=me).step == 2
    assert stub.AverageHeads(average, metadata=me).devices == 1
    tail = pb.TailWeightsRequest(model_digest=model_digest(model))
    assert len(stub.TailWeights(tail, metadata=me).weights) == len(model.tail.get_weights())
    # A call the identity names no device for (a shared token) acts as the device it names.
    assert stub.Step(train_request(model, 2)).step == 2


# ----------------------------------------------------------------------------------- the bounds
def test_a_step_over_the_batch_cap_is_refused_before_its_values_are_decoded(serving, model):
    servicer, stub = serving(max_batch_size=8)
    stub.Hello(hello_request(model))
    assert stub.Step(train_request(model, 0, batch=8)).step == 0
    code, details = refusal(lambda: stub.Step(train_request(model, 1, batch=9)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 8 samples" in details
    evaluate = train_request(model, 0, batch=9, kind=pb.StepRequest.EVALUATE)
    assert refusal(lambda: stub.Step(evaluate))[0] == grpc.StatusCode.INVALID_ARGUMENT
    # A header declaring 2^32 - 1 samples over a few bytes: the cap answers, not the codec.
    huge = train_request(model, 1)
    huge.payload = huge.payload[:8] + struct.pack("<I", 2**32 - 1) + huge.payload[12:64]
    code, details = refusal(lambda: stub.Step(huge))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 8 samples" in details
    assert servicer.trainer.devices["device-0"].next_step == 1


def test_a_tensor_proto_declaring_more_than_it_carries_is_refused_without_allocation(
    serving, model
):
    like = [np.zeros((3, 3), np.float32), np.zeros((2048, 2048), np.float32)]
    expanding = [
        tf.make_tensor_proto(np.zeros((3, 3), np.float32)).SerializeToString(),
        tf.make_tensor_proto(1.0, dtype=tf.float32, shape=[2048, 2048]).SerializeToString(),
    ]
    assert len(expanding[1]) < 64  # one value, declared as 4M of them (16 MiB)
    declaring = tf.make_tensor_proto(np.float32(1.0))
    declaring.tensor_shape.dim.add(size=1 << 40)
    tracemalloc.start()
    try:
        for blobs in (expanding, [expanding[0], declaring.SerializeToString()]):
            with pytest.raises(validation.RequestError) as raised:
                weights_from_protos(blobs, like)
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "tail weight 1" in str(raised.value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # A well-formed blob still decodes, and through the service the first Hello is refused.
    good = weights_to_protos(like)
    np.testing.assert_array_equal(weights_from_protos(good, like)[1], like[1])
    servicer, stub = serving()
    tail = weights_to_protos(model.tail.get_weights())
    tail[0] = tf.make_tensor_proto(
        1.0, dtype=tf.float32, shape=model.tail.get_weights()[0].shape
    ).SerializeToString()
    code, _ = refusal(lambda: stub.Hello(hello_request(model, tail_weights=tail)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and servicer.trainer is None


def test_a_device_that_leaves_or_times_out_frees_its_slot(serving, model):
    servicer, stub = serving(max_devices=2, device_timeout_s=0.5)
    for device in ("device-0", "device-1"):
        stub.Hello(hello_request(model, device))
    code, details = refusal(lambda: stub.Hello(hello_request(model, "device-2")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 devices" in details
    time.sleep(0.6)
    stub.Step(train_request(model, 0, device_id="device-1"))  # device-1 is still there
    stub.Hello(hello_request(model, "device-2"))  # device-0 was silent: its slot is free
    assert set(servicer.trainer.devices) == {"device-1", "device-2"}
    code, details = refusal(lambda: stub.Step(train_request(model, 0)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not in the run" in details
    leave = pb.LeaveRequest(model_digest=model_digest(model), device_id="device-1")
    assert stub.Leave(leave).left  # a device that leaves frees its slot at once
    stub.Hello(hello_request(model, "device-3"))
    assert set(servicer.trainer.devices) == {"device-2", "device-3"}
    assert not stub.Leave(leave).left  # gone already
    leave.model_digest = "0" * 64
    assert refusal(lambda: stub.Leave(leave))[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_the_step_log_is_bounded(serving, model, tmp_path):
    servicer, stub = serving(str(tmp_path), max_log_bytes=1)
    stub.Hello(hello_request(model))
    stub.Step(train_request(model, 0))
    # Past its bound the server saved its own checkpoint, which emptied the log.
    assert os.path.getsize(tmp_path / "steps.log") == 0
    restarted = service_lib.TrainingServicer(build_split, str(tmp_path))
    assert restarted.trainer.devices["device-0"].next_step == 1
    assert_identical(all_weights(servicer), all_weights(restarted))


def test_client_strings_are_cut_short_in_errors(serving, model):
    _, stub = serving()
    stub.Hello(hello_request(model))
    long_id = train_request(model, 0, device_id="d" * (1 << 20))
    code, details = refusal(lambda: stub.Step(long_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and len(details) < 300
    long_shape = hello_request(model, "device-1")
    long_shape.image_shape[:] = [7] * (1 << 18)
    code, details = refusal(lambda: stub.Hello(long_shape))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300
    assert "262144 values" in details


# ------------------------------------------------------------------------------- the first Hello
def test_a_stray_hello_changes_nothing_also_across_a_restart(serving, model, tmp_path):
    servicer, stub = serving(str(tmp_path))
    stray = pb.HelloRequest(
        model_digest="0" * 64, image_shape=[40, 40, 3], num_classes=7, device_id="device-9"
    )
    assert refusal(lambda: stub.Hello(stray))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert servicer.trainer is None and os.listdir(tmp_path) == []
    tail = weights_to_protos(model.tail.get_weights())
    assert stub.Hello(hello_request(model, tail_weights=tail)).next_step == 0
    stub.Step(train_request(model, 0))
    stub.Checkpoint(
        pb.CheckpointRequest(model_digest=model_digest(model), device_id="device-0", step=1)
    )
    # A restarted server on the same state: the stray Hello is refused, the device goes on.
    restarted, stub = serving(str(tmp_path))
    assert refusal(lambda: stub.Hello(stray))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.Hello(hello_request(model)).next_step == 1
    assert stub.Step(train_request(model, 1)).step == 1


def test_shapes_fixed_by_the_config_refuse_other_shapes_without_building(model):
    built = []

    def counting_build(*shapes):
        built.append(shapes)
        return build_split(*shapes)

    servicer = service_lib.TrainingServicer(counting_build, shapes=SHAPES)
    stray = pb.HelloRequest(
        model_digest=model_digest(model), image_shape=[40, 40, 3], num_classes=7, device_id="d"
    )
    with pytest.raises(validation.RequestError) as raised:
        servicer._hello(stray)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and built == []
    assert servicer._hello(hello_request(model)).next_step == 0 and built == [SHAPES]


# --------------------------------------------------------------------------------------- steps
def test_a_retry_with_another_payload_is_refused(serving, model):
    servicer, stub = serving()
    stub.Hello(hello_request(model))
    first = stub.Step(train_request(model, 0))
    weights = all_weights(servicer)
    assert stub.Step(train_request(model, 0)) == first  # the same request: its kept reply
    for other in (train_request(model, 0, seed=7), train_request(model, 0, learning_rate=0.01)):
        code, details = refusal(lambda: stub.Step(other))  # noqa: B023
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "other contents" in details
    assert_identical(weights, all_weights(servicer))
    assert servicer.trainer.next_step == 1


def test_a_failed_step_leaves_the_tail_bit_identical(serving, model, tmp_path, monkeypatch):
    servicer, stub = serving(str(tmp_path))
    stub.Hello(hello_request(model))
    stub.Step(train_request(model, 0))
    log_size = os.path.getsize(tmp_path / "steps.log")
    kernel = [v for v in servicer.trainer.split.tail.trainable_variables if v.shape.rank == 2][-1]
    good = kernel.numpy()
    # A non-finite loss (an overflowing logit): refused after the forward pass changed batch
    # norm's moving statistics, which go back too.
    kernel.assign(np.full_like(good, np.inf))
    weights = all_weights(servicer)
    code, details = refusal(lambda: stub.Step(train_request(model, 1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in details
    assert_identical(weights, all_weights(servicer))
    kernel.assign(good)
    weights = all_weights(servicer)

    # A gradient the wire cannot carry (float16 overflow), found once the update is computed.
    def overflowing(*args, **kwargs):
        raise codec.PayloadError("`values` must lie within float16 range.")

    request = train_request(model, 1)
    monkeypatch.setattr(batching.codec, "encode", overflowing)
    code, details = refusal(lambda: stub.Step(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "float16" in details
    monkeypatch.undo()
    assert_identical(weights, all_weights(servicer))
    assert servicer.trainer.next_step == 1
    assert os.path.getsize(tmp_path / "steps.log") == log_size  # nothing logged
    assert stub.Step(train_request(model, 1)).step == 1  # then the step trains, once
    assert any(not np.array_equal(x, y) for x, y in zip(weights, all_weights(servicer)))


def test_learning_rates_above_the_bound_are_refused(serving, model):
    limits = service_lib.config_limits(tiny_config())
    assert limits == dict(max_batch_size=48, max_learning_rate=0.05)
    servicer, stub = serving(**limits)
    stub.Hello(hello_request(model))
    code, details = refusal(lambda: stub.Step(train_request(model, 0, learning_rate=0.06)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "[0, 0.05]" in details
    assert stub.Step(train_request(model, 0, learning_rate=0.05)).step == 0
    default = service_lib.TrainingServicer(build_split)._options["max_learning_rate"]
    assert default == tail_trainer.MAX_LEARNING_RATE


# ----------------------------------------------------------------------------------- the errors
def test_a_resume_before_any_checkpoint_names_no_path(serving, model, tmp_path):
    servicer, stub = serving(str(tmp_path))
    stub.Hello(hello_request(model))
    stub.Step(train_request(model, 0))
    code, details = refusal(lambda: stub.Hello(hello_request(model, resume=True, resume_step=0)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no checkpoint yet" in details
    assert str(tmp_path) not in details and servicer.trainer.next_step == 1


def test_an_undecodable_message_gets_one_line(serving, caplog):
    _, stub = serving()
    raw = stub.channel.unary_unary(
        "/tfsplit.training.SplitTraining/Step",
        request_serializer=None,
        response_deserializer=None,
    )
    with caplog.at_level(python_logging.INFO):
        code, details = refusal(lambda: raw(b"\xff\xff\xff\xff", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a serialized StepRequest" in details
    assert not [r for r in caplog.records if r.exc_info]  # gRPC's own parser logs a traceback
    assert [r.getMessage() for r in caplog.records if "Rejected" in r.getMessage()] == [
        "Rejected Step (INVALID_ARGUMENT): " + details
    ]


class _Context:
    def abort(self, code, details):
        raise grpc.RpcError(code, details)


def test_an_internal_error_logs_one_line_and_returns_no_detail(caplog):
    def failing():
        raise FileNotFoundError("/secret/workdir/state.json")

    with caplog.at_level(python_logging.INFO), pytest.raises(grpc.RpcError) as raised:
        answer_or_abort(_Context(), "Step", failing)
    code, details = raised.value.args
    assert code == grpc.StatusCode.INTERNAL and "/secret" not in details
    assert [r.exc_info for r in caplog.records] == [None]


def test_the_warm_up_changes_nothing_and_the_steps_after_it_are_the_same(serving, model):
    tail = weights_to_protos(model.tail.get_weights())
    runs = {}
    for warm_up in (False, True):
        servicer, stub = serving(max_batch_size=4, warm_up=warm_up)
        stub.Hello(hello_request(model, tail_weights=tail))
        before = all_weights(servicer)
        replies = [stub.Step(train_request(model, step, batch=3 + step)) for step in range(2)]
        # A calibration after it leaves its batch's statistics (the warm-up traced its pass
        # before any calibration), which the evaluation then uses.
        calibrate = train_request(
            model,
            2,
            batch=4,
            kind=pb.StepRequest.CALIBRATE,
            calibration_begin=True,
            calibration_finish=True,
        )
        evaluate = train_request(model, 2, batch=4, kind=pb.StepRequest.EVALUATE)
        replies += [stub.Step(calibrate), stub.Step(evaluate)]
        runs[warm_up] = before, replies, all_weights(servicer)
    assert_identical(runs[False][0], runs[True][0])  # what the warm-up ran, it put back
    assert [r.SerializeToString() for r in runs[False][1]] == [
        r.SerializeToString() for r in runs[True][1]
    ]
    assert_identical(runs[False][2], runs[True][2])
