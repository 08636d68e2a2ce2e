"""Batch norm calibration of the trainable models: every norm's moving statistics become the
plain mean over training batches of the batch statistics `forward` returns, as
`BatchNormAverage` does for the Keras device (E[mean], and E[variance + mean^2] - mean^2)."""

import numpy as np


class MomentAverage:
    """Averages the batch moments of `model` (a `TrainableModel`: each norm's mean, then its
    variance, in the layout's `moments` order) and writes them into its weights."""

    def __init__(self, model):
        self.model, self.slices = model, model.moving_statistics()
        self.cuts = np.cumsum([size for _, size in self.slices])[:-1]
        self.sums, self.passes = [0.0] * len(self.slices), 0

    def add(self, moments):
        parts = np.split(np.asarray(moments, np.float64), self.cuts)
        for j in range(0, len(parts), 2):
            self.sums[j] = self.sums[j] + parts[j]
            self.sums[j + 1] = self.sums[j + 1] + parts[j + 1] + parts[j] * parts[j]
        self.passes += 1

    def apply(self):
        if not self.slices or not self.passes:
            return
        weights = self.model.get_weights()
        for j in range(0, len(self.slices), 2):
            mean = self.sums[j] / self.passes
            variance = self.sums[j + 1] / self.passes - mean * mean
            for (offset, size), value in zip(self.slices[j : j + 2], (mean, variance)):
                weights[offset : offset + size] = value
        self.model.set_weights(weights)


def calibrate_head(head, budget, batches, count, send_pass, top=None):
    """Calibrates `head` over the first `count` of `batches` at `budget`; `send_pass(values,
    indices, begin, finish)` sends each pass's channels to the server, whose tail calibrates on
    them (the first pass begins its calibration, the last finishes it). With a U-shaped split's
    `top`, `send_pass` returns the middle's output, on which the top calibrates too."""
    top = top if top is not None and top.moving_statistics() else None  # no norm: no pass
    averages = [MomentAverage(head)] + ([] if top is None else [MomentAverage(top)])
    batches = iter(batches)
    upcoming = next(batches, None)
    if upcoming is None:
        raise ValueError("Batch norm calibration needs at least one batch; none was given.")
    passes = 0
    while upcoming is not None:  # one batch ahead: the last pass tells the server so
        images, _ = upcoming
        upcoming = next(batches, None) if passes + 1 < count else None
        values, indices, moments = head.forward(images, budget)
        middle = send_pass(values, indices, passes == 0, upcoming is None)
        averages[0].add(moments)
        if top is not None:
            averages[1].add(top.forward(middle)[1])
        passes += 1
    for average in averages:
        average.apply()
