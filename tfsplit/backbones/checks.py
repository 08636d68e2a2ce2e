"""Argument checks shared by the backbone builders, so every backbone rejects the same mistakes."""

import math
import numbers

from tfsplit.data.common import check_positive_int


def check_backbone_arguments(
    num_classes, input_shape, width_multiplier, classifier, classifiers, family
):
    """The arguments every `build_*` takes: classes, (H, W, C), width multiplier, classifier."""
    check_positive_int("num_classes", num_classes)
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, channels). Received: {input_shape=!r}"
        )
    for label, value in zip(("height", "width", "channels"), input_shape):
        check_positive_int(f"input_shape {label}", value)
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, numbers.Real):
        raise ValueError(f"`width_multiplier` must be a number. Received: {width_multiplier=!r}")
    if not 0 < width_multiplier < math.inf:
        raise ValueError(
            f"`width_multiplier` must be finite and > 0. Received: {width_multiplier=}"
        )
    if classifier not in classifiers:
        raise ValueError(
            f"{family}: `classifier` must be one of {classifiers}. Received: {classifier=!r}"
        )
