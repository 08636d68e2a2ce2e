"""The U-shaped split on the device without TensorFlow: the exported top trains as Keras trains it,
and the LiteRT device (head and top) trains the same model as the Keras device through a real
`tfsplit-train-server` on 127.0.0.1, with the same bytes at both cuts and no labels sent."""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import json
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfsplit import callbacks as callbacks_lib
from tfsplit import codec
from tfsplit.device.spec import DeviceError
from tfsplit.device.training import TrainableHead, TrainingClient
from tfsplit.device.training.top import TOP_LAYOUT_FILE, TrainableTop
from tfsplit.device.training.ushaped import UShapedDeviceTrainer
from tfsplit.export import trainable_top
from tfsplit.export.trainable_export import check_builtins_only, optimizer_settings
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase
from tfsplit.training.server import service as service_lib

# 16x16 images, as the head's parity test (tests/test_trainable_head.py) takes them. At 32x32
# the runtimes' last-bit differences in the forward pass can flip which element a max or a ReLU
# passes its gradient to, and one step's weights then differ by about 1e-3.
INFO = types.SimpleNamespace(image_shape=(16, 16, 3), num_classes=10)


def _config(dtype="float32", dropout=False):
    """A masked U-shaped split: ResNet-18 at 1/8 width (no dropout) cut at stage 2, or the
    default VGG-11 (dropout 0.5 in its classifier), its top the classifier."""
    config = base_config("deprune")
    config.model.width_multiplier = 0.125
    if not dropout:
        config.model.backbone, config.model.cut = "resnet18", "stage2"
    config.model.top = "classifier"
    for key in ("activation_dtype", "gradient_dtype", "top_activation_dtype", "top_gradient_dtype"):
        config.wire[key] = dtype
    config.data.batch_size, config.data.augment = 8, False
    config.calibration_batches = 2
    config.phases = [phase(budget=4, epochs=1, learning_rate=0.05)]
    return config


def _split(config, side=16):
    keras.utils.set_random_seed(config.seed)
    info = types.SimpleNamespace(image_shape=(side, side, 3), num_classes=INFO.num_classes)
    return trainer.compile_split(trainer.build_split_model(config, info, remote=True), config)


