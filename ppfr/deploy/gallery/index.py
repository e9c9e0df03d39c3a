"""The in-process vector index of a gallery store: faiss, exact by default, HNSW or IVF on request.

Rows are embeddings, each with a stable 64-bit row id (the store's primary key) and the id of the identity it
belongs to. The index answers "the ``k`` best identities of each probe" under the max-over-templates rule: an
identity's score is the best inner product (= cosine: every row and probe is L2-normalised) over its rows.

* ``kind="flat"``: ``IndexIDMap2(IndexFlatIP)``. Exact. ``add_with_ids`` per enrolment; ``remove_ids`` per removal
  (faiss compacts the flat array, so a removal moves O(rows) memory; an enrolment is O(its rows)).
* ``kind="hnsw"``: ``IndexIDMap(IndexHNSWFlat(d, M, inner product))``. Approximate; its recall against exact is
  measured in ``benchmarks/bench_gallery.py``. HNSW graphs cannot delete, so a removed row is marked deleted
  (filtered out of every result) and the whole index is rebuilt from its own stored vectors once the deleted rows
  exceed ``rebuild_fraction`` of all rows.
* ``kind="ivf"``: ``IndexIVFFlat(IndexFlatIP quantizer, d, nlist, inner product)`` with a hashtable direct map
  (row id -> list slot), so ``add_with_ids`` and ``remove_ids`` work in place and a removal costs O(its rows), not
  O(gallery). Approximate: a probe scans the ``nprobe`` lists whose centroids are nearest. The coarse quantizer is
  trained with k-means on a seeded sample of the rows themselves: ``nlist = clamp(round(sqrt(N)), 16, 4096)``
  lists, ``40 * nlist`` sample rows (faiss wants >= 39 per centroid), ``ivf_niter`` iterations. Below
  ``ivf_min_rows`` live rows (default 2048) there is nothing worth training: the rows sit in an exact flat index
  (the same as ``kind="flat"``) and search is exact. Crossing that size trains the IVF; once the live rows reach
  ``ivf_regrow`` (default 4) times the count it was trained on, it is retrained and refilled (a 4x-growth rule:
  each row is re-assigned O(1) times on average, and the lists never hold far more rows than sqrt(N) suggests).
  The (re)training happens inside the ``add`` that crossed the line (that one enrolment is slow: ~110 s for 1M
  512-d rows, nlist 1000, on one shared core) or, during a bulk load, once at the end of :meth:`VectorIndex.bulk`.
  While it runs the old index and the new one are both in memory (2x the vectors).

Identity search: the top ``k`` identities are the first ``k`` distinct identities in the row ranking (an
identity's score is its first row there). So the index searches ``depth`` rows, takes the first ``k`` distinct
live identities, and searches again 4x deeper for the probes whose ``depth`` rows held fewer (many templates of
one identity, or deleted rows). For the flat index this is exact. IVF returns at most the rows of the lists it
probed: when those run out before ``k`` identities are found, the next pass also probes 4x more lists (up to all
of them, which is exact).

Not thread-safe (none of the three): the gallery that owns it serialises every call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

KINDS = ("flat", "hnsw", "ivf")
IVF_MIN_NLIST, IVF_MAX_NLIST = 16, 4096
IVF_TRAIN_PER_LIST = 40  # k-means sample rows per list (faiss warns below 39)


def faiss_module() -> Any:
    """faiss, or a one-line error saying how to get it (a gallery store needs it; ``import ppfr`` never does)."""
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        raise ModuleNotFoundError("the gallery's vector index needs faiss: pip install 'ppfr[serve]' (or faiss-cpu)",
                                  name="faiss") from None  # fmt: skip
    return faiss


class VectorIndex:
    """Row id -> (identity id, vector) with identity-level top-k search.

    ``dim``: embedding size D. ``kind``: "flat" (exact), "hnsw" or "ivf". ``hnsw_m``: graph degree;
    ``ef_construction`` / ``ef_search``: HNSW beam widths at build / query time (``ef_search`` is raised to the
    search depth when that is larger). ``rebuild_fraction``: HNSW rebuilds once deleted rows exceed this fraction
    of its rows. ``ivf_nprobe``: lists an IVF search scans (default 32); ``ivf_nlist``: lists (default 0 =
    ``clamp(round(sqrt(N)), 16, 4096)`` at each training); ``ivf_min_rows``: below this many live rows IVF is
    exact (flat); ``ivf_regrow``: retrain once the live rows reach this multiple of the trained-on count;
    ``ivf_niter``: k-means iterations; ``seed``: the training sample's seed.
    """

    def __init__(self, dim: int, kind: str = "flat", *, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 128, rebuild_fraction: float = 0.2, ivf_nprobe: int = 32, ivf_nlist: int = 0,
                 ivf_min_rows: int = 2048, ivf_regrow: float = 4.0, ivf_niter: int = 10,
                 seed: int = 0) -> None:  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"index must be one of {KINDS}, got {kind!r}")
        if not 0.0 < rebuild_fraction <= 1.0:
            raise ValueError(f"rebuild_fraction must be in (0, 1], got {rebuild_fraction}")
        if ivf_nprobe < 1 or ivf_nlist < 0 or ivf_min_rows < 1 or ivf_regrow <= 1.0 or ivf_niter < 1:
            raise ValueError(f"IVF options: need ivf_nprobe >= 1, ivf_nlist >= 0, ivf_min_rows >= 1, ivf_regrow > 1, "
                             f"ivf_niter >= 1; got {ivf_nprobe}, {ivf_nlist}, {ivf_min_rows}, {ivf_regrow}, "
                             f"{ivf_niter}")  # fmt: skip
        self.faiss = faiss_module()
        self.dim, self.kind = int(dim), kind
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self.rebuild_fraction = float(rebuild_fraction)
        self.ivf_nprobe, self.ivf_nlist, self.ivf_min_rows = int(ivf_nprobe), int(ivf_nlist), int(ivf_min_rows)
        self.ivf_regrow, self.ivf_niter, self.seed = float(ivf_regrow), int(ivf_niter), int(seed)
        self._ivf: Any = None  # the trained IndexIVFFlat once kind="ivf" has trained; None while exact
        self._quantizer: Any = None
        self.trained_rows = 0  # IVF: live rows when it was last trained (0: not trained, searching exactly)
        self.trainings = 0
        self.train_seconds = 0.0  # IVF: wall time of the last (re)training and refill
        self._bulk = False
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
        if self.kind in ("flat", "ivf"):  # ivf: exact until there are enough rows to train on
            self._ivf = self._quantizer = None
            self.trained_rows = 0
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
    def nlist(self) -> int:
        """IVF lists of the trained index (0 while an IVF index is still exact, and for flat / HNSW)."""
        return int(self._ivf.nlist) if self._ivf is not None else 0

    @property
    def deleted(self) -> int:
        """HNSW rows marked deleted and not yet rebuilt away (always 0 for flat)."""
        return self._deleted

    def nbytes(self) -> int:
        """Approximate bytes held: the vectors, the HNSW links (M*2 neighbours at level 0, 4 bytes each), the id
        map and the label array. faiss allocates in C++, outside Python's tracemalloc, hence an estimate."""
        n = int(self._index.ntotal)
        if self._ivf is not None:  # codes + ids in the lists, ~40 bytes per hashtable entry, the centroids
            return int(n * (self.dim * 4 + 8 + 40) + self.nlist * self.dim * 4 + self._label.nbytes)
        links = n * self.hnsw_m * 2 * 4 * 1.1 if self.kind == "hnsw" else 0  # upper levels add ~1/M more
        return int(n * self.dim * 4 + links + n * 8 * (1 if self.kind == "hnsw" else 2) + self._label.nbytes)

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
        if not self._bulk:
            self._maybe_train()

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Many ``add`` calls (a gallery loading its store): an IVF index (re)trains once at the end, not each
        time the growing row count crosses a threshold."""
        self._bulk = True
        try:
            yield
        finally:
            self._bulk = False
        self._maybe_train()

    def _maybe_train(self) -> None:
        if self.kind != "ivf" or self._live < self.ivf_min_rows:
            return
        if self._ivf is None or self._live >= self.ivf_regrow * self.trained_rows:
            self.train()

    def _stored(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (n,), vectors (n, D)) views of the rows stored now, in pieces (no full copy of the gallery)."""
        f = self.faiss
        if self._ivf is None:
            n = int(self._index.ntotal)
            if n:
                flat = f.downcast_index(self._index.index)
                ids = f.vector_to_array(self._index.id_map).astype(np.int64)
                yield ids, f.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
            return
        inv = self._ivf.invlists
        for lst in range(self._ivf.nlist):
            n = int(inv.list_size(lst))
            if n:
                ids = f.rev_swig_ptr(inv.get_ids(lst), n).astype(np.int64)
                codes = f.rev_swig_ptr(inv.get_codes(lst), n * self._ivf.code_size)
                yield ids, np.frombuffer(codes, dtype=np.float32).reshape(n, self.dim)

    def train(self) -> None:
        """IVF: k-means a new coarse quantizer on a seeded sample of the live rows and move every row into it.
        Called by ``add`` / :meth:`bulk` when due; callable directly (e.g. after many removals)."""
        if self.kind != "ivf":
            raise ValueError(f"train: only the ivf index trains, this one is {self.kind!r}")
        if self._live == 0:
            return
        f, t0 = self.faiss, time.perf_counter()
        n = int(self._index.ntotal)  # == live rows: flat and IVF both delete in place
        nlist = self.ivf_nlist or int(min(IVF_MAX_NLIST, max(IVF_MIN_NLIST, round(math.sqrt(n)))))
        nlist = min(nlist, n)  # k-means needs at least one row per centroid
        want = min(n, IVF_TRAIN_PER_LIST * nlist)
        pick = np.sort(np.random.default_rng(self.seed).choice(n, want, replace=False))
        parts, start = [], 0
        for ids, vec in self._stored():  # the sample, gathered piece by piece (global row numbers ``pick``)
            lo, hi = np.searchsorted(pick, [start, start + len(ids)])
            parts.append(vec[pick[lo:hi] - start])
            start += len(ids)
        sample = np.ascontiguousarray(np.concatenate(parts))
        quantizer = f.IndexFlatIP(self.dim)
        ivf = f.IndexIVFFlat(quantizer, self.dim, nlist, f.METRIC_INNER_PRODUCT)
        ivf.cp.niter, ivf.cp.seed = self.ivf_niter, self.seed
        ivf.cp.min_points_per_centroid = 1  # a small sample is fine: silence faiss's warning about it
        ivf.train(sample)
        del sample, parts
        ivf.set_direct_map_type(f.DirectMap.Hashtable)  # remove_ids by id in O(1) each; ids are any int64
        for ids, vec in self._stored():
            ivf.add_with_ids(np.ascontiguousarray(vec), ids)
        self._index = self._ivf = ivf  # drops the old index (flat, or the previous IVF) and its vectors
        self._quantizer = quantizer  # keep the quantizer alive as long as the IVF that points into it
        self.trained_rows = n
        self.trainings += 1
        self.train_seconds = time.perf_counter() - t0

    def remove(self, ids: np.ndarray) -> int:
        """Remove rows by id (ids not in the index are ignored); returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(self._label))]
        ids = ids[self._label[ids] >= 0]
        if len(ids) == 0:
            return 0
        self._label[ids] = -1
        self._live -= len(ids)
        if self.kind in ("flat", "ivf"):  # IVF: the hashtable direct map finds each row's list slot directly
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
        nlist = self.nlist
        nprobe = min(self.ivf_nprobe, nlist)
        todo = np.arange(len(probes))
        while len(todo):
            if self.kind == "hnsw":
                self._hnsw.hnsw.efSearch = max(self.ef_search, depth)
            if nlist:
                self._ivf.nprobe = nprobe
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
                if len(found) < k and (depth < total or nprobe < nlist):
                    again.append(p)
                else:
                    out[p] = list(found.items())
            todo = np.asarray(again, dtype=np.int64)
            depth = min(total, depth * 4)
            nprobe = min(nlist, nprobe * 4)  # IVF: the probed lists may simply hold too few rows
        return out
