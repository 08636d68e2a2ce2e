"""tfsplit-train's library: config -> SplitModel -> fit; bytes against real payloads, resume."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest
import tf_keras as keras

import tfsplit  # noqa: F401
from tfsplit import callbacks, codec
from tfsplit.training import load_model, train
from tfsplit.training.config import base_config, phase
from tfsplit.training.trainer import MODEL_FILE, build_data


def tiny_config(transport="fused", phases=None, bottleneck=True):
    config = base_config("deprune")
    config.data.train_size = 96
    config.data.test_size = 64
    config.data.batch_size = 32
    config.data.eval_batch_size = 64
    config.data.augment = False
    config.model.width_multiplier = 0.125
    config.model.bottleneck.enabled = bottleneck
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


def test_fused_ledger_equals_the_encoded_payload_lengths(tmp_path):
    """The fused step counts bytes by formula; the codec step measures len() of real payloads."""
    fused = train(tiny_config("fused"), str(tmp_path / "fused"))
    real = train(tiny_config("codec"), str(tmp_path / "codec"))
    assert fused["train_payload_bytes_up"] == real["train_payload_bytes_up"] > 0
    assert fused["train_payload_bytes_down"] == real["train_payload_bytes_down"] > 0
    # 96 samples, 10 held out for validation: batches of 32, 32 and 22 per epoch; budget 4 then
    # 16 of 64 channels at 4x4 (VGG-11 width 1/8 after conv 5), float16, labels upstream only.
    expected_up = sum(
        codec.payload_nbytes(n, 4, 4, k, "float16", True, channels=64)
        for k in (4, 16)
        for n in (32, 32, 22)
    )
    assert fused["train_payload_bytes_up"] == expected_up
    assert fused["inference_payload_bytes_per_sample"] == 20 + 2 * 16 + 4 * 4 * 16 * 2


def test_plain_split_learning_sends_no_index_list(tmp_path):
    sl = [phase(budget=0, epochs=1, learning_rate=0.05)]
    fused = train(tiny_config("fused", sl, bottleneck=False), str(tmp_path / "fused"))
    real = train(tiny_config("codec", sl, bottleneck=False), str(tmp_path / "codec"))
    assert fused["train_payload_bytes_up"] == real["train_payload_bytes_up"]
    assert fused["train_payload_bytes_down"] == real["train_payload_bytes_down"]
    assert (
        fused["inference_payload_bytes_per_sample"] == 20 + 4 * 4 * 64 * 2
    )  # header + values only.


def test_metrics_summary_and_tensorboard_files(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train(tiny_config(), workdir)
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["phase"] for r in records] == [1, 2]
    assert [r["budget"] for r in records] == [4, 16]
    for key in ("val_accuracy", "val_loss", "payload_bytes_up", "payload_bytes_down"):
        assert all(key in r for r in records)
    assert not any("test_accuracy" in r for r in records)  # the test set: once, at the end
    assert summary["train_payload_bytes_up"] == sum(r["payload_bytes_up"] for r in records)
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    assert set(summary) == {
        "mode",
        "dataset",
        "model",
        "final_val_accuracy",
        "final_test_accuracy",
        "final_test_loss",
        "final_budget",
        "channels",
        "train_payload_bytes_up",
        "train_payload_bytes_down",
        "inference_payload_bytes_per_sample",
        "wall_seconds",
        "epochs",
    }
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_a_local_loss_is_recorded_and_sends_no_byte_more(tmp_path):
    config = tiny_config()
    config.model.local_loss_weight = 1.0
    local = train(config, str(tmp_path / "local"))
    plain = train(tiny_config(), str(tmp_path / "plain"))
    for key in ("train_payload_bytes_up", "train_payload_bytes_down"):
        assert local[key] == plain[key]
    assert all(record["train_local_loss"] > 0 for record in read_metrics(tmp_path / "local"))
    assert "train_local_loss" not in read_metrics(tmp_path / "plain")[0]


class Interrupt(Exception):
    pass


def test_resume_after_interruption_keeps_finished_epochs(tmp_path, monkeypatch):
    """Interrupted in epoch 2 after a backup: the rerun resumes there and resets no gate twice."""
    workdir = str(tmp_path / "run")
    config = tiny_config()
    config.checkpoint_every_steps = 2
    original = callbacks.RunRecords.on_train_batch_end
    seen = []

    def interrupt_in_epoch_two(self, batch, logs=None):
        seen.append(batch)
        if len(seen) == 6:  # epoch 2, step 3, after the backup of step 2.
            raise Interrupt()

    monkeypatch.setattr(
        callbacks.RunRecords, "on_train_batch_end", interrupt_in_epoch_two, raising=False
    )
    with pytest.raises(Interrupt):
        train(config, workdir)
    first = read_metrics(workdir)
    assert [r["epoch"] for r in first] == [1]
    monkeypatch.setattr(callbacks.RunRecords, "on_train_batch_end", original, raising=False)
    summary = train(config, workdir)
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0] == first[0]  # the finished epoch is kept, not retrained.
    assert "gates_open_at_reset" not in records[1]  # the reset ran before the interruption only.
    assert summary["epochs"] == 2
    gates = load_model(workdir).encoder.gate_logits.numpy()
    assert np.all(np.abs(gates) <= 15.0)
    # A finished run re-run on its workdir trains nothing more.
    again = train(config, workdir)
    assert read_metrics(workdir) == records
    assert again == summary


def test_init_from_loads_an_earlier_run(tmp_path):
    start_dir = str(tmp_path / "start")
    train(tiny_config(phases=[phase(budget=0, epochs=1, learning_rate=0.05)]), start_dir)
    config = tiny_config(phases=[phase(budget=8, epochs=1, learning_rate=1e-9, reset="prune")])
    config.optimizer.weight_decay = 0.0
    config.init_from = start_dir
    pruned_dir = str(tmp_path / "prune")
    train(config, pruned_dir)
    start, pruned = load_model(start_dir), load_model(pruned_dir)
    for a, b in zip(start.head.layers[1].weights, pruned.head.layers[1].weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_init_from_without_a_finished_run_fails_clearly(tmp_path):
    config = tiny_config()
    config.init_from = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="No trained model"):
        train(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        (("wire", "activation_dtype"), "bfloat16", "config.wire.activation_dtype must be one of"),
        (("wire", "transport"), "pigeon", "config.wire.transport must be one of"),
        (("optimizer", "gate_optimizer"), "rmsprop", "gate_optimizer must be one of"),
        (("optimizer", "gate_beta_2"), 1.0, "gate_beta_2 must be in"),
        (("budget_sampling", "min_fraction"), 0.0, "min_budget_fraction"),
        ("calibration_batches", -1, "calibration_batches must be an integer >= 0"),
        (("model", "local_loss_weight"), -1.0, "local_loss_weight. must be >= 0"),
    ],
)
def test_bad_config_values_are_rejected(tmp_path, key, value, message):
    config = tiny_config()
    if isinstance(key, str):
        config[key] = value
    else:
        config[key[0]][key[1]] = value
    with pytest.raises(ValueError, match=message):
        train(config, str(tmp_path))


def test_each_device_trains_on_its_own_part_of_the_data():
    config = tiny_config()
    config.data.num_shards = 2
    parts = []
    for shard_index in range(2):
        config.data.shard_index = shard_index
        train_ds, _, test_ds, info = build_data(config)
        # 96 samples: 10 held out for validation (before the devices' parts), 43 each; the
        # validation and test sets are not split.
        assert (info.train_size, info.validation_size, info.test_size) == (43, 10, 64)
        parts.append(np.concatenate([labels.numpy() for _, labels in train_ds]))
    whole = np.concatenate([labels.numpy() for _, labels in build_data(tiny_config()).train])
    assert sorted(np.concatenate(parts)) == sorted(whole)


def test_bad_checkpoint_interval_is_rejected(tmp_path):
    config = tiny_config()
    config.checkpoint_every_steps = 0
    with pytest.raises(ValueError, match="checkpoint_every_steps must be a positive integer"):
        train(config, str(tmp_path))


def test_resuming_with_a_different_config_is_refused(tmp_path):
    train(tiny_config(), str(tmp_path))
    other = tiny_config()
    other.seed = 1
    with pytest.raises(ValueError, match="holds a run with a different config"):
        train(other, str(tmp_path))


def test_gate_logits_stay_in_range_and_can_have_their_own_optimizer(tmp_path):
    for gate_optimizer in ("shared", "adam"):
        config = tiny_config(phases=[phase(budget=2, epochs=1, learning_rate=0.5)])
        config.optimizer.gate_optimizer = gate_optimizer
        train(config, str(tmp_path / gate_optimizer))
        gates = load_model(str(tmp_path / gate_optimizer)).encoder.gate_logits.numpy()
        assert np.all(np.abs(gates) <= 15.0)  # a budget-loss step cannot throw them past reach.


def test_nested_budgets_send_the_same_bytes_and_both_paths_agree(tmp_path):
    """The sandwich's smaller budgets are prefixes of what was sent: no byte more crosses."""
    one_phase = [phase(budget=16, epochs=1, learning_rate=0.05)]
    summaries, models = {}, {}
    for name, transport, nested in (
        ("plain", "fused", False),
        ("fused", "fused", True),
        ("codec", "codec", True),
    ):
        config = tiny_config(transport, one_phase)
        config.budget_sampling.nested = nested
        config.optimizer.gate_travel_fraction = 0.0  # nesting from the first step (no travel).
        summaries[name] = train(config, str(tmp_path / name))
        models[name] = load_model(str(tmp_path / name))
    for key in ("train_payload_bytes_up", "train_payload_bytes_down"):
        assert summaries["plain"][key] == summaries["fused"][key] == summaries["codec"][key]
    # The extra losses change the training (the oracle's agreement: tests/test_model.py).
    fused, plain = models["fused"].get_weights(), models["plain"].get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(fused, plain))


