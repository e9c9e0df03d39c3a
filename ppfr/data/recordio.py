"""insightface / MXNet RecordIO (``.rec`` + ``.idx``), read and written without mxnet.

Record framing (dmlc-core RecordIO)::

    uint32 magic 0xced7230a | uint32 lrec = cflag << 29 | length | data | zero padding to a multiple of 4

A payload that contains the magic word at a 4-aligned position is split there into parts (cflag 1 = first,
2 = middle, 3 = last; the magic itself is dropped and re-inserted by the reader), so the magic never appears at an
aligned position inside a record and a reader can resynchronise. cflag 0 is a whole record.

The ``.idx`` text file maps ``key<TAB>byte_offset`` per record. The payload of an image record starts with an
``IRHeader`` (struct ``<IfQQ``: flag, label, id, id2; 24 bytes); when ``flag > 0`` the label is instead an array of
``flag`` float32 values following the header. insightface's face packs (MS1M, Glint360K, ...) put a header record
at key 0 with ``flag = 2`` and labels ``(first key after the images, first key after the identity records)``, the
images at keys ``1 .. N``, and one record per identity (label = its image key range) after them. Readers that treat
every key as an image (DALI given the full ``.idx``) crash on those non-image records (insightface issue #2235);
we hand DALI an image-only index instead.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ppfr.data._common import CorruptSampleError, DataFormatError, read_text

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24


@dataclass(frozen=True)
class IRHeader:
    """The image-record header: ``label`` is a float, or a tuple of floats when ``flag > 0``."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int = 0


def pack_irheader(header: IRHeader, payload: bytes = b"") -> bytes:
    """IRHeader + payload, as ``mxnet.recordio.pack``: a label sequence sets ``flag`` to its length."""
    if isinstance(header.label, (tuple, list)):
        lab = tuple(float(x) for x in header.label)
        return (
            struct.pack(_IR_FORMAT, len(lab), 0.0, header.id, header.id2) + struct.pack(f"<{len(lab)}f", *lab) + payload
        )
    return struct.pack(_IR_FORMAT, 0, float(header.label), header.id, header.id2) + payload


def unpack_irheader(record: bytes, where: str = "") -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and the rest (the encoded image)."""
    if len(record) < IR_SIZE:
        raise CorruptSampleError(f"{where}: record of {len(record)} bytes is shorter than an IRHeader")
    flag, label, id1, id2 = struct.unpack_from(_IR_FORMAT, record)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if end > len(record):
            raise CorruptSampleError(f"{where}: IRHeader claims {flag} labels but the record is {len(record)} bytes")
        return IRHeader(flag, struct.unpack_from(f"<{flag}f", record, IR_SIZE), id1, id2), record[end:]
    return IRHeader(0, label, id1, id2), record[IR_SIZE:]


def encode_record(data: bytes) -> bytes:
    """The framed bytes of one record, split around aligned magic words exactly as dmlc-core's writer does."""
    if len(data) >= 1 << 29:
        raise ValueError(f"a RecordIO record holds < 512 MiB, got {len(data)} bytes")
    out = bytearray()
    start = 0
    for i in range(0, len(data) - len(data) % 4, 4):
        if data[i : i + 4] == _MAGIC_BYTES:
            out += _MAGIC_BYTES + struct.pack("<I", (1 if start == 0 else 2) << 29 | (i - start)) + data[start:i]
            start = i + 4
    out += _MAGIC_BYTES + struct.pack("<I", (3 if start else 0) << 29 | (len(data) - start)) + data[start:]
    out += b"\0" * (-len(data) % 4)
    return bytes(out)


