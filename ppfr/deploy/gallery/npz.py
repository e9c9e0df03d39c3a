"""The legacy single-file gallery (``Gallery``): name -> L2-normalised embeddings in one ``gallery.npz``, or in
memory only (the tests' and embedded servers' gallery). The stores for deployments are ``sqlite`` and ``qdrant``
(chosen by URI with ``ppfr.deploy.gallery.open_gallery``); ``importer`` moves a ``gallery.npz`` into them.

* Several embeddings per identity (one per enrolled image). An identity's score against a probe is the best cosine
  over its embeddings (the usual "max over templates" rule; robust to one bad enrolment photo).
* Search is exact cosine similarity (a matrix product in numpy). When ``faiss`` is importable it is used for
  ``identify`` over large galleries (``IndexFlatIP``: still exact, but multi-threaded SIMD); it is imported lazily
  and never required.
* Persistence: one ``gallery.npz`` per gallery folder holding the embedding matrix, the per-row identity index and
  a JSON header (names, method, embedding size). Written to a temporary file, fsynced, then ``os.replace``-d, so a
  crash leaves either the old or the new gallery, never half of one. Read with ``allow_pickle=False`` and every
  member's declared size checked first (``_read``): the file holds only plain numeric arrays and UTF-8 JSON.
  Its cost per change grows with the gallery (the whole file is rewritten) and one process owns a folder.
* Thread-safe: every read and mutation holds one lock; a mutation is applied to copies, saved, then swapped in,
  so a failed save leaves the in-memory gallery and the file as they were.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

from ppfr.deploy.gallery.helpers import check_name, check_probes, normalize
from ppfr.deploy.gallery.index import faiss_module
from ppfr.deploy.gallery.protocol import GalleryError, Match
from ppfr.runtime import fsync_dir

FORMAT = "ppfr-gallery"
FORMAT_VERSION = 1
FILENAME = "gallery.npz"


def _faiss():
    """The faiss module if it is installed, else None (imported on first use so the gallery never needs it)."""
    try:
        return faiss_module()
    except ModuleNotFoundError:
        return None


class Gallery:
    """Enrolled identities with exact cosine search, optionally persisted in ``directory/gallery.npz``.

    ``Gallery.open(directory, method=..., embedding_size=...)`` loads an existing gallery (refusing one enrolled
    with another method or embedding size: its embeddings would be meaningless here) or starts an empty one.
    ``use_faiss``: None = use faiss when importable, True = require it, False = numpy only.
    """

    def __init__(self, embedding_size: int, method: str = "", directory: str | Path | None = None,
                 use_faiss: bool | None = None) -> None:  # fmt: skip
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.embedding_size = int(embedding_size)
        self.method = method
        self.path = Path(directory) / FILENAME if directory is not None else None
        self._lock = threading.RLock()
        self._names: list[str] = []  # identity names; row i of _emb belongs to _names[_labels[i]]
        self._labels = np.zeros(0, dtype=np.int64)
        self._emb = np.zeros((0, self.embedding_size), dtype=np.float32)
        self._index = None  # the faiss index mirroring _emb, rebuilt lazily after a mutation
        self._lockfile = None
        self._faiss = None
        if use_faiss is None or use_faiss:
            self._faiss = _faiss()
            if use_faiss and self._faiss is None:
                raise GalleryError("use_faiss=True but faiss is not installed (pip install faiss-cpu)")

    # ------------------------------------------------------------------------------------------ persistence
    @classmethod
    def open(cls, directory: str | Path, method: str, embedding_size: int, use_faiss: bool | None = None) -> Gallery:
        """Load ``directory/gallery.npz`` if it exists (else an empty gallery that will be saved there).

        The folder is locked (``flock`` on ``directory/.gallery.lock``, where available) until ``close()``: two
        servers on one gallery would each save their own copy and lose the other's enrolments.
        """
        g = cls(embedding_size, method, directory, use_faiss)
        assert g.path is not None
        g._lock_folder()
        try:
            g._load()
        except BaseException:
            g.close()
            raise
        return g

    def _lock_folder(self) -> None:
        assert self.path is not None
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory lock; one server per gallery is then the operator's job
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path.parent / ".gallery.lock", "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise GalleryError(f"gallery {self.path.parent} is in use by another process or server "
                               "(one server per gallery folder)") from None  # fmt: skip
        self._lockfile = f

    def close(self) -> None:
        """Release the folder lock (the gallery stays readable in memory; it is saved on every change anyway)."""
        f, self._lockfile = self._lockfile, None
        if f is not None:
            f.close()  # closing the descriptor releases the flock

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        names, labels, emb, meta = _read(self.path)
        if meta["method"] != self.method or meta["embedding_size"] != self.embedding_size:
            raise GalleryError(
                f"{self.path} was enrolled with method {meta['method']!r} ({meta['embedding_size']}-d embeddings); "
                f"this server runs {self.method!r} ({self.embedding_size}-d). Embeddings of another model cannot "
                "be compared: use another --gallery folder or re-enrol")  # fmt: skip
        self._names, self._labels, self._emb = names, labels, emb

    def _save(self, names: list[str], labels: np.ndarray, emb: np.ndarray) -> None:
        if self.path is None:
            return
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "method": self.method,
                "embedding_size": self.embedding_size, "names": names}  # fmt: skip
        buf = io.BytesIO()
        np.savez(buf, embeddings=emb, labels=labels,
                 meta=np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), dtype=np.uint8))  # fmt: skip
        _write_atomic(self.path, buf.getbuffer())

    # ------------------------------------------------------------------------------------------- mutations
    def enrol(self, name: str, embeddings: np.ndarray) -> int:
        """Add (N, D) embeddings to identity ``name`` (created if new); returns its embedding count."""
        return self.enrol_many([(name, embeddings)])[0]

    def enrol_many(self, items: list[tuple[str, np.ndarray]]) -> list[int]:
        """Add several enrolments with one save (the server applies a whole batch at once).

        All or nothing: a bad item or a failed save raises and leaves the gallery and its file unchanged.
        Returns each item's identity embedding count after the whole call.
        """
        prepared = []
        for name, emb in items:
            emb = normalize(emb)
            if emb.shape[1] != self.embedding_size or emb.shape[0] == 0:
                raise ValueError(f"expected (N>=1, {self.embedding_size}) embeddings, got {emb.shape}")
            prepared.append((check_name(name), emb))
        with self._lock:
            names = list(self._names)
            index = {n: i for i, n in enumerate(names)}
            new_labels, new_emb = [self._labels], [self._emb]
            for name, emb in prepared:
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
                new_labels.append(np.full(emb.shape[0], index[name], dtype=np.int64))
                new_emb.append(emb)
            labels, emb_all = np.concatenate(new_labels), np.concatenate(new_emb)
            order = np.argsort(labels, kind="stable")  # rows stay grouped by identity (see _identity_scores)
            labels, emb_all = labels[order], emb_all[order]
            self._save(names, labels, emb_all)  # raises before anything in memory changes
            self._names, self._labels, self._emb, self._index = names, labels, emb_all, None
            counts = np.bincount(labels, minlength=len(names))
            return [int(counts[index[name]]) for name, _ in prepared]

    def remove(self, name: str) -> int:
        """Delete identity ``name`` and all its embeddings; returns how many embeddings were removed."""
        with self._lock:
            if name not in self._names:
                raise KeyError(name)
            i = self._names.index(name)
            keep = self._labels != i
            labels = self._labels[keep]
            labels = labels - (labels > i)  # later identities move down one slot
            names = self._names[:i] + self._names[i + 1:]
            emb = self._emb[keep]
            self._save(names, labels, emb)
            removed = int((~keep).sum())
            self._names, self._labels, self._emb, self._index = names, labels, emb, None
            return removed

    # ---------------------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def num_embeddings(self) -> int:
        return int(self._emb.shape[0])

    def identities(self) -> dict[str, int]:
        """Name -> number of enrolled embeddings."""
        with self._lock:
            counts = np.bincount(self._labels, minlength=len(self._names))
            return {n: int(c) for n, c in zip(self._names, counts)}

    def embeddings(self, name: str) -> np.ndarray:
        with self._lock:
            if name not in self._names:
                raise KeyError(name)
            return self._emb[self._labels == self._names.index(name)].copy()

    def verify(self, name: str, probes: np.ndarray) -> np.ndarray:
        """(M,) best cosine of each probe to identity ``name``'s embeddings. KeyError if not enrolled."""
        probes = normalize(probes)
        with self._lock:
            if name not in self._names:
                raise KeyError(name)
            ref = self._emb[self._labels == self._names.index(name)]
            return (probes @ ref.T).max(axis=1)

    def search(self, probes: np.ndarray, top_k: int = 5) -> list[list[Match]]:
        """For each probe, the ``top_k`` identities with the highest best-cosine, best first (exact)."""
        probes = check_probes(probes, self.embedding_size, top_k)
        with self._lock:
            n_id = len(self._names)
            if n_id == 0:
                return [[] for _ in range(len(probes))]
            k = min(top_k, n_id)
            if self._faiss is not None:
                scores = self._identity_scores_faiss(probes, k)
            else:
                scores = self._identity_scores(probes @ self._emb.T, n_id)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return [[Match(self._names[j], float(scores[r, j])) for j in order[r] if np.isfinite(scores[r, j])]
                    for r in range(len(probes))]  # fmt: skip

    def _identity_scores(self, sims: np.ndarray, n_id: int) -> np.ndarray:
        """(M, rows) similarities -> (M, identities) best similarity per identity.

        Rows are kept sorted by identity and every identity has at least one row, so one ``maximum.reduceat``
        over the group starts does it without a Python loop.
        """
        starts = np.searchsorted(self._labels, np.arange(n_id))
        return np.maximum.reduceat(sims, starts, axis=1)

    def _identity_scores_faiss(self, probes: np.ndarray, k: int) -> np.ndarray:
        """As _identity_scores, from a faiss inner-product search deep enough to hold k distinct identities.

        The k best identities are among the best ``k * (largest identity size)`` rows: each identity contributes
        at most that many rows, so fewer rows could all belong to fewer than k identities.
        """
        if self._index is None:
            index = self._faiss.IndexFlatIP(self.embedding_size)
            index.add(np.ascontiguousarray(self._emb))
            self._index = index
        depth = min(self.num_embeddings, k * int(np.bincount(self._labels).max()))
        sims, rows = self._index.search(np.ascontiguousarray(probes), depth)
        out = np.full((len(probes), len(self._names)), -np.inf, dtype=np.float32)
        valid = rows >= 0
        r = np.nonzero(valid)[0]
        np.maximum.at(out, (r, self._labels[rows[valid]]), sims[valid].astype(np.float32))
        return out


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary file beside ``path``, fsync it, ``os.replace`` it, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


