"""The server's tail under `tf.distribute.MirroredStrategy` on 2 logical CPU devices trains as the
tail on one device: the same steps give the same replies, weights, optimizer state and batch norm
statistics, and its checkpoint and step log restore on a new mirrored server.

TensorFlow fixes its devices at its first op, so the comparison runs in a process of its own: this
file, run as a program, prints what it measured as JSON.
"""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import tf_keras as keras
from test_server_hardening import SHAPES, build_split, hello_request, train_request

from tfsplit import codec
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol.framing import reply_logits
from tfsplit.training.messages import model_digest, weights_to_protos
from tfsplit.training.server import distributed
from tfsplit.training.server.tail_trainer import TailTrainer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Batch sizes of the training steps: even, odd (the replicas' parts differ by one), and one sample
# (one replica's part is empty).
TRAIN_BATCHES = (32, 7, 1, 32)


def test_a_mirrored_tail_trains_as_the_tail_on_one_device():
    ran = subprocess.run(
        [sys.executable, __file__],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert len(report["steps"]) == len(TRAIN_BATCHES)
    # Float rounding, relative to each quantity's size: the replicas add the batch's parts in
    # another order. A tiny tail on random data amplifies it: on one device alone, weights moved
    # by 1e-7 (relative) moved a step's gradient by up to 3e-3, and updates differed here by
    # about 1e-6, and 1.7e-4 in one of six unseeded runs. Without the synchronized batch norm they
    # differ by 7e-2. The gradients go back in float16, whose step is 1e-3 relative.
    for step in report["steps"]:
        assert step["update"] < 1e-3, report
        assert step["gradient"] < 2e-3, report
        assert step["logits"] < 1e-5, report
    assert report["calibration_logits"] < 1e-5, report
    assert report["evaluation_logits"] < 1e-5, report
    assert report["joined_batch_gradient"] < 1e-5, report
    assert report["restored_difference"] == 0.0, report


def _variables(trainer):
    split = trainer.split
    return split.tail.variables + split.optimizer.variables()


def _values(trainer):
    return [v.numpy() for v in _variables(trainer)]


def _align(one, mirrored):
    """The mirrored server's weights and optimizer state set to the one device server's."""
    for mine, theirs in zip(_variables(mirrored), _variables(one)):
        mine.assign(theirs)


def _relative(x, y):
    """||x - y|| / ||x|| over arrays, as one vector."""
    x, y = (np.concatenate([np.ravel(a) for a in arrays]) for arrays in (x, y))
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def _compare():
    strategy = distributed.make_strategy("mirrored", cpu_replicas=2)
    keras.utils.set_random_seed(0)  # the same tail and data each run
    one = build_split(*SHAPES)
    with distributed.scope(strategy):
        mirrored_split = build_split(*SHAPES)
    distributed.synchronize_batch_norm(mirrored_split.tail)
    workdir = pathlib.Path(tempfile.mkdtemp())
    trainers = [
        TailTrainer(one, str(workdir / "one")),
        TailTrainer(mirrored_split, str(workdir / "mirrored"), strategy=strategy),
    ]
    start = weights_to_protos(one.tail.get_weights())
    for trainer in trainers:
        trainer.hello(hello_request(one, tail_weights=start))
    steps = []
    # Each step from the same weights and optimizer state: a tiny tail on random data is
    # sensitive enough that rounding differences grow over steps (a weight moved by 1e-7 moved
    # a gradient by 3e-3 on one device alone), and each step is what is compared.
    for step, batch in enumerate(TRAIN_BATCHES):
        _align(*trainers)
        before = _values(trainers[0])
        request = train_request(one, step, batch=batch)
        replies = [trainer.step(request) for trainer in trainers]
        updates = [[a - b for a, b in zip(_values(t), before)] for t in trainers]
        steps.append(
            dict(
                update=_relative(*updates),
                gradient=_relative(*(codec.decode(r.payload).dequantized() for r in replies)),
                logits=_relative(*(reply_logits(r) for r in replies)),
            )
        )
    report = dict(replicas=strategy.num_replicas_in_sync, steps=steps)
    # Calibration (training-mode forward passes) and evaluation.
    _align(*trainers)
    step = len(TRAIN_BATCHES)
    for name, kind, flags in (
        ("calibration", pb.StepRequest.CALIBRATE, dict(calibration_begin=True)),
        ("evaluation", pb.StepRequest.EVALUATE, {}),
    ):
        request = train_request(one, step, batch=24, kind=kind, **flags)
        report[f"{name}_logits"] = _relative(*(reply_logits(t.step(request)) for t in trainers))
    # A joined batch of two devices' steps (a selection per sample), computed and put back.
    rng = np.random.default_rng(5)
    values = rng.normal(size=(9, 16, 16, 4)).astype(np.float32)
    indices = np.repeat([[3, 1, 2, 0], [0, 1, 2, 3]], [4, 5], axis=0).astype(np.int32)
    labels, scale = np.arange(9, dtype=np.int32) % 10, np.ones(9, np.float32)
    joined = []
    for trainer in trainers:
        _, gradient, *_ = trainer._tail.compute[2](values, indices, labels, scale, 0.05, False)
        trainer._tail.put_back()
        joined.append(gradient.numpy())
    report["joined_batch_gradient"] = _relative(*joined)
    # The mirrored server's checkpoint and a step logged after it, restored by a new mirrored
    # server: the checkpoint, then the logged step trained again.
    mirrored = trainers[1]
    mirrored.checkpoint(
        pb.CheckpointRequest(model_digest=model_digest(one), device_id="device-0", step=step)
    )
    mirrored.step(train_request(one, step, batch=16))
    with distributed.scope(strategy):
        again_split = build_split(*SHAPES)
    distributed.synchronize_batch_norm(again_split.tail)
    again = TailTrainer(again_split, str(workdir / "mirrored"), strategy=strategy)
    assert again.restore() and again.devices["device-0"].next_step == step + 1
    report["restored_difference"] = max(
        float(np.max(np.abs(x - y))) for x, y in zip(_values(mirrored), _values(again))
    )
    print(json.dumps(report))


if __name__ == "__main__":
    _compare()
