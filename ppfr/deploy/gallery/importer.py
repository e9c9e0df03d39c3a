"""The legacy ``gallery.npz`` into today's stores: ``import_npz`` (``ppfr gallery import SRC DST``) and the
automatic import of a folder's ``gallery.npz`` when its ``gallery.db`` is first created (``auto_import``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ppfr.deploy.gallery.npz import FILENAME, _read
from ppfr.deploy.gallery.protocol import GalleryError, GalleryLike
from ppfr.deploy.gallery.stores import open_store
from ppfr.runtime import fsync_dir

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
            names, labels, emb, meta = _read(npz)
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
    names, labels, emb, meta = _read(src)
    g = open_store(dst, meta["method"], meta["embedding_size"], index)
    try:
        import_into(g, names, labels, emb, str(dst))
    finally:
        g.close()
    return {"identities": len(names), "embeddings": int(emb.shape[0])}


def import_into(g: GalleryLike, names: list[str], labels: np.ndarray, emb: np.ndarray, where: str) -> None:
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
