"""The split training service both halves speak: its gRPC messages (`split_training.proto`) and
their framing, with no TensorFlow (a device trains without it)."""
