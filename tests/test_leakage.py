"""tfsplit.eval.leakage: the AUC, the norm and cosine attacks, and what the server of each split
sees, with and without the noise defence."""

import json

import numpy as np
import pytest
import tf_keras as keras
from test_tools import run_tool  # the tools in a subprocess, as test_tools runs them

import tfsplit
from tfsplit import backbones, data
from tfsplit.callbacks.records import read_records
from tfsplit.eval import leakage, leakage_report
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase


def test_auc_is_the_pairwise_probability_with_ties_counted_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(float)  # many ties
    positives = rng.random(300) < 0.3
    pos, neg = scores[positives], scores[~positives]
    pairwise = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert leakage.auc(scores, positives) == pytest.approx(pairwise)
    assert leakage.auc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert leakage.auc([1.0, 1.0, 1.0], [True, False, False]) == 0.5
    with pytest.raises(ValueError, match="both positives and negatives"):
        leakage.auc([1.0, 2.0], [True, True])


def test_the_attacks_separate_what_leaks_and_not_what_does_not():
    rng = np.random.default_rng(1)
    labels = (rng.random(2000) < 0.1).astype(int)  # imbalanced, as in the paper's tasks
    noise = rng.normal(size=(2000, 16))
    longer = noise * (1 + 3 * labels[:, None])  # positives' rows have larger norms
    assert leakage.norm_attack_auc(longer, labels) > 0.95
    assert leakage.norm_attack_auc(noise, labels) < 0.6
    direction = rng.normal(size=16)
    signed = noise * 0.1 + np.where(labels[:, None] == 1, direction, -direction)
    assert leakage.cosine_attack_auc(signed, labels) > 0.99
    assert leakage.cosine_attack_auc(noise, labels) < 0.6
    ten = rng.integers(0, 10, 2000)  # one-vs-rest over ten classes
    assert (
        leakage.cosine_attack_auc(np.eye(10)[ten] + 0.1 * rng.normal(size=(2000, 10)), ten) > 0.99
    )


@pytest.fixture(scope="module")
def vgg11():
    keras.utils.set_random_seed(0)
    return backbones.build_backbone("vgg11", 2, (32, 32, 3), width_multiplier=0.125)


def _batch(seed=0, n=256):
    rng = np.random.default_rng(seed)
    return rng.random((n, 32, 32, 3), np.float32), (rng.random(n) < 0.2).astype(np.int32)


def test_the_gradient_at_the_cut_gives_binary_labels_away_unless_perturbed(vgg11):
    """Cut before the classifier, every sample's gradient is the dense kernel times (p - y) (up
    to the decoder and the dropout mask): its direction is the label's (the paper's cosine
    attack), until noise drowns it."""
    images, labels = _batch()
    aucs = []
    for noise in (0.0, 20.0):
        split = tfsplit.split_model(vgg11, "pool5", bottleneck=True, gradient_noise=noise)
        split.set_budget(8)
        split.compile(keras.optimizers.SGD(0.01))
        seen = leakage.observed(split, images, labels)
        assert list(seen) == ["cut_gradient"] and seen["cut_gradient"].shape == (256, 8)
        aucs.append(leakage.cosine_attack_auc(seen["cut_gradient"], labels))
    assert aucs[0] > 0.9 and aucs[1] < 0.65, aucs


def test_the_ushaped_server_sees_the_tops_gradient_and_the_activations(vgg11):
    images, labels = _batch(1)
    split = tfsplit.split_model(vgg11, "conv5_relu", bottleneck=True, top="pool5")
    split.set_budget(8)
    split.compile(keras.optimizers.SGD(0.01))
    seen = leakage.observed(split, images, labels)
    assert seen["top_gradient"].shape == (256, split.top_channels)
    assert seen["activations"].shape == (256, 4 * 4 * 8)
    assert leakage.cosine_attack_auc(seen["top_gradient"], labels) > 0.95  # the top leaks too


def _binary_config(**changes):
    config = base_config("sl")
    config.data.train_size, config.data.test_size = 64, 64
    config.data.batch_size, config.data.eval_batch_size = 32, 64
    config.model.width_multiplier = 0.125
    config.model.top = "classifier"
    config.data.binary_class = 3
    config.calibration_batches = 0
    config.phases = [phase(budget=0, epochs=2, learning_rate=0.01)]
    for key, value in changes.items():
        config.data[key] = value
    return config


def test_the_probe_writes_each_epochs_aucs_on_the_binary_task(tmp_path):
    config = _binary_config()
    _, _, test_ds, info = trainer.build_data(config)
    assert info.num_classes == 2
    probe = leakage.LeakageProbe(test_ds.take(1))
    ((_, probe_labels),) = probe.batches
    _, (_, plain_labels), _ = data.load_arrays("synthetic", train_size=64, test_size=64)
    np.testing.assert_array_equal(probe_labels, (plain_labels == 3).astype(np.int32))
    trainer.train(config, str(tmp_path), verbose=0, measure=[probe])
    records = read_records(str(tmp_path))
    assert [r["epoch"] for r in records] == [1, 2]
    keys = {f"leakage_{s}_{a}" for s in ("top_gradient", "activations") for a in leakage.ATTACKS}
    assert all(keys <= set(r) for r in records)
    with pytest.raises(ValueError, match="binary_class must be -1 .off. or a class"):
        trainer.build_data(_binary_config(binary_class=10))


def test_the_benchmark_attacks_on_validation_and_reuses_finished_runs(tmp_path):
    argv = [
        "--workdir={tmp}/leak",
        "--methods=sl",
        "--variant=smoke",
        "--tasks=binary",
        "--noise=0",
    ]
    first = run_tool("bench_leakage", argv, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    result = leakage_report.load(str(tmp_path / "leak"))
    assert set(result["runs"]) == {"sl_plain_binary_noise0_seed0", "sl_ushaped_binary_noise0_seed0"}
    for name, run in result["runs"].items():
        records = read_records(str(tmp_path / "leak" / name))
        assert [e["val_accuracy"] for e in run["epochs"]] == [r["val_accuracy"] for r in records]
        assert run["final_val_accuracy"] == records[-1]["val_accuracy"]
    # A second command over two seeds trains seed 2 only: seed 0's runs are reused as they were.
    # (Seed 1 holds out smoke's 25 validation images without one of class 0: no binary AUC.)
    # Its noisy runs train twice smoke's one epoch, and their names say so.
    second = run_tool(
        "bench_leakage",
        [*argv, "--splits=plain", "--seeds=0,2", "--noise=0,1", "--noise_epochs_factor=2"],
        tmp_path,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "sl_plain_binary_noise0_seed0 already holds a finished run" in second.stderr
    again = json.loads((tmp_path / "leak" / leakage_report.RESULTS_FILE).read_text())["runs"]
    assert again["sl_plain_binary_noise0_seed0"] == result["runs"]["sl_plain_binary_noise0_seed0"]
    assert {name: len(run["epochs"]) for name, run in again.items()} == {
        "sl_plain_binary_noise0_seed0": 1,
        "sl_plain_binary_noise0_seed2": 1,
        "sl_plain_binary_noise1_epochs2x_seed0": 2,
        "sl_plain_binary_noise1_epochs2x_seed2": 2,
    }
    assert "sl | plain | binary | 0 | 1 |" in "\n".join(leakage_report.section_lines(
        {"command": "x", "runs": again}))  # fmt: skip
