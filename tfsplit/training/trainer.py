"""Config -> data -> `SplitModel` -> `fit` with the run's callbacks.

A workdir holds `config.json`, `metrics.jsonl`, `summary.json`, `checkpoints/` (the backup a
killed run resumes from, every `checkpoint_every_steps` steps, and the final `model.keras`) and
`tensorboard/`. Re-running on the same workdir resumes from the last backup.

Every epoch is evaluated on the validation split held out of the training set; the test set is
evaluated once, after the last epoch, and only reported (`final_test_accuracy`).
"""

import dataclasses
import json
import os
import sys

import tensorflow as tf
import tf_keras as keras
from absl import logging

from tfsplit import backbones as models
from tfsplit import callbacks as callbacks_lib
from tfsplit import codec, data
from tfsplit.engine import randomness
from tfsplit.engine.split_model import SplitModel
from tfsplit.training.client import HeadAveraging, RemoteCheckpoint, RemoteSplitModel, RemoteTail
from tfsplit.training.codec_step import CodecSplitModel
from tfsplit.training.ushaped_client import RemoteUShapedSplitModel

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = os.path.join(CHECKPOINT_DIR, "backup")
MODEL_FILE = os.path.join(CHECKPOINT_DIR, "model.keras")
TENSORBOARD_DIR = "tensorboard"
TRANSPORTS = {"fused": SplitModel, "codec": CodecSplitModel}
GATE_OPTIMIZERS = ("shared", "adam")


def _check_choice(key, value, allowed):
    if value not in allowed:
        raise ValueError(f"config.{key} must be one of {tuple(allowed)}. Received: {value!r}")


def _wire_and_top(config, remote):
    """(the wire's settings, `split_model`'s U-shaped arguments) of `config`, checked: the
    first cut's noise defence and the binary task train in process only."""
    # Runs recorded before the U-shaped split and the noise defence existed have neither key.
    top_point = config.model.get("top", "")
    wire_config = dict(top_activation_dtype="float16", top_gradient_dtype="float16")
    wire_config.update(gradient_noise=0.0, top_gradient_noise=0.0)
    wire_config.update(config.wire.to_dict())
    for key in ("activation_dtype", "gradient_dtype", "top_activation_dtype", "top_gradient_dtype"):
        _check_choice(f"wire.{key}", wire_config[key], codec.WIRE_DTYPES)
    _check_choice("wire.transport", config.wire.transport, TRANSPORTS)
    in_process_only = dict(
        data_binary_class=config.data.get("binary_class", -1) >= 0,
        wire_gradient_noise=wire_config["gradient_noise"],
    )
    if any(in_process_only.values()) and (remote or config.wire.transport != "fused"):
        raise ValueError(
            "The gradient noise defence at the first cut and the binary task train in process, "
            "with config.wire.transport='fused'; the training server carries neither. Received: "
            f"{in_process_only}, wire.transport={config.wire.transport!r}, networked={remote}"
        )
    if top_point and config.wire.transport != "fused":
        raise ValueError(
            "A U-shaped split (config.model.top) trains in process with "
            "config.wire.transport='fused', or over the network; the codec transport carries "
            f"the plain split. Received: wire.transport={config.wire.transport!r}"
        )
    for key in ("gradient_noise", "top_gradient_noise"):
        noise = wire_config[key]
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ValueError(f"config.wire.{key} must be a number >= 0. Received: {noise!r}")
    top = {}
    if top_point:
        top = dict(
            top=models.resolve_top(config.model.backbone, top_point),
            top_activation_dtype=wire_config["top_activation_dtype"],
            top_gradient_dtype=wire_config["top_gradient_dtype"],
            top_gradient_noise=wire_config["top_gradient_noise"],
        )
    elif wire_config["top_gradient_noise"]:
        raise ValueError(
            "config.wire.top_gradient_noise perturbs a U-shaped split's second cut; set "
            "config.model.top too, or leave it 0."
        )
    return wire_config, top


