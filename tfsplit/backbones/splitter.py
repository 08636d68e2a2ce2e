"""Cuts a functional Keras model at one layer into a device head and a server tail.

The head is the original graph up to the cut layer (plus the masked encoder); the tail replays the
layers after the cut on a new input of the wire's shape (the decoder in front). Both call the very
same layer objects as the original model, so weights are shared: training the split model trains
the original, and without a bottleneck `tail(head(x))` equals `model(x)` exactly, up to a final
softmax: the tail outputs logits (see `split_model`).

The graph is read from each layer's Keras nodes, keeping only the nodes that belong to `model`
(reachable from its outputs). That way a model can be split again after an earlier split added
nodes to its layers, and layers called with constants or keyword arguments (`x * 2.0`,
`layer(x, training=False)`) are replayed with them.
"""

import collections.abc
import numbers

import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit.engine.split_model import SplitModel
from tfsplit.engine.ushaped import UShapedSplitModel
from tfsplit.layers import logits as logits_lib
from tfsplit.layers.bottleneck import Decoder, MaskedEncoder

BOTTLENECK_KEYS = ("feature_compression", "resolution_compression", "gate_init_max")
DEFAULT_BOTTLENECK = dict(feature_compression=1, resolution_compression=1, gate_init_max=15.0)


def _check_functional(model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a tf_keras functional model. Received: model of type {type(model)}"
        )
    if not model.inputs or not model.outputs:
        raise ValueError(
            "`model` must be a functional Keras model (keras.Input plus layer calls, or a "
            "Sequential that starts with an Input); a subclassed model has no layer graph to cut. "
            f"Received: {model.name!r} of type {type(model).__name__}"
        )
    if len(model.inputs) != 1:
        raise ValueError(
            f"`model` must have exactly one input, the image. Received: {len(model.inputs)} inputs"
        )


def _producers(model):
    """Maps id(tensor) -> the node of some layer of `model` that created it (any call)."""
    producers = {}
    for layer in model.layers:
        for node in layer.inbound_nodes:
            for tensor in tf.nest.flatten(node.outputs):
                producers[id(tensor)] = node
    return producers


def topological_nodes(model):
    """The nodes of `model`'s own graph, each after the nodes it consumes; inputs excluded."""
    producers = _producers(model)
    input_ids = {id(tensor) for tensor in model.inputs}
    order, visited, done = [], set(), set()
    stack = [(tensor, False) for tensor in reversed(model.outputs)]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in input_ids:
            continue
        node = producers[id(tensor)]
        if expanded:
            if id(node) not in done:
                done.add(id(node))
                order.append(node)
        elif id(node) not in visited:
            visited.add(id(node))
            stack.append((tensor, True))
            stack.extend((parent, False) for parent in reversed(node.keras_inputs))
    return order


def _check_not_shared(nodes):
    counts = collections.Counter(node.layer.name for node in nodes)
    shared = sorted(name for name, count in counts.items() if count > 1)
    if shared:
        raise ValueError(
            "Cannot split a model whose layers are called more than once (shared layers): the "
            f"head and tail could not own them separately. Shared: {shared}"
        )


def _cut_output(model, nodes, cut, what="cut"):
    names = [node.layer.name for node in nodes]
    if not isinstance(cut, str) or cut not in names:
        raise ValueError(f"Unknown {what} layer; expected one of {names}. Received: {what}={cut!r}")
    node = nodes[names.index(cut)]
    outputs = tf.nest.flatten(node.outputs)
    if len(outputs) != 1:
        raise ValueError(
            f"The {what} layer must have one output tensor. Received: {what}={cut!r} with "
            f"{len(outputs)}"
        )
    if any(outputs[0] is output for output in model.outputs):
        raise ValueError(
            f"Cutting at an output layer leaves nothing after it. Received: {what}={cut!r}"
        )
    return outputs[0]


def _check_bottleneck_config(bottleneck):
    if bottleneck is True:
        return dict(DEFAULT_BOTTLENECK)
    config = bottleneck.to_dict() if hasattr(bottleneck, "to_dict") else bottleneck
    if not isinstance(config, collections.abc.Mapping):
        raise ValueError(
            f"`bottleneck` must be None, True, a dict or a ConfigDict with keys {BOTTLENECK_KEYS}. "
            f"Received: {bottleneck!r}"
        )
    if set(config) != set(BOTTLENECK_KEYS):
        raise ValueError(
            f"`bottleneck` must have exactly the keys {BOTTLENECK_KEYS}. "
            f"Received keys: {sorted(config)}"
        )
    for key in ("feature_compression", "resolution_compression"):
        value = config[key]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`bottleneck.{key}` must be an integer >= 1. Received: {value!r}")
    gate = config["gate_init_max"]
    if isinstance(gate, bool) or not isinstance(gate, numbers.Real) or not gate >= 0:
        raise ValueError(f"`bottleneck.gate_init_max` must be a number >= 0. Received: {gate!r}")
    return config


