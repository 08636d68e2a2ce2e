"""Tests for tfsplit.serving: the tail server's two protocols and its validation.

Everything runs on 127.0.0.1 with ports picked by the OS, against tiny real SavedModels with the
export's exact signature (tests/serving_fixtures.py), through the device's own clients
(`tfsplit.device`, the project's one client per protocol) and, for what those never send, raw
HTTP and TF Serving's own gRPC stub. Answers are checked against the SavedModel signature called
directly and against numpy math on the codec's own scatter.
"""

import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import serving_fixtures as fx  # imports tfsplit (Keras 2) before TensorFlow loads
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from tfsplit import codec, device
from tfsplit.serving import (
    ServedTail,
    TailModelError,
    TailServer,
    resolve_version_dir,
    tensors,
    validation,
)
from tfsplit.serving.validation import RequestError

import tensorflow as tf  # isort: skip  (after tfsplit, which selects Keras 2)

DTYPES = codec.WIRE_DTYPES
PROTOCOLS = ("grpc", "rest")
MAX_BATCH = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_name(dtype):
    return f"tail_{dtype}"


@pytest.fixture(scope="module")
def model_base(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models"))
    for dtype in DTYPES:
        fx.build_tail_saved_model(base, _model_name(dtype), dtype)
    fx.build_tail_saved_model(base, "bare", "float32", with_spec=False)
    return base


@pytest.fixture(scope="module")
def servers(model_base):
    started = {
        dtype: TailServer(model_base, _model_name(dtype), max_batch_size=MAX_BATCH).start()
        for dtype in DTYPES
    }
    yield started
    for server in started.values():
        server.stop()


def _client(server, protocol, model_name, **kwargs):
    address = server.grpc_target if protocol == "grpc" else server.rest_url
    return device.make_client(protocol, address, model_name, **kwargs)


@pytest.fixture(scope="module")
def clients(servers):
    made = {
        (dtype, protocol): _client(server, protocol, _model_name(dtype), timeout_s=20)
        for dtype, server in servers.items()
        for protocol in PROTOCOLS
    }
    yield made
    for client in made.values():
        client.close()


@pytest.fixture(scope="module")
def signatures(model_base):
    loaded = {
        dtype: tf.saved_model.load(os.path.join(model_base, _model_name(dtype), "1"))
        for dtype in DTYPES
    }
    return {dtype: module.signatures["serving_default"] for dtype, module in loaded.items()}


def _call_signature(signature, inputs):
    outputs = signature(**{name: tf.constant(array) for name, array in inputs.items()})
    return outputs["probabilities"].numpy()


def _predict(client, payload, **changes):
    """Sends a codec payload through a device client, parts replaced by `changes` if given."""
    parts = {name: getattr(payload, name) for name in ("values", "indices", "scale", "zero_point")}
    return client.predict(device.wire_payload(**{**parts, **changes}))


def _grpc_request(model_name, payload):
    """The PredictRequest the device's gRPC client sends, as TF Serving's own proto."""
    data = device.make_client("grpc", "127.0.0.1:1", model_name).encode(fx.wire(payload))
    return predict_pb2.PredictRequest.FromString(data)


def _assert_good_request_works(client, dtype):
    """After any refusal, the next good request on the same client gets the right answer."""
    payload = fx.make_payload(dtype, batch=1, seed=99)
    got = _predict(client, payload)
    np.testing.assert_allclose(got, fx.reference_probabilities(payload), atol=1e-5)


# --- the good path --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_answers_match_signature_and_numpy(clients, signatures, dtype, protocol):
    payload = fx.make_payload(dtype, batch=3)
    got = _predict(clients[dtype, protocol], payload)
    assert got.shape == (3, fx.NUM_CLASSES) and got.dtype == np.float32
    expected = _call_signature(signatures[dtype], fx.wire(payload).inputs())
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got, fx.reference_probabilities(payload), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_budget_below_the_exported_one(clients, dtype, protocol, k):
    payload = fx.make_payload(dtype, batch=2, k=k, seed=k)
    got = _predict(clients[dtype, protocol], payload)
    np.testing.assert_allclose(got, fx.reference_probabilities(payload), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_signature_answers_the_payload_the_clients_send(clients, signatures, dtype):
    """TensorFlow's own reader of the gRPC request and the REST JSON give the same tensors."""
    payload = fx.make_payload(dtype, k=2, seed=5)
    wire = fx.wire(payload)
    request = predict_pb2.PredictRequest.FromString(clients[dtype, "grpc"].encode(wire))
    sent = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
    np.testing.assert_array_equal(sent["values"], payload.values)
    assert sent["values"].dtype == np.dtype(dtype)
    assert sent["indices"].dtype == np.int32 and sent["zero_point"].dtype == np.int32
    inputs = json.loads(clients[dtype, "rest"].encode(wire))["inputs"]
    for name, array in sent.items():
        np.testing.assert_array_equal(np.asarray(inputs[name]).astype(array.dtype), array)
    direct = _call_signature(signatures[dtype], sent)
    for protocol in PROTOCOLS:
        np.testing.assert_allclose(clients[dtype, protocol].predict(wire), direct, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_request_bytes_is_what_is_serialized(clients, dtype):
    payload = fx.make_payload(dtype, batch=2)
    encoded = {
        protocol: clients[dtype, protocol].encode(fx.wire(payload)) for protocol in PROTOCOLS
    }
    grpc_request = encoded["grpc"]
    assert len(grpc_request) == predict_pb2.PredictRequest.FromString(grpc_request).ByteSize()
    assert json.loads(encoded["rest"])["inputs"]["indices"] == payload.indices.tolist()
    for protocol, request in encoded.items():  # what is measured is what is sent
        got = clients[dtype, protocol].send(request)
        np.testing.assert_allclose(got, fx.reference_probabilities(payload), atol=1e-5)
    # Raw tensor_content: the values cost exactly their bytes, plus a small fixed overhead.
    raw = payload.values.nbytes + 4 * payload.indices.size + 8
    assert raw < len(grpc_request) < raw + 200


def _typed_proto(array):
    """The same tensor in the typed repeated field TF uses for its dtype (not tensor_content)."""
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto(dtype=tf.as_dtype(array.dtype).as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    flat = array.ravel()
    if array.dtype == np.float16:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    elif array.dtype == np.float32:
        proto.float_val.extend(flat.tolist())
    else:
        proto.int_val.extend(flat.tolist())
    return proto


@pytest.mark.parametrize("dtype", DTYPES)
def test_typed_field_tensors_are_read_like_tensor_content(servers, clients, dtype):
    payload = fx.make_payload(dtype, batch=2, seed=3)
    request = _grpc_request(_model_name(dtype), payload)
    for name, array in fx.wire(payload).inputs().items():
        request.inputs[name].CopyFrom(_typed_proto(array))
    with grpc.insecure_channel(servers[dtype].grpc_target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)
    got = tf.make_ndarray(response.outputs["probabilities"])
    np.testing.assert_allclose(got, _predict(clients[dtype, "grpc"], payload), rtol=1e-6)
    assert response.model_spec.name == _model_name(dtype) and response.model_spec.version.value == 1


def test_row_format_stacks_values(servers, clients):
    payload = fx.make_payload("float16", batch=3, k=2)
    row = {"indices": payload.indices.tolist(), "scale": 1.0, "zero_point": 0}
    body = {"instances": [dict(row, values=v.tolist()) for v in payload.values]}
    status, answer = _post(servers["float16"], _model_name("float16"), json.dumps(body).encode())
    assert status == 200
    np.testing.assert_allclose(
        answer["predictions"], _predict(clients["float16", "rest"], payload), rtol=1e-6
    )
    body["instances"][1]["indices"] = payload.indices[::-1].tolist()
    status, answer = _post(servers["float16"], _model_name("float16"), json.dumps(body).encode())
    assert status == 400 and "same 'indices'" in answer["error"]


def test_status_and_metadata(servers, clients):
    server = servers["int8"]
    assert clients["int8", "rest"].status() == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    status, metadata = _post(server, "tail_int8", None, "/metadata", "GET")
    assert status == 200
    assert metadata["model_spec"] == {"name": "tail_int8", "signature_name": "", "version": "1"}
    rest_inputs = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"][
        "inputs"
    ]
    assert rest_inputs["values"]["dtype"] == "DT_INT8"
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tail_int8"
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.GetModelMetadata(request, timeout=20)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_defs)
    signature = signature_defs.signature_def["serving_default"]
    assert sorted(signature.inputs) == ["indices", "scale", "values", "zero_point"]
    assert [d.size for d in signature.inputs["values"].tensor_shape.dim] == [-1, 3, 2, -1]
    assert list(signature.outputs) == ["probabilities"]


def test_concurrent_requests_get_their_own_answers(clients):
    def ask(seed):
        client = clients["float32", PROTOCOLS[seed % 2]]
        payload = fx.make_payload("float32", batch=1 + seed % 3, k=1 + seed % 4, seed=seed)
        return _predict(client, payload), fx.reference_probabilities(payload)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for got, expected in pool.map(ask, range(16)):
            np.testing.assert_allclose(got, expected, atol=1e-5)


# --- bad requests over gRPC -----------------------------------------------------------------


def _set(name, array):
    def mutate(request):
        request.inputs[name].CopyFrom(tensors.to_tensor_proto(np.asarray(array)))

    return mutate


def _truncate(request):
    content = request.inputs["values"].tensor_content
    request.inputs["values"].tensor_content = content[:-2]


def _drop_scale(request):
    del request.inputs["scale"]


def _extra(request):
    request.inputs["labels"].CopyFrom(tensors.to_tensor_proto(np.zeros(2, np.int32)))


def _spec(**fields):
    def mutate(request):
        for field, value in fields.items():
            if field == "version":
                request.model_spec.version.value = value
            else:
                setattr(request.model_spec, field, value)

    return mutate


_H, _W, _K = fx.HEIGHT, fx.WIDTH, fx.MAX_BUDGET
_INVALID, _NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
GRPC_CASES = [
    ("float16", "dtype", _set("values", np.zeros((2, _H, _W, _K), np.float32)), _INVALID,
     r"'values' must be float16 \(the exported wire dtype\). Received: dtype=float32"),
    ("float16", "int64 indices", lambda r: r.inputs["indices"].CopyFrom(
        tf.make_tensor_proto(np.arange(_K, dtype=np.int64))), _INVALID, "'indices' must be int32"),
    ("float16", "shape", _set("values", np.zeros((2, _W, _H, _K), np.float16)), _INVALID,
     r"shape \(N, 3, 2, k\) with 1 <= N <= 8. Received: shape=\(2, 2, 3, 4\)"),
    ("float16", "rank", _set("values", np.zeros((_H, _W, _K), np.float16)), _INVALID,
     r"shape \(N, 3, 2, k\)"),
    ("float16", "batch limit", _set("values", np.zeros((9, _H, _W, _K), np.float16)), _INVALID,
     "1 <= N <= 8"),
    ("float16", "budget", lambda r: (_set("values", np.zeros((2, _H, _W, 5), np.float16))(r),
                                     _set("indices", np.arange(5, dtype=np.int32))(r)), _INVALID,
     r"Budget k=5 .* must be in \[1, 4\]"),
    ("float16", "indices length", _set("indices", np.arange(3, dtype=np.int32)), _INVALID,
     r"'indices' must have shape \(k,\) = \(4,\)"),
    ("float16", "index range", _set("indices", np.array([0, 1, 2, 6], np.int32)), _INVALID,
     r"must lie in \[0, 6\)"),
    ("float16", "negative index", _set("indices", np.array([0, -1, 2, 3], np.int32)), _INVALID,
     r"must lie in \[0, 6\)"),
    ("float16", "duplicate index", _set("indices", np.array([0, 3, 2, 3], np.int32)), _INVALID,
     "must be distinct; channel 3 appears more than once"),
    ("float16", "truncated content", _truncate, _INVALID,
     r"`tensor_content` has 94 bytes, expected 96 for shape \(2, 3, 2, 4\)"),
    ("float16", "missing input", _drop_scale, _INVALID,
     r"Missing: \['scale'\]; unexpected: \[\]"),
    ("float16", "extra input", _extra, _INVALID, r"Missing: \[\]; unexpected: \['labels'\]"),
    ("float16", "scale on float", _set("scale", np.float32(0.5)), _INVALID,
     "carry no quantization: expected scale=1.0 and zero_point=0"),
    ("float16", "non-finite", _set("values", np.full((2, _H, _W, _K), np.inf, np.float16)),
     _INVALID, "must be finite float16"),
    ("float16", "unknown model", _spec(name="nope"), _NOT_FOUND, "model 'nope' is not served"),
    ("float16", "unknown version", _spec(version=7), _NOT_FOUND, "Version 7 .* serves version 1"),
    ("float16", "unknown label", _spec(version_label="stable"), _NOT_FOUND, "label 'stable'"),
    ("float16", "unknown signature", _spec(signature_name="other"), _INVALID,
     "signature name 'other' not found"),
    ("float16", "output filter", lambda r: r.output_filter.append("logits"), _INVALID,
     r"Unknown output\(s\) \['logits'\]"),
    ("int8", "zero point", _set("zero_point", np.int32(200)), _INVALID,
     r"zero_point in \[-128, 127\].*zero_point=200"),
    ("int8", "zero scale", _set("scale", np.float32(0.0)), _INVALID, "finite scale > 0"),
    ("int8", "nan scale", _set("scale", np.float32(np.nan)), _INVALID, "finite scale > 0"),
    ("float32", "scalar shape", _set("scale", np.ones(1, np.float32)), _INVALID,
     r"must be scalars \(shape \(\)\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    "dtype, mutate, code, match",
    [c[:1] + c[2:] for c in GRPC_CASES],
    ids=[c[1] for c in GRPC_CASES],
)
def test_grpc_refuses_bad_requests_and_keeps_serving(clients, dtype, mutate, code, match):
    request = _grpc_request(_model_name(dtype), fx.make_payload(dtype, batch=2))
    mutate(request)
    with pytest.raises(device.ServingError) as raised:
        clients[dtype, "grpc"].send(request.SerializeToString())
    assert raised.value.code == code.name
    assert raised.value.message and re.search(match, raised.value.message)
    _assert_good_request_works(clients[dtype, "grpc"], dtype)


def test_grpc_client_raises_the_servers_message(clients):
    payload = fx.make_payload("int8")
    with pytest.raises(device.ServingError, match="INVALID_ARGUMENT: .*must be distinct") as raised:
        _predict(clients["int8", "grpc"], payload, indices=[1, 1, 2, 3], zero_point=0)
    assert raised.value.code == "INVALID_ARGUMENT" and "channel 1" in raised.value.message
    _assert_good_request_works(clients["int8", "grpc"], "int8")


# --- bad requests over REST -----------------------------------------------------------------


def _post(server, model_name, body, suffix=":predict", method="POST"):
    """Sends raw bytes; returns (HTTP status, parsed JSON answer)."""
    request = urllib.request.Request(
        f"{server.rest_url}/v1/models/{model_name}{suffix}", data=body, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _body(dtype, **inputs):
    payload = fx.make_payload(dtype, batch=2)
    good = {
        "values": payload.values.tolist(),
        "indices": payload.indices.tolist(),
        "scale": payload.scale,
        "zero_point": payload.zero_point,
    }
    good.update(inputs)
    return json.dumps({"inputs": {k: v for k, v in good.items() if v is not None}}).encode()


REST_CASES = [
    ("float16", "malformed json", b'{"inputs": {"values": [1,', 400, "Malformed JSON"),
    ("float16", "not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("float16", "both formats", b'{"inputs": {}, "instances": []}', 400, "exactly one of"),
    ("float16", "strings", _body("float16", values=[[["a"]]]), 400, "Expected JSON numbers"),
    ("float16", "ragged", _body("float16", values=[[[[1.0]], [[1.0, 2.0]]]]), 400, "rectangular"),
    ("float16", "overflow", _body("float16", values=np.full((1, _H, _W, 2), 1e6).tolist(),
                                  indices=[0, 1]), 400, "within float16 range"),
    ("float16", "budget", _body("float16", values=np.zeros((1, _H, _W, 5)).tolist(),
                                indices=[0, 1, 2, 3, 4]), 400, r"Budget k=5"),
    ("float16", "duplicate index", _body("float16", indices=[1, 1, 2, 3]), 400, "distinct"),
    ("float16", "index range", _body("float16", indices=[1, 9, 2, 3]), 400, r"\[0, 6\)"),
    ("float16", "float indices", _body("float16", indices=[1.0, 2.0, 3.0, 4.0]), 400,
     "Expected JSON integers for int32"),
    ("float16", "missing input", _body("float16", scale=None), 400, r"Missing: \['scale'\]"),
    ("float16", "extra input", _body("float16", labels=[1, 2]), 400, r"unexpected: \['labels'\]"),
    ("float16", "signature", b'{"signature_name": "x", "inputs": {}}', 400, "'x' not found"),
    ("int8", "fractional int8", _body("int8", values=np.full((2, _H, _W, 4), 1.5).tolist()), 400,
     "Expected JSON integers for int8"),
    ("int8", "int8 range", _body("int8", values=np.full((2, _H, _W, 4), 300).tolist()), 400,
     r"int8 range \[-128, 127\]"),
    ("float16", "batch limit", _body("float16", values=np.zeros((9, _H, _W, _K)).tolist()), 400,
     r"1 <= N <= 8. Received: shape=\(9, 3, 2, 4\)"),
    ("float16", "scalar shape", _body("float16", scale=[1.0]), 400,
     r"must be scalars \(shape \(\)\)"),
    ("float16", "indices length", _body("float16", indices=[0, 1]), 400,
     r"'indices' must have shape \(k,\) = \(4,\)"),
    ("float16", "booleans", _body("float16", values=np.full((2, _H, _W, _K), True).tolist()), 400,
     "Expected JSON numbers"),
]  # fmt: skip


@pytest.mark.parametrize(
    "dtype, body, status, match",
    [c[:1] + c[2:] for c in REST_CASES],
    ids=[c[1] for c in REST_CASES],
)
def test_rest_refuses_bad_requests_and_keeps_serving(servers, clients, dtype, body, status, match):
    got_status, answer = _post(servers[dtype], _model_name(dtype), body)
    assert got_status == status
    assert list(answer) == ["error"] and re.search(match, answer["error"])
    _assert_good_request_works(clients[dtype, "rest"], dtype)


@pytest.mark.parametrize(
    "model_name, suffix, method, status, match",
    [
        ("nope", ":predict", "POST", 404, "model 'nope' is not served"),
        ("tail_float32", "/versions/3:predict", "POST", 404, "Version 3"),
        ("tail_float32", ":classify", "POST", 404, "Malformed request"),
        ("tail_float32", ":predict", "GET", 405, "Use POST"),
        ("tail_float32", "/metadata", "POST", 405, "Only :predict"),
        ("nope", "", "GET", 404, "model 'nope' is not served"),
    ],
)
def test_rest_routes(servers, clients, model_name, suffix, method, status, match):
    body = _body("float32") if method == "POST" else None
    got_status, answer = _post(servers["float32"], model_name, body, suffix, method)
    assert got_status == status and match in answer["error"]
    _assert_good_request_works(clients["float32", "rest"], "float32")


def test_rest_refuses_oversized_and_unsized_bodies(servers, clients):
    host, port = "127.0.0.1", servers["float32"].rest_port
    for headers, status in [({"Content-Length": str(1 << 40)}, 413), ({}, 411)]:
        connection = http.client.HTTPConnection(host, port, timeout=20)
        connection.putrequest("POST", "/v1/models/tail_float32:predict", skip_accept_encoding=True)
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == status and "error" in json.loads(response.read())
        connection.close()
    _assert_good_request_works(clients["float32", "rest"], "float32")


def test_request_size_limit_on_both_protocols(model_base):
    big, small = fx.make_payload("float32", batch=8), fx.make_payload("float32", batch=1)
    with TailServer(model_base, "tail_float32", max_request_bytes=600) as server:
        grpc_client = _client(server, "grpc", "tail_float32")
        rest = _client(server, "rest", "tail_float32")
        with contextlib.closing(grpc_client), contextlib.closing(rest):
            with pytest.raises(device.ServingError) as raised:
                _predict(grpc_client, big)
            assert raised.value.code == "RESOURCE_EXHAUSTED"
            with pytest.raises(device.ServingError, match="at most 600 bytes") as raised:
                _predict(rest, big)
            assert raised.value.http_status == 413
            for client in (grpc_client, rest):
                got = _predict(client, small)
                np.testing.assert_allclose(got, fx.reference_probabilities(small), atol=1e-5)


def test_rest_client_raises_the_servers_message(clients):
    payload = fx.make_payload("float32")
    with pytest.raises(device.ServingError, match=r"HTTP 400: .*\[0, 6\)") as raised:
        _predict(clients["float32", "rest"], payload, indices=[0, 1, 2, 7])
    assert raised.value.http_status == 400 and "indices" in raised.value.message


# --- clients on their own -------------------------------------------------------------------


def test_payloads_and_clients_check_arguments_before_sending():
    good = np.zeros((1, _H, _W, 2), np.float32)
    for args, match in [
        ((good.astype(np.float64), [0, 1]), "float32, float16 or int8"),
        ((good[0], [0, 1]), "rank-4"),
        ((good, [[0, 1]]), "1-D integer"),
        ((good, [0.0, 1.0]), "1-D integer"),
        ((good, [0, 1], "1"), "`scale` must be a number"),
        ((good, [0, 1], 1.0, 0.5), "zero_point"),
    ]:
        with pytest.raises(device.DeviceError, match=match):
            device.wire_payload(*args)
    with pytest.raises(device.DeviceError, match="base_url"):
        device.make_client("rest", "127.0.0.1:8501", "tail")
    with pytest.raises(device.DeviceError, match="timeout_s"):
        device.make_client("grpc", "127.0.0.1:1", "tail", timeout_s=0)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_a_clear_error():
    port = _free_port()
    payload = fx.make_payload("float32")
    with contextlib.closing(device.make_client("grpc", f"127.0.0.1:{port}", "tail", 5)) as client:
        with pytest.raises(device.ServingError) as raised:
            _predict(client, payload)
        assert raised.value.code == "UNAVAILABLE"
        with pytest.raises(device.ServingError, match="No gRPC server ready"):
            client.wait_ready(0.2)
    rest = device.make_client("rest", f"http://127.0.0.1:{port}", "tail", timeout_s=5)
    with pytest.raises(device.ServingError, match="Cannot reach") as raised:
        _predict(rest, payload)
    assert raised.value.code == "UNAVAILABLE"
    with pytest.raises(device.ServingError, match="No REST server ready"):
        rest.wait_ready(0.3)


# --- model loading and specs ----------------------------------------------------------------


def test_export_without_spec_file_is_served_from_the_signature(model_base):
    bare = ServedTail(model_base, "bare")
    assert (bare.spec.height, bare.spec.width, bare.spec.dtype) == (_H, _W, "float32")
    assert bare.spec.channels is None and bare.spec.max_budget is None
    with TailServer(model_base, "bare") as server:
        with contextlib.closing(_client(server, "grpc", "bare")) as client:
            payload = fx.make_payload("float32", k=3)
            np.testing.assert_allclose(
                _predict(client, payload), fx.reference_probabilities(payload), atol=1e-5
            )
            with pytest.raises(device.ServingError, match="distinct"):
                _predict(client, payload, indices=[1, 1, 2])
            with pytest.raises(device.ServingError, match=r"shape \(N, 3, 2, k\)"):
                _predict(client, payload, values=np.zeros((1, _W, _H, 1), np.float32), indices=[1])
    sized = ServedTail(model_base, "bare", channels=fx.CHANNELS)
    assert sized.spec.max_budget == fx.CHANNELS
    arrays = device.wire_payload(np.zeros((1, _H, _W, 2), np.float32), [0, 6]).inputs()
    with pytest.raises(RequestError, match=r"\[0, 6\)"):
        sized.predict(arrays)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"height": 4}, "disagree on height: the file says 4, the signature 3"),
        ({"dtype": "int8"}, "disagree on dtype"),
        ({"num_classes": 3}, "disagree on num_classes"),
        ({"max_budget": 7}, "max_budget <= channels"),
        ({"channels": 0}, "positive integer sizes"),
        ({"dtype": "float64"}, "dtype in"),
    ],
)
def test_spec_file_that_contradicts_the_model_fails_at_load(model_base, tmp_path, overrides, match):
    shutil.copytree(os.path.join(model_base, "bare"), tmp_path / "tail")
    fx.write_spec(str(tmp_path / "tail" / "1"), dict(fx.spec_json("float32"), **overrides))
    with pytest.raises(TailModelError, match=match):
        ServedTail(str(tmp_path), "tail")


def test_resolve_version_dir_follows_tf_serving(tmp_path):
    for version in ("1", "2", "10", "nightly", "11"):
        os.makedirs(tmp_path / "tail" / version)
    for version in ("1", "2", "10", "nightly"):
        (tmp_path / "tail" / version / "saved_model.pb").write_bytes(b"")
    expected = str(tmp_path / "tail" / "10"), 10  # numeric order; 11 holds no SavedModel
    assert resolve_version_dir(str(tmp_path / "tail"), "tail") == expected  # TF Serving's base
    assert resolve_version_dir(str(tmp_path), "tail") == expected  # the Docker image's base
    assert resolve_version_dir(str(tmp_path), "tail", 2)[1] == 2
    with pytest.raises(TailModelError, match=r"Version 3 not found.*\[1, 2, 10\]"):
        resolve_version_dir(str(tmp_path), "tail", 3)
    with pytest.raises(TailModelError, match="No numeric version directory"):
        resolve_version_dir(str(tmp_path), "other")


def test_server_arguments_and_ports(model_base, servers):
    with pytest.raises(ValueError, match="grpc_port"):
        TailServer(model_base, "tail_float32", grpc_port=70000)
    with pytest.raises(TailModelError, match="No numeric version directory"):
        TailServer(model_base, "missing")
    taken = TailServer(model_base, "tail_float32", grpc_port=servers["float32"].grpc_port)
    with pytest.raises(OSError, match="Cannot bind gRPC"):
        taken.start()
    server = TailServer(model_base, "tail_float32").start()
    try:
        with pytest.raises(RuntimeError, match="already"):
            server.start()
    finally:
        server.stop()
    assert server.wait(0)


class _Signalled(Exception):
    pass


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


def _signal_own_thread():
    time.sleep(0.5)  # by then the main thread is inside `wait`
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)


