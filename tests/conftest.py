"""Fixtures shared across test modules."""

import pathlib

import pytest

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.training import train
from tfsplit.training.config import load_config_file

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """A finished `configs/deprune.py:smoke` run, trained once per session: read it, never write."""
    path = tmp_path_factory.mktemp("smoke_deprune")
    train(load_config_file(str(REPO_ROOT / "configs" / "deprune.py"), "smoke"), str(path))
    return str(path)