def build_split_model(config, info, remote=False):
    """The backbone of `config.model`, cut, with the masked bottleneck if enabled; compiled.

    `remote` builds the device half of networked training (`RemoteSplitModel`, to `connect`).
    """
    wire_config, top = _wire_and_top(config, remote)
    backbone = models.build_backbone(
        config.model.backbone,
        num_classes=info.num_classes,
        input_shape=info.image_shape,
        width_multiplier=config.model.width_multiplier,
        classifier=config.model.classifier,
    )
    bottleneck = config.model.bottleneck
    if bottleneck.enabled:
        bottleneck = {key: bottleneck[key] for key in models.BOTTLENECK_KEYS}
    else:
        bottleneck = None
    split = models.split_model(
        backbone,
        models.resolve_cut(config.model.backbone, config.model.cut),
        bottleneck=bottleneck,
        activation_dtype=config.wire.activation_dtype,
        gradient_dtype=config.wire.gradient_dtype,
        gradient_noise=wire_config["gradient_noise"],
        budget_eps=config.budget_loss.eps,
        budget_delta=config.budget_loss.delta,
        nested_budgets=config.budget_sampling.nested,
        min_budget_fraction=config.budget_sampling.min_fraction,
        seed=config.seed,
        polarization=config.budget_loss.polarization,
        local_loss_weight=config.model.local_loss_weight,
        **top,
    )
    if remote or config.wire.transport != "fused":
        if remote:
            model_class = RemoteUShapedSplitModel if top else RemoteSplitModel
        else:
            model_class = TRANSPORTS[config.wire.transport]
        other = model_class.from_config(split.get_config())
        for part in ("head", "tail", "top") if top else ("head", "tail"):
            getattr(other, part).set_weights(getattr(split, part).get_weights())
        split = other
    # Dropout draws from generators the backup keeps: a resumed run draws the masks it would have.
    split.dropout_draws = randomness.checkpointed_draws(split, config.seed)
    return compile_split(split, config)


def compile_split(split, config):
    """Compiles `split` with the optimizers of `config` (SGD with momentum and weight decay, and
    the gates' own when the config has one); returns it."""
    optimizer = keras.optimizers.SGD(
        learning_rate=config.phases[0]["learning_rate"],
        momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay or None,
    )
    split.compile(optimizer, gate_optimizer=build_gate_optimizer(config))
    return split


def build_gate_optimizer(config):
    """None (gates share the main SGD, as in the reference) or Adam for the gate logits alone.

    The budget loss (eps=1000) can move a gate logit by tens of units in one SGD step, far past
    the sigmoid's slope; Adam's steps are bounded by its learning rate whatever eps is, so gates
    settle where the penalty and the task loss balance instead of collapsing.
    """
    kind = config.optimizer.gate_optimizer
    _check_choice("optimizer.gate_optimizer", kind, GATE_OPTIMIZERS)
    if kind == "shared":
        return None
    if not config.optimizer.gate_learning_rate > 0:
        raise ValueError(
            "config.optimizer.gate_learning_rate must be > 0. Received: "
            f"{config.optimizer.gate_learning_rate!r}"
        )
    if not 0.0 <= config.optimizer.gate_beta_2 < 1.0:
        raise ValueError(
            "config.optimizer.gate_beta_2 must be in [0, 1). Received: "
            f"{config.optimizer.gate_beta_2!r}"
        )
    return keras.optimizers.Adam(
        config.optimizer.gate_learning_rate, beta_2=config.optimizer.gate_beta_2
    )


def data_arguments(config):
    """What identifies a run's data, shared by training and by everything that reloads a run."""
    return dict(
        path=config.data.path or None,
        seed=config.seed,
        train_size=config.data.train_size or None,
        test_size=config.data.test_size or None,
        image_size=config.data.image_size or None,
        channels=config.data.channels or None,
    )


def load_run_arrays(config, **sizes):
    """(train, test, info) arrays of the data a run's `config` trained on, in stored order.

    `sizes` (train_size, test_size) override the config's to read less. A "shards" run reads its
    shard directory back whole: the shards fixed the sizes (training refused size arguments).
    """
    if config.data.name == "shards":
        return data.load_shard_arrays(config.data.path)
    return data.load_arrays(config.data.name, **dict(data_arguments(config), **sizes))


