"""The in-process vector index of a gallery store: faiss, exact by default, HNSW on request.

Rows are embeddings, each with a stable 64-bit row id (the store's primary key) and the id of the identity it
belongs to. The index answers "the ``k`` best identities of each probe" under the max-over-templates rule: an
identity's score is the best inner product (= cosine: every row and probe is L2-normalised) over its rows.

* ``kind="flat"``: ``IndexIDMap2(IndexFlatIP)``. Exact. ``add_with_ids`` per enrolment; ``remove_ids`` per removal
  (faiss compacts the flat array, so a removal moves O(rows) memory; an enrolment is O(its rows)).
* ``kind="hnsw"``: ``IndexIDMap(IndexHNSWFlat(d, M, inner product))``. Approximate; its recall against exact is
  measured in ``benchmarks/bench_gallery.py``. HNSW graphs cannot delete, so a removed row is marked deleted
  (filtered out of every result) and the whole index is rebuilt from its own stored vectors once the deleted rows
  exceed ``rebuild_fraction`` of all rows.

Identity search: the top ``k`` identities are the first ``k`` distinct identities in the row ranking (an
identity's score is its first row there). So the index searches ``depth`` rows, takes the first ``k`` distinct
live identities, and searches again 4x deeper for the probes whose ``depth`` rows held fewer (many templates of
one identity, or deleted rows). For the flat index this is exact.

Not thread-safe: the gallery that owns it serialises every call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = ("flat", "hnsw")


def faiss_module() -> Any:
    """faiss, or a one-line error saying how to get it (a gallery store needs it; ``import ppfr`` never does)."""
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError("the gallery's vector index needs faiss: pip install faiss-cpu") from None
    return faiss


class VectorIndex:
    """Row id -> (identity id, vector) with identity-level top-k search.

    ``dim``: embedding size D. ``kind``: "flat" (exact) or "hnsw". ``hnsw_m``: graph degree; ``ef_construction``
    / ``ef_search``: HNSW beam widths at build / query time (``ef_search`` is raised to the search depth when
    that is larger). ``rebuild_fraction``: HNSW rebuilds once deleted rows exceed this fraction of its rows.
    """

    def __init__(self, dim: int, kind: str = "flat", *, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 128, rebuild_fraction: float = 0.2) -> None:  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"index must be one of {KINDS}, got {kind!r}")
        if not 0.0 < rebuild_fraction <= 1.0:
            raise ValueError(f"rebuild_fraction must be in (0, 1], got {rebuild_fraction}")
        self.faiss = faiss_module()
        self.dim, self.kind = int(dim), kind
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self.rebuild_fraction = float(rebuild_fraction)
        # _label[row id] = identity id of a live row, -1 for a removed or never-seen id. A dense array (8 bytes per
        # row id ever issued) rather than a dict: 1M rows cost 8 MB, and results map to identities in one gather.
        self._label = np.full(1024, -1, dtype=np.int64)
        self._live = 0
        self._deleted = 0  # HNSW only: rows still in the graph but marked deleted (their _label is -1)
        self.rebuilds = 0
        self._hnsw: Any = None
        self._index = self._new_index()

    def _new_index(self) -> Any:
        f = self.faiss
        if self.kind == "flat":
            return f.IndexIDMap2(f.IndexFlatIP(self.dim))
        inner = f.IndexHNSWFlat(self.dim, self.hnsw_m, f.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.ef_construction
        inner.hnsw.efSearch = self.ef_search
        self._hnsw = inner  # the HNSW layer, for efSearch and for reconstructing vectors at a rebuild
        return f.IndexIDMap(inner)  # faiss's wrapper keeps a Python reference to ``inner`` (no double ownership)

    # ------------------------------------------------------------------------------------------------ size
    def __len__(self) -> int:
        """Live rows."""
        return self._live

    @property
    def deleted(self) -> int:
        """HNSW rows marked deleted and not yet rebuilt away (always 0 for flat)."""
        return self._deleted

    def nbytes(self) -> int:
        """Approximate bytes held: the vectors, the HNSW links (M*2 neighbours at level 0, 4 bytes each), the id
        map and the label array. faiss allocates in C++, outside Python's tracemalloc, hence an estimate."""
        n = int(self._index.ntotal)
        links = n * self.hnsw_m * 2 * 4 * 1.1 if self.kind == "hnsw" else 0  # upper levels add ~1/M more
        return int(n * self.dim * 4 + links + n * 8 * (2 if self.kind == "flat" else 1) + self._label.nbytes)

    # ------------------------------------------------------------------------------------------- mutations
    def _grow(self, max_id: int) -> None:
        if max_id >= len(self._label):
            bigger = np.full(max(max_id + 1, 2 * len(self._label)), -1, dtype=np.int64)
            bigger[: len(self._label)] = self._label
            self._label = bigger

    def add(self, ids: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows. ``ids``: (N,) int64 >= 0, new; ``labels``: (N,) int64 identity ids; ``vectors``: (N, D)
        float32, L2-normalised."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(ids) == 0:
            return
        if vectors.shape != (len(ids), self.dim) or labels.shape != ids.shape or ids.min() < 0:
            raise ValueError(f"add: expected ids (N,) >= 0, labels (N,), vectors (N, {self.dim}); got "
                             f"{ids.shape}, {labels.shape}, {vectors.shape}")  # fmt: skip
        self._grow(int(ids.max()))
        if np.any(self._label[ids] >= 0):
            raise ValueError("add: a row id is already in the index")
        self._index.add_with_ids(vectors, ids)
        self._label[ids] = labels
        self._live += len(ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove rows by id (ids not in the index are ignored); returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(self._label))]
        ids = ids[self._label[ids] >= 0]
        if len(ids) == 0:
            return 0
        self._label[ids] = -1
        self._live -= len(ids)
        if self.kind == "flat":
            self._index.remove_ids(self.faiss.IDSelectorArray(len(ids), self.faiss.swig_ptr(np.ascontiguousarray(ids))))
        else:
            self._deleted += len(ids)
            if self._deleted > self.rebuild_fraction * self._index.ntotal:
                self._rebuild()
        return len(ids)

    def _rebuild(self) -> None:
        """HNSW: a fresh graph over the live rows (vectors taken from the old graph's own flat storage)."""
        old, old_hnsw = self._index, self._hnsw
        n = int(old.ntotal)
        ids = self.faiss.vector_to_array(old.id_map).astype(np.int64) if n else np.zeros(0, np.int64)
        keep = self._label[ids] >= 0
        vectors = old_hnsw.reconstruct_n(0, n)[keep] if n else np.zeros((0, self.dim), np.float32)
        self._index = self._new_index()
        if keep.any():
            self._index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids[keep]))
        self._deleted = 0
        self.rebuilds += 1

    def clear(self) -> None:
        self._index = self._new_index()
        self._label = np.full(1024, -1, dtype=np.int64)
        self._live = self._deleted = 0

    # ---------------------------------------------------------------------------------------------- search
    def search(self, probes: np.ndarray, k: int, *, depth: int | None = None) -> list[list[tuple[int, float]]]:
        """For each probe, up to ``k`` (identity id, best inner product) pairs, best first.

        ``probes``: (M, D) float32, L2-normalised. ``depth``: rows fetched on the first pass (default
        ``max(4k, 32)``); it grows 4x for probes that need more, up to every row in the index.
        """
        probes = np.ascontiguousarray(probes, dtype=np.float32)
        out: list[list[tuple[int, float]]] = [[] for _ in range(len(probes))]
        total = int(self._index.ntotal)
        if self._live == 0 or k < 1:
            return out
        depth = min(total, depth or max(4 * k, 32))
        todo = np.arange(len(probes))
        while len(todo):
            if self.kind == "hnsw":
                self._hnsw.hnsw.efSearch = max(self.ef_search, depth)
            sims, rows = self._index.search(probes[todo], depth)
            labels = np.where(rows >= 0, self._label[np.clip(rows, 0, len(self._label) - 1)], -1)
            again = []
            for r, p in enumerate(todo):
                found: dict[int, float] = {}
                for lab, s in zip(labels[r].tolist(), sims[r].tolist()):
                    if lab >= 0 and lab not in found:  # rows come best first: the first one is the identity's best
                        found[lab] = s
                        if len(found) == k:
                            break
                if len(found) < k and depth < total:
                    again.append(p)
                else:
                    out[p] = list(found.items())
            todo = np.asarray(again, dtype=np.int64)
            depth = min(total, depth * 4)
        return out
