"""SplitFed averaging of the devices' heads, in rounds, for a server in parallel mode.

Each device trains its own head on its own data; after every epoch it sends its head to the
server and waits; once every device of the run has sent (or at the round's timeout, with those
that did) all of them get the average weighted by their samples, so the heads stay in agreement
with each other and with the one tail they share.
"""

import time

import numpy as np
from absl import logging

_KEPT_ROUNDS = 4  # Finished rounds kept to answer a retried call again.


def weighted_average(contributions):
    """The per-array average of [(weights, samples), ...], weighted by samples."""
    total = sum(samples for _, samples in contributions)
    averaged = []
    for arrays in zip(*(weights for weights, _ in contributions)):
        mean = sum(a.astype(np.float64) * n for a, (_, n) in zip(arrays, contributions)) / total
        averaged.append(mean.astype(arrays[0].dtype))
    return averaged


class AveragingRounds:
    """The rounds of one run. Its methods are called with `condition` held (the trainer's), which
    they wait on, so that the trainer sees which devices are in a round (`waiting`) and does not
    hold a training batch for them.

    Args:
      condition: the trainer's `threading.Condition`.
      timeout_s: how long a round waits for its last devices.
    """

    def __init__(self, condition, timeout_s):
        if not timeout_s > 0:
            raise ValueError(f"`timeout_s` must be > 0. Received: {timeout_s!r}")
        self._condition, self.timeout_s = condition, timeout_s
        self._rounds = {}  # round -> {device_id: (weights, samples)}
        self._results = {}  # round -> (averaged weights, devices averaged)
        self.waiting = set()  # Devices in a round now.
        self.absent = set()  # Devices that missed a round: not waited for until they send again.

    def join(self, device_id, round_id, weights, samples, devices):
        """Adds `device_id`'s head to round `round_id` and returns (average, devices averaged)
        once the devices in `devices()` (the run's, less the absent) have all sent."""
        if round_id in self._results:  # a retried call, or a device late for a finished round
            return self._results[round_id]
        contributions = self._rounds.setdefault(round_id, {})
        contributions[device_id] = (weights, samples)
        self.absent.discard(device_id)
        self.waiting.add(device_id)
        self._condition.notify_all()
        deadline = time.monotonic() + self.timeout_s
        try:
            while round_id not in self._results:
                missing = set(devices()) - self.absent - set(contributions)
                remaining = deadline - time.monotonic()
                if missing and remaining > 0:
                    self._condition.wait(remaining)
                    continue
                if missing:
                    logging.warning(
                        "Round %d averages %d heads without %s (not sent within %.0f s).",
                        round_id,
                        len(contributions),
                        sorted(missing),
                        self.timeout_s,
                    )
                    self.absent |= missing
                self._finish(round_id)
        finally:
            self.waiting.discard(device_id)
        return self._results[round_id]

    def _finish(self, round_id):
        contributions = self._rounds.pop(round_id)
        self._results[round_id] = (
            weighted_average(list(contributions.values())),
            len(contributions),
        )
        for old in sorted(self._results)[:-_KEPT_ROUNDS]:
            del self._results[old]
        logging.info("Round %d: averaged the heads of %s.", round_id, sorted(contributions))
        self._condition.notify_all()
