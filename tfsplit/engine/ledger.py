"""What a split model's step counts: the metrics, the device's own losses, and the bytes that
crossed the cut, by the codec's formula (`wire.step_nbytes`), per step and for the run."""

import tensorflow as tf

from tfsplit.codec import wire


class StepLedger:
    """The per-step accounting of `SplitModel`, which holds the wire's settings (dtypes, shape,
    `labels_go_up`), the trackers and `sent_payload_bytes` that these methods update."""

    def payload_bytes(self, batch, k, training):
        """Bytes up and down for one step of `batch` samples at budget k, by the codec's formula."""
        return wire.step_nbytes(
            batch,
            k,
            (self.activation_dtype, self.gradient_dtype),
            training,
            with_labels=training and self.labels_go_up,
            height=self.height,
            width=self.width,
            channels=self.channels,
        )

    def update_metrics(self, labels, logits, penalty, k, training, local=None):
        self.compiled_metrics.update_state(labels, logits)
        self.track_device_losses(penalty, local)
        up, down = self.payload_bytes(tf.shape(labels)[0], k, training)
        self.count_sent(up, down, training)
        return self.get_metrics_result()

    def track_device_losses(self, penalty, local=None):
        self.budget_loss_tracker.update_state(penalty)
        if local is not None and self.local_classifier is not None:
            self.local_loss_tracker.update_state(local)

    def count_sent(self, up, down, training=True):
        if training:
            self.sent_payload_bytes.assign_add(tf.cast(tf.stack([up, down]), tf.int64))
        self.payload_bytes_up.update_state(up)
        self.payload_bytes_down.update_state(down)
