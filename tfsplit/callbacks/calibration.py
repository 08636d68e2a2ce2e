"""`BatchNormCalibration`: batch norm statistics that match the channels the model now sends."""

import numpy as np
import tf_keras as keras


class BatchNormCalibration(keras.callbacks.Callback):
    """Recomputes batch norm statistics before an evaluation when the sent channels changed.

    Without it a model whose gates moved during the epoch is evaluated with moving averages of
    selections it no longer sends, and test accuracy trails train accuracy for that reason alone.
    Calibrates when the set of sent channels or any of their gates changed since the last time.

    Args:
      dataset: training batches (images, labels).
      batches: how many of them each calibration averages over.
    """

    def __init__(self, dataset, batches=20):
        super().__init__()
        if not isinstance(batches, int) or batches < 1:
            raise ValueError(f"`batches` must be a positive integer. Received: {batches!r}")
        self.dataset, self.batches = dataset, batches
        self._calibrated_for = None

    def on_test_begin(self, logs=None):
        model = self.model
        if model.encoder is None:
            return
        sent = model.channel_indices().numpy()
        state = (tuple(sent), tuple(np.round(model.encoder.gate_logits.numpy()[sent], 3)))
        if state != self._calibrated_for:
            model.calibrate_batch_norm(self.dataset, self.batches)
            self._calibrated_for = state
