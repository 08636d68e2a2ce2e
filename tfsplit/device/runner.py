"""The device side of split inference: image -> LiteRT head -> payload -> tail server -> class.

    head = HeadRunner("export/head_float16.tflite")                  # + head_float16.json
    client = make_client("rest", "http://127.0.0.1:8501", "tfsplit_tail_float16")
    prediction = DeviceRunner(head, client).predict(images)         # uint8 (N, H, W, C)

Each request is timed in three stages: `head` (normalize, quantize, interpreter, wire cast),
`encode` (building the request body) and `network_tail` (send, the server's dequantize and tail,
answer, parse); a U-shaped split's device then runs its top on the middle's answer (`top`). TF
Serving's predict API reports no server-side time, so the network and the tail are measured
together. Bytes are counted two ways: `request_bytes`, what the request weighs on the
wire (JSON text for REST, the protobuf for gRPC), and `payload_bytes`, what the codec's encoding of
the same selection weighs (`codec.payload_nbytes`), the protocol-independent figure that training
reports too.
"""

import dataclasses
import os
import time

import numpy as np

from tfsplit.device import payload as payload_lib
from tfsplit.device import stats
from tfsplit.device.head import LiteModel
from tfsplit.device.rest import RestClient
from tfsplit.device.spec import DeviceError, check_count

PROTOCOLS = ("rest", "grpc")
STAGES = ("head", "encode", "network_tail", "total")
# A U-shaped split's device also runs its top on the middle's answer.
USHAPED_STAGES = ("head", "encode", "network_tail", "top", "total")
DEFAULT_SERVERS = {"rest": "http://127.0.0.1:8501", "grpc": "127.0.0.1:8500"}


def make_client(
    protocol, server, model_name, timeout_s=30.0, version=None, token=None, root_certificates=None
):
    """A REST or gRPC client for the tail; gRPC needs grpcio (imported only then).

    Args:
      protocol: "rest" or "grpc".
      server: REST base URL ("http://host:port", "https://..." for TLS) or gRPC target
        ("host:port"); None takes DEFAULT_SERVERS (TF Serving's default ports on this machine;
        REST over https:// with `root_certificates`).
      model_name: the served model's name.
      timeout_s: per-request timeout.
      version: model version, or None for the latest.
      token: the server's token (`tfsplit-serve --token_file`), sent with every request; None:
        none.
      root_certificates: PEM bytes of the CA of the server's certificate: TLS, verified against
        it (REST needs an https:// URL). None: gRPC in plain TCP; REST as the URL says, an
        https:// server verified against the system's CAs.

    Raises:
      DeviceError: unknown protocol, bad address, token or CA, or gRPC asked for without grpcio.
    """
    if protocol not in PROTOCOLS:
        raise DeviceError(f"`protocol` must be one of {PROTOCOLS}. Received: {protocol!r}")
    if server is None:
        server = DEFAULT_SERVERS[protocol]
        if protocol == "rest" and root_certificates is not None:
            server = server.replace("http://", "https://", 1)
    security = {"token": token, "root_certificates": root_certificates}
    if protocol == "rest":
        return RestClient(server, model_name, timeout_s=timeout_s, version=version, **security)
    try:
        from tfsplit.device import grpc_client  # optional: grpcio (a device may speak REST only)
    except ImportError as error:
        raise DeviceError(f"gRPC needs grpcio (pip install grpcio), or use REST: {error}") from None
    return grpc_client.GrpcClient(
        server, model_name, timeout_s=timeout_s, version=version, **security
    )


@dataclasses.dataclass
class Prediction:
    """The answer to one request, with its cost.

    Attributes:
      probabilities: (N, num_classes) float32 from the tail (a U-shaped split's top).
      seconds: dict stage -> duration of this request (see STAGES).
      request_bytes: what the request weighs on the wire (its serialized body).
      payload_bytes: the codec's encoding of the same payload (`WirePayload.payload_bytes`).
      answer_bytes: what the answer weighed on the wire (its serialized body).
    """

    probabilities: np.ndarray
    seconds: dict
    request_bytes: int
    payload_bytes: int
    answer_bytes: int

    @property
    def classes(self):
        return self.probabilities.argmax(axis=-1)