def _build_bottleneck(cut_tensor, config, cut):
    """Encoder and decoder for a cut output (N, H, W, C); the decoder restores (H, W, C)."""
    shape = cut_tensor.shape
    if shape.rank != 4 or None in shape[1:]:
        raise ValueError(
            "The bottleneck needs a cut output (batch, H, W, C) with static H, W and C. "
            f"Received: {cut=!r} with output shape {shape}"
        )
    height, width, channels = shape[1:]
    features = int(config["feature_compression"])
    stride = int(config["resolution_compression"])
    if channels % features:
        raise ValueError(
            f"`bottleneck.feature_compression` must divide the {channels} channels of cut "
            f"{cut!r}. Received: feature_compression={features}"
        )
    if height % stride or width % stride:
        raise ValueError(
            f"`bottleneck.resolution_compression` must divide the cut's height and width "
            f"({height}x{width} at {cut!r}) so that the decoder restores them. "
            f"Received: resolution_compression={stride}"
        )
    encoder = MaskedEncoder(
        channels // features,
        resolution_factor=stride,
        gate_init_max=float(config["gate_init_max"]),
        name="encoder",
    )
    return encoder, Decoder(channels, resolution_factor=stride, name="decoder")


def _tail_nodes(model, nodes, cut, cut_tensor):
    """The nodes downstream of `cut_tensor`, in order; checks that the cut separates the graph."""
    owners = {id(tensor): "the model input" for tensor in model.inputs}
    owners.update(
        (id(tensor), node.layer.name) for node in nodes for tensor in tf.nest.flatten(node.outputs)
    )
    downstream, tail = {id(cut_tensor)}, []
    for node in nodes:
        consumed = [id(tensor) for tensor in node.keras_inputs]
        if not any(tensor in downstream for tensor in consumed):
            continue
        crossing = sorted({owners[tensor] for tensor in consumed if tensor not in downstream})
        if crossing:
            raise ValueError(
                f"Cut {cut!r} does not separate the model: layer {node.layer.name!r} after the "
                f"cut also consumes the output of {crossing} from before it (e.g. a skip "
                "connection across the cut). Cut where one tensor carries everything, e.g. after "
                "a residual Add."
            )
        downstream.update(id(tensor) for tensor in tf.nest.flatten(node.outputs))
        tail.append(node)
    before_cut = sorted(owners[id(t)] for t in model.outputs if id(t) not in downstream)
    if before_cut:
        raise ValueError(
            f"Cut {cut!r} does not separate the model: the outputs of {before_cut} are computed "
            "before it."
        )
    return tail


def _replay(model, tail_nodes, cut_tensor, tail_start, ends=None):
    """Calls the tail layers again, with their original arguments, on `tail_start`, and returns
    what becomes of `ends` (the model's outputs by default); a model output that comes out of a
    softmax comes out as the logits under it instead."""
    rebuilt = {id(cut_tensor): tail_start}
    output_ids = {id(tensor) for tensor in model.outputs}
    for node in tail_nodes:
        args, kwargs = tf.nest.map_structure(
            lambda value: rebuilt.get(id(value), value), (node.call_args, node.call_kwargs)
        )
        layer = node.layer
        is_output = any(id(tensor) in output_ids for tensor in tf.nest.flatten(node.outputs))
        if is_output and logits_lib.is_softmax_layer(layer):
            logging.info("The tail outputs logits: the softmax layer %r is left out.", layer.name)
            outputs = rebuilt[id(node.keras_inputs[0])]
        elif is_output and logits_lib.has_softmax_activation(layer):
            logging.info("The tail outputs logits: %r runs without its softmax.", layer.name)
            outputs = logits_lib.Logits(layer, name=f"{layer.name}_logits")(*args, **kwargs)
        else:
            outputs = layer(*args, **kwargs)
        for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
            rebuilt[id(old)] = new
    outputs = [rebuilt[id(tensor)] for tensor in (model.outputs if ends is None else ends)]
    return outputs[0] if len(outputs) == 1 else outputs


