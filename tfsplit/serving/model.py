"""The served tail: one SavedModel version, one signature, validated thread-safe predictions."""

import os
import threading

import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from tfsplit.serving import validation
from tfsplit.serving.validation import TailModelError

_SAVED_MODEL_FILE = "saved_model.pb"


def _numeric_versions(base):
    """{version: directory} for the numeric subdirectories of `base` that hold a SavedModel."""
    if not os.path.isdir(base):
        return {}
    return {
        int(entry): os.path.join(base, entry)
        for entry in os.listdir(base)
        if entry.isdigit() and os.path.isfile(os.path.join(base, entry, _SAVED_MODEL_FILE))
    }


def resolve_version_dir(model_base_path, model_name, version=None):
    """Finds the SavedModel directory of a version (the latest numeric one by default).

    Accepts both layouts in use: TF Serving's `--model_base_path` (the directory that holds the
    version directories) and the Docker image's base (`<base>/<model_name>/<version>`), in that
    order.

    Returns:
      (version_dir, version).

    Raises:
      TailModelError: no numeric version directory with a saved_model.pb, or not the one asked.
    """
    candidates = [model_base_path, os.path.join(model_base_path, model_name)]
    for base in candidates:
        versions = _numeric_versions(base)
        if versions:
            break
    else:
        raise TailModelError(
            f"No numeric version directory holding {_SAVED_MODEL_FILE} under any of {candidates}."
        )
    if version is None:
        version = max(versions)
    if version not in versions:
        raise TailModelError(
            f"Version {version} not found under {base}. Available: {sorted(versions)}"
        )
    return versions[version], version


def _read_signature_def(version_dir, signature_name):
    """The SignatureDef proto of the served signature, as GetModelMetadata returns it."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, _SAVED_MODEL_FILE), "rb") as f:
        saved_model.ParseFromString(f.read())
    return saved_model.meta_graphs[0].signature_def[signature_name]


class ServedTail:
    """A loaded tail SavedModel that answers only requests that pass validation.

    Args:
      model_base_path: the directory with numeric version subdirectories, or the one holding
        `<model_name>/<version>/` (see `resolve_version_dir`).
      model_name: the name clients address.
      version: the version to load; None loads the latest.
      signature_name: the signature to serve; None takes the one named in tfsplit_tail.json, else
        serving_default.
      channels: bottleneck width C for a SavedModel exported without tfsplit_tail.json; without
        it such a model is served with indices checked only for sign and distinctness.
      max_batch_size: the largest batch N accepted in one request.

    Raises:
      TailModelError: nothing servable at the path, or a signature that is not a tail's.
    """

    def __init__(
        self,
        model_base_path,
        model_name,
        version=None,
        signature_name=None,
        channels=None,
        max_batch_size=256,
    ):
        if not isinstance(model_name, str) or not model_name or "/" in model_name:
            raise ValueError(f"`model_name` must be a name without '/'. Received: {model_name!r}")
        if type(max_batch_size) is not int or max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1. Received: {max_batch_size!r}")
        self.name = model_name
        self.max_batch_size = max_batch_size
        self.version_dir, self.version = resolve_version_dir(model_base_path, model_name, version)
        spec_path = os.path.join(self.version_dir, validation.SPEC_FILE)
        spec_file = validation.read_spec_file(spec_path) if os.path.exists(spec_path) else None
        if signature_name is None:
            signature_name = spec_file["signature"] if spec_file else validation.DEFAULT_SIGNATURE
        self._loaded = tf.saved_model.load(self.version_dir)
        if signature_name not in self._loaded.signatures:
            raise TailModelError(
                f"Signature {signature_name!r} not found in {self.version_dir}. "
                f"Available: {sorted(self._loaded.signatures)}"
            )
        self._signature = self._loaded.signatures[signature_name]
        self.spec = validation.build_tail_spec(self._signature, signature_name, spec_file, channels)
        self.signature_def = _read_signature_def(self.version_dir, signature_name)
        self._lock = threading.Lock()
        logging.info(
            "Loaded model %r version %d from %s: %s",
            self.name,
            self.version,
            self.version_dir,
            self.spec,
        )
        if spec_file is None and self.spec.channels is None:
            logging.warning(
                "%s is missing and no channel count was given: indices are checked for sign and "
                "distinctness only, and budgets are not limited (pass channels=C).",
                validation.SPEC_FILE,
            )

    def check_target(self, name, version, label, signature_name):
        """Raises RequestError unless the request addresses this model, version and signature."""
        validation.check_target(
            self.spec, self.name, self.version, name, version, label, signature_name
        )

    def _output_names(self, output_filter):
        if unknown := sorted(set(output_filter) - set(self.spec.output_names)):
            raise validation.invalid(
                f"Unknown output(s) {unknown} in the output filter; the signature "
                f"{self.spec.signature_name!r} returns {list(self.spec.output_names)}."
            )
        return sorted(set(output_filter)) or list(self.spec.output_names)

    def predict(self, arrays, output_filter=()):
        """Validates decoded inputs, then runs the signature (one call at a time).

        Calls are serialised with a lock: a shared loaded function is then safe however the
        frontends thread their requests, and the memory of concurrent batches stays bounded.

        Args:
          arrays: dict from input name to numpy array.
          output_filter: output names to return; empty returns all.

        Returns:
          dict from output name to numpy array.

        Raises:
          RequestError: the request fails validation, or TensorFlow rejects it anyway.
        """
        validation.validate_inputs(self.spec, arrays, self.max_batch_size)
        names = self._output_names(output_filter)
        with self._lock:
            try:
                outputs = self._signature(**{key: tf.constant(arrays[key]) for key in arrays})
            except tf.errors.InvalidArgumentError as error:
                raise validation.invalid(
                    f"The model rejected the request: {error.message}"
                ) from None
        return {name: outputs[name].numpy() for name in names}

    def signature_def_map(self):
        """The GetModelMetadata `signature_def` field: the served signature only."""
        return get_model_metadata_pb2.SignatureDefMap(
            signature_def={self.spec.signature_name: self.signature_def}
        )
