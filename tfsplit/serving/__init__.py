"""Serving the tail: a TF Serving-compatible server that validates every request first.

    server = TailServer("/models/tail", "tail").start()  # gRPC + REST on free ports
    client = tfsplit.device.make_client("grpc", server.grpc_target, "tail")  # or "rest", rest_url
    probabilities = client.predict(payload)

The server speaks TF Serving's own protocols, so the device's clients (`tfsplit.device`, no
TensorFlow) work unchanged against it and against a real model server serving the same SavedModel.
"""

from tfsplit.serving.model import ServedTail, resolve_version_dir
from tfsplit.serving.server import TailServer
from tfsplit.serving.validation import RequestError, TailModelError, TailSpec

__all__ = [
    "RequestError",
    "ServedTail",
    "TailModelError",
    "TailServer",
    "TailSpec",
    "resolve_version_dir",
]
