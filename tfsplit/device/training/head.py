"""The trainable head on the device: `head_train.tflite` in the LiteRT interpreter, checked
against its `head_train.json`, its signatures as numpy calls.

The model is what `tfsplit-export --trainable` writes (`tfsplit.export.trainable`): `forward`,
`train`, `infer`, `get_weights` and `set_weights` over the head's variables. The JSON
names every slice of the weight vector and describes the run (`run`): the digest the server
checks, the wire, the phases and the optimizer settings.
"""

import json
import os

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from tfsplit import codec
from tfsplit.device.spec import DeviceError
from tfsplit.protocol import split_training_pb2 as pb


def _one(value, dtype):
    """A number as the signatures take it: a one-element vector (see `signatures` in
    tfsplit/export/trainable.py)."""
    return np.array([value], dtype)


# Images per `infer` call in evaluation. The interpreter keeps each signature's tensors at the
# largest batch it has seen; at 16 the `infer` tensors of the quick config's head take 11.6 MiB
# against 35.6 at its training batch of 64, and 2,000 images take 0.46 s against 0.52 (2 threads).
EVALUATION_CHUNK = 16
MODEL_FILE, LAYOUT_FILE, TAIL_FILE = "head_train.tflite", "head_train.json", "tail_weights.pb"
SIGNATURES = ("forward", "train", "infer", "get_weights", "set_weights")
# The run description's keys and what each must be (`tfsplit.export.trainable_export`).
_RUN_KEYS = {
    "model_digest": "a 64-digit hex digest",
    "image_shape": "[H, W, C]",
    "num_classes": "a positive integer",
    "channels": "a positive integer",
    "activation_dtype": f"one of {codec.WIRE_DTYPES}",
    "gradient_dtype": f"one of {codec.WIRE_DTYPES}",
    "masked": "a boolean",
    "nested_budgets": "a boolean",
    "budget_eps": "a number",
    "phases": "a list of phases",
    "seed": "an integer",
    "gate_optimizer": "a boolean",
    "gate_learning_rate": "a number",
    "gate_travel_fraction": "a number",
    "batch_size": "a positive integer",
    "eval_batch_size": "a positive integer",
    "augment": "a boolean",
    "calibration_batches": "an integer >= 0",
    "checkpoint_every_steps": "a positive integer",
}


def read_weight_layout(path, what):
    """The JSON object at `path` whose `variables` slice a weight vector of `size` values in
    order (what the trainable exports write beside each model); `what` names the model."""
    try:
        with open(path) as f:
            layout = json.load(f)
    except OSError as error:
        raise DeviceError(f"Cannot read the {what}'s layout {path}: {error}") from None
    except ValueError as error:
        raise DeviceError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(layout, dict):
        raise DeviceError(f"{path} must hold a JSON object (the export's layout).")
    size = layout.get("size")
    entries = layout.get("variables")
    if not isinstance(size, int) or size < 1 or not isinstance(entries, list) or not entries:
        raise DeviceError(f"{path} must give `size` (> 0) and the `variables` of the weights.")
    offset = 0
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or entry.get("offset") != offset
            or not isinstance(entry.get("size"), int)
            or entry["size"] != int(np.prod(entry.get("shape", [-1])))
        ):
            raise DeviceError(
                f"{path}: variables[{i}] must follow the one before it (offset {offset}) with a "
                f"size that matches its shape. Received: {str(entry)[:200]}"
            )
        offset += entry["size"]
    if offset != size:
        raise DeviceError(f"{path}: the variables cover {offset} values, but `size` is {size}.")
    return layout


def _read_layout(path):
    layout = read_weight_layout(path, "trainable head")
    run = layout.get("run")
    if not isinstance(run, dict):
        raise DeviceError(
            f"{path} has no run description: export the head with its run "
            "(tfsplit-export --trainable with --workdir or --config)."
        )
    missing = [key for key in _RUN_KEYS if key not in run]
    if missing:
        raise DeviceError(
            f"{path}: the run description lacks {missing}; expected "
            + ", ".join(f"{key} ({what})" for key, what in _RUN_KEYS.items() if key in missing)
        )
    for key in ("activation_dtype", "gradient_dtype"):
        if run[key] not in codec.WIRE_DTYPES:
            raise DeviceError(f"{path}: run.{key} must be {_RUN_KEYS[key]}. Received: {run[key]!r}")
    return layout


class TrainableModel:
    """A trainable LiteRT model of `model_dir` (`model_file`, described by `layout`) whose
    `signatures` are numpy calls; its weights are one float32 vector (`get_weights`). `what`
    names it in errors.

    Raises:
      DeviceError: a missing, corrupt or truncated model, a layout that does not describe it, or
        a model without the signatures.
    """

    def __init__(self, model_dir, model_file, layout, signatures, what, num_threads=None):
        self.model_dir, self.layout, self.what = os.fspath(model_dir), layout, what
        path = os.path.join(self.model_dir, model_file)
        try:
            with open(path, "rb") as f:
                model = f.read()
        except OSError as error:
            raise DeviceError(f"Cannot read the {what} {path}: {error}") from None
        if len(model) < 8 or model[4:8] != b"TFL3":
            raise DeviceError(f"{path} is not a TFLite model (no TFL3 identifier).")
        try:
            self._interpreter = Interpreter(model_content=model, num_threads=num_threads)
            found = self._interpreter.get_signature_list()
        except (ValueError, RuntimeError) as error:
            raise DeviceError(f"{path} is not a loadable {what}: {error}") from None
        missing = [name for name in signatures if name not in found]
        if missing:
            raise DeviceError(f"{path} lacks the {what}'s signatures {missing}.")
        try:
            self._runners = {
                name: self._interpreter.get_signature_runner(name) for name in signatures
            }
        except (ValueError, RuntimeError) as error:
            raise DeviceError(f"{path} is not a loadable {what}: {error}") from None
        held = self.get_weights().size
        if held != self.layout["size"]:
            raise DeviceError(
                f"{path} holds {held} weight values, but its layout describes "
                f"{self.layout['size']}: the JSON belongs to another model."
            )

    def _call(self, name, **inputs):
        try:
            return self._runners[name](**inputs)
        except (ValueError, RuntimeError) as error:
            raise DeviceError(f"The {self.what}'s {name} failed: {error}") from None

    def get_weights(self):
        return self._call("get_weights")["weights"]

    def set_weights(self, weights):
        weights = np.asarray(weights, np.float32)
        if weights.shape != (self.layout["size"],):
            raise DeviceError(
                f"The {self.what}'s weights are {self.layout['size']} float32 values. Received: shape "
                f"{weights.shape}"
            )
        self._call("set_weights", weights=weights)

    def moving_statistics(self):
        """The (offset, size) of each moving statistic, in `moments`' order."""
        return [(entry["offset"], entry["size"]) for entry in self.layout.get("moments", [])]


