"""Tests for reading shards through a tf.data service: a dispatcher and two workers on 127.0.0.1.

The servers run in a `tfsplit-data-service` process that the test starts and stops, as a user
would run them on another machine.
"""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tfsplit import data
from tfsplit.data import shards
from tfsplit.data.service import start_data_service

TRAIN_SIZE, TEST_SIZE = 240, 40
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    train, test, info = data.load_arrays(
        "synthetic", seed=2, train_size=TRAIN_SIZE, test_size=TEST_SIZE
    )
    out = tmp_path_factory.mktemp("service") / "shards"
    shards.write_array_shards(train, test, info, str(out), num_shards=6)
    return out, train


@pytest.fixture(scope="module")
def service_address():
    """A dispatcher and 2 workers in a tfsplit-data-service process, stopped after the tests."""
    process, address = _start_service()
    try:
        assert address, "tfsplit-data-service did not start"
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def _start_service(*wrapper, cwd=REPO_ROOT):
    """A tfsplit-data-service process (under `wrapper`, a command that execs the rest) and its
    dispatcher's address."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "tfsplit_tools.data_service", "--workers=2"]
    process = subprocess.Popen(
        [*wrapper, *command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline, line = time.monotonic() + 60, ""
    while time.monotonic() < deadline and not line:
        line = process.stdout.readline()
        if process.poll() is not None:
            break
    match = re.match(r"data.service_address=(grpc://127\.0\.0\.1:\d+) \(2 workers", line)
    return process, match and match.group(1)


@pytest.fixture(scope="module")
def worker_only_shards(written, tmp_path_factory):
    """Shards that only the workers can read: this process sees decoys (the same index, files of
    the same sizes, all zeros) where the workers' own mount namespace sees the real shards."""
    real, _ = written
    seen = tmp_path_factory.mktemp("decoy") / "shards"
    seen.mkdir()
    for name in os.listdir(real):
        source = real / name
        if name == "index.json":
            shutil.copy(source, seen / name)
        else:
            (seen / name).write_bytes(bytes(source.stat().st_size))
    bind = f'mount --bind "{real}" "{seen}" && exec "$0" "$@"'
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip(
            "the workers must see the real shards where this process sees decoys, which takes a "
            "mount namespace of their own; `unshare --mount` makes one only as root (CI runs as "
            "root, so CI runs this test)"
        )
    process, address = _start_service(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", bind
    )
    try:
        assert address, "tfsplit-data-service did not start in its mount namespace"
        yield seen, address
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_workers_do_the_reading(written, worker_only_shards):
    """Read through the service, the decoys give the real training set; read here, they fail:
    a pipeline that ignored `service_address` could not pass."""
    _, (x, y) = written
    seen, address = worker_only_shards
    train_ds, _, _, info = shards.build_shard_datasets(
        str(seen), 32, 16, augment=False, verify_checksums=False, service_address=address
    )
    images, labels = (np.concatenate(part) for part in zip(*train_ds.as_numpy_iterator()))
    label_of = {image.tobytes(): label for image, label in zip(x, y)}
    recovered = [image.tobytes() for image in _pixels(images, info)]
    assert sorted(recovered) == sorted(label_of)
    assert [label_of[image] for image in recovered] == labels.tolist()
    local, _, _, _ = shards.build_shard_datasets(
        str(seen), 32, 16, augment=False, verify_checksums=False
    )
    with pytest.raises(Exception, match="corrupted record|DataLoss|truncated|Corrupted"):
        next(local.as_numpy_iterator())


def _pixels(images, info):
    return np.round((images * np.array(info.std) + np.array(info.mean)) * 255).astype(np.uint8)


def test_workers_read_every_training_sample_once_per_epoch(written, service_address):
    path, (x, y) = written
    train_ds, _, test_ds, info = data.build_datasets(
        "shards", 32, 16, augment=False, path=str(path), service_address=service_address
    )
    label_of = {image.tobytes(): label for image, label in zip(x, y)}
    for _ in range(2):
        batches = list(train_ds.as_numpy_iterator())
        assert len(batches) == int(train_ds.cardinality()) == 8
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        recovered = [image.tobytes() for image in _pixels(images, info)]
        assert sorted(recovered) == sorted(label_of)
        assert [label_of[image] for image in recovered] == labels.tolist()
    assert sum(len(b[1]) for b in test_ds.as_numpy_iterator()) == TEST_SIZE  # read locally


def test_a_device_part_goes_through_the_service(written, service_address):
    path, _ = written
    train_ds, _, _, info = data.build_datasets(
        "shards",
        32,
        16,
        path=str(path),
        shard_index=1,
        num_shards=3,
        service_address=service_address,
    )
    assert info.train_size == 80
    assert sum(len(b[1]) for b in train_ds.as_numpy_iterator()) == 80


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cache=True), "cannot be combined with `service_address`"),
        (dict(service_address=" "), "tf.data service dispatcher address"),
    ],
)
def test_service_arguments_are_checked(written, kwargs, message):
    args = {"service_address": "grpc://127.0.0.1:1", **kwargs}
    with pytest.raises(ValueError, match=message):
        shards.build_shard_datasets(str(written[0]), 32, 16, **args)


def test_in_memory_sets_refuse_a_service():
    with pytest.raises(ValueError, match="applies to streamed shards"):
        data.build_datasets("synthetic", 32, 16, service_address="grpc://127.0.0.1:1")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_workers=-1), "num_workers"),
        (dict(port=70000), "port"),
        (dict(host="::1"), "host"),
        (dict(num_workers=1, dispatcher="nohost"), "host:port"),
        (dict(num_workers=0), "needs workers"),
    ],
)
def test_start_data_service_checks_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        start_data_service(**kwargs)