def test_wait_hears_a_signal_that_another_thread_received(model_base):
    """The kernel may hand SIGTERM to any thread; `wait` must still let the main thread act."""
    server = TailServer(model_base, "tail_float32")  # never started: `wait` is all that runs
    unheard = threading.Event()

    def give_up():  # bounds the test if the signal goes unheard
        unheard.set()
        server.stop()

    previous = signal.signal(signal.SIGUSR1, _raise_signalled)
    stopper = threading.Timer(10.0, give_up)
    sender = threading.Thread(target=_signal_own_thread)
    try:
        stopper.start()
        with pytest.raises(_Signalled):
            sender.start()
            server.wait()
    finally:
        stopper.cancel()
        sender.join()
        signal.signal(signal.SIGUSR1, previous)
    assert not unheard.is_set(), "the main thread heard the signal only once `stop` woke it"
    assert not server.wait(0.3)  # a timed wait still times out


# --- tensor conversions ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int32])
def test_tensor_proto_round_trip(dtype):
    array = (np.arange(12).reshape(3, 4) - 6).astype(dtype)
    proto = tensors.to_tensor_proto(array)
    assert proto.tensor_content and not proto.float_val and not proto.int_val
    for decoded in (tensors.from_tensor_proto(proto), tf.make_ndarray(proto)):
        np.testing.assert_array_equal(decoded, array)
        assert decoded.dtype == dtype
    np.testing.assert_array_equal(tensors.from_tensor_proto(_typed_proto(array)), array)


