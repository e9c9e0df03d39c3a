"""TFRecord files and the TFace 4-field index, read and written without TensorFlow or ``dareblopy``.

Frame (the standard TFRecord framing, METHODS.md §1.2)::

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | payload | uint32 masked_crc32c(payload)

so a record occupies ``length + 16`` bytes. The payload is a ``tf.train.Example`` protobuf; TFace stores the JPEG
under the feature ``"image"`` (a BytesList) and we also write ``"label"`` (an Int64List) so DALI's TFRecord reader
can produce labels. The protobuf subset needed here (varints, length-delimited fields, packed or unpacked int64) is
encoded and decoded below by hand: about 60 lines instead of a protobuf/TensorFlow dependency.

TFace layout (``tools/img2tfrecord.py``): records in ``DATA_ROOT/<name>/<name>-%05d.tfrecord`` shards, and an index
``<name>.txt`` whose tab-separated lines are ``<name> <shard> <byte_offset> <label>``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ppfr.data._common import CorruptSampleError, DataFormatError, check_label
from ppfr.data.crc32c import masked_crc32c

SHARD_SIZE = 500_000  # records per shard file, as TFace's img2tfrecord.py


# ------------------------------------------------------------------------------------------ record framing
def frame(payload: bytes) -> bytes:
    """One framed record: length, its CRC, the payload, the payload's CRC."""
    head = struct.pack("<Q", len(payload))
    return head + struct.pack("<I", masked_crc32c(head)) + payload + struct.pack("<I", masked_crc32c(payload))


def unframe(buf: bytes | memoryview, offset: int = 0, *, check_crc: bool = True, where: str = "") -> tuple[bytes, int]:
    """Parse the record starting at ``offset`` of ``buf``; returns (payload, offset of the next record).

    Raises:
        CorruptSampleError: short read, or a CRC mismatch (when ``check_crc``).
    """
    if offset + 12 > len(buf):
        raise CorruptSampleError(f"{where}: truncated TFRecord header at byte {offset}")
    head = bytes(buf[offset : offset + 8])
    (length,) = struct.unpack("<Q", head)
    (len_crc,) = struct.unpack("<I", buf[offset + 8 : offset + 12])
    if check_crc and masked_crc32c(head) != len_crc:
        raise CorruptSampleError(f"{where}: TFRecord length CRC mismatch at byte {offset}")
    end = offset + 12 + length
    if end + 4 > len(buf):
        raise CorruptSampleError(f"{where}: truncated TFRecord payload at byte {offset} (length {length})")
    payload = bytes(buf[offset + 12 : end])
    if check_crc and masked_crc32c(payload) != struct.unpack("<I", buf[end : end + 4])[0]:
        raise CorruptSampleError(f"{where}: TFRecord payload CRC mismatch at byte {offset}")
    return payload, end + 4


def read_record(f: BinaryIO, offset: int, *, check_crc: bool = True, where: str = "") -> bytes:
    """Seek to ``offset`` in an open file and read one record's payload (the TFace 4-field index access path).

    Raises:
        CorruptSampleError: as :func:`unframe`, an implausible length, or a read that fails (EIO, a vanished file).
    """
    try:
        f.seek(offset)
        head = f.read(12)
        if len(head) < 12:
            raise CorruptSampleError(f"{where}: truncated TFRecord header at byte {offset}")
        (length,) = struct.unpack("<Q", head[:8])
        if length > 1 << 31:  # a garbage length would make us allocate gigabytes
            raise CorruptSampleError(f"{where}: implausible TFRecord length {length} at byte {offset}")
        record = head + f.read(length + 4)
    except OSError as exc:
        raise CorruptSampleError(f"{where}: unreadable ({exc.strerror or exc})") from None
    payload, _ = unframe(record, 0, check_crc=check_crc, where=where)
    return payload


