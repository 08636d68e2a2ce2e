"""Tests of tfsplit.data.object_store against a real moto S3 server process (tests/s3_server.py).

Nothing is mocked: requests go through botocore and sockets to `python -m moto.server`, and
failures are real ones (a killed server, connections reset or cut by `FaultProxy`).
"""

import concurrent.futures
import hashlib
import logging
import threading
import time

import boto3
import numpy as np
import pytest
from s3_server import (  # noqa: F401  (fixtures)
    create_bucket,
    fault_proxy,
    moto_server,
    own_moto_server,
    point_boto3_at,
    s3_bucket,
)

from tfsplit.data import object_store
from tfsplit.data.common import DatasetFileError
from tfsplit.data.object_store import RetryPolicy, S3Files, parse_s3_url

import tensorflow as tf  # isort: skip  (after tfsplit)

FAST = RetryPolicy(attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
MiB = 1 << 20


def _payload(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _put(bucket, key, data):
    boto3.session.Session().client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def _retry_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.message]


# ----------------------------------------------------------------------------------------------
# URLs and policies (no server).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my.bucket-1/a/b.tfrecord", ("my.bucket-1", "a/b.tfrecord")),
        ("s3://bucket/dir/", ("bucket", "dir/")),
    ],
)
def test_parse_s3_url(url, expected):
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    "url, match",
    [
        ("/local/dir", "s3://bucket/key"),
        ("gs://bucket/key", "s3://bucket/key"),
        (b"s3://bucket/key", "s3://bucket/key"),
        ("s3://", "valid bucket"),
        ("s3:///key", "valid bucket"),
        ("s3://Upper/key", "bucket='Upper'"),
        ("s3://ab/key", "bucket='ab'"),
        ("s3://under_score/key", "valid bucket"),
        ("s3://-dash/key", "valid bucket"),
        ("s3://a..b/key", "valid bucket"),
        ("s3://192.168.1.10/key", "valid bucket"),
        ("s3://bucket/" + "k" * 1025, "at most 1024 bytes"),
    ],
)
def test_parse_s3_url_rejects(url, match):
    with pytest.raises(ValueError, match=match):
        parse_s3_url(url)


def test_object_methods_reject_buckets_and_directories():
    files = S3Files(FAST)
    for url in ("s3://bucket", "s3://bucket/dir/"):
        with pytest.raises(ValueError, match="naming an object"):
            files.read_object(url)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attempts=0), "attempts"),
        (dict(attempts=True), "attempts"),
        (dict(attempts=2.0), "attempts"),
        (dict(initial_backoff_s=-1), "initial_backoff_s"),
        (dict(max_backoff_s=float("inf")), "max_backoff_s"),
        (dict(initial_backoff_s=2.0, max_backoff_s=1.0), "max_backoff_s"),
    ],
)
def test_retry_policy_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)


