"""The device half of split training with no TensorFlow: the gRPC channel to a training server
(`channel`), shared by the Keras device trainer."""
