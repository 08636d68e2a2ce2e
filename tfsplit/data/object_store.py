"""S3 object storage behind the file methods of local paths (`S3Files`), retried and checked.

Endpoint, region and credentials come only from boto3's standard sources (AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and friends, `endpoint_url` in ~/.aws/config), so the same
code reads AWS S3 or MinIO by configuration alone. Object stores and networks fail transiently:
every call is retried with exponential backoff and jitter per a `RetryPolicy` (botocore's own
retries are kept to one, so the two do not multiply), and every error that reaches the user names
the object as `s3://bucket/key`.

Object stores have no directories: a "directory" is a key prefix ending in "/", `makedirs` creates
nothing, and an empty directory cannot be told from a missing one.
"""

import contextlib
import hashlib
import io
import posixpath
import re
import threading

import boto3
import botocore.exceptions

from tfsplit.codec.values import is_int
from tfsplit.data.common import DatasetFileError
from tfsplit.data.object_streams import ObjectReader, ObjectWriter
from tfsplit.data.retry import Retry, RetryPolicy, with_retries
from tfsplit.data.s3_client import (
    CHUNK_BYTES,
    CLIENT_CONFIG,
    S3_ERRORS,
    TRANSFER_CONFIG,
    error_code,
    is_missing,
    is_missing_bucket,
    problem,
)
from tfsplit.data.s3_urls import SCHEME, object_key, parse_s3_url  # noqa: F401 (public here too)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_RETRY = RetryPolicy()


