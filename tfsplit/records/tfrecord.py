"""The TFRecord framing: each record is a little-endian uint64 length, a uint32 CRC of the
length, the record's bytes, and a uint32 CRC of the bytes."""

import struct

_HEADER_BYTES, _FOOTER_BYTES = 12, 4


class RecordError(ValueError):
    """A TFRecord file or an Example record that does not parse."""


def split_records(data, path):
    """The records of a whole TFRecord file held in `data` (bytes), in order.

    The CRCs are not checked: the caller verifies the whole file's sha256 first (the shard
    index holds it). A frame that runs past the end names `path` (a truncated file).
    """
    records, offset, end = [], 0, len(data)
    while offset < end:
        if end - offset < _HEADER_BYTES:
            raise RecordError(f"{path} ends inside a record header at byte {offset}")
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + _HEADER_BYTES
        offset = start + length + _FOOTER_BYTES
        if offset > end:
            raise RecordError(
                f"{path}: a record of {length} bytes at byte {start - _HEADER_BYTES} runs past "
                f"the end of the file ({end} bytes; truncated or not a TFRecord file)"
            )
        records.append(data[start : start + length])
    return records
