"""A gallery stored in SQLite, searched through a faiss index kept in step with the database.

Layout of ``gallery.db`` (format ``ppfr-gallery-sqlite``, version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)           format, version, method, embedding_size
    identities(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE)
    embeddings(id INTEGER PRIMARY KEY AUTOINCREMENT, identity_id -> identities.id, vector BLOB)
                                                     vector: D little-endian float32, L2-normalised
    removals(seq INTEGER PRIMARY KEY AUTOINCREMENT, identity_id, row_ids BLOB)
                                                     a log of removed identities (row_ids: int64 little-endian)

* One transaction per enrolment batch / removal: its cost is that of its own rows (B-tree inserts and deletes),
  not of the gallery. WAL journal with ``synchronous=FULL``: a committed change survives a crash or power loss, an
  uncommitted one vanishes whole (SQLite's atomic commit), so ``kill -9`` mid-enrolment leaves the gallery as it
  was before that enrolment or after it.
* Several processes may open one database (e.g. server workers on one host). Each keeps its own faiss index and
  before every operation asks SQLite whether another connection committed (``PRAGMA data_version``: one cheap
  call). If so it applies just what changed: rows with an id above the last one it holds (AUTOINCREMENT ids only
  grow, and writers commit one at a time, so every newer row has a larger id), and the removal log entries
  after the last one it applied. A write first takes SQLite's write lock (``BEGIN IMMEDIATE``) and catches up
  inside it, so no other process's row can slip in below its own.
* Row ids are never reused (AUTOINCREMENT), so a row id in an index always means one vector.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ppfr.deploy.gallery.helpers import check_name, check_probes, normalize
from ppfr.deploy.gallery.index import VectorIndex
from ppfr.deploy.gallery.protocol import GalleryError, Match

FORMAT = "ppfr-gallery-sqlite"
FORMAT_VERSION = 1
FILENAME = "gallery.db"
PAGE_SIZE = 16384
BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another process's transaction before giving up

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id INTEGER NOT NULL REFERENCES identities(id),
    vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS embeddings_by_identity ON embeddings(identity_id);
CREATE TABLE IF NOT EXISTS removals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, identity_id INTEGER NOT NULL, row_ids BLOB NOT NULL);
"""
_NEW_IDENTITY = "INSERT INTO identities(name) VALUES (?) RETURNING id"
_NEW_ROW = "INSERT INTO embeddings(identity_id, vector) VALUES (?, ?) RETURNING id"


