"""The device side of split inference, without TensorFlow: LiteRT head, payload, tail clients.

Everything here imports only numpy, absl-py, the standard library and `ai_edge_litert` (gRPC
also `grpcio`, imported only when asked for; PNG/JPEG reading also Pillow), so it runs on a
Raspberry Pi or any device that has the LiteRT runtime:

    head = HeadRunner("head_int8.tflite")              # checks head_int8.json against the model
    client = make_client("rest", "http://server:8501", "tfsplit_tail_int8")
    prediction = DeviceRunner(head, client).predict(images)   # uint8 (N, H, W, C)
    prediction.classes, prediction.seconds, prediction.request_bytes, prediction.payload_bytes

A U-shaped split's head JSON names its top (`HeadSpec.top`): the client then reads the middle's
output (`make_client(..., output=spec.top.output)`), and the runner runs the top on it.

The clients speak TF Serving's own REST and gRPC protocols (the protobuf written by hand), so they
work unchanged against `tfsplit-serve` and against a real TF Serving. `make_client(...,
token=..., root_certificates=...)` sends the token of a server that asks for one (`tfsplit-serve
--token_file`) and speaks TLS, verifying the server against that CA (`--tls_cert`).
"""

from tfsplit.device.bench import bench_head, bench_heads, find_heads, format_bench_table
from tfsplit.device.head import HeadRunner, LiteModel, normalize_images, quantize_input
from tfsplit.device.images import load_images
from tfsplit.device.payload import WirePayload, build_payload, wire_payload
from tfsplit.device.rest import OUTPUT_NAME, RestClient, ServingError, predict_body
from tfsplit.device.runner import (
    PROTOCOLS,
    STAGES,
    USHAPED_STAGES,
    DeviceRunner,
    Prediction,
    RunRecord,
    make_client,
    run_images,
)
from tfsplit.device.spec import HEAD_DTYPES, DeviceError, HeadSpec, head_json, load_spec
from tfsplit.device.stats import format_table, latency_summary

__all__ = [
    "HEAD_DTYPES",
    "OUTPUT_NAME",
    "PROTOCOLS",
    "STAGES",
    "USHAPED_STAGES",
    "DeviceError",
    "DeviceRunner",
    "HeadRunner",
    "HeadSpec",
    "LiteModel",
    "Prediction",
    "RestClient",
    "RunRecord",
    "ServingError",
    "WirePayload",
    "bench_head",
    "bench_heads",
    "build_payload",
    "find_heads",
    "format_bench_table",
    "format_table",
    "head_json",
    "latency_summary",
    "load_images",
    "load_spec",
    "make_client",
    "normalize_images",
    "predict_body",
    "quantize_input",
    "run_images",
    "wire_payload",
]
