"""The trainable top of a U-shaped split on the device: `top_train.tflite` in the LiteRT
interpreter, checked against its `top_train.json` (written by `tfsplit-export --trainable` for a
U-shaped config, `tfsplit.export.trainable_top`). The labels and the loss stay here."""

import os

import numpy as np

from tfsplit import codec
from tfsplit.device.spec import DeviceError
from tfsplit.device.training.head import TrainableModel, read_weight_layout

TOP_MODEL_FILE, TOP_LAYOUT_FILE = "top_train.tflite", "top_train.json"
TOP_SIGNATURES = ("forward", "train", "infer", "get_weights", "set_weights")


def has_top(model_dir):
    """Whether `model_dir` holds a U-shaped split's trainable top."""
    return os.path.exists(os.path.join(os.fspath(model_dir), TOP_MODEL_FILE))


def _read_top_layout(path):
    layout = read_weight_layout(path, "trainable top")
    top = layout.get("top")
    ok = isinstance(top, dict) and all(
        top.get(key) in codec.WIRE_DTYPES for key in ("top_activation_dtype", "top_gradient_dtype")
    )
    shape = top.get("top_shape") if ok else None
    ok = ok and isinstance(shape, list) and len(shape) in (1, 3)
    ok = ok and all(isinstance(d, int) and d > 0 for d in shape)
    noise = top.get("top_gradient_noise") if ok else None
    ok = ok and isinstance(noise, (int, float)) and noise >= 0
    dropout = layout.get("dropout")
    if dropout is not None:
        rate = dropout.get("rate") if isinstance(dropout, dict) else None
        ok = ok and isinstance(rate, (int, float)) and 0 <= rate < 1
        ok = ok and isinstance(dropout.get("features"), int) and dropout["features"] > 0
    if not ok:
        raise DeviceError(
            f"{path} must describe the second cut: top.top_shape ([h, w, C] or [C]), "
            f"top.top_activation_dtype and top.top_gradient_dtype ({codec.WIRE_DTYPES}), "
            "top.top_gradient_noise (>= 0), and dropout (null, or its rate in [0, 1) and "
            "features). Received: " + str({k: layout.get(k) for k in ("top", "dropout")})[:300]
        )
    return layout


class TrainableTop(TrainableModel):
    """`top_train.tflite` of `model_dir`: the layers after the second cut and the loss.

    Args:
      model_dir: the directory `tfsplit-export --trainable` wrote for a U-shaped config.
      num_threads: interpreter threads; None lets LiteRT choose.
    """

    def __init__(self, model_dir, num_threads=None):
        layout = _read_top_layout(os.path.join(os.fspath(model_dir), TOP_LAYOUT_FILE))
        super().__init__(
            model_dir, TOP_MODEL_FILE, layout, TOP_SIGNATURES, "trainable top", num_threads
        )
        self.cut = self.layout["top"]
        self.shape = tuple(self.cut["top_shape"])
        self.dropout = self.layout.get("dropout")

    def _middle(self, middle):
        middle = np.asarray(middle, np.float32)
        if middle.ndim != 1 + len(self.shape) or middle.shape[1:] != self.shape:
            raise DeviceError(
                f"The middle's output must be (N, {', '.join(map(str, self.shape))}) for this "
                f"top. Received: shape={middle.shape}"
            )
        return middle

    def keep_mask(self, batch, rng):
        """The dropout layer's mask for a batch, drawn from `rng` as Keras draws it: each
        feature kept with probability 1 - rate and then scaled by 1 / (1 - rate)."""
        if self.dropout is None:
            return np.ones((batch, 1), np.float32)
        rate = self.dropout["rate"]
        kept = rng.random((batch, self.dropout["features"])) >= rate
        return (kept / (1.0 - rate)).astype(np.float32)

    def train(self, middle, labels, keep, learning_rate):
        """One step of the top; returns (loss, logits, the loss's gradient at `middle`)."""
        out = self._call(
            "train",
            middle=self._middle(middle),
            labels=np.asarray(labels, np.int32),
            keep=np.asarray(keep, np.float32),
            learning_rate=np.array([learning_rate], np.float32),
        )
        return float(out["loss"]), out["logits"], out["gradient"]

    def forward(self, middle):
        """(logits, moments) with batch statistics: what batch norm calibration averages."""
        out = self._call("forward", middle=self._middle(middle))
        return out["logits"], out.get("moments", np.zeros(0, np.float32))

    def infer(self, middle):
        """The logits with the moving statistics (evaluation)."""
        return self._call("infer", middle=self._middle(middle))["logits"]