def _bad_protos():
    good = tensors.to_tensor_proto(np.ones((2, 2), np.float32))
    padded, short_typed, both, stray = (tensor_pb2.TensorProto() for _ in range(4))
    padded.CopyFrom(good)
    padded.tensor_content += b"\0\0\0\0"
    short_typed.CopyFrom(_typed_proto(np.ones((2, 2), np.float32)))
    del short_typed.float_val[-1]
    both.CopyFrom(good)
    both.float_val.append(1.0)
    stray.CopyFrom(_typed_proto(np.ones(2, np.float32)))
    stray.int_val.append(1)
    half_bits = _typed_proto(np.ones(1, np.float16))
    half_bits.half_val[0] = 70000
    int8_range = _typed_proto(np.ones(1, np.int8))
    int8_range.int_val[0] = 300
    unknown_rank = tensor_pb2.TensorProto(dtype=good.dtype)
    unknown_rank.tensor_shape.unknown_rank = True
    return [
        (padded, "has 20 bytes, expected 16"),
        (short_typed, "carries 3 values in `float_val`"),
        (both, "both `tensor_content`"),
        (stray, "keeps its values in `float_val`"),
        (half_bits, "16-bit patterns"),
        (int8_range, r"outside the int8 range"),
        (unknown_rank, "unknown rank"),
        (tf.make_tensor_proto(np.ones(2, np.float64)), "Unsupported tensor dtype float64"),
    ]


