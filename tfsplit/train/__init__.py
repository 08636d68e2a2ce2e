"""Split training: steps (fused and through real bytes), the byte ledger and the phase loop."""

from tfsplit.train.ledger import ByteLedger
from tfsplit.train.steps import STEPS, CodecSteps, FusedSteps
from tfsplit.train.trainer import Trainer, build_data, build_split_model, train

__all__ = ["ByteLedger", "STEPS", "CodecSteps", "FusedSteps", "Trainer", "build_data",
           "build_split_model", "train"]
