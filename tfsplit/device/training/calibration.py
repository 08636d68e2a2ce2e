"""Batch norm calibration of the trainable head: every norm's moving statistics become the plain
mean over training batches of the batch statistics `forward` returns, as `BatchNormAverage` does
for the Keras device (E[mean], and E[variance + mean^2] - mean^2)."""

import numpy as np


def calibrate_head(head, budget, batches, count, send_pass):
    """Calibrates `head` over the first `count` of `batches` at `budget`; `send_pass(values,
    indices, begin, finish)` sends each pass's channels to the server, whose tail calibrates on
    them (the first pass begins its calibration, the last finishes it)."""
    slices = head.moving_statistics()  # each norm's mean, then its variance
    cuts = np.cumsum([size for _, size in slices])[:-1]
    sums = [0.0] * len(slices)
    batches = iter(batches)
    upcoming, passes = next(batches, None), 0
    if upcoming is None:
        raise ValueError("Batch norm calibration needs at least one batch; none was given.")
    while upcoming is not None:  # one batch ahead: the last pass tells the server so
        images, _ = upcoming
        upcoming = next(batches, None) if passes + 1 < count else None
        values, indices, moments = head.forward(images, budget)
        send_pass(values, indices, passes == 0, upcoming is None)
        parts = np.split(moments.astype(np.float64), cuts)
        for j in range(0, len(parts), 2):
            sums[j] = sums[j] + parts[j]
            sums[j + 1] = sums[j + 1] + parts[j + 1] + parts[j] * parts[j]
        passes += 1
    weights = head.get_weights()
    for j in range(0, len(slices), 2):
        mean = sums[j] / passes
        for (offset, size), value in zip(
            slices[j : j + 2], (mean, sums[j + 1] / passes - mean * mean)
        ):
            weights[offset : offset + size] = value
    head.set_weights(weights)
