"""The legacy ``gallery.npz`` (ppfr's first gallery: one file per folder, rewritten whole on every change) into today's
stores. Nothing serves from an npz any more; this module only reads one and copies it:

* ``read_npz``: the file's identities and rows, fully checked before a byte is trusted (``allow_pickle=False``,
  every member's declared size against what it holds, unit rows, labels in range).
* ``import_npz`` (``ppfr gallery import SRC DST``): into any store ``open_gallery`` opens (sqlite, qdrant).
* ``auto_import``: a folder's ``gallery.npz`` into its ``gallery.db`` when that database is first created.

The file format (``ppfr-gallery`` version 1): an ``np.savez`` zip of ``embeddings`` (N, D) float32 L2-normalised
rows, ``labels`` (N,) int64 (row i belongs to identity ``names[labels[i]]``) and ``meta``, the UTF-8 bytes (uint8)
of a JSON header ``{"format": "ppfr-gallery", "version": 1, "method", "embedding_size", "names"}``.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from ppfr.deploy.gallery.protocol import GalleryError, GalleryLike
from ppfr.deploy.gallery.stores import open_store
from ppfr.runtime import fsync_dir

FORMAT = "ppfr-gallery"
FORMAT_VERSION = 1
FILENAME = "gallery.npz"
log = logging.getLogger("ppfr.deploy.gallery")


def auto_import(db: Path) -> None:
    """Create ``db`` from the ``gallery.npz`` beside it, when there is one and no database yet.

    Built in a temporary file and renamed into place, under an exclusive ``flock`` (where available) so that
    two servers starting together import once; a crash mid-import leaves no database (the next start retries).
    The ``gallery.npz`` is left in place as a backup; from then on only the database changes. An unusable
    ``gallery.npz`` (corrupt, or declaring more than it holds) is skipped with a warning naming it.
    """
    from ppfr.deploy.gallery.sqlite import FILENAME as DB

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
        from ppfr.deploy.gallery.sqlite import SqliteGallery

        try:
            names, labels, emb, meta = read_npz(npz)
        except GalleryError as exc:  # a bad file beside the database must not stop a server from starting
            log.warning("skipping the import of %s (the gallery starts without it; the file is left in place): %s",
                        npz, exc)  # fmt: skip
            return
        try:
            g = SqliteGallery(tmp, meta["method"], meta["embedding_size"])
            try:
                g._db.execute("PRAGMA journal_mode=DELETE")  # the file to be renamed into place must be one file
                import_into(g, names, labels, emb, str(db))
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
    names, labels, emb, meta = read_npz(src)
    g = open_store(dst, meta["method"], meta["embedding_size"], index)
    try:
        import_into(g, names, labels, emb, str(dst))
    finally:
        g.close()
    return {"identities": len(names), "embeddings": int(emb.shape[0])}


def import_into(g: GalleryLike, names: list[str], labels: np.ndarray, emb: np.ndarray, where: str) -> None:
    """Enrol what ``read_npz`` returned into the empty store ``g``: one ``enrol_many`` (one transaction for sqlite),
    each identity's (n_i, D) rows in file order. The rows go through the store's one L2 rule like any enrolment
    (no second way into a store); the npz's rows were written by that same rule, so re-applying it moves a row by
    at most an ulp in a few small-D rows and, at the models' D = 512, leaves them bit for bit as they were."""
    if len(g):
        raise GalleryError(f"{where} already holds {len(g)} identities: import into an empty gallery")
    if names:
        starts = np.searchsorted(labels, np.arange(len(names) + 1))  # read_npz returns rows grouped by identity
        g.enrol_many([(n, emb[starts[i] : starts[i + 1]]) for i, n in enumerate(names)])


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
        ValueError: a member whose declared shape, dtype, sizes or compression do not fit (caught by ``read_npz``).
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


def read_npz(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """Read and fully check a legacy ``gallery.npz``; GalleryError (one line) saying what is wrong otherwise.

    Returns:
        names: the identity names, distinct.
        labels: (N,) int64, row i belongs to ``names[labels[i]]``; sorted (rows grouped by identity, stable).
        embeddings: (N, D) float32 unit rows, in the order of ``labels``.
        meta: the JSON header (``method``, ``embedding_size``, ...).
    """

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
    order = np.argsort(labels, kind="stable")  # grouped by identity: one slice per identity to enrol
    return names, labels[order], np.ascontiguousarray(emb[order]), meta
