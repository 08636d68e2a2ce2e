"""Serving the tail: a TF Serving-compatible server with request validation, and its clients.

    server = TailServer("/models/tail", "tail").start()  # gRPC + REST on free ports
    client = GrpcTailClient(server.grpc_target, "tail")  # or RestTailClient(server.rest_url, ..)
    probabilities = client.predict(values, indices, scale, zero_point)

The clients speak TF Serving's own protocols, so they work unchanged against a real model server
serving the same SavedModel.
"""

from tfsplit.serve.client import (
    GrpcTailClient,
    RestTailClient,
    TailServingError,
    build_predict_body,
    build_predict_request,
)
from tfsplit.serve.model import ServedTail, resolve_version_dir
from tfsplit.serve.server import TailServer
from tfsplit.serve.validation import RequestError, TailModelError, TailSpec

__all__ = [
    "GrpcTailClient",
    "RequestError",
    "RestTailClient",
    "ServedTail",
    "TailModelError",
    "TailServer",
    "TailServingError",
    "TailSpec",
    "build_predict_body",
    "build_predict_request",
    "resolve_version_dir",
]
