"""The trainable head written as a LiteRT file: converted with TFLite builtins only, its op list
checked, and saved with the layout of its weight vector (`TrainableHead` is what it converts).

  tfsplit-export --workdir=/tmp/tfsplit/deprune --trainable   # or export_trainable_run(...)
"""

import contextlib
import io
import json
import os
import re
import tempfile

import tensorflow as tf
import tf_keras as keras

from tfsplit.export.run import load_run
from tfsplit.export.trainable import LAYOUT_FILE, MODEL_FILE, SIGNATURES, TrainableHead
from tfsplit.training import trainer

_OP_LINE = re.compile(r"^\s+Op#\d+ (\w+)\(", re.MULTILINE)


def optimizer_settings(split):
    """(momentum, weight_decay, gate Adam settings or None) of a compiled `split`."""
    optimizer = split.optimizer
    if not isinstance(optimizer, keras.optimizers.SGD) or optimizer.nesterov:
        raise ValueError(
            "A trainable head trains with SGD (momentum, weight decay) as the runs' configs "
            f"build it. Received: {type(optimizer).__name__}"
        )
    gate = split.gate_optimizer
    adam = None
    if gate is not None:
        if not isinstance(gate, keras.optimizers.Adam) or gate.amsgrad:
            raise ValueError(
                f"The gates' optimizer must be Adam (or none). Received: {type(gate).__name__}"
            )
        adam = dict(beta_1=float(gate.beta_1), beta_2=float(gate.beta_2), epsilon=gate.epsilon)
    return float(optimizer.momentum), float(optimizer.weight_decay or 0.0), adam


def convert(module):
    """`module` as LiteRT flatbuffer bytes of builtin ops only (raises on any other op)."""
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures=module.signatures())
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        model = converter.convert()
    check_builtins_only(model)
    return model


def op_names(model):
    """The names of the ops in every subgraph (signature) of a LiteRT model."""
    report = io.StringIO()
    with contextlib.redirect_stdout(report):  # the analyzer prints its report
        tf.lite.experimental.Analyzer.analyze(model_content=model)
    return sorted(set(_OP_LINE.findall(report.getvalue())))


def check_builtins_only(model):
    """Refuses a model that holds a Flex or custom op: the device's LiteRT cannot run it."""
    bad = [name for name in op_names(model) if name.startswith("Flex") or name == "CUSTOM"]
    if bad:
        raise ValueError(f"The trainable head needs ops that are not TFLite builtins: {bad}")


def export_trainable_head(split, out_dir):
    """Writes `head_train.tflite` and its layout `head_train.json` for a compiled `split` to
    `out_dir`; returns the model's path."""
    module = TrainableHead(split, *optimizer_settings(split))
    model = convert(module)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    with open(path + ".partial", "wb") as f:
        f.write(model)
    os.replace(path + ".partial", path)
    with open(os.path.join(out_dir, LAYOUT_FILE), "w") as f:
        json.dump(dict(module.layout(), signatures=list(SIGNATURES)), f, indent=1)
    return path


def export_trainable_run(workdir, out_dir):
    """`export_trainable_head` of the run in `workdir`, with the optimizers of its config."""
    run = load_run(workdir)
    return export_trainable_head(trainer.compile_split(run.split, run.config), out_dir)
