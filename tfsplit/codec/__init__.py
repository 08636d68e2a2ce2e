"""The one wire format for everything that crosses the cut between device and server.

Activations go upstream (training and inference), gradients downstream (training), both as a
*payload*: the k selected channels of a bottleneck tensor, their indices, optionally the labels,
in a wire dtype. `layout` lays out the bytes and `values` quantizes them, both numpy only so that
a device can use them without TensorFlow; this package's top level gathers them and imports no
TensorFlow. `wire` is the TensorFlow side that compiled training steps need (the same quantization
as graph ops, with straight-through gradients). Every `payload_bytes` the project reports is
`len(encode(...))` or `payload_nbytes(...)`, which a test proves equal for every shape, dtype and
kind.
"""

from tfsplit.codec.layout import (
    HEADER_NBYTES,
    INT8_PARAMS_NBYTES,
    KINDS,
    Payload,
    decode,
    encode,
    payload_nbytes,
)
from tfsplit.codec.values import WIRE_DTYPES, PayloadError, dequantize, quantize

__all__ = [
    "HEADER_NBYTES",
    "INT8_PARAMS_NBYTES",
    "KINDS",
    "Payload",
    "PayloadError",
    "WIRE_DTYPES",
    "decode",
    "dequantize",
    "encode",
    "payload_nbytes",
    "quantize",
]