def iter_records(path: str | Path, *, check_crc: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) for every record of a TFRecord file, in order."""
    data = Path(path).read_bytes()
    off = 0
    while off < len(data):
        payload, nxt = unframe(data, off, check_crc=check_crc, where=str(path))
        yield off, payload
        off = nxt


class TFRecordWriter:
    """Append records to a TFRecord file; ``write`` returns the record's byte offset (what the index stores)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._off = 0

    def write(self, payload: bytes) -> int:
        off = self._off
        rec = frame(payload)
        self._f.write(rec)
        self._off += len(rec)
        return off

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ tf.train.Example (subset)
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CorruptSampleError("bad protobuf varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """Yield (field number, wire type, value) of a protobuf message; values of type 2 are bytes, 0 ints."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
            yield num, wt, val
        elif wt == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise CorruptSampleError("truncated protobuf field")
            yield num, wt, buf[pos : pos + n]
            pos += n
        elif wt == 1:
            yield num, wt, int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wt == 5:
            yield num, wt, int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise CorruptSampleError(f"unsupported protobuf wire type {wt}")


def encode_example(image: bytes, label: int | None = None) -> bytes:
    """A ``tf.train.Example`` with feature ``image`` (BytesList of one) and, if given, ``label`` (Int64List of one)."""
    feats = [(b"image", _field(1, _field(1, image)))]  # Feature.bytes_list = 1; BytesList.value = 1
    if label is not None:
        feats.append((b"label", _field(3, _field(1, _varint(int(label))))))  # int64_list = 3, packed value = 1
    entries = b"".join(_field(1, _field(1, k) + _field(2, v)) for k, v in feats)  # map entry: key = 1, value = 2
    return _field(1, entries)  # Example.features = 1


def decode_example(payload: bytes) -> dict[str, list[bytes] | list[int]]:
    """Parse a ``tf.train.Example``: {feature name: list of bytes (BytesList) or ints (Int64List)}.

    FloatList features are skipped (never used for faces). Raises CorruptSampleError on malformed input.
    """
    out: dict[str, list] = {}
    for num, _, features in _fields(payload):
        if num != 1 or not isinstance(features, bytes):
            continue
        for fnum, _, entry in _fields(features):
            if fnum != 1 or not isinstance(entry, bytes):
                continue
            key, value = None, b""
            for enum, _, v in _fields(entry):
                if enum == 1 and isinstance(v, bytes):
                    key = v.decode("utf-8", "replace")
                elif enum == 2 and isinstance(v, bytes):
                    value = v
            if key is None:
                continue
            for knum, _, lst in _fields(value):
                if knum == 1 and isinstance(lst, bytes):  # BytesList
                    out[key] = [v for n, _, v in _fields(lst) if n == 1]
                elif knum == 3 and isinstance(lst, bytes):  # Int64List, packed or not
                    vals: list[int] = []
                    for n, wt, v in _fields(lst):
                        if n != 1:
                            continue
                        if wt == 2:
                            p = 0
                            while p < len(v):
                                x, p = _read_varint(v, p)
                                vals.append(x)
                        else:
                            vals.append(int(v))
                    out[key] = [x - (1 << 64) if x >= 1 << 63 else x for x in vals]
    return out


def example_image(payload: bytes, key: str = "image", where: str = "") -> bytes:
    """The JPEG/PNG bytes stored under ``key`` in a serialized Example."""
    feats = decode_example(payload)
    vals = feats.get(key)
    if not vals or not isinstance(vals[0], bytes):
        raise CorruptSampleError(f"{where}: TFRecord example has no bytes feature {key!r} (has {sorted(feats)})")
    return vals[0]


# ------------------------------------------------------------------------------------ TFace 4-field index
def shard_path(data_root: str | Path, name: str, shard: int) -> Path:
    return Path(data_root) / name / f"{name}-{shard:05d}.tfrecord"


def parse_index_line(line: str, lineno: int, path: str | Path) -> tuple[str, int, int, int]:
    """(name, shard, offset, label) of one index line; DataFormatError for anything out of bounds.

    Bounds here are the ones a line can be checked against alone (shard and offset >= 0, the label as
    :func:`~ppfr.data._common.check_label`); offsets against the shard's size are checked by the source that
    opens the shards.
    """
    f = line.split()
    where = f"{path}:{lineno}"
    if len(f) != 4:
        raise DataFormatError(f"{where}: a TFRecord index line has 4 fields (name shard offset label), got {len(f)}")
    try:
        shard, offset, label = int(f[1]), int(f[2]), int(f[3])
    except ValueError:
        raise DataFormatError(f"{where}: shard, offset and label must be integers: {line.strip()!r}") from None
    if shard < 0 or offset < 0:  # a negative offset reached f.seek() as an OSError
        raise DataFormatError(f"{where}: shard and offset must be >= 0: {line.strip()!r}")
    return f[0], shard, offset, check_label(label, where)


def record_size(f: BinaryIO, offset: int) -> int:
    """Framed size (length + 16) of the record at ``offset``, from its header only (for DALI's index files)."""
    f.seek(offset)
    head = f.read(8)
    if len(head) < 8:
        raise CorruptSampleError(f"truncated TFRecord header at byte {offset}")
    return struct.unpack("<Q", head)[0] + 16
