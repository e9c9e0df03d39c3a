"""Data sources: every format a face-recognition user arrives with, behind one small interface.

A :class:`Source` is an indexed list of samples: ``len(source)``, ``source.labels`` ((N,) int64), ``source.read(i)``
(the encoded image bytes of sample ``i``) and ``source.name(i)`` (for messages). Sources read lazily and reopen
their files in each process, so they can be handed to DataLoader workers. ``dali_reader(good, workdir)`` describes
the same samples to DALI (a native reader where DALI has one, else an external source over ``read``).

========================  ==========================================  =========================================
source                    path                                        labels
========================  ==========================================  =========================================
:class:`FolderSource`     ``root/<identity>/*.jpg|png``               identity folders in sorted order, 0..C-1
:class:`IndexListSource`  TFace 2-field index ``path label``          from the index
:class:`TFRecordIndexSource`  TFace 4-field ``name shard offset label``  from the index
:class:`TFRecordFileSource`   one ``.tfrecord`` file                  the records' ``label`` feature
:class:`RecordIOSource`   insightface ``.rec`` + ``.idx``             the IRHeader label
:class:`BinSource`        verification ``.bin``                       image position (pair i = 2i, 2i+1)
:class:`PairSource`       LFW ``pairs.txt`` / ``fold same a b``       position in the list of distinct images
:class:`SyntheticSource`  ``"synthetic"``                             random in [0, num_classes)
========================  ==========================================  =========================================
"""

from __future__ import annotations

import os
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ppfr.data import binset, image, pairs, recordio, tfrecord
from ppfr.data._common import CorruptDataWarning, CorruptSampleError, DataFormatError, check_label, read_text

Verify = Literal["none", "header", "decode"]
VERIFY_LEVELS = ("none", "header", "decode")


class Source:
    """Base class; subclasses set ``kind``, ``path``, ``labels`` and implement ``read`` and ``name``."""

    kind: str = "?"
    path: Path
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    def read(self, i: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def name(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def dali_reader(self, good: np.ndarray, workdir: Path):
        """A reader description for ``ppfr.pipelines`` covering samples ``good`` (default: an external source)."""
        from ppfr.pipelines.dali import ExternalReader

        return ExternalReader(read=self.read, indices=good, labels=self.labels[good])

    def info(self) -> dict:
        """Facts for ``ppfr data inspect``."""
        present = np.unique(self.labels, return_counts=True)[1]  # memory ~ samples, not ~ the largest label
        d = {"kind": self.kind, "path": str(self.path), "samples": len(self), "identities": int(present.size)}
        if present.size:
            d["images_per_identity"] = {
                "min": int(present.min()),
                "median": float(np.median(present)),
                "max": int(present.max()),
            }
        return d


# ------------------------------------------------------------------------------------------ image folder
class _FileListSource(Source):
    """A source whose samples are image files: ``self.files`` (list of Path) and ``self.labels`` (int64 array)."""

    files: list[Path]
    labels: np.ndarray

    def read(self, i: int) -> bytes:
        try:
            return self.files[i].read_bytes()
        except OSError as exc:
            raise CorruptSampleError(f"unreadable ({exc.strerror})") from None
        except ValueError:  # an index line's path with a NUL byte in it
            raise CorruptSampleError("unreadable (not a valid file name)") from None

    def name(self, i: int) -> str:
        return str(self.files[i])

    def dali_reader(self, good: np.ndarray, workdir: Path):
        from ppfr.pipelines.dali import FileReader

        return FileReader(files=[str(self.files[i]) for i in good], labels=self.labels[good])


class FolderSource(_FileListSource):
    """``root/<identity>/<image>``: every regular file in an identity folder is a sample.

    Files directly under ``root`` are ignored (a README or an index beside the folders). A file in an identity
    folder that is not a JPEG/PNG (``notes.txt``, ``.DS_Store``, a truncated download) stays in the list so that
    the scan counts and reports it, rather than silently vanishing.
    """

    kind = "folder"

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root)
        if not self.path.is_dir():
            raise DataFormatError(f"image folder not found: {self.path}")
        files: list[Path] = []
        labels: list[int] = []
        self.identities: list[str] = []
        try:
            ids = sorted(d.name for d in self.path.iterdir() if d.is_dir() and not d.name.startswith("."))
            for name in ids:
                members = sorted(p for p in (self.path / name).iterdir() if p.is_file())
                if not members:
                    continue
                label = len(self.identities)
                self.identities.append(name)
                files += members
                labels += [label] * len(members)
        except OSError as exc:  # an unreadable identity folder (permissions, a vanished mount)
            raise DataFormatError(f"{self.path}: cannot list the image folder ({exc})") from None
        if not files:
            raise DataFormatError(f"{self.path}: no identity folders with files (expected root/<identity>/*.jpg)")
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)

    def name(self, i: int) -> str:
        return str(self.files[i].relative_to(self.path))