# deflate's largest expansion is ~1032:1 (a run of one byte); a member claiming more than this is lying
_MAX_DEFLATE_RATIO = 1032


def _check_npz_sizes(path: Path) -> None:
    """Check every ``.npy`` member of the zip at ``path`` against its stored size, before numpy allocates it.

    ``np.load`` allocates the shape a member's header declares before it reads a byte of data: a 934-byte file
    declaring 10**12 float32 asked for 3.64 TiB (MemoryError). So each header is read from its zip member first
    (a few hundred bytes) and its byte count, computed in Python ints (zero dimensions included), must be what the
    member holds after the header; that size is in turn bounded by the file's size and deflate's ratio. A stored
    member's data is then exactly the file's bytes, and zipfile's CRC check at the member's end covers them.

    Raises:
        ValueError: a member whose declared shape, dtype, sizes or compression do not fit (caught by ``_read``).
        zipfile.BadZipFile, OSError: not a readable zip.
    """
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"member {info.filename!r} uses zip compression {info.compress_type} (numpy writes "
                                 "stored or deflated members)")  # fmt: skip
            limit = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO)
            if info.compress_size > size or info.file_size > limit:
                raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes from {info.compress_size} "
                                 f"stored, in a file of {size} bytes")  # fmt: skip
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"member {info.filename!r} has .npy format {version}; galleries use 1.0/2.0")
                header = f.tell()
            if dtype.hasobject or any(d < 0 for d in shape):
                raise ValueError(f"member {info.filename!r} declares {dtype} {shape}: not a plain numeric array")
            count = 1
            for d in shape:  # Python ints: no int64 overflow, and a zero dimension gives 0 bytes
                count *= d
            if header + count * dtype.itemsize != info.file_size:
                raise ValueError(f"member {info.filename!r} declares shape {shape} of {dtype} ({count * dtype.itemsize} "
                                 f"bytes) but holds {info.file_size - header}")  # fmt: skip