class TrainableHead(TrainableModel):
    """`head_train.tflite` of `model_dir` in the LiteRT interpreter.

    Args:
      model_dir: the directory `tfsplit-export --trainable` wrote.
      num_threads: interpreter threads; None lets LiteRT choose.

    Raises:
      DeviceError: a missing, corrupt or truncated model, a layout that does not describe it, or
        a model without the trainable head's signatures.
    """

    def __init__(self, model_dir, num_threads=None):
        layout = _read_layout(os.path.join(os.fspath(model_dir), LAYOUT_FILE))
        super().__init__(model_dir, MODEL_FILE, layout, SIGNATURES, "trainable head", num_threads)
        self.run = self.layout["run"]
        self.image_shape = tuple(self.run["image_shape"])

    # --------------------------------------------------------------------------- the calls
    def forward(self, images, budget):
        """(values (N, h, w, k) float32, indices (k,) int32, moments) with batch statistics:
        what a training step sends, and every batch norm's batch mean and variance, flat, in
        the layout's `moments` order (what calibration averages)."""
        out = self._call("forward", images=self._images(images), budget=_one(budget, np.int32))
        return out["values"], out["indices"], out["moments"]

    def infer(self, images, budget, chunk=EVALUATION_CHUNK):
        """(values, indices) as `forward`, with the moving statistics (evaluation), `chunk`
        images at a time (None: all at once): the same values, as inference has no batch
        statistics, and the interpreter's memory of a small batch instead of an evaluation
        batch's."""
        images = self._images(images)
        step = chunk or max(len(images), 1)
        parts = [
            self._call("infer", images=images[i : i + step], budget=_one(budget, np.int32))
            for i in range(0, len(images), step)
        ]
        return np.concatenate([p["values"] for p in parts]), parts[0]["indices"]

    def train(self, images, labels, gradient, budget, rates, penalty_weight):
        """One step of the head for the server's `gradient` of the sent values; `rates` is
        (learning rate, gates' learning rate). Returns (penalty, local classifier loss)."""
        out = self._call(
            "train",
            images=self._images(images),
            labels=np.asarray(labels, np.int32),
            upstream_gradient=np.asarray(gradient, np.float32),
            budget=_one(budget, np.int32),
            learning_rate=_one(rates[0], np.float32),
            gate_learning_rate=_one(rates[1], np.float32),
            penalty_weight=_one(penalty_weight, np.float32),
        )
        return float(out["penalty"]), float(out["local_loss"])

    def warm_up(self, batch_size, budget):
        """Runs `train`, `forward` and `infer` once on zeros at the run's batch size and
        `budget` (its largest), then puts every weight back. The interpreter sizes each
        signature's tensors at the first call of a shape and briefly holds about two thirds as
        much again while it does: `train` first, before the other signatures' tensors and the
        data, keeps that peak low, and the run's later calls fit the tensors already there."""
        saved = self.get_weights()
        images = np.zeros((batch_size,) + self.image_shape, np.float32)
        wire = self._runners["train"].get_input_details()["upstream_gradient"]["shape_signature"]
        gradient = np.zeros((batch_size, *wire[1:-1], budget), np.float32)
        labels = np.zeros(batch_size, np.int32)
        self.train(images, labels, gradient, budget, (0.0, 0.0), 0.0)
        self.forward(images, budget)
        self.infer(images[:EVALUATION_CHUNK], budget)
        self.set_weights(saved)

    def _images(self, images):
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise DeviceError(
                f"Images must be (N, {', '.join(map(str, self.image_shape))}) for this head. "
                f"Received: shape={images.shape}"
            )
        return images

    def starting_tail(self):
        """The tail weights a new run starts from (serialized TensorProtos, for Hello)."""
        path = os.path.join(self.model_dir, TAIL_FILE)
        try:
            with open(path, "rb") as f:
                return list(pb.TailWeightsReply.FromString(f.read()).weights)
        except OSError as error:
            raise DeviceError(f"Cannot read the run's starting tail {path}: {error}") from None
        except Exception:  # noqa: BLE001  (protobuf's DecodeError: any malformed bytes)
            raise DeviceError(f"{path} is not a TailWeightsReply (the export's tail).") from None

    # ------------------------------------------------------------------ named weight slices
    def view(self, weights, name):
        """The slice `name` ("gates", "seniority") of a weight vector, or None without it."""
        where = self.layout.get(name)
        if where is None:
            return None
        return weights[where["offset"] : where["offset"] + where["size"]]
