"""The server half of networked training: the tail, its optimizer and its durable state.

`service` is the gRPC service devices call (`tfsplit-train-server`); `tail_trainer` runs their
steps on the tail, one device at a time or concurrent devices joined into one batch (`batching`);
`state` keeps what survives a restart (checkpoints and the step log); `averaging` averages heads
across devices (SplitFed); `calibration` runs batch-norm calibration passes.
"""
