"""What a training request must be before the server acts on it: its model, its device id, its
shapes, its learning rate, and a retry's sameness. Each refusal says what was expected."""

import grpc
import numpy as np

from tfsplit.auth import identity
from tfsplit.serving import validation
from tfsplit.training.messages import shown


def check_digest(received, expected):
    """Refuses a request whose model digest is not `expected` (the server's model's)."""
    if received != expected:
        raise validation.RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"The device's model (digest {shown(received[:12])}) differs from this server's "
            f"({expected[:12]}); start both with the same config.",
        )


def check_device_id(device_id):
    try:
        identity.check_device_id(device_id)
    except ValueError:
        raise validation.invalid(
            "device_id must be 1 to 64 letters, digits, '.', '_' or '-'. "
            f"Received: {shown(device_id)}"
        ) from None


def check_shapes(hello, split):
    """A Hello's image shape and number of classes must be those of `split`, the run's model."""
    expected = list(split.head.input.shape[1:])
    if list(hello.image_shape) != expected:
        raise validation.invalid(
            f"image_shape must be {expected}. Received: {shown(hello.image_shape)}"
        )
    classes = split.num_classes
    if hello.num_classes != classes:
        raise validation.invalid(f"num_classes must be {classes}. Received: {hello.num_classes}")


def check_learning_rate(rate, max_rate):
    if not (np.isfinite(rate) and 0 <= rate <= np.float32(max_rate)):
        raise validation.invalid(
            f"learning_rate must be finite and in [0, {max_rate:g}] on this server. "
            f"Received: {rate}"
        )


def check_retry(step, digest):
    """A step id sent again must be the same request (a retry), not another step."""
    if step.digest != digest:
        raise validation.RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Training step {step.request.step} of device {shown(step.request.device_id)} was "
            "already sent with other contents (payload, rate or fields); a retry must resend the "
            "same request.",
        )