def test_retry_policy_backoff_doubles_jittered_and_capped():
    policy = RetryPolicy(attempts=10, initial_backoff_s=0.2, max_backoff_s=1.0)
    for retry, full in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (9, 1.0)]:
        delays = [policy.backoff_s(retry) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_join_keeps_the_scheme():
    assert S3Files.join("s3://bucket", "dir", "a.bin") == "s3://bucket/dir/a.bin"
    assert S3Files.join("s3://bucket/dir/", "a.bin") == "s3://bucket/dir/a.bin"
    with pytest.raises(ValueError, match="leaves s3://"):
        S3Files.join("s3://bucket/dir", "/etc/passwd")


def test_s3_filesystem_is_shared_per_policy():
    object_store.clear_s3_filesystems()
    assert object_store.s3_filesystem() is object_store.s3_filesystem(object_store.DEFAULT_RETRY)
    assert object_store.s3_filesystem(FAST) is object_store.s3_filesystem(
        RetryPolicy(attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
    )
    assert object_store.s3_filesystem(FAST) is not object_store.s3_filesystem()
    assert object_store.s3_filesystem(FAST).retry == FAST
    with pytest.raises(ValueError, match="RetryPolicy"):
        object_store.s3_filesystem(3)
    object_store.clear_s3_filesystems()


def test_endpoint_comes_from_the_standard_sources(monkeypatch, tmp_path):
    point_boto3_at(monkeypatch, "http://127.0.0.1:1")
    assert S3Files().endpoint == "http://127.0.0.1:1"  # AWS_ENDPOINT_URL_S3
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert S3Files().endpoint == "http://127.0.0.1:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = tmp_path / "config"
    config.write_text("[default]\nendpoint_url = http://127.0.0.1:3\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert S3Files().endpoint == "http://127.0.0.1:3"


def test_bad_configuration_errors_name_the_object(monkeypatch):
    point_boto3_at(monkeypatch, "localhost:9000")  # no scheme
    with pytest.raises(DatasetFileError, match="read s3://bucket/a.bin: no S3 client .*localhost"):
        S3Files(FAST).read_object("s3://bucket/a.bin")
    point_boto3_at(monkeypatch, "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DatasetFileError, match="size of s3://bucket/a.bin: Unable to locate cred"):
        S3Files(FAST).size("s3://bucket/a.bin")


# ----------------------------------------------------------------------------------------------
# The file methods against the server.
# ----------------------------------------------------------------------------------------------


def test_round_trip(s3_bucket):
    files = S3Files(FAST)
    root = f"s3://{s3_bucket}/shards"
    files.makedirs(root)
    assert not files.exists(root) and files.listdir(root) == []  # makedirs creates nothing
    data = _payload(3 * MiB + 17)
    path = files.join(root, "train-00000-of-00001.tfrecord.partial")
    with files.open(path, "wb") as f:
        for start in range(0, len(data), 100_000):
            f.write(data[start : start + 100_000])
    with files.open(files.join(root, "index.json"), "w") as f:
        f.write('{"name": "héllo"}\n')
    with files.open(files.join(root, "sub", "deep.bin"), "wb") as f:
        f.write(b"x")

    assert files.exists(path) and files.size(path) == len(data)
    assert files.exists(root) and files.isdir(root) and files.isdir(root + "/")
    assert files.isdir(f"s3://{s3_bucket}") and not files.isdir(path)
    assert files.listdir(root) == ["index.json", "sub/", "train-00000-of-00001.tfrecord.partial"]
    assert files.listdir(f"s3://{s3_bucket}") == ["shards/"]
    with files.open(files.join(root, "index.json"), "r") as f:
        assert f.read() == '{"name": "héllo"}\n'
    with files.open(path, "rb") as f:
        assert f.read(10) == data[:10]
        f.seek(2 * MiB + 5)
        assert f.read(100) == data[2 * MiB + 5 : 2 * MiB + 105]
        f.seek(0)
        assert f.read() == data

    final = path[: -len(".partial")]
    files.rename(path, final)
    assert not files.exists(path) and files.read_object(final, len(data), _sha256(data)) == data
    files.remove(final)
    assert not files.exists(final)
    assert files.listdir(root) == ["index.json", "sub/"]
    with pytest.raises(DatasetFileError, match=f"{final}: the object is missing"):
        files.size(final)
    with pytest.raises(DatasetFileError, match=f"remove {final}"):
        files.remove(final)
    with pytest.raises(DatasetFileError, match=f"{final} is missing"):
        files.rename(final, path)
    with pytest.raises(DatasetFileError, match=f"read {final}: the object is missing"):
        files.open(final, "rb")


def test_a_failed_write_uploads_nothing(s3_bucket):
    files = S3Files(FAST)
    path = f"s3://{s3_bucket}/half.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with files.open(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert not files.exists(path)


def test_bucket_missing_is_a_clear_error(s3_bucket):
    files = S3Files(FAST)
    with pytest.raises(DatasetFileError, match="bucket no-such-bucket-x does not exist at http"):
        files.makedirs("s3://no-such-bucket-x/out")
    start = time.monotonic()
    with pytest.raises(DatasetFileError, match="read s3://no-such-bucket-x/a.bin: the bucket"):
        files.read_object("s3://no-such-bucket-x/a.bin")
    assert time.monotonic() - start < 1  # retrying cannot help: not retried
    with pytest.raises(DatasetFileError, match="write s3://no-such-bucket-x/a.bin: the bucket"):
        with files.open("s3://no-such-bucket-x/a.bin", "wb") as f:
            f.write(b"x")
    with pytest.raises(DatasetFileError, match="list s3://no-such-bucket-x/out: the bucket"):
        files.listdir("s3://no-such-bucket-x/out")
    assert not files.exists("s3://no-such-bucket-x/a.bin")


# ----------------------------------------------------------------------------------------------
# read_object: checks and retries.
# ----------------------------------------------------------------------------------------------


def test_read_object_checks_size_and_sha256(s3_bucket):
    data = _payload(2 * MiB + 3)
    path = _put(s3_bucket, "a/shard.tfrecord", data)
    files = S3Files(FAST)
    assert files.read_object(path) == data
    assert files.read_object(path, expected_size=len(data), expected_sha256=_sha256(data)) == data
    with pytest.raises(ValueError, match="expected_sha256"):
        files.read_object(path, expected_sha256="ABC")
    with pytest.raises(ValueError, match="expected_size"):
        files.read_object(path, expected_size=-1)


def test_read_object_missing_retries_then_names_it(s3_bucket, caplog):
    path = f"s3://{s3_bucket}/missing.tfrecord"
    with pytest.raises(DatasetFileError) as err:
        S3Files(FAST).read_object(path)
    assert f"Could not read {path} after 3 attempts: the object is missing (NoSuchKey" in str(
        err.value
    )
    assert len(_retry_warnings(caplog)) == 2


def test_read_object_waits_for_an_object_that_appears(s3_bucket):
    path = f"s3://{s3_bucket}/late.bin"
    timer = threading.Timer(0.2, _put, (s3_bucket, "late.bin", b"late"))
    timer.start()
    try:
        assert S3Files(RetryPolicy(6, 0.1, 0.2)).read_object(path, 4) == b"late"
    finally:
        timer.join()


def test_read_object_wrong_sha256_or_size_is_retried_then_named(s3_bucket, caplog):
    expected = _payload(1000, seed=1)
    path = _put(s3_bucket, "corrupt.bin", _payload(1000, seed=2))
    files = S3Files(FAST)
    with pytest.raises(DatasetFileError) as err:
        files.read_object(path, expected_size=1000, expected_sha256=_sha256(expected))
    assert str(err.value) == (
        f"Could not read {path} after 3 attempts: sha256 {_sha256(_payload(1000, seed=2))} but "
        f"expected {_sha256(expected)}"
    )
    assert len(_retry_warnings(caplog)) == 2
    with pytest.raises(DatasetFileError, match=f"read {path} after 3 attempts: 1000 bytes but "):
        files.read_object(path, expected_size=999)


def test_read_object_server_killed_names_object_and_endpoint(own_moto_server):
    bucket = create_bucket()
    path = _put(bucket, "shard.bin", b"data")
    files = S3Files(FAST)
    assert files.read_object(path) == b"data"
    own_moto_server.kill()
    with pytest.raises(DatasetFileError) as err:
        files.read_object(path, 4)
    message = str(err.value)
    assert message.startswith(f"Could not read {path} after 3 attempts: server unreachable at ")
    assert own_moto_server.endpoint in message


def test_read_object_retries_through_an_outage(fault_proxy, caplog):
    bucket = create_bucket()
    data = _payload(MiB + 1)
    path = _put(bucket, "shard.bin", data)
    files = S3Files(RetryPolicy(attempts=8, initial_backoff_s=0.1, max_backoff_s=0.2))
    assert files.endpoint == fault_proxy.endpoint  # the client is made before the outage starts
    fault_proxy.down_for(0.3)
    start = time.monotonic()
    assert files.read_object(path, len(data), _sha256(data)) == data
    assert fault_proxy.refused >= 1 and time.monotonic() - start >= 0.3


def test_botocore_tries_each_attempt_twice(fault_proxy):
    bucket = create_bucket()
    path = _put(bucket, "shard.bin", b"data")
    fault_proxy.down()
    with pytest.raises(DatasetFileError, match=f"read {path} after 2 attempts: server unreachable"):
        S3Files(RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)).read_object(
            path
        )
    assert fault_proxy.refused == 4  # 2 attempts of ours x 2 tries of botocore's


def test_read_object_retries_a_cut_transfer(fault_proxy):
    bucket = create_bucket()
    data = _payload(2 * MiB)
    path = _put(bucket, "shard.bin", data)
    fault_proxy.drop_after(MiB)
    assert S3Files(FAST).read_object(path, len(data), _sha256(data)) == data
    assert fault_proxy.dropped == 1


def test_read_object_from_threads_and_tf_data(s3_bucket):
    blobs = {_put(s3_bucket, f"s{i}.bin", _payload(300_000 + i, seed=i)): i for i in range(4)}
    files = S3Files(FAST)
    paths = list(blobs) * 3
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        read = list(pool.map(files.read_object, paths))
    assert [len(r) for r in read] == [300_000 + blobs[p] for p in paths]

    def fetch(path):
        return files.read_object(path.numpy().decode())

    dataset = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: tf.py_function(fetch, [p], tf.string), num_parallel_calls=4, deterministic=True
    )
    lengths = [len(x.numpy()) for x in dataset]
    assert lengths == [300_000 + blobs[p] for p in paths]


# ----------------------------------------------------------------------------------------------
# The streaming reader: resume with Range after a cut.
# ----------------------------------------------------------------------------------------------


def test_reader_resumes_with_a_range_request(fault_proxy):
    bucket = create_bucket()
    data = _payload(3 * MiB + 5)
    path = _put(bucket, "big.bin", data)
    files = S3Files(FAST)
    fault_proxy.drop_after(MiB + MiB // 2)  # the first 1 MiB read succeeds, the second is cut
    with files.open(path, "rb") as f:
        chunks = list(iter(lambda: f.read(MiB), b""))
    assert b"".join(chunks) == data
    # One resume, from the byte reached (at least the first 1 MiB read; urllib3 may have handed
    # over part of the cut second read before it failed).
    assert fault_proxy.dropped == 1 and len(fault_proxy.ranges) == 1
    assert MiB <= fault_proxy.ranges[0] < len(data)


def test_reader_fails_when_the_object_changes_before_a_resume(fault_proxy, moto_server):
    bucket = create_bucket()
    path = _put(bucket, "big.bin", _payload(3 * MiB))
    files = S3Files(FAST)
    fault_proxy.drop_after(MiB + MiB // 2)
    with files.open(path, "rb") as f:
        f.read(MiB)
        direct = boto3.session.Session().client("s3", endpoint_url=moto_server.endpoint)
        direct.put_object(Bucket=bucket, Key="big.bin", Body=b"replaced")
        with pytest.raises(DatasetFileError, match=f"read {path}: the object changed"):
            f.read()
    assert len(fault_proxy.ranges) == 1


def test_reader_gives_up_after_the_policy(fault_proxy):
    bucket = create_bucket()
    path = _put(bucket, "big.bin", _payload(2 * MiB))
    files = S3Files(RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01))
    fault_proxy.drop_after(MiB + MiB // 2)
    with files.open(path, "rb") as f:
        f.read(MiB)
        fault_proxy.down()
        with pytest.raises(DatasetFileError, match=f"read {path} after 2 attempts: server"):
            f.read()
    fault_proxy.up()
