"""The byte ledger: every byte that crossed the cut, per step, per epoch and in total."""

import dataclasses


@dataclasses.dataclass
class ByteLedger:
    """Running byte counts; the trainer records each step's upstream and downstream payloads.

    Totals survive a resume because the trainer restores them from the epochs already recorded.
    """

    total_up: int = 0
    total_down: int = 0
    steps: int = 0
    epoch_up: int = 0
    epoch_down: int = 0
    last_step_up: int = 0
    last_step_down: int = 0

    def record(self, up, down):
        if up < 0 or down < 0:
            raise ValueError(f"Byte counts must be >= 0. Received: up={up}, down={down}")
        self.last_step_up, self.last_step_down = up, down
        self.epoch_up += up
        self.epoch_down += down
        self.total_up += up
        self.total_down += down
        self.steps += 1

    def start_epoch(self):
        self.epoch_up = self.epoch_down = 0

    @property
    def total_megabytes(self):
        return (self.total_up + self.total_down) / 1e6
