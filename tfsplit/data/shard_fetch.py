"""A shard's records, fetched: local files natively, object-store shards whole, checked, cached.

`shard_reader` turns the records into pipelines; this module is where they come from, and the
up-front checks of the files an index lists.
"""

import concurrent.futures
import hashlib
import os
import tempfile

import tensorflow as tf
from absl import logging

from tfsplit.data.common import DatasetFileError
from tfsplit.data.shard_index import file_sha256, filesystem, is_local
from tfsplit.records import RecordError, split_records


def check_shard_files(shards, verify_checksums):
    """Every shard exists with its indexed size; local ones (when asked) also their sha256.

    Object-store shards are hashed as they stream in instead (see `_remote_records`), so that
    training starts without reading the whole dataset first.
    """

    def size_of(shard):
        files = filesystem(shard.path)
        return files.size(shard.path) if files.exists(shard.path) else None

    workers = max(1, min(16, len(shards)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(size_of, shards))
        for shard, size in zip(shards, sizes):
            if size is None:
                raise DatasetFileError(
                    f"Shard {shard.path} is missing; its index lists it with "
                    f"{shard.num_samples} samples"
                )
            if size != shard.num_bytes:
                raise DatasetFileError(
                    f"Shard {shard.path} has {size} bytes; its index expects {shard.num_bytes} "
                    "(truncated or replaced)"
                )
        local = [s for s in shards if is_local(s.path)]
        if not verify_checksums or not local:
            return
        digests = list(pool.map(file_sha256, [s.path for s in local]))
    for shard, digest in zip(local, digests):
        if digest != shard.sha256:
            raise DatasetFileError(
                f"Shard {shard.path} has sha256 {digest}; its index expects {shard.sha256} "
                "(corrupt or replaced)"
            )


def local_records(path, expected):
    """One element: the (n,) serialized records of a local shard file.

    Records that fail their CRC are dropped (the error logged) and the count check in `_decode`
    then names the file; an empty file gives an empty element so that the check still runs.
    """
    records = tf.data.TFRecordDataset(path).ignore_errors(log_warning=True)
    whole = records.batch(expected + 1).take(1)
    return whole.concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.string))).take(1)


def remote_records(path, num_bytes, sha256, local_cache_dir):
    """One element: the (n,) records of an object-store shard, read whole with its size and
    sha256 checked (retried with backoff; the error names the object).

    With `local_cache_dir`, a verified shard is kept there under its sha256 and read from disk
    (checked again) on later epochs and runs. Memory holds the shards being read: at most
    a window of them (`shard_reader`), each about three times its file size while it is split.
    """

    def read(path, num_bytes, sha256):
        path, sha256 = path.numpy().decode(), sha256.numpy().decode()
        data = cached_object(path, int(num_bytes), sha256, local_cache_dir)
        try:
            return tf.constant(split_records(data, path), tf.string)
        except RecordError as error:
            raise DatasetFileError(str(error)) from None

    records = tf.py_function(read, [path, num_bytes, sha256], tf.string)
    return tf.data.Dataset.from_tensors(tf.ensure_shape(records, [None]))


def cached_object(path, num_bytes, sha256, local_cache_dir):
    """The bytes of object `path`, through the local cache directory when there is one."""
    if not local_cache_dir:
        return filesystem(path).read_object(path, num_bytes, sha256)
    local = os.path.join(local_cache_dir, f"{sha256}.tfrecord")
    if os.path.isfile(local) and os.path.getsize(local) == num_bytes:
        with open(local, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        logging.warning("Cached copy %s of %s is corrupt; reading the object again", local, path)
    data = filesystem(path).read_object(path, num_bytes, sha256)
    os.makedirs(local_cache_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=local_cache_dir, suffix=".partial", delete=False) as f:
        f.write(data)
    os.replace(f.name, local)
    return data
