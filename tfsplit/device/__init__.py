"""The device side of split inference, without TensorFlow: LiteRT head, payload, tail clients.

Everything here imports only numpy, absl-py, the standard library and `ai_edge_litert` (gRPC
also `grpcio`, imported only when asked for; PNG/JPEG reading also Pillow), so it runs on a
Raspberry Pi or any device that has the LiteRT runtime:

    head = HeadRunner("head_int8.tflite")              # checks head_int8.json against the model
    client = make_client("rest", "http://server:8501", "tfsplit_tail_int8")
    prediction = DeviceRunner(head, client).predict(images)   # uint8 (N, H, W, C)
    prediction.classes, prediction.seconds, prediction.request_bytes

`tfsplit.serve`'s clients need TensorFlow (TF Serving's protos import it); the clients here speak
the same REST and gRPC protocols from the standard library and grpcio alone.
"""

from tfsplit.device.bench import bench_head, bench_heads, find_heads, format_bench_table
from tfsplit.device.head import (
    HEAD_DTYPES,
    DeviceError,
    HeadRunner,
    HeadSpec,
    load_spec,
    normalize_images,
    quantize_input,
)
from tfsplit.device.images import load_images, load_run_test_images
from tfsplit.device.payload import WirePayload, build_payload
from tfsplit.device.rest import RestClient, ServingError, predict_body
from tfsplit.device.runner import (
    PROTOCOLS,
    STAGES,
    DeviceRunner,
    Prediction,
    RunRecord,
    make_client,
    run_images,
)
from tfsplit.device.stats import format_table, latency_summary

__all__ = [
    "HEAD_DTYPES",
    "PROTOCOLS",
    "STAGES",
    "DeviceError",
    "DeviceRunner",
    "HeadRunner",
    "HeadSpec",
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
    "latency_summary",
    "load_images",
    "load_run_test_images",
    "load_spec",
    "make_client",
    "normalize_images",
    "predict_body",
    "quantize_input",
    "run_images",
]
