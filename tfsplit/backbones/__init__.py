"""Backbones with named cut points, and the splitter that cuts any functional model in two.

A backbone is registered in `_REGISTRY` under its name with three things: a builder taking
(num_classes, input_shape, width_multiplier, classifier), its short cut names mapped to layer
names, and the layer names a cut may sit behind. A new family (ResNet-18, MobileNetV2) lives in its
own module that exports the same three things and gets one more `_REGISTRY` entry here.

Typical use:
  model = build_backbone("vgg11", num_classes=10, input_shape=(32, 32, 3))
  split = split_model(model, resolve_cut("vgg11", "conv5"), bottleneck=config.model.bottleneck)
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping

from tfsplit.backbones import mobilenet, resnet, vgg
from tfsplit.backbones.splitter import BOTTLENECK_KEYS, split_model
from tfsplit.engine.split_model import SplitModel


@dataclasses.dataclass(frozen=True)
class _Backbone:
    build: Callable  # (num_classes, input_shape, width_multiplier, classifier) -> keras.Model
    cut_points: Mapping  # short cut name -> layer name
    layer_names: tuple  # layers a cut may sit behind, in order


_REGISTRY = {
    **{
        name: _Backbone(
            build=functools.partial(vgg.build_vgg, name),
            cut_points=vgg.CUT_POINTS[name],
            layer_names=tuple(vgg.feature_layer_names(name)),
        )
        for name in vgg.CONFIGS
    },
    "resnet18": _Backbone(resnet.build_resnet18, resnet.CUT_POINTS, resnet.CUT_LAYERS),
    "mobilenetv2": _Backbone(
        mobilenet.build_mobilenetv2, mobilenet.CUT_POINTS, mobilenet.CUT_LAYERS
    ),
}
BACKBONES = tuple(_REGISTRY)

# Where a U-shaped split's top (on the device, with the loss) starts, for every backbone: after
# the last cut point (the top is the classifier) or after the one before it (the last block too).
TOP_POINTS = ("classifier", "last_block")

__all__ = [
    "BACKBONES",
    "BOTTLENECK_KEYS",
    "SplitModel",
    "TOP_POINTS",
    "build_backbone",
    "cut_points",
    "resolve_cut",
    "resolve_top",
    "split_model",
]


def _backbone(name):
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"Unknown backbone; expected one of {list(BACKBONES)}. Received: {name=!r}"
        )
    return _REGISTRY[name]


def build_backbone(name, num_classes, input_shape, width_multiplier=1.0, classifier="cifar"):
    """Builds the functional backbone `name` (one of `BACKBONES`), image -> logits.

    Args:
      name: backbone name, e.g. "vgg11".
      num_classes: number of logits.
      input_shape: (height, width, channels) of one image.
      width_multiplier: scales the layer widths (0.125 makes test-sized models).
      classifier: "cifar" (small head for 32x32 data); VGG also takes "imagenet" (the research
        code's head).

    Returns:
      An uncompiled `keras.Model` whose layer names match `cut_points(name)`.

    Raises:
      ValueError: for an unknown backbone or arguments the backbone rejects.
    """
    return _backbone(name).build(num_classes, input_shape, width_multiplier, classifier)


def cut_points(name):
    """Short cut names of backbone `name` mapped to the layer whose output is the cut.

    Raises:
      ValueError: for an unknown backbone.
    """
    return dict(_backbone(name).cut_points)


def resolve_cut(backbone_name, cut):
    """The layer name for `cut`, given as a short cut name ("conv5") or a layer name ("pool2").

    Args:
      backbone_name: one of `BACKBONES`.
      cut: a key of `cut_points(backbone_name)` or one of the backbone's feature layer names.

    Returns:
      The name of the layer to pass to `split_model`.

    Raises:
      ValueError: for an unknown backbone, or a cut that names neither, listing the valid ones.
    """
    backbone = _backbone(backbone_name)
    if isinstance(cut, str) and cut in backbone.cut_points:
        return backbone.cut_points[cut]
    if isinstance(cut, str) and cut in backbone.layer_names:
        return cut
    raise ValueError(
        f"Unknown cut for {backbone_name}; expected a cut name {list(backbone.cut_points)} or a "
        f"layer name {list(backbone.layer_names)}. Received: {cut=!r}"
    )


def resolve_top(backbone_name, top):
    """The layer whose output a U-shaped split sends back down to the device, for `top`: one of
    `TOP_POINTS`, or a cut as `resolve_cut` takes it.

    Raises:
      ValueError: for an unknown backbone, or a `top` that names neither.
    """
    backbone = _backbone(backbone_name)
    if top in TOP_POINTS:
        cut_layers = set(backbone.cut_points.values())
        ordered = [name for name in backbone.layer_names if name in cut_layers]
        return ordered[-1] if top == "classifier" else ordered[-2]
    try:
        return resolve_cut(backbone_name, top)
    except ValueError as error:
        raise ValueError(f"{error}; or a top point {list(TOP_POINTS)}") from None
