"""Tests of tfsplit.device (the TensorFlow-free device side) on one smoke-trained deprune run.

The run is trained and exported once for the module. The device code is compared with the
TensorFlow-based references: `tfsplit.export.run_head` for the head, TF Serving's predict_pb2 for
the hand-written protobuf, the tail's SavedModel signature called directly for the two protocols,
and the codec for `payload_bytes`.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit import codec, device
from tfsplit import export as export_lib
from tfsplit import serving as serve
from tfsplit.device import protowire
from tfsplit.serving import tensors

import tensorflow as tf  # isort: skip  (after tfsplit, which selects Keras 2)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = device.HEAD_DTYPES
# Runs a module with `import tensorflow` (and its Keras and Serving packages) made impossible, as
# on a device that has only LiteRT: python -c BLOCK_TF <module> <args...>
BLOCK_TF = """
import importlib.abc, runpy, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras", "keras", "tensorflow_serving"):
            raise ImportError(f"no {name} on this device")
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def run(smoke_workdir):
    return export_lib.load_run(smoke_workdir)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export_lib.export_split(run, str(tmp_path_factory.mktemp("export")), qat=False)


@pytest.fixture(scope="module")
def servers(exported):
    started = {
        dtype: serve.TailServer(os.path.dirname(tail.path), f"tfsplit_tail_{dtype}").start()
        for dtype, tail in exported.tails.items()
    }
    yield started
    for server in started.values():
        server.stop()


def _head(exported, dtype):
    return device.HeadRunner(exported.heads[dtype].model_path)


def _run_python(args, timeout=120):
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- no TensorFlow on the device ------------------------------------------------------------


def test_device_codec_and_auth_import_without_tensorflow():
    # The tools' own runs without TensorFlow are below (absl flags clash in one process).
    code = (
        "import sys; import tfsplit.device, tfsplit.device.grpc_client, tfsplit_tools.run_head; "
        "import tfsplit.codec, tfsplit.auth.credentials, tfsplit.auth.grpc_server; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tf_keras', 'keras', 'tensorflow_serving')]; assert not heavy, heavy"
    )
    result = _run_python(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]


# --- the head -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_runner_head_output_equals_export_run_head(run, exported, dtype):
    head = _head(exported, dtype)
    images = run.test_images[:16]
    expected, quantization = export_lib.run_head(head.model_path, run.normalize(images))
    np.testing.assert_array_equal(device.normalize_images(images, head.spec), run.normalize(images))
    one_by_one = np.concatenate([head(images[i : i + 1]) for i in range(len(images))])
    np.testing.assert_array_equal(one_by_one, expected)
    np.testing.assert_array_equal(head(images), expected)  # the input is resized for a batch
    assert head.spec.output_quantization == quantization
    assert head.spec.indices.tolist() == exported.heads[dtype].metadata["indices"]


def test_normalize_and_quantize_by_hand(exported):
    spec = _head(exported, "float32").spec
    pixels = np.zeros((1, *spec.image_shape), np.uint8)
    pixels[0, 0, 0] = 255
    normalized = device.normalize_images(pixels, spec)
    np.testing.assert_allclose(normalized[0, 0, 0], (1.0 - spec.mean) / spec.std, rtol=1e-6)
    np.testing.assert_allclose(normalized[0, 1, 1], -spec.mean / spec.std, rtol=1e-6)
    x = np.array([1.0, 100.0, -100.0, 0.25, 0.75], np.float32)
    # round(x / 0.5) - 3 with half to even: 2-3, clip 127, clip -128, round(0.5)=0 -> -3, 2-3.
    np.testing.assert_array_equal(device.quantize_input(x, (0.5, -3)), [-1, 127, -128, -3, -1])


# --- the payload ----------------------------------------------------------------------------


def test_payload_per_dtype(run, exported):
    images = run.test_images[:2]
    for dtype in DTYPES:
        head = _head(exported, dtype)
        output = head(images)
        payload = device.build_payload(output, head.spec)
        height, width, k = head.spec.output_shape
        itemsize = {"float32": 4, "float16": 2, "int8": 1}[dtype]
        assert payload.values.dtype == np.dtype(dtype)
        header = 20 + (8 if dtype == "int8" else 0)  # magic..k, then int8 scale and zero point
        index_list = 0 if k == head.spec.channels else 2 * k  # u16 indices unless all are sent
        assert payload.payload_bytes == header + index_list + 2 * height * width * k * itemsize
        scale, zero_point = head.spec.output_quantization or (None, None)
        encoded = codec.encode(
            payload.values,
            payload.indices,
            head.spec.channels,
            dtype,
            scale=scale,
            zero_point=zero_point,
        )
        assert payload.payload_bytes == len(encoded)
        np.testing.assert_array_equal(payload.indices, exported.heads[dtype].metadata["indices"])
        if dtype == "float16":  # computed in float32, cast on the device
            assert output.dtype == np.float32
            np.testing.assert_array_equal(payload.values, output.astype(np.float16))
        else:  # float32 and int8 output tensors are sent as they are
            np.testing.assert_array_equal(payload.values, output)
        scale, zero_point = head.spec.output_quantization or (1.0, 0)
        assert (float(payload.scale), int(payload.zero_point)) == (scale, zero_point)
        assert payload.scale.dtype == np.float32 and payload.zero_point.dtype == np.int32


