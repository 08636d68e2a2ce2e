"""tfsplit: compression-aware split learning and inference on TensorFlow and Keras 2.

`tf.keras` is Keras 3 in TensorFlow 2.21 unless TF_USE_LEGACY_KERAS=1 is set before TensorFlow is
first imported; setting it here keeps `tf.keras` and `tf_keras` the same object, so no Keras 3
object can slip into a tfsplit model.
"""

import importlib
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# The Keras-facing API, imported on first use so that the TF-free `tfsplit.device` package can be
# imported on a device without TensorFlow.
_LAZY = {
    "SplitModel": "tfsplit.engine.split_model",
    "UShapedSplitModel": "tfsplit.engine.ushaped",
    "split_model": "tfsplit.backbones.splitter",
    "PhaseSchedule": "tfsplit.callbacks",
    "BatchNormCalibration": "tfsplit.callbacks",
    "Phase": "tfsplit.schedule",
    "load_model": "tfsplit.training.trainer",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfsplit' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
