"""`DataPosition`: a resumed run trains on the batches the uninterrupted run would have."""

import tf_keras as keras


class DataPosition(keras.callbacks.Callback):
    """Sets the training pipeline's position (the epoch and first batch its next iterator
    starts at, `tfsplit.data.pipeline.epoch_plans`) from the steps the model has trained.

    When training begins, after `BackupAndRestore` put a backup back (place it after), that is
    the step after the backup, in the middle of an epoch or at its start: Keras runs the epoch's
    remaining steps and the pipeline yields that epoch's remaining batches. At each epoch's end
    it is set again for the next epoch, whatever read the training data since (batch norm
    calibration takes training batches before the epoch's evaluation).

    Args:
      position: the variable the training pipeline reads (`tfsplit.data.build_datasets`).
    """

    def __init__(self, position):
        super().__init__()
        self.position = position

    def on_train_begin(self, logs=None):
        self._set()

    def on_epoch_end(self, epoch, logs=None):
        self._set()

    def _set(self):
        steps, trained = self.params["steps"], int(self.model.optimizer.iterations)
        self.position.assign([trained // steps, trained % steps])