def test_payload_refuses_overflow_and_wrong_output(exported):
    spec = _head(exported, "float16").spec
    big = np.full((1, *spec.output_shape), 1e6, np.float32)
    with pytest.raises(device.DeviceError, match="not finite in float16"):
        device.build_payload(big, spec)
    with pytest.raises(device.DeviceError, match="must be float32 of shape"):
        device.build_payload(big.astype(np.int8), spec)
    with pytest.raises(device.DeviceError, match="must be float32 of shape"):
        device.build_payload(big[..., :1], spec)


# --- the protocols --------------------------------------------------------------------------


def test_rest_body_is_tf_servings_columnar_format(run, exported):
    for dtype in DTYPES:
        head = _head(exported, dtype)
        payload = device.build_payload(head(run.test_images[:3]), head.spec)
        expected = {
            "signature_name": "serving_default",
            "inputs": {name: np.asarray(a).tolist() for name, a in payload.inputs().items()},
        }
        assert json.loads(device.predict_body(payload)) == expected
        assert b" " not in device.predict_body(payload)  # compact: request_bytes count no spaces


def test_grpc_request_is_tf_servings_request(run, exported):
    for dtype in DTYPES:
        head = _head(exported, dtype)
        payload = device.build_payload(head(run.test_images[:3]), head.spec)
        for version in (None, 0, 7):
            expected = predict_pb2.PredictRequest()
            expected.model_spec.name = "tail"
            expected.model_spec.signature_name = "serving_default"
            if version is not None:
                expected.model_spec.version.value = version
            for name, array in payload.inputs().items():
                expected.inputs[name].CopyFrom(tensors.to_tensor_proto(array))
            data = protowire.predict_request("tail", payload.inputs(), version=version)
            assert predict_pb2.PredictRequest.FromString(data) == expected
            assert data == expected.SerializeToString(deterministic=True)


def test_protowire_reads_float_val_and_tensor_content():
    probabilities = np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], np.float32)
    response = predict_pb2.PredictResponse()
    proto = response.outputs["probabilities"]
    proto.dtype = 1
    for size in probabilities.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.float_val.extend(probabilities.ravel().tolist())
    np.testing.assert_array_equal(
        protowire.read_outputs(response.SerializeToString())["probabilities"], probabilities
    )
    proto.ClearField("float_val")
    proto.tensor_content = probabilities.tobytes()
    response.model_spec.name = "tail"  # other fields are skipped
    np.testing.assert_array_equal(
        protowire.read_outputs(response.SerializeToString())["probabilities"], probabilities
    )
    bad = tensor_pb2.TensorProto(dtype=1, tensor_content=b"\0" * 12)
    bad.tensor_shape.dim.add(size=2)
    with pytest.raises(protowire.ProtoError, match="holds 3 elements"):
        protowire.read_tensor(bad.SerializeToString())


@pytest.mark.parametrize("dtype", DTYPES)
def test_device_clients_answer_as_the_tail_signature(run, exported, servers, dtype):
    head = _head(exported, dtype)
    payload = device.build_payload(head(run.test_images[:4]), head.spec)
    server, name = servers[dtype], f"tfsplit_tail_{dtype}"
    signature = tf.saved_model.load(exported.tails[dtype].path).signatures[export_lib.SIGNATURE]
    expected = export_lib.run_tail(signature, *payload.inputs().values())
    for protocol, address in (("rest", server.rest_url), ("grpc", server.grpc_target)):
        client = device.make_client(protocol, address, name)
        np.testing.assert_allclose(client.predict(payload), expected, rtol=1e-6)
        prediction = device.DeviceRunner(head, client).predict(run.test_images[:4])
        np.testing.assert_allclose(prediction.probabilities, expected, rtol=1e-6)
        assert prediction.payload_bytes == payload.payload_bytes
        assert prediction.request_bytes == len(client.encode(payload)) > payload.payload_bytes
        assert all(prediction.seconds[stage] > 0 for stage in device.STAGES)
        assert prediction.seconds["total"] >= prediction.seconds["head"]
        client.close()


