"""The trainable head written as a LiteRT file: converted with TFLite builtins only, its op list
checked, and saved with the layout of its weight vector (`TrainableHead` is what it converts).

  tfsplit-export --workdir=/tmp/tfsplit/deprune --trainable   # a trained run's head
  tfsplit-export --config=configs/deprune.py:smoke --trainable --out=/tmp/head   # a new run's

Beside the model, `head_train.json` describes the run the head belongs to (the model digest the
server checks, the wire, the phases and the optimizer settings: what `tfsplit-device-train`
follows) and `tail_weights.pb` holds the tail the run starts from (a `TailWeightsReply`), so that
a device without TensorFlow can open a new run on the server as the TensorFlow device does.
"""

import contextlib
import io
import json
import os
import re
import tempfile

import tensorflow as tf
import tf_keras as keras

from tfsplit.device.training.head import LAYOUT_FILE, MODEL_FILE, SIGNATURES, TAIL_FILE
from tfsplit.export.run import load_run
from tfsplit.export.trainable import TrainableHead
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.schedule import build_phases
from tfsplit.training import trainer
from tfsplit.training.messages import model_digest, weights_to_protos

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


def run_description(split, config):
    """What a device that trains `split` without TensorFlow must know of its run's `config`."""
    phases = build_phases(
        [dict(p) for p in config.phases], split.channels, split.encoder is not None
    )
    data, optimizer = config.data, config.optimizer
    return dict(
        model_digest=model_digest(split),
        image_shape=[int(d) for d in split.head.input.shape[1:]],
        num_classes=int(split.tail.output.shape[-1]),
        channels=int(split.channels),
        activation_dtype=split.activation_dtype,
        gradient_dtype=split.gradient_dtype,
        masked=split.encoder is not None,
        nested_budgets=bool(split.nested_budgets),
        budget_eps=float(split.budget_eps),
        phases=[dict(vars(phase)) for phase in phases],
        seed=int(config.seed),
        gate_optimizer=split.gate_optimizer is not None,
        gate_learning_rate=float(optimizer.gate_learning_rate),
        gate_travel_fraction=float(optimizer.gate_travel_fraction),
        batch_size=int(data.batch_size),
        eval_batch_size=int(data.eval_batch_size),
        augment=bool(data.augment),
        # Its validation split: shards hold it; an image folder's is drawn from the seed.
        validation_fraction=float(data.get("validation_fraction", 0.0)),
        calibration_batches=int(config.calibration_batches),
        checkpoint_every_steps=int(config.checkpoint_every_steps),
    )


def _write_atomically(path, data):
    with open(path + ".partial", "wb") as f:
        f.write(data)
    os.replace(path + ".partial", path)


def export_trainable_head(split, out_dir, config=None):
    """Writes `head_train.tflite` and its layout `head_train.json` for a compiled `split` to
    `out_dir`, with the run's description and starting tail when `config` is given; returns the
    model's path."""
    module = TrainableHead(split, *optimizer_settings(split))
    model = convert(module)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    _write_atomically(path, model)
    layout = dict(module.layout(), signatures=list(SIGNATURES))
    if config is not None:
        layout["run"] = run_description(split, config)
        tail = pb.TailWeightsReply(weights=weights_to_protos(split.tail.get_weights()))
        _write_atomically(os.path.join(out_dir, TAIL_FILE), tail.SerializeToString())
    _write_atomically(os.path.join(out_dir, LAYOUT_FILE), json.dumps(layout, indent=1).encode())
    return path


def export_trainable_run(workdir, out_dir):
    """`export_trainable_head` of the run in `workdir`, with the optimizers of its config."""
    run = load_run(workdir)
    return export_trainable_head(trainer.compile_split(run.split, run.config), out_dir, run.config)


def export_trainable_start(config, out_dir):
    """`export_trainable_head` of the model a new run of `config` starts from (seeded as
    `tfsplit-train` builds it): what a device without TensorFlow opens the run with."""
    keras.utils.set_random_seed(config.seed)
    info = trainer.build_data(config).info
    split = trainer.build_split_model(config, info, remote=True)
    return export_trainable_head(split, out_dir, config)
