"""A gallery URI -> its store: ``sqlite://`` (or a plain path) -> ``SqliteGallery``, ``qdrant://`` /
``qdrants://`` / ``qdrant+local://`` -> ``QdrantGallery``. Each store's module is imported only when its URI is
opened (faiss, qdrant-client are extras).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ppfr.deploy.gallery.protocol import GalleryLike


def sqlite_path(target: str | Path) -> Path:
    """A sqlite target -> the database file: a folder (existing, or a path without a suffix) means
    ``folder/gallery.db``."""
    from ppfr.deploy.gallery.sqlite import FILENAME as DB

    p = Path(target)
    return p / DB if p.is_dir() or (not p.exists() and p.suffix == "") else p


def open_store(uri: str | Path, method: str, embedding_size: int, index: str = "flat", options: dict[str, Any] | None = None,
               *, before_sqlite: Callable[[Path], None] | None = None) -> GalleryLike:  # fmt: skip
    """The store at ``uri`` (see ``ppfr.deploy.gallery.open_gallery``); ``before_sqlite(db)`` runs before a sqlite
    database is opened (the gallery.npz import)."""
    options = options or {}
    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "sqlite", text
    scheme = scheme.lower()
    if scheme == "sqlite":
        from ppfr.deploy.gallery.sqlite import SqliteGallery

        db = sqlite_path(rest)
        if before_sqlite is not None:
            before_sqlite(db)
        return SqliteGallery(db, method, embedding_size, index=index, **options)
    if scheme in ("qdrant", "qdrants", "qdrant+local"):
        from urllib.parse import parse_qs, urlsplit

        from ppfr.deploy.gallery.qdrant import DEFAULT_COLLECTION, QdrantGallery

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