def test_server_refusals_and_unreachable_server(run, exported, servers):
    head = _head(exported, "int8")
    payload = device.build_payload(head(run.test_images[:1]), head.spec)
    server = servers["int8"]
    with pytest.raises(device.ServingError, match="HTTP 404: .*not served here"):
        device.make_client("rest", server.rest_url, "other").predict(payload)
    with pytest.raises(device.ServingError, match="NOT_FOUND: .*not served here"):
        device.make_client("grpc", server.grpc_target, "other").predict(payload)
    float_payload = device.build_payload(
        _head(exported, "float32")(run.test_images[:1]), _head(exported, "float32").spec
    )
    client = device.make_client("rest", server.rest_url, "tfsplit_tail_int8")
    with pytest.raises(device.ServingError, match="HTTP 400: .*JSON integers for int8"):
        client.predict(float_payload)
    # The server closed that connection after refusing; the client reconnects for the next one.
    assert client.predict(payload).shape == (1, head.spec.num_classes)
    closed = device.make_client("rest", "http://127.0.0.1:9", "tail", timeout_s=5)
    with pytest.raises(device.ServingError, match="UNAVAILABLE: Cannot reach"):
        closed.predict(payload)
    with pytest.raises(device.DeviceError, match="host:port"):
        device.make_client("grpc", "http://127.0.0.1:8500", "tail")
    with pytest.raises(device.DeviceError, match="http"):
        device.make_client("rest", "127.0.0.1:8501", "tail")
    with pytest.raises(device.DeviceError, match="protocol"):
        device.make_client("udp", None, "tail")


# --- images ---------------------------------------------------------------------------------


def test_load_images_png_and_npy(run, exported, tmp_path):
    shape = _head(exported, "float32").spec.image_shape
    images = run.test_images[:3]
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", images[1])
    np.save(tmp_path / "batch.npy", images[1:3])
    paths = [str(tmp_path / name) for name in ("a.png", "b.npy", "batch.npy")]
    loaded = device.load_images(paths, shape)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, np.concatenate([images[:2], images[1:3]]))