class SqliteGallery:
    """Enrolled identities in ``path`` (a SQLite file), searched with a faiss index.

    ``method`` / ``embedding_size``: the model the embeddings come from; a database enrolled with another is
    refused (GalleryError). ``index``: "flat" (exact, default), "hnsw" or "ivf" (approximate); ``index_options``
    go to :class:`~ppfr.deploy.gallery.index.VectorIndex` (``hnsw_m``, ``ef_construction``, ``ef_search``,
    ``rebuild_fraction``; ``ivf_nprobe``, ``ivf_nlist``, ``ivf_min_rows``, ``ivf_regrow``, ``ivf_niter``,
    ``seed``). Thread-safe (one lock per handle); several handles and processes may share a file.
    """

    backend = "sqlite"

    def __init__(self, path: str | Path, method: str, embedding_size: int, *, index: str = "flat",
                 **index_options: float) -> None:  # fmt: skip
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.path = Path(path)
        self.method, self.embedding_size = method, int(embedding_size)
        self.uri = f"sqlite://{self.path}"  # sqlite:///abs/path for an absolute path
        self._lock = threading.RLock()
        self._index = VectorIndex(self.embedding_size, index, **index_options)  # type: ignore[arg-type]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE for writes), never implicitly
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)  # fmt: skip
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery database {self.path}: {exc}") from None
        try:
            self._setup()
            self._reload()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise GalleryError(f"gallery database {self.path} is unusable: {exc}. Restore it from a backup, or "
                               "move it away to start an empty gallery") from None  # fmt: skip
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------------------------------ connection
    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # A new file only (ignored once it exists): a 512-d row is ~2.06 kB, so 4 kB pages hold one row each and
        # waste half the file; 16 kB pages hold 7 (88% full) while one enrolment still writes only a few pages.
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise GalleryError(f"{self.path}: SQLite refused WAL mode (a network file system?)")
        db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a committed enrolment survives power loss too
        db.execute("PRAGMA foreign_keys=ON")
        with self._write():
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and ("meta" not in tables or
                           db.execute("SELECT 1 FROM meta WHERE key = 'format'").fetchone() is None):  # fmt: skip
                raise GalleryError(f"{self.path} is an SQLite database of something else (tables "
                                   f"{sorted(tables)}), not a ppfr gallery")  # fmt: skip
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            want = {"format": FORMAT, "version": str(FORMAT_VERSION), "method": self.method,
                    "embedding_size": str(self.embedding_size)}  # fmt: skip
            db.executemany("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", want.items())
            have = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if have.get("format") != FORMAT:
            raise GalleryError(f"{self.path} is not a ppfr gallery database (format {have.get('format')!r})")
        if have.get("version") != str(FORMAT_VERSION):
            raise GalleryError(f"{self.path} has gallery format version {have.get('version')}, this ppfr reads "
                               f"{FORMAT_VERSION}")  # fmt: skip
        if have.get("method") != self.method or have.get("embedding_size") != str(self.embedding_size):
            raise GalleryError(
                f"{self.path} was enrolled with method {have.get('method')!r} ({have.get('embedding_size')}-d "
                f"embeddings); this server runs {self.method!r} ({self.embedding_size}-d). Embeddings of another "
                "model cannot be compared: use another gallery or re-enrol")  # fmt: skip

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE (takes the write lock now, waiting up to busy_timeout), commit
        on success, roll back on any error."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # "database is locked" after busy_timeout
            raise GalleryError(f"gallery database {self.path} stayed locked by another writer: {exc}") from None
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close the database connection (every change is already committed) and free the in-memory index."""
        with self._lock:
            self._db.close()
            self._index.clear()

    def __enter__(self) -> SqliteGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- keeping the index in step
    def _data_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _reload(self) -> None:
        """Rebuild the in-memory state from the whole database (at open, or after an index failure)."""
        self.reloads = getattr(self, "reloads", 0) + 1  # full loads so far (1 = only the one at open)
        self._index.clear()
        self._names: dict[int, str] = {}  # identity id -> name
        self._ids: dict[str, int] = {}  # name -> identity id
        self._counts: dict[int, int] = {}  # identity id -> live rows
        self._last_row = self._last_identity = self._last_removal = 0
        self._stale = False
        self._version = -1
        self._catch_up()

    def _sync(self) -> None:
        """Apply other connections' commits since the last look (no-op, one PRAGMA, when there are none)."""
        if self._stale:
            self._reload()
        elif self._data_version() != self._version:
            self._catch_up()

    def _catch_up(self) -> None:
        db = self._db
        own_txn = not db.in_transaction
        if own_txn:
            db.execute("BEGIN")  # one snapshot for the three reads below
        try:
            self._version = self._data_version()
            removed = db.execute("SELECT seq, identity_id, row_ids FROM removals WHERE seq > ? ORDER BY seq",
                                 (self._last_removal,)).fetchall()  # fmt: skip
            new_ids = db.execute("SELECT id, name FROM identities WHERE id > ? ORDER BY id",
                                 (self._last_identity,)).fetchall()  # fmt: skip
            rows = db.execute("SELECT id, identity_id, vector FROM embeddings WHERE id > ? ORDER BY id",
                              (self._last_row,))  # fmt: skip
            try:
                for seq, ident, blob in removed:
                    self._index.remove(np.frombuffer(blob, dtype="<i8"))
                    self._forget(ident)
                    self._last_removal = seq
                for ident, name in new_ids:
                    self._names[ident], self._ids[name] = name, ident
                    self._counts.setdefault(ident, 0)
                    self._last_identity = ident
                with self._index.bulk():  # an IVF index trains once after the last chunk, not per chunk
                    while chunk := rows.fetchmany(65536):  # chunks: a 1M-row gallery never sits in memory twice
                        ids = np.fromiter((r[0] for r in chunk), np.int64, len(chunk))
                        labels = np.fromiter((r[1] for r in chunk), np.int64, len(chunk))
                        blob = b"".join(r[2] for r in chunk)
                        if len(blob) != len(chunk) * self.embedding_size * 4:  # a row written by something else
                            raise GalleryError(f"gallery database {self.path} is unusable: an embedding row is "
                                               f"not {self.embedding_size} float32 values")  # fmt: skip
                        vec = np.frombuffer(blob, dtype="<f4").reshape(len(chunk), self.embedding_size)
                        self._add_rows(ids, labels, vec)
            except BaseException:
                self._stale = True  # memory no longer mirrors the database: rebuild it on the next call
                raise
        finally:
            if own_txn:
                db.execute("COMMIT")

    def _add_rows(self, ids: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add(ids, labels, vectors)
        for lab, c in zip(*np.unique(labels, return_counts=True)):
            self._counts[int(lab)] = self._counts.get(int(lab), 0) + int(c)
        self._last_row = max(self._last_row, int(ids.max()))

    def _forget(self, ident: int) -> None:
        name = self._names.pop(ident, None)
        if name is not None and self._ids.get(name) == ident:
            del self._ids[name]
        self._counts.pop(ident, None)

    # ------------------------------------------------------------------------------------------- mutations
    def enrol(self, name: str, embeddings: np.ndarray) -> int:
        """Add (N, D) embeddings (any non-zero finite rows; stored L2-normalised) to identity ``name``, created
        if new. Returns its embedding count."""
        return self.enrol_many([(name, embeddings)])[0]

    def enrol_many(self, items: list[tuple[str, np.ndarray]]) -> list[int]:
        """Add several enrolments in one transaction (all or nothing: a bad item or a failed commit raises and
        changes nothing). Each item is (name, (N>=1, D) embeddings). Returns each item's identity embedding
        count after the whole call."""
        prepared = []
        for name, emb in items:
            emb = normalize(emb)
            if emb.shape[1] != self.embedding_size or emb.shape[0] == 0:
                raise ValueError(f"expected (N>=1, {self.embedding_size}) embeddings, got {emb.shape}")
            prepared.append((check_name(name), emb.astype("<f4", copy=False)))
        with self._lock:
            self._sync()
            new_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            new_names: dict[str, int] = {}
            with self._write() as db:
                self._catch_up()  # under the write lock: nobody can commit below our row ids now
                for name, emb in prepared:
                    ident = self._ids.get(name, new_names.get(name))
                    if ident is None:
                        ident = db.execute(_NEW_IDENTITY, (name,)).fetchone()[0]
                        new_names[name] = ident
                    ids = np.array([db.execute(_NEW_ROW, (ident, r.tobytes())).fetchone()[0] for r in emb], np.int64)
                    new_rows.append((ids, np.full(len(ids), ident, np.int64), emb))
            # committed: mirror it (a failure here only marks the mirror stale; the database is right)
            try:
                for name, ident in new_names.items():
                    self._names[ident], self._ids[name], self._counts[ident] = name, ident, 0
                    self._last_identity = max(self._last_identity, ident)
                if new_rows:  # one faiss add for the whole batch (per-item adds dominate a bulk import)
                    self._add_rows(*(np.concatenate(parts) for parts in zip(*new_rows)))
            except BaseException:
                self._stale = True
                raise
            return [self._counts[self._ids[name]] for name, _ in prepared]

    def remove(self, name: str) -> int:
        """Delete identity ``name`` and all its embeddings (one transaction); returns how many were removed.
        KeyError if it is not enrolled."""
        with self._lock:
            with self._write() as db:
                self._catch_up()
                ident = self._ids.get(name)
                if ident is None:
                    raise KeyError(name)
                rows = np.array([r[0] for r in db.execute("SELECT id FROM embeddings WHERE identity_id = ?", (ident,))],
                                dtype="<i8")  # fmt: skip
                db.execute("DELETE FROM embeddings WHERE identity_id = ?", (ident,))
                db.execute("DELETE FROM identities WHERE id = ?", (ident,))
                seq = db.execute("INSERT INTO removals(identity_id, row_ids) VALUES (?, ?) RETURNING seq",
                                 (ident, rows.tobytes())).fetchone()[0]  # fmt: skip
            try:
                self._index.remove(rows)
                self._forget(ident)
                self._last_removal = seq
            except BaseException:
                self._stale = True
                raise
            return len(rows)

    # ---------------------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        with self._lock:
            self._sync()
            return len(self._ids)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            self._sync()
            return name in self._ids

    @property
    def num_embeddings(self) -> int:
        with self._lock:
            self._sync()
            return len(self._index)

    @property
    def index(self) -> VectorIndex:
        """The faiss index mirroring the database (for inspection: size, ``nbytes()``, HNSW rebuilds, IVF
        trainings)."""
        return self._index

    def identities(self) -> dict[str, int]:
        """Name -> number of enrolled embeddings."""
        with self._lock:
            self._sync()
            return {self._names[i]: self._counts[i] for i in sorted(self._names)}

    def embeddings(self, name: str) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of ``name``, in enrolment order. KeyError if not enrolled."""
        with self._lock:
            self._sync()
            ident = self._ids.get(name)
            if ident is None:
                raise KeyError(name)
            blobs = [r[0] for r in self._db.execute(
                "SELECT vector FROM embeddings WHERE identity_id = ? ORDER BY id", (ident,))]  # fmt: skip
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.embedding_size).astype(np.float32)

    def verify(self, name: str, probes: np.ndarray) -> np.ndarray:
        """(M,) best cosine in [-1, 1] of each of the (M, D) probes to identity ``name``'s embeddings (exact,
        whatever the index). KeyError if not enrolled."""
        probes = check_probes(probes, self.embedding_size)
        return (probes @ self.embeddings(name).T).max(axis=1)

    def search(self, probes: np.ndarray, top_k: int = 5) -> list[list[Match]]:
        """For each of the (M, D) probes, the ``top_k`` identities with the highest best-cosine, best first
        (exact with the flat index, approximate with HNSW and a trained IVF)."""
        probes = check_probes(probes, self.embedding_size, top_k)
        with self._lock:
            self._sync()
            k = min(top_k, len(self._ids))
            if k == 0:
                return [[] for _ in range(len(probes))]
            found = self._index.search(probes, k)
            return [[Match(self._names[i], float(s)) for i, s in r] for r in found]