def _data(count=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count,) + INFO.image_shape).astype(np.float32)
    return images, rng.integers(0, 10, count).astype(np.int32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The starting model of `_config()`'s run, and its head and top exported once."""
    config = _config()
    split = _split(config)
    out = tmp_path_factory.mktemp("ushaped") / "model"
    trainable_top.export_trainable_ushaped(split, str(out), config)
    return types.SimpleNamespace(config=config, split=split, dir=out)


def test_the_exported_top_steps_as_tensorflow_with_the_same_dropout_mask(tmp_path):
    split = _split(_config("float16", dropout=True), side=32)  # VGG's pools need 32x32
    _, top_path = trainable_top.export_trainable_ushaped(split, str(tmp_path))
    with open(top_path, "rb") as f:
        check_builtins_only(f.read())
    top = TrainableTop(tmp_path)
    assert top.dropout == {"rate": 0.5, "features": int(split.top_shape[-1])}
    rng = np.random.default_rng(0)
    middle = rng.normal(size=(6,) + top.shape).astype(np.float32)
    labels = rng.integers(0, 10, 6).astype(np.int32)
    keep = top.keep_mask(6, rng)
    assert set(np.unique(keep)) <= {0.0, 2.0}
    np.testing.assert_allclose(top.infer(middle), split.top(middle).numpy(), atol=1e-5)
    variables = split.top.trainable_variables
    before = [v.numpy() for v in variables]
    loss, logits, gradient = top.train(middle, labels, keep, learning_rate=0.1)
    x = tf.constant(middle)
    with tf.GradientTape() as tape:  # the Keras top, its dropout replaced by the same mask
        tape.watch(x)
        features = split.top.get_layer("avg_pool")(x) * keep
        want_logits = split.top.get_layer("logits")(features)
        want_loss = split.loss(labels, want_logits)
    want_gradient, *grads = tape.gradient(want_loss, [x] + variables)
    np.testing.assert_allclose(loss, want_loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-6)
    np.testing.assert_allclose(gradient, want_gradient.numpy(), atol=1e-7)
    momentum, decay, _ = optimizer_settings(split)
    weights = top.get_weights()
    for entry, old, grad in zip(top.layout["variables"], before, grads):  # Keras's first step
        got = weights[entry["offset"] : entry["offset"] + entry["size"]].reshape(entry["shape"])
        np.testing.assert_allclose(got, old - 0.1 * decay * old - 0.1 * grad.numpy(), atol=1e-7)
    assert momentum > 0  # the velocity is state: the next step uses it


def _serve(config):
    def build_split(image_shape, num_classes):
        info = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
        return trainer.build_split_model(config, info)

    servicer = service_lib.TrainingServicer(build_split)
    server, port = service_lib.serve(servicer, 0)
    return server, servicer, TrainingClient(f"127.0.0.1:{port}", deadline_s=60)


def test_the_litert_device_trains_the_keras_devices_ushaped_model(exported):
    """Float32 wires: both devices train the same head, top and middle from the same start, with
    the same payload bytes at both cuts, evaluate the same after calibrating batch norm on both
    halves, and the LiteRT device sends no label."""
    config, split, model_dir = exported.config, exported.split, exported.dir
    images, labels = _data()
    batches = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, len(labels), 8)]
    test_images, test_labels = _data(8, seed=1)

    server, keras_server, client = _serve(config)
    try:
        split.connect(client)
        schedule = trainer.phase_schedule(config)
        calibration_data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
        calibration = callbacks_lib.BatchNormCalibration(
            calibration_data, config.calibration_batches
        )
        history = split.fit(
            images,
            labels,
            batch_size=8,
            epochs=1,
            shuffle=False,
            verbose=0,
            validation_data=(test_images, test_labels),
            callbacks=[schedule, calibration],
        ).history
    finally:
        server.stop(0)
    server, litert_server, client = _serve(config)
    sent = []
    call = client.call
    client.call = lambda method, request: sent.append(request) or call(method, request)
    try:
        head, top = TrainableHead(model_dir), TrainableTop(model_dir)
        device = UShapedDeviceTrainer(head, top, client)
        device.connect()
        summary = device.fit(
            lambda epoch: batches, len(batches), lambda: [(test_images, test_labels)]
        )
    finally:
        server.stop(0)

    steps = [r for r in sent if isinstance(r, pb.StepRequest)]
    kinds = [pb.StepRequest.FORWARD, pb.StepRequest.TRAIN] * 2 + [pb.StepRequest.CALIBRATE] * 2
    assert [r.kind for r in steps] == kinds + [pb.StepRequest.EVALUATE]
    assert all(codec.decode(r.payload).labels is None for r in steps)
    for key in ("payload_bytes_up", "val_payload_bytes_up", "val_top_payload_bytes_down"):
        assert summary[f"final_{key}"] == history[key][0], key
    assert summary["final_val_loss"] == pytest.approx(history["val_loss"][0], rel=1e-4)
    for key in ("payload_bytes_up", "payload_bytes_down"):
        assert summary[f"train_{key}"] == history[key][0], key
    for key in ("top_payload_bytes_down", "top_payload_bytes_up"):
        assert summary[f"train_{key}"] == history[key][0], key
    assert summary["final_loss"] == pytest.approx(history["loss"][0], rel=1e-4)

    head_view = trainable_top._HeadOnly(split)
    modules = (
        (head, trainable_top.TrainableHead(head_view, *optimizer_settings(head_view))),
        (top, trainable_top.TrainableTop(split, *optimizer_settings(split)[:2])),
    )
    for model, module in modules:
        got = model.get_weights()
        for entry, (kind, variable) in zip(model.layout["variables"], module.state):
            if kind in ("weight", "state"):
                value = got[entry["offset"] : entry["offset"] + entry["size"]]
                np.testing.assert_allclose(
                    value, variable.numpy().ravel(), rtol=1e-4, atol=1e-5, err_msg=entry["name"]
                )
    middles = [s.trainer.split.tail.get_weights() for s in (keras_server, litert_server)]
    names = [w.name for w in keras_server.trainer.split.tail.weights]
    for name, want, got in zip(names, *middles):
        # The decoder's bias comes before a batch norm: its gradient is rounding noise, and the
        # norm's calibrated mean carries that noise too, a little of it into the later norms'
        # calibrated statistics (the plain split's device does the same).
        if name not in ("decoder/bias:0", "decoder/moving_mean:0"):
            scale = max(1.0, float(np.abs(want).max()))  # relative to the tensor's own size
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_a_top_that_does_not_match_the_head_is_refused(exported, tmp_path):
    shutil.copytree(exported.dir, tmp_path, dirs_exist_ok=True)
    layout_path = tmp_path / TOP_LAYOUT_FILE
    layout = json.loads(layout_path.read_text())
    layout["top"]["num_classes"] = 7
    layout_path.write_text(json.dumps(layout))
    with pytest.raises(DeviceError, match="different exports"):
        UShapedDeviceTrainer(TrainableHead(tmp_path), TrainableTop(tmp_path), client=None)
    layout["top"]["top_activation_dtype"] = "float64"
    layout_path.write_text(json.dumps(layout))
    with pytest.raises(DeviceError, match="must describe the second cut"):
        TrainableTop(tmp_path)