def test_bad_images_fail_clearly(exported, tmp_path):
    head = _head(exported, "float32")
    shape = head.spec.image_shape
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(device.DeviceError, match=r"small.png holds images of shape \(8, 8, 3\)"):
        device.load_images([str(tmp_path / "small.png")], shape)
    np.save(tmp_path / "float.npy", np.zeros(shape, np.float32))
    with pytest.raises(device.DeviceError, match="integer pixels"):
        device.load_images([str(tmp_path / "float.npy")], shape)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(device.DeviceError, match="Unsupported image file"):
        device.load_images([str(tmp_path / "notes.txt")], shape)
    with pytest.raises(device.DeviceError, match="No image file"):
        device.load_images([str(tmp_path / "missing.png")], shape)
    with pytest.raises(device.DeviceError, match=r"\(N, 32, 32, 3\)"):
        head(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(device.DeviceError, match="0..255"):
        head(np.full((1, *shape), 300, np.int32))


# --- bad models and JSON --------------------------------------------------------------------


def _copy_head(exported, dtype, tmp_path):
    model = shutil.copy(exported.heads[dtype].model_path, tmp_path)
    meta = json.loads(pathlib.Path(exported.heads[dtype].metadata_path).read_text())
    return model, tmp_path / f"head_{dtype}.json", meta


def test_bad_model_and_json_fail_clearly(exported, tmp_path):
    with pytest.raises(device.DeviceError, match="No head model"):
        device.HeadRunner(str(tmp_path / "missing.tflite"))
    model, json_path, meta = _copy_head(exported, "int8", tmp_path)
    with pytest.raises(device.DeviceError, match="No head JSON"):
        device.HeadRunner(model)
    json_path.write_text("{not json")
    with pytest.raises(device.DeviceError, match="not valid JSON"):
        device.HeadRunner(model)
    for key, value, message in [
        ("indices", None, "lacks `indices`"),
        ("indices", [0, 0], "distinct"),
        ("format", "other/1", "`format` must be"),
        ("budget", 0, "`budget` must be an integer >= 1"),
    ]:
        broken = dict(meta)
        if value is None:
            del broken[key]
        else:
            broken[key] = value
        json_path.write_text(json.dumps(broken))
        with pytest.raises(device.DeviceError, match=message):
            device.HeadRunner(model)
    broken = json.loads(json.dumps(meta))
    broken["normalization"]["std"] = [1.0, 0.0, 1.0]
    json_path.write_text(json.dumps(broken))
    with pytest.raises(device.DeviceError, match="normalization.std"):
        device.HeadRunner(model)
    json_path.write_text(json.dumps(meta))
    other = exported.heads["float32"].model_path
    with pytest.raises(device.DeviceError, match="does not match"):
        device.HeadRunner(other, json_path)
    pathlib.Path(model).write_bytes(b"not a flatbuffer")
    with pytest.raises(device.DeviceError, match="not a loadable TFLite model"):
        device.HeadRunner(model)


# --- the benchmark --------------------------------------------------------------------------


def test_bench_heads_three_rows(exported):
    rows = device.bench_heads(exported.out_dir, runs=5, warmup=1)
    assert [row["dtype"] for row in rows] == list(DTYPES)
    for row in rows:
        assert row["file_bytes"] == exported.heads[row["dtype"]].size_bytes
        assert row["threads"] == 1 and row["runs"] == 5
        assert 0 < row["p50_ms"] <= row["p95_ms"]
    assert len(device.format_bench_table(rows).splitlines()) == 2 + len(rows)
    with pytest.raises(device.DeviceError, match="No head model"):
        device.bench_heads(exported.out_dir + "/missing")
    with pytest.raises(device.DeviceError, match="runs"):
        device.bench_head(exported.heads["int8"].model_path, runs=0)


def test_latency_summary_by_hand():
    summary = device.latency_summary([0.001, 0.002, 0.003, 0.004])
    assert summary == pytest.approx({"p50_ms": 2.5, "p95_ms": 3.85, "mean_ms": 2.5})
    with pytest.raises(device.DeviceError, match="non-empty"):
        device.latency_summary([])


# --- the tools, on a machine without TensorFlow -------------------------------------


def test_run_head_tool_without_tensorflow(run, exported, servers, tmp_path):
    images = run.test_images[:3]
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    np.save(tmp_path / "rest.npy", images[1:])
    head = exported.heads["float16"].model_path
    spec = _head(exported, "float16").spec
    payload_bytes = codec.payload_nbytes(1, *spec.output_shape, "float16", False, spec.channels)
    files = f"--images={tmp_path / 'a.png'},{tmp_path / 'rest.npy'}"
    for protocol, address in (
        ("rest", servers["float16"].rest_url),
        ("grpc", servers["float16"].grpc_target),
    ):
        result = _run_python(
            [
                "-c",
                BLOCK_TF,
                "tfsplit_tools.run_head",
                f"--head={head}",
                files,
                f"--protocol={protocol}",
                f"--server={address}",
            ]
        )
        assert result.returncode == 0, result.stderr[-2000:]
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"float16 head, budget {run.final_budget}")
        assert [line.split()[:2] for line in lines[1:4]] == [["image", f"{i}:"] for i in range(3)]
        assert "network+tail" in lines[1] and f"payload_bytes {payload_bytes}" in lines[1]
        assert lines[4].startswith("p50 ms: head")
    result = _run_python(
        [
            "-c",
            BLOCK_TF,
            "tfsplit_tools.run_head",
            f"--head={head}",
            "--dataset_images=2",
            f"--server={servers['float16'].rest_url}",
        ]
    )
    assert result.returncode != 0 and "TensorFlow" in result.stderr  # a device has no dataset


def test_run_head_tool_reports_bad_input(exported, servers, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((8, 8, 3), np.uint8))
    result = _run_python(
        [
            "-m",
            "tfsplit_tools.run_head",
            f"--head={exported.heads['int8'].model_path}",
            f"--images={tmp_path / 'small.npy'}",
            f"--server={servers['int8'].rest_url}",
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]  # a user error: one line, no traceback
    assert "tfsplit-run-head: error: " in result.stderr and "Traceback" not in result.stderr
    assert "the head takes (32, 32, 3)" in result.stderr


def test_bench_head_tool_without_tensorflow(exported, tmp_path):
    result = _run_python(
        [
            "-c",
            BLOCK_TF,
            "tfsplit_tools.bench_head",
            f"--export_dir={exported.out_dir}",
            "--runs=3",
            "--warmup=1",
            f"--out={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_head.json").read_text())["rows"]
    assert [row["dtype"] for row in rows] == list(DTYPES)
    assert [line.split()[0] for line in result.stdout.splitlines()[3:6]] == list(DTYPES)