class S3Files:
    """`s3://bucket/key` paths with the methods of shard_index's local files, plus `read_object`.

    One boto3 client per instance, created on first use: clients are thread-safe (sessions are
    not), so the shard reader may call `read_object` from several tf.py_function threads at once.
    The endpoint is resolved when the client is made; see `clear_s3_filesystems`.

    Args:
      retry: the `RetryPolicy` of every call.
    """

    def __init__(self, retry=DEFAULT_RETRY):
        if not isinstance(retry, RetryPolicy):
            raise ValueError(f"`retry` must be a RetryPolicy. Received: retry={retry!r}")
        self.retry = retry
        self._s3 = None

    @property
    def client(self):
        # No lock: two threads that both find none each build one (a spare client, no harm).
        # Under a lock, a tf.data thread stopped mid-creation (its iterator torn down) held
        # it for good, and every later call here waited forever.
        if self._s3 is None:
            self._s3 = boto3.session.Session().client("s3", config=CLIENT_CONFIG)
        return self._s3

    @property
    def endpoint(self):
        return self.client.meta.endpoint_url

    def _client_for(self, what):
        """The client, or a DatasetFileError naming `what` when the AWS configuration is bad."""
        try:
            return self.client
        except (ValueError, botocore.exceptions.BotoCoreError) as err:
            raise DatasetFileError(
                f"Could not {what}: no S3 client from the AWS configuration "
                f"(AWS_ENDPOINT_URL_S3, AWS_PROFILE, ~/.aws/config): {err}"
            ) from err

    def call(self, what, request, retry_missing=False):
        """`request(client)` with retries; errors become DatasetFileError naming `what`."""
        client = self._client_for(what)

        def attempt():
            try:
                return request(client)
            except S3_ERRORS as err:
                raise problem(err, what, self.endpoint, retry_missing) from err

        return with_retries(self.retry, what, attempt)

    def _head(self, url, what):
        """head_object's response for `url`, or None when the object does not exist."""
        bucket, key = object_key(url)

        def head(s3):
            try:
                return s3.head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as err:
                if is_missing(err) or is_missing_bucket(err):
                    return None
                raise

        return self.call(what, head)

    # ------------------------------------------------------------------------------------------
    # The methods of shard_index's local files.
    # ------------------------------------------------------------------------------------------

    def open(self, path, mode="r"):
        """A reader ("rb", "r") or a writer ("wb", "w"; uploaded on close) of one object."""
        bucket, key = object_key(path)
        if mode in ("r", "rb"):
            reader = io.BufferedReader(ObjectReader(self, path, bucket, key), CHUNK_BYTES)
            return reader if mode == "rb" else io.TextIOWrapper(reader, encoding="utf-8")
        if mode in ("w", "wb"):
            return ObjectWriter(self, path, bucket, key, text=mode == "w")
        raise ValueError(f"`mode` must be 'r', 'rb', 'w' or 'wb'. Received: mode={mode!r}")

    def exists(self, path):
        """Whether `path` is an object, a directory (a prefix holding keys) or a bucket."""
        bucket, key = parse_s3_url(path)
        if key and not key.endswith("/") and self._head(path, f"check {path}") is not None:
            return True
        return self.isdir(path)

    def isdir(self, path):
        """Whether any key starts with `key/` (or, for s3://bucket, whether the bucket exists)."""
        bucket, key = parse_s3_url(path)
        if not key:
            return self._bucket_exists(bucket, f"check {path}")
        prefix = key.rstrip("/") + "/"

        def any_key(s3):
            try:
                return s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)["KeyCount"] > 0
            except botocore.exceptions.ClientError as err:
                if is_missing_bucket(err):
                    return False
                raise

        return self.call(f"list {path}", any_key)

    def listdir(self, path):
        """Names directly under `path`, sub-directories ending in "/" (as tf.io.gfile.listdir).

        An empty or missing directory lists as [] (object stores cannot tell them apart).
        """
        bucket, key = parse_s3_url(path)
        prefix = key.rstrip("/") + "/" if key else ""

        def names(s3):
            found = set()
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                found.update(o["Key"][len(prefix) :] for o in page.get("Contents", ()))
                found.update(p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", ()))
            found.discard("")  # A zero-byte "directory marker" object some tools create.
            return sorted(found)

        return self.call(f"list {path}", names)

    def makedirs(self, path):
        """Creates nothing (keys need no parent); fails unless the bucket exists."""
        bucket, _ = parse_s3_url(path)
        if not self._bucket_exists(bucket, f"create {path}"):
            raise DatasetFileError(
                f"Could not create {path}: bucket {bucket} does not exist at {self.endpoint} "
                "(create the bucket first; nothing else needs creating)"
            )

    def _bucket_exists(self, bucket, what):
        def head_bucket(s3):
            try:
                s3.head_bucket(Bucket=bucket)
                return True
            except botocore.exceptions.ClientError as err:
                if error_code(err) in ("404", "NoSuchBucket", "NotFound"):
                    return False
                raise

        return self.call(what, head_bucket)

    def remove(self, path):
        """Deletes one object; raises when it does not exist, as a local remove would."""
        bucket, key = object_key(path)
        what = f"remove {path}"
        if self._head(path, what) is None:
            raise DatasetFileError(f"Could not {what}: the object is missing")
        self.call(what, lambda s3: s3.delete_object(Bucket=bucket, Key=key))

    @staticmethod
    def join(path, *paths):
        """posixpath.join, which keeps `s3://`; an absolute part would leave the bucket."""
        joined = posixpath.join(path, *paths)
        if not joined.startswith(SCHEME):
            raise ValueError(f"Joining {(path, *paths)} leaves s3://. Received: {joined!r}")
        return joined

    def size(self, path):
        """The object's length in bytes."""
        response = self._head(path, f"get the size of {path}")
        if response is None:
            raise DatasetFileError(f"Could not get the size of {path}: the object is missing")
        return response["ContentLength"]

    def rename(self, source, target):
        """Server-side copy, then delete: S3 has no rename, so a reader may briefly see both."""
        (source_bucket, source_key), (bucket, key) = object_key(source), object_key(target)
        if (source_bucket, source_key) == (bucket, key):
            return
        what = f"rename {source} to {target}"
        if self._head(source, what) is None:
            raise DatasetFileError(f"Could not {what}: {source} is missing")
        copy_source = {"Bucket": source_bucket, "Key": source_key}
        self.call(what, lambda s3: s3.copy(copy_source, bucket, key, Config=TRANSFER_CONFIG))
        self.call(what, lambda s3: s3.delete_object(Bucket=source_bucket, Key=source_key))

    # ------------------------------------------------------------------------------------------
    # Whole-object reads for the shard reader.
    # ------------------------------------------------------------------------------------------

    def read_object(self, path, expected_size=None, expected_sha256=None):
        """The object's bytes, streamed in CHUNK_BYTES reads and checked against the index.

        The whole read is retried per the policy when the server is unreachable, the object is
        missing (a store that is only eventually consistent) or the size or sha256 differ (a
        corrupt transfer). Safe to call from several threads at once.

        Args:
          path: s3://bucket/key of the object.
          expected_size: its size in bytes, or None to accept any.
          expected_sha256: its sha256 as 64 lowercase hex digits, or None to skip the check.

        Raises:
          DatasetFileError: after the last attempt, naming the object, what was wrong and how many
            attempts were made; or at once when retrying cannot help (no bucket, access denied).
        """
        bucket, key = object_key(path)
        if expected_size is not None and (not is_int(expected_size) or expected_size < 0):
            raise ValueError(f"`expected_size` must be an int >= 0. Received: {expected_size!r}")
        if expected_sha256 is not None and not _SHA256.match(str(expected_sha256)):
            raise ValueError(
                f"`expected_sha256` must be 64 lowercase hex digits. Received: {expected_sha256!r}"
            )
        what = f"read {path}"
        client = self._client_for(what)

        def attempt():
            try:
                response = client.get_object(Bucket=bucket, Key=key)
                with contextlib.closing(response["Body"]) as body:
                    size = response["ContentLength"]
                    if expected_size is not None and size != expected_size:
                        raise Retry(f"{size} bytes but the index expects {expected_size}")
                    digest, chunks = hashlib.sha256(), []
                    for chunk in iter(lambda: body.read(CHUNK_BYTES), b""):
                        digest.update(chunk)
                        chunks.append(chunk)
            except S3_ERRORS as err:
                raise problem(err, what, self.endpoint, retry_missing=True) from err
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                raise Retry(f"sha256 {digest.hexdigest()} but expected {expected_sha256}")
            return b"".join(chunks)

        return with_retries(self.retry, what, attempt)


_FILESYSTEMS = {}
_FILESYSTEMS_LOCK = threading.Lock()


def s3_filesystem(retry=None):
    """The shared `S3Files` for `retry` (default `DEFAULT_RETRY`): one client per policy, so
    every reader shares its connection pool."""
    retry = DEFAULT_RETRY if retry is None else retry
    if not isinstance(retry, RetryPolicy):
        raise ValueError(f"`retry` must be a RetryPolicy. Received: retry={retry!r}")
    with _FILESYSTEMS_LOCK:
        if retry not in _FILESYSTEMS:
            _FILESYSTEMS[retry] = S3Files(retry)
        return _FILESYSTEMS[retry]


def clear_s3_filesystems():
    """Forgets the shared `S3Files`: the next ones resolve endpoint and credentials anew (for
    tests, and for programs that change the AWS environment)."""
    with _FILESYSTEMS_LOCK:
        _FILESYSTEMS.clear()
