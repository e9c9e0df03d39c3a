"""Galleries of enrolled identities for the recognition server, chosen by URI with :func:`open_gallery`.

* ``protocol``  the interface every store provides (``GalleryLike``), ``Match``, ``GalleryError``
* ``helpers``   the checks every store shares: identity names, embeddings (one L2 rule), probes
* ``sqlite``    ``sqlite:///path/gallery.db`` or a folder: SQLite rows + a vector index, one transaction per change,
                several processes per host
* ``index``     that vector index (faiss: ``flat`` exact, ``hnsw`` / ``ivf`` approximate)
* ``qdrant``    ``qdrant://host:port/collection`` (a Qdrant server or cluster), ``qdrant+local:///path`` (embedded)
* ``stores``    URI -> store
* ``importer``  the legacy single-file ``gallery.npz`` (no longer a store): ``read_npz`` and its import into any
                store (``ppfr gallery import SRC DST``; automatic for a folder's first ``gallery.db``)

Imports point down: this package's ``__init__`` -> ``importer`` -> ``stores`` -> ``sqlite`` / ``qdrant`` ->
``index`` / ``helpers`` / ``protocol``; no store imports the package back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppfr.deploy.gallery.helpers import MAX_NAME_LEN, check_name, check_probes, normalize
from ppfr.deploy.gallery.importer import auto_import, import_npz, main, read_npz
from ppfr.deploy.gallery.protocol import GalleryError, GalleryLike, Match
from ppfr.deploy.gallery.stores import open_store

__all__ = ["MAX_NAME_LEN", "GalleryError", "GalleryLike", "Match", "check_name", "check_probes", "import_npz", "main",
           "normalize", "open_gallery", "read_npz"]  # fmt: skip


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
    return open_store(uri, method, embedding_size, index, options, before_sqlite=auto_import)
