"""The exported head on the device: the LiteRT interpreter, checked against the head's JSON.

`HeadRunner` loads `head_<dtype>.tflite` with the `HeadSpec` of the JSON beside it
(`tfsplit.device.spec`) and checks the model against the JSON, so a JSON copied beside the wrong
model fails at load time, not as a wrong prediction later. `LiteModel` is the interpreter alone,
which the export also uses to check what it converted. Only numpy, the standard library and
`ai_edge_litert`: this runs on a device without TensorFlow.
"""

import os

import numpy as np
from absl import logging
from ai_edge_litert.interpreter import Interpreter

from tfsplit.device import spec as spec_lib
from tfsplit.device.spec import DeviceError


def normalize_images(images, spec):
    """uint8 (N, H, W, C) pixels -> float32 (pixel / 255 - mean) / std, as in training.

    Raises:
      DeviceError: not an integer array of images of the head's shape, or pixels outside 0..255.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != spec.image_shape or not len(images):
        raise DeviceError(
            f"Images must be a batch (N, H, W, C) = (N, {', '.join(map(str, spec.image_shape))}) "
            f"for this head. Received: shape={images.shape}"
        )
    if images.dtype.kind not in "iu" or images.min() < 0 or images.max() > 255:
        raise DeviceError(
            f"Images must hold integer pixels in 0..255 (e.g. uint8). Received: dtype="
            f"{images.dtype}, range [{images.min()}, {images.max()}]"
        )
    return (images.astype(np.float32) / np.float32(255.0) - spec.mean) / spec.std


def quantize_input(normalized, quantization):
    """Normalized float32 images -> the int8 input of an int8 head: round(x / s) + zp, clipped.

    The export calibrates and checks its int8 heads with this same arithmetic.
    """
    scale, zero_point = quantization
    q = np.rint(np.asarray(normalized, np.float32) / np.float32(scale)) + np.float32(zero_point)
    return np.clip(q, spec_lib.INT8_MIN, spec_lib.INT8_MAX).astype(np.int8)


class LiteModel:
    """A .tflite model in the LiteRT interpreter, its batch size following each input.

    Args:
      model: path of a .tflite file, or its flatbuffer bytes.
      num_threads: interpreter threads; None lets LiteRT choose.

    Attributes:
      input_detail, output_detail: the interpreter's details of the first input and output.
      input_quantization, output_quantization: (scale, zero_point) of int8 tensors, else None.

    Raises:
      DeviceError: bytes or a file that LiteRT cannot load.
    """

    def __init__(self, model, num_threads=None):
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
        try:
            self._interpreter = Interpreter(**source, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            name = "The model bytes" if isinstance(model, bytes) else model
            raise DeviceError(f"{name} is not a loadable TFLite model: {error}") from None
        self.input_detail = self._interpreter.get_input_details()[0]
        self.output_detail = self._interpreter.get_output_details()[0]
        self.input_quantization = spec_lib.tensor_quantization(self.input_detail)
        self.output_quantization = spec_lib.tensor_quantization(self.output_detail)
        self._input_shape = tuple(self.input_detail["shape"])

    def __call__(self, model_input):
        """Runs the interpreter on a prepared input batch; returns a copy of its output."""
        if model_input.shape != self._input_shape:
            index = self.input_detail["index"]
            self._interpreter.resize_tensor_input(index, model_input.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._input_shape = model_input.shape
        self._interpreter.set_tensor(self.input_detail["index"], model_input)
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self.output_detail["index"]))


class HeadRunner:
    """A head .tflite in the LiteRT interpreter, checked against its JSON.

    Args:
      model_path: the head .tflite file.
      metadata_path: its JSON; by default the file beside it with the .json extension.
      num_threads: interpreter threads (1: what a small device core gives a model).

    Attributes:
      spec: the `HeadSpec`.

    Raises:
      DeviceError: a missing or unreadable model, a bad JSON, or a model whose input/output
        shapes, dtypes or int8 quantization differ from the JSON's.
    """

    def __init__(self, model_path, metadata_path=None, num_threads=1):
        if not isinstance(model_path, (str, os.PathLike)) or not os.path.isfile(model_path):
            raise DeviceError(f"No head model at {model_path!r}: expected a .tflite file.")
        spec_lib.check_count("num_threads", num_threads)
        if metadata_path is None:
            metadata_path = os.path.splitext(os.fspath(model_path))[0] + ".json"
        self.spec = spec_lib.load_spec(metadata_path)
        self.model_path = os.fspath(model_path)
        self._model = LiteModel(self.model_path, num_threads)
        self._check_against_spec()
        logging.info("Loaded %s head %s on %d thread(s)", self.spec.dtype, model_path, num_threads)

    def _check_against_spec(self):
        spec, model = self.spec, self._model
        input_shape = tuple(int(s) for s in model.input_detail["shape"][1:])
        output_shape = tuple(int(s) for s in model.output_detail["shape"][1:])
        found = {
            "input shape": (input_shape, spec.image_shape),
            "input quantization": (model.input_quantization, spec.input_quantization),
            "output shape": (output_shape, spec.output_shape),
            "output quantization": (model.output_quantization, spec.output_quantization),
        }
        wrong = {name: pair for name, pair in found.items() if pair[0] != pair[1]}
        if wrong:
            details = "; ".join(f"{name}: model {m}, JSON {j}" for name, (m, j) in wrong.items())
            raise DeviceError(
                f"{self.model_path} does not match {spec.path}: {details}. Keep each "
                "head_<dtype>.tflite with the head_<dtype>.json exported with it."
            )

    def model_input(self, images):
        """uint8 (N, H, W, C) images -> the interpreter's input (normalized, int8 if quantized)."""
        normalized = normalize_images(images, self.spec)
        if self.spec.input_quantization is None:
            return normalized
        return quantize_input(normalized, self.spec.input_quantization)

    def invoke(self, model_input):
        """Runs the interpreter on a prepared input batch; returns a copy of its output."""
        return self._model(model_input)

    def __call__(self, images):
        """uint8 (N, H, W, C) images -> the head output (float32, or int8 for int8 heads)."""
        return self.invoke(self.model_input(images))
