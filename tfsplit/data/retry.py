"""Retrying a failed call with exponential backoff and jitter, then failing with a clear error."""

import dataclasses
import math
import random
import time

from absl import logging

from tfsplit.codec.values import is_int
from tfsplit.data.common import DatasetFileError


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed object-store call is tried again.

    Attributes:
      attempts: tries in all (1 means no retry).
      initial_backoff_s: the wait before the first retry; it doubles with every retry.
      max_backoff_s: the longest wait between two tries.
    """

    attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 4.0

    def __post_init__(self):
        if not is_int(self.attempts) or self.attempts < 1:
            raise ValueError(
                f"`attempts` must be an int >= 1. Received: attempts={self.attempts!r}"
            )
        for name in ("initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not is_seconds(value):
                raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                "`max_backoff_s` must be >= `initial_backoff_s`. Received: "
                f"initial_backoff_s={self.initial_backoff_s}, max_backoff_s={self.max_backoff_s}"
            )

    def backoff_s(self, retry):
        """Seconds to wait before retry number `retry` (1, 2, ...).

        Jittered into [half, full] of the doubled wait, so that the many readers of a tf.data
        pipeline that lost the same server do not all come back in the same instant.
        """
        full = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** min(retry - 1, 30))
        return random.uniform(full / 2, full)


def is_seconds(value):
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


class Retry(Exception):
    """A failed try worth repeating; its message says what went wrong."""


def with_retries(policy, what, attempt):
    """`attempt()`'s result, repeated per `policy` while it raises `Retry`.

    Raises:
      DatasetFileError: after the last try, naming `what`, the last problem and the tries made.
    """
    for tries in range(1, policy.attempts + 1):
        try:
            return attempt()
        except Retry as err:
            last = err
            if tries < policy.attempts:
                delay = policy.backoff_s(tries)
                logging.warning(
                    "Could not %s (attempt %d of %d): %s; retrying in %.2f s",
                    what,
                    tries,
                    policy.attempts,
                    err,
                    delay,
                )
                time.sleep(delay)
    attempts = f"{policy.attempts} attempt{'s' if policy.attempts > 1 else ''}"
    raise DatasetFileError(f"Could not {what} after {attempts}: {last}") from last
