"""Deployment measured end to end on a development machine (TensorFlow needed).

    result = run_split_inference("/tmp/tfsplit/deprune", protocols=("rest", "grpc"))
    print(format_infer_table(result.rows))

The device side itself lives in `tfsplit.device`, which runs without TensorFlow.
"""

from tfsplit.deploy.infer import (
    InferError,
    InferResult,
    format_infer_table,
    prepare_export,
    run_split_inference,
    write_results,
)

__all__ = [
    "InferError",
    "InferResult",
    "format_infer_table",
    "prepare_export",
    "run_split_inference",
    "write_results",
]
