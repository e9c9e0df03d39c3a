"""A gallery of enrolled identities for the recognition server: name -> L2-normalised embeddings.

* Several embeddings per identity (one per enrolled image). An identity's score against a probe is the best cosine
  over its embeddings (the usual "max over templates" rule; robust to one bad enrolment photo).
* Search is exact cosine similarity (a matrix product in numpy). When ``faiss`` is importable it is used for
  ``identify`` over large galleries (``IndexFlatIP``: still exact, but multi-threaded SIMD); it is imported lazily
  and never required.
* Persistence: one ``gallery.npz`` per gallery folder holding the embedding matrix, the per-row identity index and
  a JSON header (names, method, embedding size). Written to a temporary file, fsynced, then ``os.replace``-d, so a
  crash leaves either the old or the new gallery, never half of one. Read with ``allow_pickle=False``: the file
  holds only plain numeric arrays and UTF-8 JSON, nothing that can execute code when loaded.
* Thread-safe: every read and mutation holds one lock; a mutation is applied to copies, saved, then swapped in,
  so a failed save leaves the in-memory gallery and the file as they were.

``Gallery`` is the single-file gallery (and the in-memory one of the tests). Its cost per change grows with the
gallery (the whole file is rewritten) and one process owns a folder. The stores for real deployments share its
interface (:class:`GalleryLike`) and are chosen by URI with :func:`open_gallery`:

* ``sqlite:///path/to/gallery.db``, or a plain folder (-> ``folder/gallery.db``): SQLite rows + a faiss index
  (``index="flat"`` exact, ``"hnsw"`` / ``"ivf"`` approximate), one transaction per change, several processes
  per host (:mod:`ppfr.deploy.gallery_sqlite`). A folder holding only today's ``gallery.npz`` is imported on
  first open.
* ``qdrant://host:port/collection`` (a Qdrant server or cluster) and ``qdrant+local:///path`` (embedded, one
  process): :mod:`ppfr.deploy.gallery_qdrant`.

``python -m ppfr.deploy.gallery import SRC.npz DST`` imports a ``gallery.npz`` into any of them (:func:`import_npz`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ppfr.runtime import fsync_dir

FORMAT = "ppfr-gallery"
FORMAT_VERSION = 1
FILENAME = "gallery.npz"
MAX_NAME_LEN = 256

log = logging.getLogger(__name__)


class GalleryError(RuntimeError):
    """A gallery file that cannot be used (corrupt, another format, another model), or a bad gallery operation."""


@dataclass(frozen=True)
class Match:
    """One ranked identity of a search: its name and best cosine similarity to the probe."""

    name: str
    score: float


def check_name(name: Any) -> str:
    """An identity name: a non-empty string of at most 256 printable characters (no control characters)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise ValueError(f"an identity name must be a non-empty string of at most {MAX_NAME_LEN} characters")
    if not name.isprintable():
        raise ValueError("an identity name must not contain control characters")
    return name


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of a (N, D) float array to float32; refuses zero or non-finite rows."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(norms < 1e-12):
        raise ValueError("embeddings must be finite and non-zero")
    return x / norms


def check_probes(probes: np.ndarray, embedding_size: int, top_k: int | None = None) -> np.ndarray:
    """(M, D) probes L2-normalised to float32, refused unless D == ``embedding_size`` (and ``top_k`` >= 1 if given):
    the argument checks every gallery backend's ``scores`` / ``search`` share."""
    probes = normalize(probes)
    if probes.shape[1] != embedding_size:
        raise ValueError(f"expected {embedding_size}-d probes, got {probes.shape[1]}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return probes


def _faiss():
    """The faiss module if it is installed, else None (imported on first use so the gallery never needs it)."""
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return faiss


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


# ------------------------------------------------------------------------------------ stores chosen by URI
@runtime_checkable
class GalleryLike(Protocol):
    """What the server needs of a gallery; :class:`Gallery`, ``SqliteGallery`` and ``QdrantGallery`` provide it.

    Embeddings are (N, D) float arrays (stored float32, L2-normalised; zero or non-finite rows refused); scores
    are cosines in [-1, 1]; an identity's score is its best cosine over its embeddings.
    """

    method: str
    embedding_size: int

    def enrol(self, name: str, embeddings: np.ndarray) -> int: ...
    def enrol_many(self, items: list[tuple[str, np.ndarray]]) -> list[int]: ...
    def remove(self, name: str) -> int: ...
    def identities(self) -> dict[str, int]: ...
    def embeddings(self, name: str) -> np.ndarray: ...
    def verify(self, name: str, probes: np.ndarray) -> np.ndarray: ...
    def search(self, probes: np.ndarray, top_k: int = 5) -> list[list[Match]]: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: object) -> bool: ...
    @property
    def num_embeddings(self) -> int: ...