# ------------------------------------------------------------------------------------ TFace index files
def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the meaningful lines of an index (no blanks, no ``#`` comments)."""
    text = read_text(path, "TFace index")
    return [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.startswith("#")]


class IndexListSource(_FileListSource):
    """TFace 2-field index: ``image_path<TAB>label`` per line, paths relative to ``data_root``."""

    kind = "index"

    def __init__(self, path: str | Path, data_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.data_root = Path(data_root) if data_root is not None else self.path.parent
        files, labels = [], []
        for lineno, ln in _text_lines(self.path):
            f = ln.rstrip("\n").split("\t") if "\t" in ln else ln.split()
            if len(f) != 2:
                raise DataFormatError(f"{self.path}:{lineno}: a 2-field index line is 'path<TAB>label', got {ln!r}")
            try:
                label = int(f[1])
            except ValueError:
                raise DataFormatError(f"{self.path}:{lineno}: label must be an integer, got {f[1]!r}") from None
            labels.append(check_label(label, f"{self.path}:{lineno}"))
            files.append(self.data_root / f[0])
        if not files:
            raise DataFormatError(f"{self.path}: empty index")
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)


class _FileHandles:
    """Per-process cache of open binary files (a forked worker must not share its parent's file offsets)."""

    def __init__(self) -> None:
        self._pid = -1
        self._open: dict[Path, object] = {}

    def get(self, path: Path, where: str = ""):
        """The open file; CorruptSampleError (for sample ``where``) if it cannot be opened any more."""
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        f = self._open.get(path)
        if f is None:
            try:
                f = self._open[path] = open(path, "rb")
            except OSError as exc:
                raise CorruptSampleError(f"{where or path}: unreadable ({exc.strerror or exc})") from None
        return f

    def __getstate__(self) -> dict:
        return {"_pid": -1, "_open": {}}


class TFRecordIndexSource(Source):
    """TFace 4-field index ``name shard offset label``: records in ``data_root/name/name-%05d.tfrecord``."""

    kind = "tfrecord-index"

    def __init__(self, path: str | Path, data_root: str | Path | None = None, check_crc: bool = True) -> None:
        self.path = Path(path)
        self.data_root = Path(data_root) if data_root is not None else self.path.parent
        self.check_crc = check_crc
        lines = _text_lines(self.path)
        entries = [tfrecord.parse_index_line(ln, n, self.path) for n, ln in lines]
        if not entries:
            raise DataFormatError(f"{self.path}: empty index")
        self.shards = [tfrecord.shard_path(self.data_root, name, sh) for name, sh, _, _ in entries]
        sizes: dict[Path, int] = {}
        for p in sorted(set(self.shards)):
            try:
                sizes[p] = p.stat().st_size if p.is_file() else -1
            except OSError:  # a name too long for the file system, a shard in an unreadable folder
                sizes[p] = -1
            if sizes[p] < 0:
                raise DataFormatError(f"{self.path}: TFRecord shard not found: {p}")
        for (lineno, _), sh, (_, _, off, _) in zip(lines, self.shards, entries):
            if off + 16 > sizes[sh]:  # a record is at least its 16 framing bytes
                raise DataFormatError(f"{self.path}:{lineno}: offset {off} lies past the end of {sh} ({sizes[sh]} "
                                      "bytes): a truncated shard, or the index of another pack")  # fmt: skip
        self.offsets = np.asarray([e[2] for e in entries], dtype=np.int64)
        self.labels = np.asarray([e[3] for e in entries], dtype=np.int64)
        self._files = _FileHandles()

    def read(self, i: int) -> bytes:
        where = f"{self.shards[i]}@{self.offsets[i]}"
        payload = tfrecord.read_record(
            self._files.get(self.shards[i], where), int(self.offsets[i]), check_crc=self.check_crc, where=where
        )
        return tfrecord.example_image(payload, where=where)

    def name(self, i: int) -> str:
        return f"{self.shards[i].name}@{self.offsets[i]}"

    def dali_reader(self, good: np.ndarray, workdir: Path):
        """DALI's TFRecord reader when the records carry a ``label`` equal to the index's; else an external source."""
        from ppfr.pipelines.dali import TFRecordReader

        if good.size == 0:
            return super().dali_reader(good, workdir)
        first = int(good[0])
        payload = tfrecord.read_record(self._files.get(self.shards[first]), int(self.offsets[first]))
        lab = tfrecord.decode_example(payload).get("label")
        if not lab or lab[0] != int(self.labels[first]):
            return super().dali_reader(good, workdir)  # TFace's own packs carry no label feature
        # one DALI index ("offset size" lines) per shard, good records only, shards in order of first use
        order: dict[Path, list[str]] = {}
        for i in good:
            sh = self.shards[i]
            size = tfrecord.record_size(self._files.get(sh), int(self.offsets[i]))
            order.setdefault(sh, []).append(f"{int(self.offsets[i])} {size}\n")
        paths, idx_paths = [], []
        for k, (sh, lines) in enumerate(order.items()):
            ip = workdir / f"tfrecord{k:05d}.idx"
            ip.write_text("".join(lines))
            paths.append(str(sh))
            idx_paths.append(str(ip))
        grouped = np.concatenate([good[[self.shards[i] == sh for i in good]] for sh in order])
        return TFRecordReader(paths=paths, index_paths=idx_paths, labels=self.labels[grouped])


class TFRecordFileSource(Source):
    """One ``.tfrecord`` file without an index: records scanned in order; labels from their ``label`` feature."""

    kind = "tfrecord"

    def __init__(self, path: str | Path, check_crc: bool = True) -> None:
        self.path = Path(path)
        self.check_crc = check_crc
        offsets, labels = [], []
        try:
            for off, payload in tfrecord.iter_records(self.path, check_crc=check_crc):
                lab = tfrecord.decode_example(payload).get("label")
                if not lab:
                    raise DataFormatError(f"{self.path}@{off}: record without a 'label' feature (use a TFace index)")
                offsets.append(off)
                labels.append(check_label(lab[0], f"{self.path}@{off}"))  # a BytesList 'label' is refused there too
        except CorruptSampleError as exc:
            raise DataFormatError(f"{self.path}: not a readable TFRecord file ({exc})") from None
        except OSError as exc:
            raise DataFormatError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        if not offsets:
            raise DataFormatError(f"{self.path}: no records")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._files = _FileHandles()

    def read(self, i: int) -> bytes:
        where = f"{self.path}@{self.offsets[i]}"
        payload = tfrecord.read_record(
            self._files.get(self.path, where), int(self.offsets[i]), check_crc=self.check_crc, where=where
        )
        return tfrecord.example_image(payload, where=where)

    def name(self, i: int) -> str:
        return f"{self.path.name}@{self.offsets[i]}"


# ----------------------------------------------------------------------------------------------- RecordIO
class RecordIOSource(Source):
    """insightface ``.rec`` + ``.idx`` (``path`` may name either); labels from each image's IRHeader."""

    kind = "recordio"

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        rec = p.with_suffix(".rec") if p.suffix == ".idx" else p
        self.reader = recordio.RecordIOReader(rec, rec.with_suffix(".idx"))
        self.path = self.reader.rec
        self.keys = np.asarray(self.reader.image_keys, dtype=np.int64)
        self.labels = np.asarray([self._label(int(k)) for k in self.keys], dtype=np.int64)

    def _label(self, key: int) -> int:
        where = f"{self.path} key {key}"
        buf = self.reader._buf()
        off = self.reader.offsets[key]  # the reader checked off + 8 <= file size
        magic, lrec = struct.unpack_from("<II", buf, off)
        length = lrec & ((1 << 29) - 1)
        if (magic == recordio.MAGIC and lrec >> 29 == 0 and length >= recordio.IR_SIZE + 4
                and off + 8 + length <= len(buf)):  # a whole record: its header can be read in place
            flag, label = struct.unpack_from("<If", buf, off + 8)  # header only: no need to copy the image
            if flag > 0:
                label = struct.unpack_from("<f", buf, off + 8 + recordio.IR_SIZE)[0]
            return check_label(label, where)
        try:  # multi-part, truncated or garbled: the full reader says which
            _, header = self.reader.read_image(key)
        except CorruptSampleError as exc:
            raise DataFormatError(f"{self.path}: cannot read the label of key {key} ({exc})") from None
        return check_label(header.label[0] if isinstance(header.label, tuple) else header.label, where)

    def read(self, i: int) -> bytes:
        return self.reader.read_image(int(self.keys[i]))[0]

    def name(self, i: int) -> str:
        return f"{self.path.name} key {int(self.keys[i])}"

    def info(self) -> dict:
        d = super().info()
        d["layout"] = "insightface (header record 0 + identity records)" if self.reader.header0 else "plain"
        return d

    def dali_reader(self, good: np.ndarray, workdir: Path):
        from ppfr.pipelines.dali import RecordIOReader

        # image records only: DALI would try to decode the header and identity records of insightface packs
        idx = workdir / "images.idx"
        recordio.write_idx(idx, [(int(self.keys[i]), self.reader.offsets[int(self.keys[i])]) for i in good])
        return RecordIOReader(rec=str(self.path), idx=str(idx), labels=self.labels[good])


# ----------------------------------------------------------------------------------- verification data
class BinSource(Source):
    """insightface verification ``.bin`` (read with the restricted unpickler of :mod:`ppfr.data.binset`)."""

    kind = "bin"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.set = binset.read_bin(self.path)
        self.labels = np.arange(len(self.set.images), dtype=np.int64)
        self.issame = np.asarray(self.set.issame, dtype=bool)

    def read(self, i: int) -> bytes:
        return self.set.images[i]

    def info(self) -> dict:
        d = super().info()
        d.pop("identities", None)
        d.pop("images_per_identity", None)
        d.update(pairs=self.set.num_pairs, genuine=int(self.issame.sum()), impostor=int((~self.issame).sum()))
        return d


class PairSource(_FileListSource):
    """A pair list: the distinct images it references, and ``pairs`` = (P, 4) int64 rows (fold, same, a, b)."""

    kind = "pairs"

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        self.path = Path(path)
        plist = pairs.read_pairs(self.path, image_root)
        if not plist:
            raise DataFormatError(f"{self.path}: a pair list without pairs")
        where: dict[Path, int] = {}
        for q in plist:
            for p in (q.a, q.b):
                where.setdefault(p, len(where))
        self.files = list(where)
        self.labels = np.arange(len(self.files), dtype=np.int64)
        self.pairs = np.asarray([(q.fold, q.same, where[q.a], where[q.b]) for q in plist], dtype=np.int64).reshape(
            -1, 4
        )

    # evaluation order must match the PyTorch path exactly: the external-source reader, not DALI's file reader
    dali_reader = Source.dali_reader

    def info(self) -> dict:
        d = super().info()
        d.pop("identities", None)
        d.pop("images_per_identity", None)
        same = self.pairs[:, 1].astype(bool)
        d.update(pairs=len(self.pairs), folds=len(set(self.pairs[:, 0].tolist())), genuine=int(same.sum()),
                 impostor=int((~same).sum()))  # fmt: skip
        return d


class SyntheticSource(Source):
    """Random images and labels (arcface_torch's smoke/throughput convention), encoded as PNG so the decode path
    runs exactly as for real data. Sample ``i`` is the same on every call and process (seeded by ``seed + i``)."""

    kind = "synthetic"

    def __init__(self, num_samples: int = 1024, num_classes: int = 100, size: int = 112, seed: int = 0) -> None:
        self.path = Path("synthetic")
        self.size, self.seed = size, seed
        self.labels = np.random.default_rng(seed).integers(0, num_classes, num_samples, dtype=np.int64)

    def read(self, i: int) -> bytes:
        import io

        from PIL import Image

        px = np.random.default_rng(self.seed + 1 + i).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


# ------------------------------------------------------------------------------------------------- open
def open_source(path: str | Path, *, data_root: str | Path | None = None, **synthetic) -> Source:
    """Open any supported source, detected from the path and (for text files) the content.

    Args:
        path: a folder, ``.rec``/``.idx``, ``.bin``, ``.tfrecord``, a TFace index / pair list text file, or
            ``"synthetic"``.
        data_root: where TFace index paths (and LFW pair names) are resolved; default the index file's folder.
        synthetic: ``num_samples``, ``num_classes``, ``size``, ``seed`` for ``"synthetic"``.
    Raises:
        DataFormatError: the path does not exist, its format is not recognised, or ppfr refuses it.
    """
    if str(path) == "synthetic":
        return SyntheticSource(**synthetic)
    p = Path(path)
    if p.is_dir():
        return FolderSource(p)
    if not p.exists():
        raise DataFormatError(f"data source not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".rec", ".idx"):
        return RecordIOSource(p)
    if suffix == ".bin":
        return BinSource(p)
    if suffix in (".tfrecord", ".tfrecords"):
        return TFRecordFileSource(p)
    try:
        with open(p, encoding="utf-8") as f:
            head = [ln for ln in (f.readline() for _ in range(8)) if ln]
    except UnicodeDecodeError:
        raise DataFormatError(f"{p}: binary file of unknown format (expected .rec/.idx/.bin/.tfrecord)") from None
    except OSError as exc:
        raise DataFormatError(f"{p}: cannot read ({exc.strerror or exc})") from None
    kind = pairs.sniff_pairs(head)
    if kind is not None:
        return PairSource(p, data_root)
    body = [ln for ln in head if ln.strip() and not ln.startswith("#")]
    if body:
        f0 = body[0].rstrip("\n").split("\t") if "\t" in body[0] else body[0].split()
        if len(f0) == 4 and all(pairs._is_int(x) for x in f0[1:]):
            return TFRecordIndexSource(p, data_root)
        if len(f0) == 2 and pairs._is_int(f0[1]):
            return IndexListSource(p, data_root)
    raise DataFormatError(
        f"{p}: unrecognised text format (expected a TFace index 'path label' or 'name shard offset label', "
        "LFW pairs.txt, or 'fold same path_a path_b')"
    )


# ------------------------------------------------------------------------------------------------- scan
@dataclass
class ScanResult:
    """Which samples are usable: ``good`` (sorted sample indices) and ``bad`` ((index, reason) pairs)."""

    good: np.ndarray
    bad: list[tuple[int, str]] = field(default_factory=list)

    def reasons(self) -> Counter:
        return Counter(r for _, r in self.bad)


def check_sample(source: Source, i: int, level: Verify = "header", decoder: str = "auto") -> str | None:
    """None if sample ``i`` passes ``level``, else the reason it does not."""
    try:
        data = source.read(i)
        if level == "decode":
            image.sniff(data)
            image.decode(data, decoder)
        elif level == "header":
            image.sniff(data)
    except CorruptSampleError as exc:
        return str(exc)
    return None


def scan(source: Source, level: Verify = "header", decoder: str = "auto") -> ScanResult:
    """Check every sample at ``level`` ('none': nothing; 'header': magic + end marker; 'decode': full decode).

    Cost: 'header' reads every sample once (about 20 us per face JPEG from a warm cache); 'decode' adds a decode.
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {level!r}")
    n = len(source)
    if level == "none":
        return ScanResult(np.arange(n, dtype=np.int64))
    bad = [(i, r) for i in range(n) if (r := check_sample(source, i, level, decoder)) is not None]
    mask = np.ones(n, dtype=bool)
    mask[[i for i, _ in bad]] = False
    return ScanResult(np.flatnonzero(mask).astype(np.int64), bad)


def summarize_bad(source: Source, bad: list[tuple[int, str]], total: int | None = None) -> str:
    """One line: how many samples were skipped, why, and a few of them."""
    total = len(source) if total is None else total
    why = ", ".join(f"{c} {r}" for r, c in Counter(r for _, r in bad).most_common())
    eg = ", ".join(source.name(i) for i, _ in bad[:3])
    return f"skipped {len(bad)} of {total} samples of {source.path} ({why}; e.g. {eg})"


def warn_bad(source: Source, bad: list[tuple[int, str]], stacklevel: int = 3) -> None:
    """The single summary warning for skipped samples (nothing when there are none)."""
    if bad:
        warnings.warn(f"ppfr.data: {summarize_bad(source, bad)}; `ppfr data inspect` lists them",
                      CorruptDataWarning, stacklevel=stacklevel)  # fmt: skip
