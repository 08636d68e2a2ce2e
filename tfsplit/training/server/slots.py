"""Which device gives its slot to a new one when a run is full."""

import time

import grpc
from absl import logging

from tfsplit.serving import validation


def slot_to_free(devices, busy, timeout_s):
    """The device (id) silent the longest, if it has been for `timeout_s` and is not in `busy`
    (waiting for an answer): its slot goes to a new device.

    Raises:
      RequestError: RESOURCE_EXHAUSTED when no device has been silent that long.
    """
    now = time.monotonic()
    silent = [
        (device.last_seen, device_id)
        for device_id, device in devices.items()
        if device_id not in busy and now - device.last_seen >= timeout_s
    ]
    if not silent:
        raise validation.RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"This run has its {len(devices)} devices; a slot frees when one of them leaves or "
            f"makes no call for {timeout_s:g} s.",
        )
    last_seen, device_id = min(silent)
    logging.info(
        "Device %r made no call for %.0f s: its slot goes to a new device.",
        device_id,
        now - last_seen,
    )
    return device_id
