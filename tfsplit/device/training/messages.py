"""The device trainer's messages to the server and its byte ledger: each step's payload, its
request, and the bytes both count (the payloads as the Keras device's ledger counts them, and the
gRPC messages each way)."""

from tfsplit import codec
from tfsplit.protocol import split_training_pb2 as pb

LEDGER_KEYS = ("payload_bytes_up", "payload_bytes_down", "wire_bytes_up", "wire_bytes_down")


class StepMessages:
    """What `DeviceTrainer` sends: it sets `run`, `digest`, `device_id` and `client`."""

    labels_go_up = True  # with the training activations (not in a U-shaped split)
    height = width = None  # the wire's positions, from the first payload

    def _payload(self, values, indices, labels=None):
        self.height, self.width = values.shape[1:3]
        return codec.encode(
            values,
            indices,
            self.run["channels"],
            self.run["activation_dtype"],
            kind="activations",
            labels=labels,
        )

    def _request(self, kind, payload, step=0, **fields):
        return pb.StepRequest(
            kind=kind,
            model_digest=self.digest,
            device_id=self.device_id,
            step=step,
            payload=payload,
            **fields,
        )

    def _exchange(self, request, payload_bytes, ledger):
        """The step's reply; its bytes (payloads, and gRPC messages each way) go to `ledger`."""
        before = list(self.client.wire_bytes)
        reply = self.client.call("Step", request)
        ledger["wire_bytes_up"] += self.client.wire_bytes[0] - before[0]
        ledger["wire_bytes_down"] += self.client.wire_bytes[1] - before[1]
        ledger["payload_bytes_up"] += payload_bytes[0]
        ledger["payload_bytes_down"] += payload_bytes[1]
        return reply

    def _payload_bytes(self, batch, k, training):
        """The byte ledger's counts, as the Keras device's `payload_bytes` makes them."""
        run, shape = self.run, (self.height, self.width)
        labels = training and self.labels_go_up
        up = codec.payload_nbytes(
            batch, *shape, k, run["activation_dtype"], labels, channels=run["channels"]
        )
        if not training:
            return up, 0
        down = codec.payload_nbytes(
            batch, *shape, k, run["gradient_dtype"], False, channels=run["channels"]
        )
        return up, down
