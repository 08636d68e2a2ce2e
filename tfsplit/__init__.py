"""tfsplit: compression-aware split learning and inference on TensorFlow and Keras 2.

`tf.keras` is Keras 3 in TensorFlow 2.21 unless TF_USE_LEGACY_KERAS=1 is set before TensorFlow is
first imported; setting it here keeps `tf.keras` and `tf_keras` the same object, so no Keras 3
object can slip into a tfsplit model.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