def build_data(config, position=None):
    """`Splits(train, validation, test, info)` of `config.data`; with `binary_class` >= 0, the
    task "that class or another" (label 1 or 0), as in the label-leakage literature's binary
    tasks. A run recorded before the validation split existed has none (validation is None).
    `position`: the training data's position variable (`data.build_datasets`)."""
    splits = _build_datasets(config, position)
    positive = config.data.get("binary_class", -1)
    if positive < 0:
        return splits
    info = splits.info
    if not isinstance(positive, int) or positive >= info.num_classes:
        raise ValueError(
            f"config.data.binary_class must be -1 (off) or a class of {info.name}, 0 to "
            f"{info.num_classes - 1}. Received: {positive!r}"
        )

    def binary(images, labels):
        return images, tf.cast(labels == positive, labels.dtype)

    return data.Splits(
        *(None if ds is None else ds.map(binary) for ds in splits[:3]),
        dataclasses.replace(info, num_classes=2),
    )


def _build_datasets(config, position):
    return data.build_datasets(
        config.data.name,
        batch_size=config.data.batch_size,
        eval_batch_size=config.data.eval_batch_size,
        augment=config.data.augment,
        # Runs recorded before these keys existed trained on the whole set.
        shard_index=config.data.get("shard_index", 0),
        num_shards=config.data.get("num_shards", 1),
        cache=config.data.get("cache", False),
        service_address=config.data.get("service_address", "") or None,
        local_cache_dir=config.data.get("local_cache_dir", "") or None,
        validation_fraction=config.data.get("validation_fraction", 0.0),
        position=position,
        **data_arguments(config),
    )


def load_model(workdir):
    """The trained `SplitModel` of a finished run in `workdir`."""
    path = os.path.join(workdir, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No trained model at {path}; expected the workdir of a finished tfsplit-train run."
        )
    return keras.models.load_model(path, compile=False)


def restore_weights(split, source_workdir):
    """Copies head and tail weights of another finished run (prune's start model)."""
    source = load_model(source_workdir)
    if hasattr(split, "top") != hasattr(source, "top"):
        raise ValueError(
            f"The run in {source_workdir} and this one must both be U-shaped or both plain "
            "(config.model.top set in both or in neither)."
        )
    for part in ("head", "tail", "top") if hasattr(split, "top") else ("head", "tail"):
        getattr(split, part).set_weights(getattr(source, part).get_weights())
    logging.info("Initialised weights from %s", source_workdir)


def build_callbacks(config, workdir, info, train_ds):
    """PhaseSchedule, batch norm calibration (on `train_ds`), records, TensorBoard and the backup,
    in the order they must act."""
    if not isinstance(config.checkpoint_every_steps, int) or config.checkpoint_every_steps < 1:
        raise ValueError(
            "config.checkpoint_every_steps must be a positive integer. Received: "
            f"{config.checkpoint_every_steps!r}"
        )
    summary = dict(
        mode=config.mode,
        dataset=info.name,
        model=f"{config.model.backbone}@{config.model.cut}",
    )
    if config.model.get("top", ""):
        summary["model"] += f", top after {config.model.top}"
    calibration = config.calibration_batches
    if not isinstance(calibration, int) or calibration < 0:
        raise ValueError(
            f"config.calibration_batches must be an integer >= 0. Received: {calibration!r}"
        )
    schedule = [phase_schedule(config)]
    if calibration:
        schedule.append(callbacks_lib.BatchNormCalibration(train_ds, calibration))
    return schedule + [
        callbacks_lib.RunRecords(
            workdir, info.train_size, summary, model_path=os.path.join(workdir, MODEL_FILE)
        ),
        keras.callbacks.TensorBoard(
            os.path.join(workdir, TENSORBOARD_DIR), write_graph=False, profile_batch=0
        ),
        keras.callbacks.BackupAndRestore(
            os.path.join(workdir, BACKUP_DIR), save_freq=config.checkpoint_every_steps
        ),
    ]


