"""Shards in an S3 bucket, served by a real moto server process on 127.0.0.1.

Writing, reading and training go through `tfsplit.data.object_store` (botocore over sockets) as
they would against AWS or MinIO. The faults are real too: objects replaced, deleted or cut short
in the bucket, the server killed mid-epoch, the link down for a moment.
"""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import hashlib
import json
import os

import boto3
import numpy as np
import pytest
from s3_server import (  # noqa: F401  (fixtures)
    create_bucket,
    fault_proxy,
    moto_server,
    own_moto_server,
    s3_bucket,
)
from test_tools import run_tool  # the tools in a subprocess, as test_tools runs them

from tfsplit import data
from tfsplit.data import object_store, shard_reader, shards
from tfsplit.data.common import DatasetFileError
from tfsplit.training import train
from tfsplit.training.config import base_config, phase

import tensorflow as tf  # isort: skip  (after tfsplit)

TRAIN_SIZE, TEST_SIZE = 160, 40
_FAST_RETRY = object_store.RetryPolicy(attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """Three attempts, backoff in tenths of a second: the faults fail in seconds, not tens."""
    monkeypatch.setattr(object_store, "DEFAULT_RETRY", _FAST_RETRY)
    object_store.clear_s3_filesystems()
    yield
    object_store.clear_s3_filesystems()


@pytest.fixture(scope="module")
def arrays():
    return data.load_arrays("synthetic", seed=4, train_size=TRAIN_SIZE, test_size=TEST_SIZE)


@pytest.fixture(scope="module")
def local(arrays, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "shards"
    shards.write_array_shards(*arrays[:2], arrays[2], str(out), num_shards=4)
    return out


def _upload(arrays, bucket, num_shards=4, prefix="data"):
    url = f"s3://{bucket}/{prefix}"
    shards.write_array_shards(*arrays[:2], arrays[2], url, num_shards=num_shards)
    return url


def _epoch(dataset):
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _build(path, **kwargs):
    args = dict(batch_size=16, eval_batch_size=16, seed=3, augment=False)
    args.update(kwargs)
    splits = shards.build_shard_datasets(str(path), **args)
    return splits.train, splits.test, splits.info  # what these tests check


def _key(url):
    return object_store.parse_s3_url(url)


def test_a_bucket_holds_the_same_shards_and_gives_the_same_batches(arrays, local, s3_bucket):
    url = _upload(arrays, s3_bucket)
    index, local_index = data.load_index(url), data.load_index(str(local))
    assert index.info == local_index.info and index.encoding == "raw"
    assert [s.sha256 for s in index.train] == [s.sha256 for s in local_index.train]
    assert index.train[0].path == f"{url}/train-00000-of-00004.tfrecord"
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert not [o["Key"] for o in listed if o["Key"].endswith(".partial")]
    (x, y), (xt, yt), _ = data.load_shard_arrays(url)
    np.testing.assert_array_equal(x, arrays[0][0])
    np.testing.assert_array_equal(yt, arrays[1][1])
    remote_train, remote_test, _ = _build(url, augment=True)
    local_train, local_test, _ = _build(local, augment=True)
    for remote_ds, local_ds in ((remote_train, local_train), (remote_test, local_test)):
        for _ in range(2):  # same seed, same batches, epoch after epoch
            for got, want in zip(_epoch(remote_ds), _epoch(local_ds)):
                np.testing.assert_array_equal(got, want)


def test_prepare_data_writes_a_bucket_and_training_reads_it(s3_bucket, tmp_path):
    """The README's two commands: tfsplit-prepare-data to s3://, then training from it."""
    url = f"s3://{s3_bucket}/synthetic"
    argv = ["--dataset=synthetic", f"--out={url}", "--num_shards=4", "--train_size=256"]
    result = run_tool("prepare_data", [*argv, "--test_size=64"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {url}/index.json" in result.stdout
    config = base_config("deprune")
    config.data.name = "shards"
    config.data.path = url
    config.data.batch_size = 64
    config.data.eval_batch_size = 64
    config.data.local_cache_dir = str(tmp_path / "cache")
    config.model.width_multiplier = 0.125
    config.calibration_batches = 2
    config.phases = [phase(budget=4, epochs=1, learning_rate=0.05)]
    summary = train(config, str(tmp_path / "run"))
    assert summary["dataset"] == "synthetic" and summary["train_payload_bytes_up"] > 0
    index = data.load_index(url)
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        f"{s.sha256}.tfrecord" for s in index.train + index.validation + index.test
    )  # the validation split's shards too: every epoch is evaluated on it


def test_a_local_cache_keeps_training_when_the_bucket_is_gone(arrays, own_moto_server, tmp_path):
    url = _upload(arrays, create_bucket())
    cache = tmp_path / "cache"
    train_ds, _, _ = _build(url, local_cache_dir=str(cache))
    first = _epoch(train_ds)
    for shard in data.load_index(url).train:
        cached = (cache / f"{shard.sha256}.tfrecord").read_bytes()
        assert hashlib.sha256(cached).hexdigest() == shard.sha256
    own_moto_server.kill()
    assert len(_epoch(train_ds)[1]) == len(first[1]) == TRAIN_SIZE  # from the cache alone


def test_a_corrupt_cached_copy_is_read_again_from_the_bucket(arrays, s3_bucket, tmp_path):
    url = _upload(arrays, s3_bucket)
    cache = tmp_path / "cache"
    train_ds, _, _ = _build(url, local_cache_dir=str(cache))
    expected = _epoch(train_ds)
    shard = data.load_index(url).train[1]
    copy = cache / f"{shard.sha256}.tfrecord"
    damaged = bytearray(copy.read_bytes())
    damaged[100] ^= 0xFF
    copy.write_bytes(bytes(damaged))
    again, _, _ = _build(url, local_cache_dir=str(cache))
    np.testing.assert_array_equal(_epoch(again)[1], expected[1])
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == shard.sha256


# ----------------------------------------------------------------------------------------------
# Faults: each is retried, then fails with an error that names the object.
# ----------------------------------------------------------------------------------------------


def _replace(url, content):
    bucket, key = _key(url)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=content)


def _fails_naming(dataset, url, *what):
    with pytest.raises(tf.errors.OpError) as raised:
        _epoch(dataset)
    message = str(raised.value)
    assert url in message and "after 3 attempts" in message, message
    for part in what:
        assert part in message, message


def test_a_corrupt_shard_is_retried_then_named(arrays, s3_bucket):
    """Same size, other bytes (a checksum mismatch): the build-time size check passes, and the
    streamed sha256 catches it on every attempt."""
    url = _upload(arrays, s3_bucket)
    train_ds, _, _ = _build(url)
    shard = data.load_index(url).train[2]
    bucket, key = _key(shard.path)
    content = bytearray(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    content[-5] ^= 0xFF
    _replace(shard.path, bytes(content))
    _fails_naming(train_ds, shard.path, "sha256", shard.sha256)


def test_a_truncated_shard_is_named_at_build_and_when_read(arrays, s3_bucket):
    url = _upload(arrays, s3_bucket)
    train_ds, _, _ = _build(url)
    shard = data.load_index(url).train[0]
    bucket, key = _key(shard.path)
    content = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    _replace(shard.path, content[:-100])
    _fails_naming(train_ds, shard.path, f"index expects {shard.num_bytes}")
    with pytest.raises(DatasetFileError, match=f"Shard {shard.path} has {shard.num_bytes - 100}"):
        _build(url)


def test_a_missing_object_is_retried_then_named(arrays, s3_bucket):
    url = _upload(arrays, s3_bucket)
    train_ds, _, _ = _build(url)
    shard = data.load_index(url).train[3]
    bucket, key = _key(shard.path)
    boto3.client("s3").delete_object(Bucket=bucket, Key=key)
    _fails_naming(train_ds, shard.path, "missing")
    with pytest.raises(DatasetFileError, match=f"Shard {shard.path} is missing"):
        _build(url)


def test_the_server_dying_mid_epoch_fails_the_epoch_naming_an_object(
    arrays, own_moto_server, monkeypatch
):
    """One shard per window and many shards: the epoch is still reading when the server dies."""
    monkeypatch.setattr(shard_reader, "_WINDOW_SHARDS", 1)
    url = _upload(arrays, create_bucket(), num_shards=16)
    train_ds, _, _ = _build(url, batch_size=2)
    batches = iter(train_ds)
    next(batches)
    own_moto_server.kill()
    with pytest.raises(tf.errors.OpError) as raised:
        for _ in batches:
            pass
    message = str(raised.value)
    assert f"{url}/train-" in message and "after 3 attempts" in message, message
    assert own_moto_server.endpoint in message, message


def test_a_short_outage_is_retried_through(arrays, fault_proxy):
    url = _upload(arrays, create_bucket())
    train_ds, _, _ = _build(url)
    fault_proxy.down_for(0.3)
    images, labels = _epoch(train_ds)
    assert len(labels) == TRAIN_SIZE and fault_proxy.refused > 0


def test_cache_and_service_arguments_are_checked(arrays, local, s3_bucket, tmp_path):
    url = _upload(arrays, s3_bucket)
    with pytest.raises(ValueError, match="object store"):
        _build(url, service_address="grpc://127.0.0.1:1")
    with pytest.raises(ValueError, match="is local already"):
        _build(local, local_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="must be a local directory"):
        _build(url, local_cache_dir=f"s3://{s3_bucket}/cache")
    with pytest.raises(ValueError, match="keeps shards read from an object store"):
        data.build_datasets("synthetic", 16, 16, local_cache_dir=str(tmp_path))