def _split_top(model, nodes, cut, tail_nodes, top):
    """(the nodes of the middle, the second cut's tensor, the nodes of the top) for `top`, the
    layer whose output goes back down to the device."""
    top_tensor = _cut_output(model, nodes, top, "top")
    top_nodes = _tail_nodes(model, nodes, top, top_tensor)
    ids = {id(node) for node in tail_nodes}
    if not top_nodes or not all(id(node) in ids for node in top_nodes) or top == cut:
        raise ValueError(
            f"The top must start after the cut: `top` names a layer after {cut!r} whose output "
            f"the device takes back. Received: {top=!r}"
        )
    on_top = {id(node) for node in top_nodes}
    middle = [node for node in tail_nodes if id(node) not in on_top]
    if not any(node.layer.name == top for node in middle):
        raise ValueError(f"The middle between {cut!r} and {top!r} is empty. Received: {top=!r}")
    return middle, top_tensor, top_nodes


def split_model(model, cut, bottleneck=None, top=None, **options):
    """Cuts `model` after layer `cut` into head and tail that share its weights; with `top`,
    after layer `top` too, into head, middle and top (the U-shape: labels stay on the device).

    Args:
      model: a functional tf_keras model with one input (a Sequential with an Input counts).
      cut: name of the layer whose output crosses the network (see `resolve_cut` for backbones).
      bottleneck: None for plain split learning, True for the reference bottleneck (all channels
        of the cut, no stride, gates nearly open), or a dict / ConfigDict with exactly the keys
        `feature_compression` (C' = C // it), `resolution_compression` (encoder stride; the
        decoder undoes it) and `gate_init_max` (gate logits start uniform in [0, it]).
      **options: the wire and budget-loss settings of `tfsplit.SplitModel`.

    Returns:
      A `tfsplit.SplitModel` (a `tfsplit.UShapedSplitModel` with `top`); with a bottleneck its head ends with the layer "encoder" and its
      tail starts with the layer "decoder". Its tail outputs logits, which its losses, the
      networked server and the exported tail (a softmax on top) all expect. When `model` ends in a
      softmax, as keras.applications models do, the tail leaves it out: a final `Softmax` or
      `Activation("softmax")` layer is dropped, and a final layer with a softmax activation
      (`Dense(classes, activation="softmax")`) runs without it (`tfsplit.layers.logits.Logits`,
      the same layer and weights). So `split(x)` and `predict` give logits, and
      `keras.activations.softmax(split(x))` the probabilities `model` gives; `model` itself is
      left as it was.

    Raises:
      ValueError: when `model` is not functional, has several inputs or shared layers; when `cut`
        or `top` is not one of its layers or does not separate the graph (a skip connection
        across it), or `top` does not come after `cut`;
        when the bottleneck config is malformed or does not fit the cut's shape.
    """
    _check_functional(model)
    config = None if bottleneck is None else _check_bottleneck_config(bottleneck)
    nodes = topological_nodes(model)
    _check_not_shared(nodes)
    cut_tensor = _cut_output(model, nodes, cut)
    tail_nodes = _tail_nodes(model, nodes, cut, cut_tensor)
    encoder, decoder = (
        (None, None) if config is None else _build_bottleneck(cut_tensor, config, cut)
    )
    wire = cut_tensor if encoder is None else encoder(cut_tensor)
    head = keras.Model(model.inputs[0], wire, name=f"{model.name}_head")
    wire_input = keras.Input(shape=wire.shape[1:], dtype=wire.dtype, name="wire")
    tail_start = wire_input if decoder is None else decoder(wire_input)
    if top is None:
        outputs = _replay(model, tail_nodes, cut_tensor, tail_start)
        tail = keras.Model(wire_input, outputs, name=f"{model.name}_tail")
        split = SplitModel(head, tail, cut=cut, name=f"{model.name}_split", **options)
    else:
        middle, top_tensor, top_nodes = _split_top(model, nodes, cut, tail_nodes, top)
        outputs = _replay(model, middle, cut_tensor, tail_start, [top_tensor])
        tail = keras.Model(wire_input, outputs, name=f"{model.name}_middle")
        top_input = keras.Input(shape=top_tensor.shape[1:], dtype=top_tensor.dtype, name="top")
        top_model = keras.Model(
            top_input, _replay(model, top_nodes, top_tensor, top_input), name=f"{model.name}_top"
        )
        split = UShapedSplitModel(
            head, tail, top_model, cut=cut, top_cut=top, name=f"{model.name}_split", **options
        )
    logging.info(
        "Split %s at %r: wire %s, head %d weights, tail %d weights.",
        model.name,
        cut,
        split.wire_shape,
        head.count_params(),
        tail.count_params(),
    )
    return split
