"""Keras callbacks that drive and record a split-training run: one module per job.

`phase_schedule`: `PhaseSchedule`, which walks SL, CA-SL, deprune and prune as one list of phases
(the budget, the gate resets, nested budgets and the rates each phase asks for); `calibration`:
`BatchNormCalibration`, batch norm statistics for the channels now sent; `data_position`:
`DataPosition`, which has a resumed run train on the batches it would have; `records`:
`RunRecords`, what a run leaves in its workdir (`metrics.jsonl`, one line per epoch, and
`summary.json`), read by the tools and the reproduce table.
"""

from tfsplit.callbacks.calibration import BatchNormCalibration
from tfsplit.callbacks.data_position import DataPosition
from tfsplit.callbacks.phase_schedule import GATE_TRAVEL, PhaseSchedule
from tfsplit.callbacks.records import (
    METRICS_FILE,
    SUMMARY_FILE,
    RunRecords,
    add_test_result,
    last_epoch_change,
    read_records,
    write_summary,
)

__all__ = [
    "GATE_TRAVEL",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "BatchNormCalibration",
    "DataPosition",
    "PhaseSchedule",
    "RunRecords",
    "add_test_result",
    "last_epoch_change",
    "read_records",
    "write_summary",
]