class DeviceRunner:
    """Runs a head and sends its payload to the tail, one request per call; for a U-shaped
    split (the head's spec names a top) the server answers the middle's output, and the top runs
    here on it.

    Args:
      head: a `HeadRunner`.
      client: a `RestClient` or `GrpcClient` (see `make_client`) for the matching tail; for a
        U-shaped split it is set to read the middle's output (`client.output`).
      num_threads: the top's interpreter threads.
    """

    def __init__(self, head, client, num_threads=1):
        self.head = head
        self.client = client
        self.top, self.stages = None, STAGES
        top = head.spec.top
        if top is not None:
            self.top = LiteModel(
                os.path.join(os.path.dirname(head.spec.path), top.model_file), num_threads
            )
            self.stages, client.output = USHAPED_STAGES, top.output

    def predict(self, images):
        """uint8 (N, H, W, C) images -> a `Prediction` (one request for the whole batch).

        Raises:
          DeviceError: images that do not fit the head.
          ServingError: the server refused or could not be reached.
        """
        start = time.perf_counter()
        output = self.head(images)
        payload = payload_lib.build_payload(output, self.head.spec)
        encode_start = time.perf_counter()
        request = self.client.encode(payload)
        send_start = time.perf_counter()
        answer, answer_bytes = self.client.exchange(request)
        received = time.perf_counter()
        spec = self.head.spec
        expected = (len(images),) + ((spec.num_classes,) if self.top is None else spec.top.shape)
        if answer.shape != expected:
            raise DeviceError(
                f"The tail answered {self.client.output!r} of shape {answer.shape}, expected "
                f"{expected}: is the server serving this head's tail?"
            )
        seconds = {
            "head": encode_start - start,
            "encode": send_start - encode_start,
            "network_tail": received - send_start,
            "total": received - start,
        }
        probabilities = answer
        if self.top is not None:
            top_start = time.perf_counter()
            probabilities = self.top(answer.astype(np.float32))
            end = time.perf_counter()
            seconds.update(top=end - top_start, total=end - start)
        return Prediction(probabilities, seconds, len(request), payload.payload_bytes, answer_bytes)


@dataclasses.dataclass
class RunRecord:
    """Many requests' answers and costs, in request order.

    Attributes:
      probabilities: (samples, num_classes) float32.
      seconds: dict stage -> (requests,) float64 durations, in the runner's stage order.
      request_bytes, payload_bytes, answer_bytes: (requests,) int64 per request.
      complete: False when a time limit stopped the run before every image was sent.
    """

    probabilities: np.ndarray
    seconds: dict
    request_bytes: np.ndarray
    payload_bytes: np.ndarray
    answer_bytes: np.ndarray
    complete: bool

    @property
    def samples(self):
        return len(self.probabilities)

    def summary(self):
        """Samples, requests, request_bytes, payload_bytes and answer_bytes per sample, ms per
        stage; flat."""
        row = {
            "samples": self.samples,
            "requests": len(self.request_bytes),
            "complete": self.complete,
            "request_bytes_per_sample": float(self.request_bytes.sum() / self.samples),
            "payload_bytes_per_sample": float(self.payload_bytes.sum() / self.samples),
            "answer_bytes_per_sample": float(self.answer_bytes.sum() / self.samples),
        }
        for stage in self.seconds:
            for key, value in stats.latency_summary(self.seconds[stage]).items():
                row[f"{stage}_{key}"] = value
        return row


def run_images(runner, images, batch_size=1, max_seconds=None):
    """Sends images through `runner` in requests of `batch_size`, bounded in time.

    Args:
      runner: a `DeviceRunner`.
      images: uint8 (N, H, W, C).
      batch_size: images per request (1: a device sends each image as it comes).
      max_seconds: stop starting new requests after this long (None: no limit); at least one
        request is always sent.

    Returns:
      A `RunRecord` of the requests sent.

    Raises:
      DeviceError: bad arguments or images. ServingError: a refused request.
    """
    check_count("batch_size", batch_size)
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise DeviceError(f"`max_seconds` must be None or > 0. Received: {max_seconds!r}")
    if not len(images):
        raise DeviceError("`images` must hold at least one image. Received: 0 images")
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    predictions = []
    for start in range(0, len(images), batch_size):
        if predictions and deadline is not None and time.monotonic() > deadline:
            break
        predictions.append(runner.predict(images[start : start + batch_size]))
    sent = sum(len(p.probabilities) for p in predictions)
    return RunRecord(
        probabilities=np.concatenate([p.probabilities for p in predictions]),
        seconds={s: np.array([p.seconds[s] for p in predictions]) for s in runner.stages},
        request_bytes=np.array([p.request_bytes for p in predictions], np.int64),
        payload_bytes=np.array([p.payload_bytes for p in predictions], np.int64),
        answer_bytes=np.array([p.answer_bytes for p in predictions], np.int64),
        complete=sent == len(images),
    )
