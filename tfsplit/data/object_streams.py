"""Streaming reads and uploads of one S3 object, behind `S3Files.open` (file objects).

Both take the `S3Files` that opened them (`files`) for its client, its `RetryPolicy` and its
retried `call`.
"""

import contextlib
import io
import tempfile

from absl import logging

from tfsplit.data.retry import Retry, with_retries
from tfsplit.data.s3_client import CHUNK_BYTES, S3_ERRORS, TRANSFER_CONFIG, problem


class ObjectReader(io.RawIOBase):
    """Streams one object; a connection lost mid-object resumes at the byte reached.

    The resumed request is a Range request conditioned on the first response's ETag, so an
    object replaced in between fails (naming it) instead of splicing two versions together.
    """

    def __init__(self, files, url, bucket, key):
        super().__init__()
        self._files, self._url, self._bucket, self._key = files, url, bucket, key
        self._what, self._body = f"read {url}", None
        response = files.call(self._what, lambda s3: s3.get_object(Bucket=bucket, Key=key))
        self._body, self._etag = response["Body"], response["ETag"]
        self._size, self._pos = response["ContentLength"], 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if start + offset < 0:
            raise ValueError(f"Cannot seek {self._url} to {start + offset}")
        if start + offset != self._pos:
            self._drop_body()
            self._pos = start + offset
        return self._pos

    def readinto(self, buffer):
        wanted = min(len(buffer), CHUNK_BYTES, max(0, self._size - self._pos))
        if wanted == 0:
            return 0
        data = with_retries(self._files.retry, self._what, lambda: self._read(wanted))
        memoryview(buffer)[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self):
        chunks = []
        for chunk in iter(lambda: self.read(CHUNK_BYTES), b""):
            chunks.append(chunk)
        return b"".join(chunks)

    def _read(self, wanted):
        """Up to `wanted` bytes at the current position; a lost connection raises `Retry`."""
        try:
            if self._body is None:
                self._body = self._files.client.get_object(
                    Bucket=self._bucket,
                    Key=self._key,
                    Range=f"bytes={self._pos}-",
                    IfMatch=self._etag,
                )["Body"]
                logging.info("Resuming %s at byte %d of %d", self._url, self._pos, self._size)
            data = self._body.read(wanted)
            if not data:
                raise Retry(f"the stream ended at byte {self._pos} of {self._size}")
            return data
        except S3_ERRORS as err:
            self._drop_body()
            raise problem(err, self._what, self._files.endpoint) from err
        except Retry:
            self._drop_body()
            raise

    def _drop_body(self):
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self):
        self._drop_body()
        super().close()


class ObjectWriter:
    """Spools writes to a local temporary file and uploads it on close.

    S3 has no appends, and spooling keeps memory flat for shards of any size. A with-block that
    raises uploads nothing, so a failed write never leaves half an object under its name.
    """

    def __init__(self, files, url, bucket, key, text):
        self._files, self._url, self._bucket, self._key = files, url, bucket, key
        self._text = text
        self._spool = tempfile.TemporaryFile(prefix="tfsplit-s3-")
        self.closed = False

    def writable(self):
        return True

    def write(self, data):
        if self._text:
            if not isinstance(data, str):
                raise TypeError(f"Writing {self._url} in text mode takes str, not {type(data)}")
            self._spool.write(data.encode("utf-8"))
            return len(data)
        return self._spool.write(data)

    def tell(self):
        return self._spool.tell()

    def flush(self):
        """Nothing to do: the object is uploaded whole on close."""

    def close(self):
        """Uploads what was written (with boto3's managed, multipart upload) and frees it."""
        if self.closed:
            return
        try:
            self._files.call(f"write {self._url}", self._upload)
        finally:
            self.discard()

    def _upload(self, s3):
        self._spool.seek(0)
        s3.upload_fileobj(self._spool, self._bucket, self._key, Config=TRANSFER_CONFIG)

    def discard(self):
        """Drops what was written without uploading it."""
        self.closed = True
        self._spool.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            logging.warning("Not uploading %s: the write failed (%s)", self._url, exc)
            self.discard()