def test_tensor_proto_decoding_refuses_inconsistent_tensors():
    for proto, match in _bad_protos():
        with pytest.raises(tensors.TensorDecodeError, match=match):
            tensors.from_tensor_proto(proto)
    with pytest.raises(tensors.TensorDecodeError, match="too large: 4 elements, at most 3"):
        tensors.from_tensor_proto(tensors.to_tensor_proto(np.ones(4, np.int8)), max_elements=3)


def test_json_decoding_follows_the_signature_dtype():
    half = tensors.from_json([[0.1, -2.5]], np.float16)
    assert half.dtype == np.float16 and half.tolist() == [[np.float16(0.1), -2.5]]
    exact = np.array([0.1, 3.3e-5, -65504], np.float16)
    np.testing.assert_array_equal(
        tensors.from_json(json.loads(json.dumps(tensors.to_json(exact))), np.float16), exact
    )
    assert tensors.from_json(-128, np.int8).dtype == np.int8
    assert tensors.from_json(2, np.float32) == np.float32(2.0)
    for value, dtype, match in [
        ([1.5], np.int8, "integers"),
        ([128], np.int8, "int8 range"),
        ([2**31], np.int32, "int32 range"),
        ([70000.0], np.float16, "float16 range"),
        ([float("nan")], np.float32, "finite"),
        ([{"b64": "AAAA"}], np.float32, "JSON numbers"),
        ([[1], [1, 2]], np.float32, "rectangular"),
        ([1, 2, 3], np.float32, "too large"),
    ]:
        with pytest.raises(tensors.TensorDecodeError, match=match):
            tensors.from_json(value, dtype, max_elements=2)