def _sqlite_path(target: str | Path) -> Path:
    """A sqlite target -> the database file: a folder (existing, or a path without a suffix) means
    ``folder/gallery.db``."""
    from ppfr.deploy.gallery_sqlite import FILENAME as DB

    p = Path(target)
    return p / DB if p.is_dir() or (not p.exists() and p.suffix == "") else p


def open_gallery(uri: str | Path, method: str, embedding_size: int, *, index: str = "flat",
                 **options: Any) -> GalleryLike:  # fmt: skip
    """Open (creating if absent) the gallery at ``uri`` for embeddings of ``method`` (``embedding_size``-d).

    ``uri``: ``sqlite://<path>`` (``sqlite:///abs/gallery.db``; a folder means ``folder/gallery.db``), a plain path
    (the same as ``sqlite://<path>``), ``qdrant://host:port/collection`` (``qdrants://`` for TLS) or
    ``qdrant+local://<folder>[?collection=name]``. ``index`` ("flat" exact / "hnsw" / "ivf") and ``options`` (see
    ``VectorIndex``) apply to sqlite; ``options`` ``exact`` / ``api_key`` / ``timeout`` to qdrant.
    A folder's ``gallery.db`` that does not exist yet, beside a ``gallery.npz``, is first imported from it.
    Raises GalleryError for an unusable store or one enrolled with another method / embedding size.
    """
    return _open(uri, method, embedding_size, index, options, auto_import=True)


def _open(uri: str | Path, method: str, embedding_size: int, index: str, options: dict[str, Any], *,
          auto_import: bool) -> GalleryLike:  # fmt: skip
    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "sqlite", text
    scheme = scheme.lower()
    if scheme == "sqlite":
        from ppfr.deploy.gallery_sqlite import SqliteGallery

        db = _sqlite_path(rest)
        if auto_import:
            _auto_import(db)
        return SqliteGallery(db, method, embedding_size, index=index, **options)
    if scheme in ("qdrant", "qdrants", "qdrant+local"):
        from urllib.parse import parse_qs, urlsplit

        from ppfr.deploy.gallery_qdrant import DEFAULT_COLLECTION, QdrantGallery

        if index != "flat":
            raise ValueError("index= selects the sqlite backend's faiss index; Qdrant indexes itself (HNSW)")
        if scheme == "qdrant+local":
            path, _, query = rest.partition("?")
            coll = parse_qs(query).get("collection", [DEFAULT_COLLECTION])[0]
            if not path:
                raise ValueError(f"{text}: qdrant+local needs a folder, e.g. qdrant+local:///var/lib/ppfr/gallery")
            return QdrantGallery(method, embedding_size, path=path, collection=coll, **options)
        u = urlsplit(text)
        coll = u.path.strip("/") or DEFAULT_COLLECTION
        if not u.hostname or "/" in coll:
            raise ValueError(f"{text}: expected qdrant://host:port/collection")
        url = f"{'https' if scheme == 'qdrants' else 'http'}://{u.hostname}:{u.port or 6333}"
        return QdrantGallery(method, embedding_size, url=url, collection=coll, **options)
    raise ValueError(f"unknown gallery URI scheme {scheme!r} in {text!r}: use a folder, sqlite://, qdrant:// or "
                     "qdrant+local://")  # fmt: skip


