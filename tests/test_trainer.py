"""The split trainer: the byte ledger against real payloads, resume, init_from, the step's wire."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tfsplit  # noqa: F401
from tfsplit import codec
from tfsplit.config import base_config, phase
from tfsplit.train import Trainer, steps, train


def tiny_config(transport="fused", phases=None, bottleneck=True):
    config = base_config("deprune")
    config.data.train_size = 96
    config.data.test_size = 64
    config.data.batch_size = 32
    config.data.eval_batch_size = 64
    config.data.augment = False
    config.model.width_multiplier = 0.125
    config.model.bottleneck.enabled = bottleneck
    config.log_every_steps = 1
    config.optimizer.momentum = 0.0
    config.wire.transport = transport
    config.phases = phases or [
        phase(budget=4, epochs=1, learning_rate=0.05),
        phase(budget=16, epochs=1, learning_rate=0.05, reset="deprune"),
    ]
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_wire_quantizes_both_directions_and_masks_gradients():
    wire = steps.make_wire("float16", "float16")
    x = tf.constant([[1.0 + 2**-12, 2.0, 3.0]])
    mask = tf.constant([1.0, 0.0, 1.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = wire(x, mask)
        loss = tf.reduce_sum(y * tf.constant([[1.0 + 2**-13, 5.0, 7.0]]))
    np.testing.assert_array_equal(y.numpy(), [[1.0, 0.0, 3.0]])  # 1 + 2^-12 rounds in float16.
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), [[1.0, 0.0, 7.0]])


def test_fused_ledger_equals_the_encoded_payload_lengths(tmp_path):
    """The fused step counts bytes by formula; the codec step measures len() of real payloads."""
    fused = train(tiny_config("fused"), str(tmp_path / "fused"))
    real = train(tiny_config("codec"), str(tmp_path / "codec"))
    assert fused["train_bytes_up"] == real["train_bytes_up"] > 0
    assert fused["train_bytes_down"] == real["train_bytes_down"] > 0
    # 96 samples in batches of 32: 3 steps per epoch; budget 4 then 16 of 64 channels at 4x4
    # (VGG-11 width 1/8 after conv 5), float16, labels upstream only.
    expected_up = sum(3 * codec.payload_nbytes(32, 4, 4, k, "float16", True, channels=64)
                      for k in (4, 16))
    assert fused["train_bytes_up"] == expected_up
    assert fused["inference_bytes_per_sample"] == 20 + 2 * 16 + 4 * 4 * 16 * 2


def test_plain_split_learning_sends_no_index_list(tmp_path):
    sl = [phase(budget=0, epochs=1, learning_rate=0.05)]
    fused = train(tiny_config("fused", sl, bottleneck=False), str(tmp_path / "fused"))
    real = train(tiny_config("codec", sl, bottleneck=False), str(tmp_path / "codec"))
    assert fused["train_bytes_up"] == real["train_bytes_up"]
    assert fused["train_bytes_down"] == real["train_bytes_down"]
    assert fused["inference_bytes_per_sample"] == 20 + 4 * 4 * 64 * 2  # header + values only.


def test_fused_and_codec_steps_train_the_same_model(tmp_path):
    one_phase = [phase(budget=4, epochs=1, learning_rate=0.05)]
    results = {}
    for transport in ("fused", "codec"):
        trainer = Trainer(tiny_config(transport, one_phase), str(tmp_path / transport))
        trainer.run()
        results[transport] = (trainer.records[0], trainer.split.encoder.gate_logits.numpy())
    fused, codec_run = results["fused"], results["codec"]
    np.testing.assert_allclose(
        fused[0]["train_cross_entropy"], codec_run[0]["train_cross_entropy"], rtol=1e-3
    )
    np.testing.assert_allclose(fused[1], codec_run[1], rtol=1e-4, atol=1e-4)


def test_metrics_summary_and_tensorboard_files(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train(tiny_config(), workdir)
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["phase"] for r in records] == [1, 2]
    assert [r["budget"] for r in records] == [4, 16]
    for key in ("test_accuracy", "bytes_up", "bytes_down", "wall_seconds"):
        assert all(key in r for r in records)
    assert summary["train_bytes_up"] == sum(r["bytes_up"] for r in records)
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    assert set(summary) == {
        "mode",
        "dataset",
        "model",
        "final_test_accuracy",
        "final_budget",
        "channels",
        "train_bytes_up",
        "train_bytes_down",
        "inference_bytes_per_sample",
        "wall_seconds",
        "epochs",
    }
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_after_interruption_keeps_finished_epochs(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    original = Trainer._run_epoch

    def crash_in_epoch_two(self, phase_number, epoch, k, learning_rate):
        if epoch == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, phase_number, epoch, k, learning_rate)

    monkeypatch.setattr(Trainer, "_run_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), workdir)
    first = read_metrics(workdir)
    assert [r["epoch"] for r in first] == [1]
    monkeypatch.setattr(Trainer, "_run_epoch", original)

    resumed = Trainer(tiny_config(), workdir)
    resumed._resume_or_init()
    restored_gates = resumed.split.encoder.gate_logits.numpy().copy()
    summary = resumed.run()
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0] == first[0]  # the finished epoch is kept, not retrained.
    assert summary["epochs"] == 2
    assert summary["train_bytes_up"] == records[0]["bytes_up"] + records[1]["bytes_up"]
    # The deprune reset ran on entering phase 2 after the resume: the gates open at the end of
    # epoch 1 were pinned at 15 (3 Adam steps of 0.05 move them at most 0.15); the others were
    # redrawn in [0, 3] and cannot have climbed near 15.
    was_open = restored_gates >= 0.9
    assert was_open.any() and not was_open.all()
    gates = resumed.split.encoder.gate_logits.numpy()
    assert np.all(gates[was_open] >= 14.8) and np.all(gates[~was_open] < 4.0)

    # A finished run re-run on its workdir trains nothing more.
    again = train(tiny_config(), workdir)
    assert read_metrics(workdir) == records
    assert again == summary


def test_init_from_loads_an_earlier_run(tmp_path):
    start_dir = str(tmp_path / "start")
    start = Trainer(tiny_config(phases=[phase(budget=0, epochs=1, learning_rate=0.05)]), start_dir)
    start.run()
    config = tiny_config(phases=[phase(budget=8, epochs=1, learning_rate=0.05, reset="prune")])
    config.init_from = start_dir
    pruned = Trainer(config, str(tmp_path / "prune"))
    pruned._resume_or_init()
    for a, b in zip(start.split.head.weights, pruned.split.head.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_init_from_without_a_checkpoint_fails_clearly(tmp_path):
    config = tiny_config()
    config.init_from = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        train(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("activation_dtype", "bfloat16", "config.wire.activation_dtype must be one of"),
        ("transport", "pigeon", "config.wire.transport must be one of"),
    ],
)
def test_bad_wire_config_is_rejected(tmp_path, key, value, message):
    config = tiny_config()
    config.wire[key] = value
    with pytest.raises(ValueError, match=message):
        Trainer(config, str(tmp_path))


def test_resuming_with_a_different_config_is_refused(tmp_path):
    Trainer(tiny_config(), str(tmp_path))
    assert os.path.exists(tmp_path / "config.json")
    other = tiny_config()
    other.seed = 1
    with pytest.raises(ValueError, match="holds a run with a different config"):
        Trainer(other, str(tmp_path))


def test_gate_logits_stay_in_range_and_can_have_their_own_optimizer(tmp_path):
    for gate_optimizer in ("shared", "adam"):
        config = tiny_config(phases=[phase(budget=2, epochs=1, learning_rate=0.5)])
        config.optimizer.gate_optimizer = gate_optimizer
        trainer = Trainer(config, str(tmp_path / gate_optimizer))
        before = trainer.split.encoder.gate_logits.numpy().copy()
        trainer.run()
        gates = trainer.split.encoder.gate_logits.numpy()
        assert np.all(np.abs(gates) <= 15.0)  # a budget-loss step cannot throw them past reach.
        assert not np.allclose(gates, before)
        assert (trainer.steps.gate_optimizer is None) == (gate_optimizer == "shared")


def test_unknown_gate_optimizer_is_rejected(tmp_path):
    config = tiny_config()
    config.optimizer.gate_optimizer = "rmsprop"
    with pytest.raises(ValueError, match="gate_optimizer must be one of"):
        Trainer(config, str(tmp_path))


def test_nested_budget_sampling_sends_fewer_channels_and_both_paths_agree(tmp_path):
    one_phase = [phase(budget=16, epochs=1, learning_rate=0.05)]
    summaries = {}
    for name, transport, probability in (("fixed", "fused", 0.0), ("fused", "fused", 1.0),
                                         ("codec", "codec", 1.0)):
        config = tiny_config(transport, one_phase)
        config.budget_sampling.probability = probability
        summaries[name] = train(config, str(tmp_path / name))
    fixed, fused, real = summaries["fixed"], summaries["fused"], summaries["codec"]
    assert fused["train_bytes_up"] == real["train_bytes_up"] < fixed["train_bytes_up"]
    assert fused["train_bytes_down"] == real["train_bytes_down"] < fixed["train_bytes_down"]
    # Evaluation and inference always use the phase's budget.
    assert fused["final_budget"] == 16
    assert fused["inference_bytes_per_sample"] == fixed["inference_bytes_per_sample"]


@pytest.mark.parametrize("probability, min_budget", [(1.5, 1), (-0.1, 1), (0.5, 0)])
def test_bad_budget_sampling_is_rejected(tmp_path, probability, min_budget):
    config = tiny_config()
    config.budget_sampling.probability = probability
    config.budget_sampling.min_budget = min_budget
    with pytest.raises(ValueError, match="sampling_probability|min_budget"):
        Trainer(config, str(tmp_path))