def test_json_shape_is_read_before_any_array_is_built():
    assert tensors.json_shape(1.5) == () and tensors.json_shape(-3) == ()
    assert tensors.json_shape([]) == (0,) and tensors.json_shape([[[]]]) == (1, 1, 0)
    assert tensors.json_shape([[1, 2.5], [3, 4], [5, 6]]) == (3, 2)
    for value, match in [
        ([[1], [1, 2]], "rectangular"),
        ([[1], 2], "rectangular"),
        ([1, [2]], None),  # only the first number is looked at: numpy refuses the rest
        ([["a"]], "JSON numbers"),
        ([True], "JSON numbers"),
        ("x", "JSON numbers"),
        ([{"b64": "AAAA"}], "JSON numbers"),
    ]:
        if match is None:
            assert tensors.json_shape(value) == (2,)
            with pytest.raises(tensors.TensorDecodeError, match="rectangular"):
                tensors.from_json(value, np.float32)
            continue
        with pytest.raises(tensors.TensorDecodeError, match=match):
            tensors.json_shape(value)


def test_refusal_messages_are_clipped():
    assert validation.clip_message("short") == "short"
    for text in ("k" * 100_000, "\u00e9" * 5_000, "\U0001f600" * 5_000):
        clipped = validation.clip_message(text)
        assert clipped.endswith("...") and text.startswith(clipped[:-3])
        assert len(json.dumps(clipped)) <= validation.MESSAGE_BYTES


