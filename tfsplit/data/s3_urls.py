"""`s3://bucket/key` URLs: checked against S3's rules before any request is made."""

import re

SCHEME = "s3://"
_MAX_KEY_BYTES = 1024
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_s3_url(url):
    """(bucket, key) of `s3://bucket[/key]`; key is "" for a bucket or "prefix/" for a directory.

    Raises:
      ValueError: when `url` is not an s3:// URL with a valid bucket name and key.
    """
    if not isinstance(url, str) or not url.startswith(SCHEME):
        raise ValueError(f"Expected an s3://bucket/key URL. Received: {url!r}")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket or re.match(r"^\d+(\.\d+){3}$", bucket):
        raise ValueError(
            f"{url!r} does not name a valid bucket: expected 3-63 lowercase letters, digits, "
            f"'.' or '-', starting and ending with a letter or digit. Received: bucket={bucket!r}"
        )
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise ValueError(f"{url!r}: an S3 key has at most {_MAX_KEY_BYTES} bytes")
    return bucket, key


def object_key(url):
    """(bucket, key) of a URL that must name an object (not a bucket or a directory)."""
    bucket, key = parse_s3_url(url)
    if not key or key.endswith("/"):
        raise ValueError(f"Expected an s3://bucket/key URL naming an object. Received: {url!r}")
    return bucket, key