# The smoke deprune run (VGG-11, dropout in its classifier) at its own learning rates, killed in
# its second phase, after the deprune reset: 18 steps an epoch, a backup every 5.
KILL_OVERRIDES = [
    "--config=configs/deprune.py:smoke",
    "--config.data.train_size=640",
    "--config.data.test_size=500",
    "--config.data.eval_batch_size=500",
    "--config.checkpoint_every_steps=5",
]


def _train_command(workdir):
    return [sys.executable, "-m", "tfsplit_tools.train", f"--workdir={workdir}", *KILL_OVERRIDES]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_resumes_from_the_backup(tmp_path):
    """A real tfsplit-train process is killed in epoch 2 and rerun on its workdir: it ends as the
    run uninterrupted, weights and optimizer state, because the resumed epoch trains on the
    batches (order and crops, `DataPosition`) and draws the dropout masks that the uninterrupted
    one did from the step after the backup on."""
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    process = subprocess.Popen(
        _train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # The backup's index file names the last complete backup.
    backup_index = os.path.join(killed, "checkpoints", "backup", "chief", "checkpoint")
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.monotonic() + 240
    # Kill after epoch 1 is recorded and a later backup has landed in epoch 2.
    while time.monotonic() < deadline and process.poll() is None:
        if (
            os.path.exists(metrics)
            and os.path.exists(backup_index)
            and os.path.getmtime(backup_index) > os.path.getmtime(metrics)
        ):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed mid-epoch"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    [first] = read_metrics(killed)
    for workdir in (killed, clean):
        finished = subprocess.run(_train_command(workdir), capture_output=True, timeout=300)
        assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    resumed, uninterrupted = read_metrics(killed), read_metrics(clean)
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[0] == first
    for record, clean_record in zip(resumed, uninterrupted):
        assert record["val_accuracy"] == clean_record["val_accuracy"]
        assert record["val_loss"] == pytest.approx(clean_record["val_loss"], rel=1e-5)
    # The rerun started from a backup inside epoch 2; the ledger counts
    # the steps it redid (at most checkpoint_every_steps = 5 steps of 32 samples) as sent again.
    step_bytes = codec.payload_nbytes(32, 4, 4, 32, "float16", True, channels=64)
    extra = resumed[1]["payload_bytes_up"] - uninterrupted[1]["payload_bytes_up"]
    assert 0 <= extra <= 5 * step_bytes
    models = [keras.models.load_model(os.path.join(d, MODEL_FILE)) for d in (killed, clean)]
    for got, want in zip(*(m.weights for m in models)):
        np.testing.assert_allclose(
            got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6, err_msg=got.name
        )
    optimizers = [_optimizer_state(d) for d in (killed, clean)]
    assert optimizers[0].keys() == optimizers[1].keys()
    assert len(optimizers[0]) > 20  # the step counts, SGD's momenta and the gates' Adam moments
    for name, value in optimizers[0].items():
        np.testing.assert_allclose(value, optimizers[1][name], rtol=1e-5, atol=1e-6, err_msg=name)


def _optimizer_state(workdir):
    """The optimizers' variables that the trained model.keras holds (by optimizer and index)."""
    with zipfile.ZipFile(os.path.join(workdir, MODEL_FILE)) as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    with weights:
        return {
            f"{name}/{index}": weights[name]["vars"][index][()]
            for name in ("optimizer", "gate_optimizer")
            for index in weights[name]["vars"]
        }