# --- the tool as a separate process ---------------------------------------------------------


def test_tool_serves_in_a_separate_process(model_base, tmp_path):
    grpc_port, rest_port = _free_port(), _free_port()
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "tfsplit_tools.serve", f"--model_base_path={model_base}",
                "--model_name=tail_int8", f"--grpc_port={grpc_port}", f"--rest_port={rest_port}",
            ],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        rest = device.make_client("rest", f"http://127.0.0.1:{rest_port}", "tail_int8", 20)
        try:
            rest.wait_ready(timeout_s=45)
        except device.ServingError:
            pytest.fail(f"the server never became ready:\n{log_path.read_text()[-3000:]}")
        payload = fx.make_payload("int8", batch=2)
        grpc_client = device.make_client("grpc", f"127.0.0.1:{grpc_port}", "tail_int8", 20)
        with contextlib.closing(grpc_client), contextlib.closing(rest):
            grpc_client.wait_ready(timeout_s=10)
            for client in (grpc_client, rest):
                got = _predict(client, payload)
                np.testing.assert_allclose(got, fx.reference_probabilities(payload), atol=1e-5)
                with pytest.raises(device.ServingError, match="zero_point"):
                    _predict(client, payload, zero_point=500)
    finally:
        return_code = fx.stop_server(process, log_path)
    log = log_path.read_text()
    assert return_code == 0, log[-3000:]
    assert f"grpc=127.0.0.1:{grpc_port} rest=http://127.0.0.1:{rest_port}" in log
    assert "Rejected Predict (INVALID_ARGUMENT)" in log