def _auto_import(db: Path) -> None:
    """Create ``db`` from the ``gallery.npz`` beside it, when there is one and no database yet.

    Built in a temporary file and renamed into place, under an exclusive ``flock`` (where available) so that
    two servers starting together import once; a crash mid-import leaves no database (the next start retries).
    The ``gallery.npz`` is left in place as a backup; from then on only the database changes. An unusable
    ``gallery.npz`` (corrupt, or declaring more than it holds) is skipped with a warning naming it.
    """
    from ppfr.deploy.gallery_sqlite import FILENAME as DB

    npz = db.parent / FILENAME
    if db.name != DB or db.exists() or not npz.exists():  # only the folder's own database stands in for its npz
        return
    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    with open(db.parent / ".gallery-import.lock", "a+b") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if db.exists():  # another process imported it while we waited
            return
        tmp = db.with_name(f".{db.name}.importing")
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)  # from an import killed half way
        from ppfr.deploy.gallery_sqlite import SqliteGallery

        try:
            names, labels, emb, meta = _read(npz)
        except GalleryError as exc:  # a bad file beside the database must not stop a server from starting
            log.warning("skipping the import of %s (the gallery starts without it; the file is left in place): %s",
                        npz, exc)  # fmt: skip
            return
        try:
            g = SqliteGallery(tmp, meta["method"], meta["embedding_size"])
            try:
                g._db.execute("PRAGMA journal_mode=DELETE")  # the file to be renamed into place must be one file
                _import_into(g, names, labels, emb, str(db))
            finally:
                g.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, db)
        except BaseException:
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
            raise
        fsync_dir(db.parent)


def import_npz(src: str | Path, dst: str | Path, *, index: str = "flat") -> dict[str, int]:
    """Copy a ``gallery.npz`` (the file, or its folder) into the gallery at ``dst`` (any :func:`open_gallery`
    URI or path), with the method and embedding size recorded in the npz.

    Read with ``allow_pickle=False`` and fully checked first (GalleryError if unusable). The destination must hold
    no identity yet (GalleryError otherwise: importing twice would double every template). All identities go in
    one ``enrol_many`` (one transaction for sqlite). Returns {"identities": n, "embeddings": rows}.
    """
    src = Path(src)
    if src.is_dir():
        src = src / FILENAME
    if not src.exists():
        raise GalleryError(f"no gallery file at {src}")
    names, labels, emb, meta = _read(src)
    g = _open(dst, meta["method"], meta["embedding_size"], index, {}, auto_import=False)
    try:
        _import_into(g, names, labels, emb, str(dst))
    finally:
        g.close()
    return {"identities": len(names), "embeddings": int(emb.shape[0])}


def _import_into(g: GalleryLike, names: list[str], labels: np.ndarray, emb: np.ndarray, where: str) -> None:
    if len(g):
        raise GalleryError(f"{where} already holds {len(g)} identities: import into an empty gallery")
    if names:
        starts = np.searchsorted(labels, np.arange(len(names) + 1))  # _read returns rows grouped by identity
        g.enrol_many([(n, emb[starts[i]: starts[i + 1]]) for i, n in enumerate(names)])


def main(argv: list[str] | None = None) -> int:
    """``ppfr gallery import SRC DST`` (or ``python -m ppfr.deploy.gallery import ...``): import a gallery.npz;
    exit 0, or 2 with a one-line error."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="ppfr gallery", description="gallery maintenance")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="import a gallery.npz into a sqlite or qdrant gallery")
    imp.add_argument("src", help="a gallery.npz, or the folder holding it")
    imp.add_argument("dst", help="destination: folder, sqlite://..., qdrant://host:port/collection, qdrant+local://...")
    args = ap.parse_args(argv)
    try:
        got = import_npz(args.src, args.dst)
    except (GalleryError, ValueError, OSError, ImportError) as exc:
        print(f"ppfr gallery: error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {got['identities']} identities ({got['embeddings']} embeddings) into {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
