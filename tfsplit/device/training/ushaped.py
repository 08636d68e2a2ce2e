"""The U-shaped split on the device without TensorFlow: the LiteRT head and top here, with the
labels, the middle on a `tfsplit-train-server`, step for step as the Keras device
(`tfsplit.training.ushaped_client`) trains it.

Each training batch makes two calls. FORWARD sends the head's k channels, without labels, and
gets the middle's output; the top's `train` computes the loss with the labels, takes its own SGD
step and gives the loss's gradient at the middle's output; TRAIN sends that gradient up (in the
second cut's wire dtype, perturbed first when the run sets `top_gradient_noise`) and gets the
head's gradient back for the head's `train`. The top's dropout masks and noise are drawn from
(seed, step), so a resumed run draws what the lost steps drew. Evaluation and batch norm
calibration finish on the top with the middle's output.
"""

import grpc
import numpy as np
from absl import logging

from tfsplit import codec
from tfsplit.codec import second_cut
from tfsplit.device.spec import DeviceError
from tfsplit.device.training.trainer import DeviceTrainer
from tfsplit.protocol import split_training_pb2 as pb

TOP_LEDGER_KEYS = ("top_payload_bytes_down", "top_payload_bytes_up")
_LOST_FORWARD = "comes after its FORWARD"  # the server's refusal of a TRAIN it has no FORWARD for


class UShapedDeviceTrainer(DeviceTrainer):
    """Trains `head` and `top` (a `TrainableTop`) against the U-shaped server `client`; the
    arguments and the state are `DeviceTrainer`'s, the top's weights saved beside the head's."""

    labels_go_up = False

    def __init__(self, head, top, client, workdir=None, device_id="device-0"):
        super().__init__(head, client, workdir, device_id)
        if head.run["num_classes"] != top.layout["top"]["num_classes"]:
            raise DeviceError(
                f"The top predicts {top.layout['top']['num_classes']} classes, the head's run "
                f"{head.run['num_classes']}: the two files come from different exports."
            )
        self.top, self.cut = top, top.layout["top"]
        self.ledger.update(dict.fromkeys(TOP_LEDGER_KEYS, 0))
        self._epoch_start = dict(self.ledger)

    # ------------------------------------------------------------------------ the wire
    def _second_cut_bytes(self, batch, training):
        """(down, up) bytes of the second cut: the middle's output, and the top's gradient."""
        height, width, channels = second_cut.geometry(self.top.shape)
        sizes = [
            codec.payload_nbytes(
                batch, height, width, channels, self.cut[key], False, channels=channels
            )
            for key in ("top_activation_dtype", "top_gradient_dtype")
        ]
        return sizes[0], sizes[1] if training else 0

    def _middle(self, reply, batch):
        try:
            return second_cut.decode_second_cut(
                reply.payload,
                self.top.shape,
                self.cut["top_activation_dtype"],
                "activations",
                batch,
            )
        except codec.PayloadError as error:
            raise DeviceError(f"The server's answer: {error}") from None

    def _rng(self, step):
        return np.random.default_rng([self.run["seed"], step, 2])

    # ------------------------------------------------------------------------ the steps
    def _train_step(self, images, labels, plan, totals):
        labels = np.asarray(labels, np.int32)
        batch, step = len(labels), self.remote_step
        values, indices, _ = self.head.forward(images, plan["budget"])
        forward = self._request(pb.StepRequest.FORWARD, self._payload(values, indices), step)
        up, down = self._payload_bytes(batch, len(indices), training=True)
        top_down, top_up = self._second_cut_bytes(batch, training=True)
        reply = self._exchange(forward, (up, 0), self.ledger)
        if reply.step != step:
            raise RuntimeError(f"The server answered step {reply.step} to step {step}.")
        rng = self._rng(step)
        loss, logits, gradient = self.top.train(
            self._middle(reply, batch),
            labels,
            self.top.keep_mask(batch, rng),
            plan["learning_rate"],
        )
        noise = self.cut["top_gradient_noise"]
        if noise:  # as `codec.wire.perturb`: the noise's scale is relative to the gradient's RMS
            gradient = gradient + rng.standard_normal(gradient.shape).astype(np.float32) * (
                noise * np.sqrt(np.mean(np.square(gradient, dtype=np.float64)))
            ).astype(np.float32)
        train = self._request(
            pb.StepRequest.TRAIN,
            second_cut.encode_second_cut(
                gradient, self.top.shape, self.cut["top_gradient_dtype"], "gradients"
            ),
            step,
            learning_rate=plan["learning_rate"],
            nesting=plan["nesting"],
        )
        reply = self._train_call(train, forward, down)
        self.ledger["top_payload_bytes_down"] += top_down
        self.ledger["top_payload_bytes_up"] += top_up
        self.remote_step = step + 1
        returned = codec.decode(reply.payload, expect_kind="gradients")
        self.head.train(
            images,
            labels,
            returned.scatter()[..., indices],
            plan["budget"],
            (plan["learning_rate"], plan["gate_learning_rate"]),
            plan["penalty_weight"],
        )
        totals["loss"] += loss
        totals["steps"] += 1
        totals["correct"] += int(np.sum(np.argmax(logits, -1) == labels))
        totals["samples"] += batch

    def _train_call(self, train, forward, down):
        """The TRAIN's reply; a server that lost the step's FORWARD (a restart since) gets the
        FORWARD again first: its middle is where the FORWARD found it, so the output is the
        same."""
        try:
            reply = self._exchange(train, (0, down), self.ledger)
        except grpc.RpcError as error:
            lost = error.code() == grpc.StatusCode.FAILED_PRECONDITION
            if not lost or _LOST_FORWARD not in (error.details() or ""):
                raise
            logging.warning("The server lost this step's FORWARD (a restart): sending it again.")
            self._exchange(forward, (0, 0), self.ledger)
            reply = self._exchange(train, (0, down), self.ledger)
        if reply.step != train.step:
            raise RuntimeError(f"The server answered step {reply.step} to step {train.step}.")
        return reply

    def _answer_logits(self, reply, batch, ledger):
        """The top's logits on the middle's output that an EVALUATE's reply carries."""
        ledger["top_payload_bytes_down"] += self._second_cut_bytes(batch, training=False)[0]
        return self.top.infer(self._middle(reply, batch))

    # -------------------------------------------------------------------- saved state
    def _saved_weights(self):
        return np.concatenate([self.head.get_weights(), self.top.get_weights()])

    def _restore_weights(self, weights):
        size = self.head.layout["size"]
        if weights.shape != (size + self.top.layout["size"],):
            raise DeviceError(
                f"The saved state holds {weights.size} weight values; the head and the top "
                f"hold {size} + {self.top.layout['size']}."
            )
        self.head.set_weights(weights[:size])
        self.top.set_weights(weights[size:])
