"""Benchmark programs and their infrastructure, run from a clone and not installed with tfsplit.

`train_benchmark` (split `fit` against unsplit `fit`), `network_benchmark` (training over
emulated links; `tfsplit.eval.link_report` reads its result), `data_benchmark` (input pipelines
from disk and object storage); their infrastructure: `links` and `namespaces` (emulated links
between network namespaces), `local_s3` (an S3-compatible server on loopback) and `grain_loader`
(the Grain comparison).
"""