def phase_schedule(config):
    """The `PhaseSchedule` callback of `config`'s phases, seed and gates' travel rate."""
    return callbacks_lib.PhaseSchedule(
        config.phases, seed=config.seed, gate_travel_fraction=config.optimizer.gate_travel_fraction
    )


def train(config, workdir, verbose="auto", client=None, measure=()):
    """Trains `config` in `workdir`, resuming from its last backup; returns the run's summary.

    A workdir whose run already finished returns its summary without training again. `verbose`
    is `fit`'s; "auto" shows the progress bar on a terminal and a line per epoch elsewhere.
    With `client` (a `TrainingClient` to a `tfsplit-train-server` of the same config), this
    process is the device and the tail trains on the server. `measure` holds callbacks that add
    logs at each epoch's end for `metrics.jsonl` (keys starting "leakage_"; see
    `tfsplit.eval.leakage.LeakageProbe`); they run just before the records are written.
    """
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    write_config(config, workdir)
    summary_path = os.path.join(workdir, callbacks_lib.SUMMARY_FILE)
    if os.path.exists(summary_path) and os.path.exists(os.path.join(workdir, MODEL_FILE)):
        with open(summary_path) as f:
            summary = json.load(f)
        if "final_test_accuracy" in summary:
            logging.info("%s already holds a finished run.", workdir)
            return summary
        logging.info("%s holds a trained model; its test set is evaluated now.", workdir)
        return _test_once(load_model(workdir), build_data(config).test, workdir)
    keras.utils.set_random_seed(config.seed)
    position = data.pipeline.new_position()
    splits = build_data(config, position)
    train_ds, info = splits.train, splits.info
    split = build_split_model(config, info, remote=client is not None)
    if config.init_from and not os.path.isdir(os.path.join(workdir, BACKUP_DIR)):
        restore_weights(split, config.init_from)
    callbacks = build_callbacks(config, workdir, info, train_ds)
    at_records = next(i for i, c in enumerate(callbacks) if isinstance(c, callbacks_lib.RunRecords))
    callbacks[at_records:at_records] = list(measure)
    if client is not None:
        split.connect(client, device_id=f"device-{config.data.get('shard_index', 0)}")
        records = next(
            i for i, c in enumerate(callbacks) if isinstance(c, callbacks_lib.RunRecords)
        )
        callbacks.insert(records, RemoteTail())
        if split.parallel:  # before the evaluation and the records: they see the average
            callbacks.insert(1, HeadAveraging(info.train_size, config.average_every_steps))
        callbacks.append(RemoteCheckpoint(config.checkpoint_every_steps))  # after the backup
    callbacks.append(callbacks_lib.DataPosition(position))  # after the backup is restored
    # Training randomness (dropout) starts from the seed whatever building the model consumed.
    keras.utils.set_random_seed(config.seed)
    split.fit(
        train_ds,
        epochs=callbacks[0].epochs,
        validation_data=splits.validation,
        callbacks=callbacks,
        verbose=verbose,
    )
    calibration = [c for c in callbacks if isinstance(c, callbacks_lib.BatchNormCalibration)]
    summary = _test_once(split, splits.test, workdir, calibration)
    if client is not None:
        split.leave()  # its slot frees now, not after the server's device timeout
    return summary


def _test_once(split, test_ds, workdir, callbacks=()):
    """Evaluates the trained `split` on the test set, once, and adds the result to the run's
    summary (every choice before was made on the validation split)."""
    logs = split.evaluate(test_ds, callbacks=list(callbacks), return_dict=True, verbose=0)
    summary = callbacks_lib.add_test_result(workdir, logs)
    logging.info(
        "Test accuracy %.4f (validation %s), evaluated once at the end.",
        summary["final_test_accuracy"],
        "none" if summary.get("final_val_accuracy") is None else summary["final_val_accuracy"],
    )
    return summary


def write_config(config, workdir):
    """Records the resolved config; refuses to resume a workdir that holds a different one."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != json.loads(text):
                raise ValueError(
                    f"{workdir} holds a run with a different config ({path}); resume it with the "
                    "same config and overrides, or train into a new workdir."
                )
        return
    with open(path, "w") as f:
        f.write(text)
