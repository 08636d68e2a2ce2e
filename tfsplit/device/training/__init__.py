"""The device half of split training with no TensorFlow: the trainable LiteRT head
(`head_train.tflite`), its trainer against a `tfsplit-train-server`, and the gRPC channel that
both device trainers (this one and the Keras one) use.

    head = TrainableHead("/tmp/head")            # what tfsplit-export --trainable wrote
    client = TrainingClient("server:50051", token=..., root_certificates=...)
    trainer = DeviceTrainer(head, client, workdir="/tmp/device")
    trainer.connect()
    trainer.fit(train_batches, steps_per_epoch, test_batches)
"""

from tfsplit.device.training.channel import TrainingClient
from tfsplit.device.training.head import TrainableHead
from tfsplit.device.training.plan import epoch_plan
from tfsplit.device.training.trainer import DeviceTrainer

__all__ = ["DeviceTrainer", "TrainableHead", "TrainingClient", "epoch_plan"]
