"""A gallery in a Qdrant collection: the fleet backend (many servers on many hosts, one shared gallery).

``qdrant-client`` talks to a Qdrant server or cluster (``qdrant://host:port/collection``) and, with the same API,
runs embedded in-process on a local folder (``qdrant+local:///path``: pure Python brute-force search, one process
at a time, and every point committed in its own SQLite transaction, so tens of ms per embedding: what the tests
use, fine for small galleries, not a deployment). Chosen over milvus-lite for exactly that: one client for the
embedded and the clustered case, and the embedded mode needs no native server.

* One point per embedding: a random UUID id, the L2-normalised vector (cosine distance) and payload
  ``{"name": <identity>}`` (with a keyword payload index on ``name``).
* The collection's metadata holds format / version / method / embedding size; a collection enrolled with another
  model is refused.
* Identity search: ``query_points_groups`` grouped by ``name`` with one hit per group, so each group's score is
  the identity's best template (max over templates) and the server ranks identities itself.
* Consistency: one enrolment batch is one ``upsert`` request and one removal one filtered ``delete`` (``wait=True``:
  applied before the call returns). Qdrant has no multi-request transactions: a server crash inside a request can
  apply part of it on a multi-shard collection; every other server sees a change as soon as it is acknowledged.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import numpy as np

from ppfr.deploy.gallery.helpers import check_name, check_probes, normalize
from ppfr.deploy.gallery.protocol import GalleryError, Match

FORMAT = "ppfr-gallery-qdrant"
FORMAT_VERSION = 1
DEFAULT_COLLECTION = "gallery"
SCROLL_PAGE = 1024


def _qdrant() -> tuple[Any, Any]:
    try:
        from qdrant_client import QdrantClient, models
    except ImportError:
        raise ModuleNotFoundError("the qdrant gallery backend needs qdrant-client: pip install 'ppfr[fleet]'",
                                  name="qdrant_client") from None  # fmt: skip
    return QdrantClient, models


class QdrantGallery:
    """Enrolled identities in Qdrant collection ``collection`` (created if absent).

    Give either ``url`` ("http://host:6333"; ``api_key`` from the argument or ``PPFR_QDRANT_API_KEY``) or ``path``
    (embedded local mode, a folder). ``exact=True`` asks a server for exact (brute-force) search instead of its
    HNSW; the embedded mode is always exact.
    """

    backend = "qdrant"

    def __init__(self, method: str, embedding_size: int, *, url: str | None = None, path: str | None = None,
                 collection: str = DEFAULT_COLLECTION, api_key: str | None = None, exact: bool = False,
                 timeout: int = 30) -> None:  # fmt: skip
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if (url is None) == (path is None):
            raise ValueError("give exactly one of url (a Qdrant server) or path (embedded local mode)")
        QdrantClient, self._m = _qdrant()
        self.method, self.embedding_size, self.collection, self.exact = method, int(embedding_size), collection, exact
        self.path = None  # no single gallery file (the sqlite backend's attribute)
        if path is not None:  # the open_gallery URI of this handle
            self.uri = f"qdrant+local://{path}?collection={collection}"
        else:
            scheme = "qdrants" if str(url).startswith("https") else "qdrant"
            self.uri = f"{scheme}://{str(url).split('://')[-1]}/{collection}"
        self._lock = threading.RLock()
        self._local = path is not None
        try:
            if path is not None:
                os.makedirs(path, exist_ok=True)
                self._client = QdrantClient(path=path)
            else:
                self._client = QdrantClient(url=url, api_key=api_key or os.environ.get("PPFR_QDRANT_API_KEY"),
                                            timeout=timeout)  # fmt: skip
        except RuntimeError as exc:  # local mode: the folder is locked by another process
            raise GalleryError(f"cannot open Qdrant gallery {self.uri}: {exc}") from None
        try:
            self._setup()
        except GalleryError:
            self._client.close()
            raise
        except Exception as exc:  # unreachable server, refused API key, ...: one line for the operator
            self._client.close()
            raise GalleryError(f"cannot open Qdrant gallery {self.uri}: {type(exc).__name__}: {exc}") from None

    def _setup(self) -> None:
        m, c = self._m, self._client
        want = {"format": FORMAT, "version": FORMAT_VERSION, "method": self.method,
                "embedding_size": self.embedding_size}  # fmt: skip
        if not c.collection_exists(self.collection):
            c.create_collection(self.collection, vectors_config=m.VectorParams(size=self.embedding_size,
                                distance=m.Distance.COSINE), metadata=want)  # fmt: skip
            if not self._local:  # the embedded mode filters by scanning and warns that an index does nothing
                c.create_payload_index(self.collection, "name", m.PayloadSchemaType.KEYWORD)
        have = c.get_collection(self.collection).config.metadata or {}
        if have.get("format") != FORMAT or have.get("version") != FORMAT_VERSION:
            raise GalleryError(f"Qdrant collection {self.collection!r} is not a ppfr gallery (format "
                               f"{have.get('format')!r} version {have.get('version')!r})")  # fmt: skip
        if have.get("method") != self.method or have.get("embedding_size") != self.embedding_size:
            raise GalleryError(
                f"Qdrant collection {self.collection!r} was enrolled with method {have.get('method')!r} "
                f"({have.get('embedding_size')}-d embeddings); this server runs {self.method!r} "
                f"({self.embedding_size}-d). Embeddings of another model cannot be compared: use another "
                "collection or re-enrol")  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def __enter__(self) -> QdrantGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- helpers
    def _name_filter(self, name: str) -> Any:
        m = self._m
        return m.Filter(must=[m.FieldCondition(key="name", match=m.MatchValue(value=name))])

    def _count(self, name: str | None = None) -> int:
        flt = None if name is None else self._name_filter(name)
        return int(self._client.count(self.collection, count_filter=flt, exact=True).count)

    # ------------------------------------------------------------------------------------------- mutations
    def enrol(self, name: str, embeddings: np.ndarray) -> int:
        """Add (N, D) embeddings (stored L2-normalised) to identity ``name``; returns its embedding count."""
        return self.enrol_many([(name, embeddings)])[0]

    def enrol_many(self, items: list[tuple[str, np.ndarray]]) -> list[int]:
        """Add several enrolments in one upsert request; a bad item raises before anything is sent. Each item is
        (name, (N>=1, D) embeddings). Returns each item's identity embedding count after the call."""
        m = self._m
        points = []
        names = []
        for name, emb in items:
            emb = normalize(emb)
            if emb.shape[1] != self.embedding_size or emb.shape[0] == 0:
                raise ValueError(f"expected (N>=1, {self.embedding_size}) embeddings, got {emb.shape}")
            names.append(check_name(name))
            points += [m.PointStruct(id=str(uuid.uuid4()), vector=row.tolist(), payload={"name": name}) for row in emb]
        with self._lock:
            self._client.upsert(self.collection, points=points, wait=True)
            counts = self._counts(sorted(set(names)))
        return [counts[n] for n in names]

    def _counts(self, names: list[str]) -> dict[str, int]:
        """Embedding count of each of ``names``: one exact facet request, not one count per name."""
        m = self._m
        flt = m.Filter(must=[m.FieldCondition(key="name", match=m.MatchAny(any=names))])
        hits = self._client.facet(self.collection, key="name", facet_filter=flt, limit=len(names), exact=True).hits
        return {n: 0 for n in names} | {str(h.value): int(h.count) for h in hits}

    def remove(self, name: str) -> int:
        """Delete identity ``name`` and all its embeddings; returns how many were removed. KeyError if absent."""
        with self._lock:
            n = self._count(name)
            if n == 0:
                raise KeyError(name)
            self._client.delete(self.collection, points_selector=m_filter(self._m, self._name_filter(name)), wait=True)
            return n

    # ---------------------------------------------------------------------------------------------- queries
    def identities(self) -> dict[str, int]:
        """Name -> number of enrolled embeddings (an exact facet over the ``name`` payload: O(embeddings))."""
        with self._lock:
            total = self._count()
            if total == 0:
                return {}
            hits = self._client.facet(self.collection, key="name", limit=total, exact=True).hits
        return {str(h.value): int(h.count) for h in sorted(hits, key=lambda h: str(h.value))}

    def __len__(self) -> int:
        return len(self.identities())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._lock:
            return self._count(name) > 0

    @property
    def num_embeddings(self) -> int:
        with self._lock:
            return self._count()

    def embeddings(self, name: str) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of ``name`` (in no particular order). KeyError if absent."""
        rows: list[list[float]] = []
        offset = None
        with self._lock:
            while True:
                page, offset = self._client.scroll(self.collection, scroll_filter=self._name_filter(name),
                                                   limit=SCROLL_PAGE, offset=offset, with_vectors=True,
                                                   with_payload=False)  # fmt: skip
                rows += [p.vector for p in page]
                if offset is None:
                    break
        if not rows:
            raise KeyError(name)
        return normalize(np.asarray(rows, dtype=np.float32))

    def verify(self, name: str, probes: np.ndarray) -> np.ndarray:
        """(M,) best cosine of each of the (M, D) probes to identity ``name``'s embeddings (exact). KeyError if
        not enrolled."""
        probes = check_probes(probes, self.embedding_size)
        return (probes @ self.embeddings(name).T).max(axis=1)

    def search(self, probes: np.ndarray, top_k: int = 5) -> list[list[Match]]:
        """For each of the (M, D) probes, the ``top_k`` identities with the highest best-cosine, best first."""
        probes = check_probes(probes, self.embedding_size, top_k)
        params = self._m.SearchParams(exact=True) if self.exact else None
        out = []
        with self._lock:
            for p in probes:
                groups = self._client.query_points_groups(self.collection, group_by="name", query=p.tolist(),
                                                          limit=top_k, group_size=1, search_params=params,
                                                          with_payload=False)  # fmt: skip
                out.append([Match(str(g.id), float(g.hits[0].score)) for g in groups.groups])
        return out


def m_filter(models: Any, flt: Any) -> Any:
    """A points selector deleting every point matching ``flt``."""
    return models.FilterSelector(filter=flt)
