"""Every file in configs/ loads, validates, and its smoke variant trains end to end."""

import glob
import importlib.util
import json
import os

import pytest

import tfsplit  # noqa: F401
from tfsplit import config as config_lib
from tfsplit.train import train

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_the_four_methods_have_configs():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    assert {"sl", "casl", "deprune", "prune"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_variants_load_and_serialize(path):
    for arg in config_lib.VARIANTS:
        config = load(path, arg or None)
        assert config.mode == os.path.basename(path)[:-3]
        json.loads(config.to_json_best_effort())
    assert load(path, "paper").data.name == "cifar10"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_smoke_variant_trains(path, tmp_path):
    summary = train(load(path, "smoke"), str(tmp_path))
    assert summary["epochs"] >= 1
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    assert summary["train_payload_bytes_up"] > 0


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="Unknown config variant 'huge'"):
        load(CONFIG_FILES[0], "huge")
