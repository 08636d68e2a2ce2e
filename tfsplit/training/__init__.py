"""Split training from a config: data, a compiled `SplitModel` and `fit` with the run's callbacks."""

from tfsplit.training.codec_step import CodecSplitModel
from tfsplit.training.trainer import (
    build_data,
    build_gate_optimizer,
    build_split_model,
    load_model,
    train,
)

__all__ = [
    "CodecSplitModel",
    "build_data",
    "build_gate_optimizer",
    "build_split_model",
    "load_model",
    "train",
]
