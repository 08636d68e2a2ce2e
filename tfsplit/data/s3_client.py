"""The boto3 client's settings and what its errors mean: worth another try, or a final error.

`object_store` (the files) and `object_streams` (one object as a file object) share these, so
that a read, a write and a listing time out, retry and fail with the same words.
"""

import botocore.config
import botocore.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig

from tfsplit.data.common import DatasetFileError
from tfsplit.data.retry import Retry

CHUNK_BYTES = 1 << 20  # Reads stream objects in 1 MiB pieces (bounded memory per reader).
CLIENT_CONFIG = botocore.config.Config(
    connect_timeout=3,  # A dead endpoint fails in seconds; `RetryPolicy` decides how often.
    read_timeout=10,  # No byte for this long: the connection is treated as lost and resumed.
    # Two tries per call in all (botocore's `max_attempts` would count retries only, so 3 tries);
    # our `RetryPolicy` does the patient retrying, and nesting two patient loops multiplies them.
    retries={"mode": "standard", "total_max_attempts": 2},
    max_pool_connections=16,  # tf.data reads several shards at once from one client.
)
TRANSFER_CONFIG = TransferConfig(max_concurrency=4)
# Errors of the connection or of the transfer, not of the request: always worth another try.
_TRANSIENT_ERRORS = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.FlexibleChecksumError,
    urllib3.exceptions.HTTPError,
)
# Of those, the ones where the server answered but the body did not arrive whole.
_BROKEN_TRANSFER_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.FlexibleChecksumError,
    urllib3.exceptions.ProtocolError,
)
# Everything a call can raise: the transient errors, the server's answers and the rest of botocore.
S3_ERRORS = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    urllib3.exceptions.HTTPError,
)
_MISSING_CODES = ("NoSuchKey", "404", "NotFound")
_DENIED_CODES = ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch")
_THROTTLE_CODES = ("SlowDown", "Throttling", "RequestTimeout", "RequestTimeTooSkewed")


def error_code(err):
    """The S3 error code of a ClientError ("NoSuchKey", "404", ...)."""
    return str(err.response.get("Error", {}).get("Code", ""))


def is_missing(err):
    return isinstance(err, botocore.exceptions.ClientError) and error_code(err) in _MISSING_CODES


def is_missing_bucket(err):
    return isinstance(err, botocore.exceptions.ClientError) and error_code(err) == "NoSuchBucket"


def problem(err, what, endpoint, retry_missing=False):
    """`Retry` for a transient error of one of `S3_ERRORS` (or a missing object, when asked),
    else the final DatasetFileError; both name what failed and the `endpoint` asked."""
    if isinstance(err, _BROKEN_TRANSFER_ERRORS):
        return Retry(f"the transfer from {endpoint} broke off: {err}")
    if isinstance(err, _TRANSIENT_ERRORS):
        return Retry(f"server unreachable at {endpoint}: {err}")
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return DatasetFileError(
            f"Could not {what}: {err} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE)"
        )
    if not isinstance(err, botocore.exceptions.ClientError):
        return DatasetFileError(f"Could not {what}: {err}")
    code = error_code(err)
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _MISSING_CODES:
        missing = f"the object is missing ({code} at {endpoint})"
        return Retry(missing) if retry_missing else DatasetFileError(f"Could not {what}: {missing}")
    if code == "NoSuchBucket":
        return DatasetFileError(f"Could not {what}: the bucket does not exist at {endpoint}")
    if code in _DENIED_CODES:
        return DatasetFileError(
            f"Could not {what}: access denied by {endpoint} ({code}); check the "
            "credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy"
        )
    if code == "PreconditionFailed":
        return DatasetFileError(f"Could not {what}: the object changed while it was read")
    if status >= 500 or code in _THROTTLE_CODES:
        return Retry(f"{endpoint} answered {code or status}: {err}")
    return DatasetFileError(f"Could not {what}: {err}")