def decode_record(buf: bytes | memoryview | mmap.mmap, offset: int, where: str = "") -> bytes:
    """Read the (possibly multi-part) record starting at ``offset``."""
    parts: list[bytes] = []
    pos = offset
    while True:
        if pos + 8 > len(buf):
            raise CorruptSampleError(f"{where}: truncated RecordIO header at byte {pos}")
        magic, lrec = struct.unpack_from("<II", buf, pos)
        if magic != MAGIC:
            raise CorruptSampleError(f"{where}: bad RecordIO magic 0x{magic:08x} at byte {pos}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        if pos + 8 + length > len(buf):
            raise CorruptSampleError(f"{where}: truncated RecordIO record at byte {pos} (length {length})")
        parts.append(bytes(buf[pos + 8 : pos + 8 + length]))
        pos += 8 + length + (-length % 4)
        if cflag in (0, 3):
            if (cflag == 0) != (len(parts) == 1):
                raise CorruptSampleError(f"{where}: RecordIO part sequence broken at byte {pos}")
            return _MAGIC_BYTES.join(parts)
        if cflag == 1 and len(parts) > 1 or cflag == 2 and len(parts) == 1:
            raise CorruptSampleError(f"{where}: RecordIO part sequence broken at byte {pos}")


def read_idx(path: str | Path) -> dict[int, int]:
    """``.idx`` -> {key: byte offset}, in file order; DataFormatError for a line that is not two integers >= 0.

    Keys are stored as int64 (``RecordIOSource.keys``), so one above 2**63 - 1 is refused here rather than as an
    OverflowError there; offsets are checked against the ``.rec``'s size by :class:`RecordIOReader`.
    """
    out: dict[int, int] = {}
    for lineno, line in enumerate(read_text(path, "RecordIO index (.idx)").splitlines(), 1):
        if not line.strip():
            continue
        f = line.split()
        try:
            if len(f) != 2:
                raise ValueError
            key, off = int(f[0]), int(f[1])
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: a RecordIO index line is 'key<TAB>offset', got {line!r}") from None
        if not 0 <= key < 1 << 63 or off < 0:
            raise DataFormatError(f"{path}:{lineno}: key must lie in [0, 2**63) and offset be >= 0, got {line!r}")
        out[key] = off
    return out


def write_idx(path: str | Path, items: Sequence[tuple[int, int]]) -> None:
    Path(path).write_text("".join(f"{k}\t{o}\n" for k, o in items))


class RecordIOWriter:
    """Write an indexed RecordIO pack; ``write(key, data)`` records the offset for the ``.idx``."""

    def __init__(self, rec: str | Path, idx: str | Path) -> None:
        self.rec, self.idx = Path(rec), Path(idx)
        self._f = open(self.rec, "wb")
        self._index: list[tuple[int, int]] = []

    def write(self, key: int, data: bytes) -> int:
        off = self._f.tell()
        self._f.write(encode_record(data))
        self._index.append((key, off))
        return off

    def close(self) -> None:
        self._f.close()
        write_idx(self.idx, self._index)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_face_pack(rec: str | Path, idx: str | Path, images: Sequence[bytes], labels: Sequence[int]) -> None:
    """Write images in insightface's layout: header record 0, images at keys 1..N, then one record per identity.

    Identity records need images of one identity to be contiguous; they are when ``labels`` is sorted, which is
    how ``ppfr data pack`` writes them (records in label order, so DALI's sequential reader needs a shuffle buffer).
    """
    n = len(images)
    if n != len(labels):
        raise ValueError(f"{n} images but {len(labels)} labels")
    ranges: dict[int, list[int]] = {}
    for i, lab in enumerate(labels, 1):
        r = ranges.get(int(lab))
        if r is None:
            ranges[int(lab)] = [i, i + 1]
        elif r[1] != i:
            raise ValueError(f"images of label {lab} are not contiguous (insightface layout needs sorted labels)")
        else:
            r[1] = i + 1
    ids = sorted(ranges)
    with RecordIOWriter(rec, idx) as w:
        w.write(0, pack_irheader(IRHeader(2, (float(n + 1), float(n + 1 + len(ids))), 0)))
        for i, (img, lab) in enumerate(zip(images, labels), 1):
            w.write(i, pack_irheader(IRHeader(0, float(lab), i), img))
        for j, lab in enumerate(ids):
            w.write(n + 1 + j, pack_irheader(IRHeader(2, (float(ranges[lab][0]), float(ranges[lab][1])), n + 1 + j)))


class RecordIOReader:
    """Random access to an indexed RecordIO pack (memory-mapped; opened lazily so it survives a worker fork).

    ``image_keys`` are the keys holding images: 1..N for insightface's layout (detected from record 0), every key
    otherwise.
    """

    def __init__(self, rec: str | Path, idx: str | Path | None = None) -> None:
        self.rec = Path(rec)
        self.idx = Path(idx) if idx is not None else self.rec.with_suffix(".idx")
        for p, what in ((self.rec, "RecordIO file"), (self.idx, "RecordIO index (.idx)")):
            if not p.is_file():
                raise DataFormatError(f"{what} not found: {p}")
        self.offsets = read_idx(self.idx)
        if not self.offsets:
            raise DataFormatError(f"{self.idx}: empty RecordIO index")
        size = self.rec.stat().st_size
        past = [(k, o) for k, o in self.offsets.items() if o + 8 > size]  # a record header is 8 bytes
        if past:  # (an mmap of an empty file is refused too: size 0 puts every offset here)
            k, o = past[0]
            raise DataFormatError(f"{self.idx}: {len(past)} offset(s) point past the end of {self.rec} ({size} bytes), "
                                  f"e.g. key {k} at byte {o}: truncated pack, or the .idx of another one")  # fmt: skip
        self._mm: mmap.mmap | None = None
        self._pid = -1
        self.header0: IRHeader | None = None
        keys = list(self.offsets)
        if 0 in self.offsets:
            try:
                rec0 = self.read(0)
            except CorruptSampleError as exc:
                raise DataFormatError(f"{self.rec}: record 0 is unreadable ({exc}); not a RecordIO pack?") from None
            try:
                h = unpack_irheader(rec0)[0]
            except CorruptSampleError:  # then not a header record: key 0 is read (and refused) as an image
                h = None
            if h is not None and h.flag >= 2 and len(rec0) == IR_SIZE + 4 * h.flag:  # a header record, no image
                self.header0 = h
                end = h.label[0]  # type: ignore[index]  # a float32: compared as one (NaN/inf then select nothing/all)
                keys = [k for k in keys if 1 <= k < end]
        if not keys:
            raise DataFormatError(f"{self.rec}: no image records (header record 0 declares none)")
        self.image_keys = keys

    def _buf(self) -> mmap.mmap:
        import os

        if self._mm is None or self._pid != os.getpid():
            with open(self.rec, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        return self._mm

    def read(self, key: int) -> bytes:
        """The raw record (IRHeader + image) stored under ``key``."""
        if key not in self.offsets:
            raise KeyError(f"{self.rec}: no record with key {key}")
        return decode_record(self._buf(), self.offsets[key], f"{self.rec} key {key}")

    def read_image(self, key: int) -> tuple[bytes, IRHeader]:
        """(encoded image bytes, header) of an image record."""
        header, img = unpack_irheader(self.read(key), f"{self.rec} key {key}")
        return img, header

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mm": None, "_pid": -1}  # an mmap does not pickle; reopen in the worker