def _read(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """Read and fully check a gallery file; GalleryError saying what is wrong otherwise."""
    def bad(why: str) -> GalleryError:
        why = " ".join(why.split())  # parsers' messages may quote the file's bytes: one line, always
        return GalleryError(f"gallery file {path} is unusable: {why}. Restore it from a backup, or move it away "
                            "to start an empty gallery (the server never overwrites an unreadable one)")  # fmt: skip

    try:
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            if set(z.files) != {"embeddings", "labels", "meta"}:
                raise bad(f"expected arrays embeddings, labels, meta; found {sorted(z.files)}")
            emb, labels, meta_bytes = z["embeddings"], z["labels"], z["meta"]
    except GalleryError:
        raise
    except Exception as exc:
        # truncated or garbled zip (zipfile raises BadZipFile, EOFError, NotImplementedError for an unknown zip
        # version, RuntimeError for an "encrypted" member, zlib.error...), an object array (refused by
        # allow_pickle=False), not an npz at all: whatever the bytes make the parsers raise, the file is unusable
        raise bad(f"{type(exc).__name__}: {exc}") from None
    try:
        meta = json.loads(meta_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: [[[[...]]]]
        raise bad(f"its header is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} file")
    if meta.get("version") != FORMAT_VERSION:
        raise bad(f"format version {meta.get('version')!r}, this ppfr reads {FORMAT_VERSION}")
    names, dim = meta.get("names"), meta.get("embedding_size")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise bad("the identity names are not a list of distinct strings")
    if not isinstance(dim, int) or not isinstance(meta.get("method"), str):
        raise bad("the header lacks method / embedding_size")
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[1] != dim:
        raise bad(f"embeddings are {emb.dtype} {emb.shape}, expected float32 (N, {dim})")
    if labels.dtype != np.int64 or labels.shape != (emb.shape[0],):
        raise bad(f"labels are {labels.dtype} {labels.shape}, expected int64 ({emb.shape[0]},)")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise bad("a label points past the identity list")
    if len(names) and np.bincount(labels, minlength=len(names)).min() == 0:
        raise bad("an identity has no embeddings")
    if not np.all(np.isfinite(emb)) or (len(emb) and np.abs(np.linalg.norm(emb, axis=1) - 1).max() > 1e-3):
        raise bad("embeddings are not finite unit vectors")
    order = np.argsort(labels, kind="stable")  # grouped by identity, as the gallery keeps its rows
    return names, labels[order], np.ascontiguousarray(emb[order]), meta


