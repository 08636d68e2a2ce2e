"""The training benchmark (benchmarks.train_benchmark): split `fit` against unsplit `fit`, on a tiny run.

Speeds depend on the machine and its load, so only the result's shape is checked here; the ratio
itself is measured with `tfsplit-bench-train`.
"""

import pathlib

import numpy as np
import pytest

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from benchmarks import train_benchmark as benchmark
from tfsplit import codec
from tfsplit.training import trainer
from tfsplit.training.config import load_config_file

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _smoke_config():
    return load_config_file(str(REPO_ROOT / "configs" / "deprune.py"), "smoke")


def test_benchmark_runs_and_reports_both_sides():
    config = _smoke_config()
    result = benchmark.benchmark_training(config, steps=2, repeats=1)
    assert set(result) == {
        "split_samples_per_second",
        "unsplit_samples_per_second",
        "ratio",
        "batch_size",
        "steps",
        "budget",
        "payload_bytes_up_per_step",
        "payload_bytes_down_per_step",
    }
    assert result["split_samples_per_second"] > 0 and result["unsplit_samples_per_second"] > 0
    assert result["ratio"] == pytest.approx(
        result["split_samples_per_second"] / result["unsplit_samples_per_second"]
    )
    budget, batch = config.phases[0].budget, config.data.batch_size
    assert (result["steps"], result["budget"], result["batch_size"]) == (2, budget, batch)
    _, _, _, info = trainer.build_data(config)
    height, width, channels = trainer.build_split_model(config, info).wire_shape
    up = codec.payload_nbytes(batch, height, width, budget, "float16", True, channels)
    down = codec.payload_nbytes(batch, height, width, budget, "float16", False, channels)
    assert result["payload_bytes_up_per_step"] == up
    assert result["payload_bytes_down_per_step"] == down


def test_unsplit_model_is_the_same_network():
    config = _smoke_config()
    _, _, test_ds, info = trainer.build_data(config)
    split = trainer.build_split_model(config, info)
    unsplit = benchmark.build_unsplit_model(split, config, 0.01)
    assert {v.ref() for v in unsplit.trainable_variables} == {
        v.ref() for v in split.trainable_variables
    }
    images, _ = next(iter(test_ds))
    split.set_budget(split.channels, masking=False)  # every channel, float32-exact wire aside
    np.testing.assert_allclose(
        unsplit(images),
        split.receive(split.send(images, split.channel_indices()), split.channel_indices()),
        atol=1e-5,
    )


def test_too_few_batches_fail_clearly():
    config = _smoke_config()
    with pytest.raises(ValueError, match="needs 1000 full batches"):
        benchmark.benchmark_training(config, steps=1000, repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        benchmark.benchmark_training(config, steps=2, repeats=0)


def test_networked_benchmark_runs_a_server_process_and_reports_both_sides():
    config = _smoke_config()
    result = benchmark.benchmark_networked(config, steps=2, repeats=1)
    assert result["in_process_samples_per_second"] > 0
    assert result["networked_samples_per_second"] > 0
    assert result["ratio"] == pytest.approx(
        result["networked_samples_per_second"] / result["in_process_samples_per_second"]
    )
    payload_up, payload_down = result["payload_bytes_per_step"]
    wire_up, wire_down = result["wire_bytes_per_step"]
    assert wire_up > payload_up > 0 and wire_down > payload_down > 0
