"""Gallery store latency, memory and HNSW / IVF recall at 10k / 100k (/ 1M) synthetic identities of 512-d embeddings.

Synthetic, clustered embeddings: 1000 random unit centres (think demographic groups), each identity a unit vector
at cosine ~0.7 from its centre (so neighbours are close, which is what makes approximate search miss); a probe
is an identity's vector plus noise (cosine ~0.9 to it: a new photo). One embedding per identity.

Indexes: ``flat`` (exact), ``hnsw`` and ``ivf`` (approximate; see ``ppfr.deploy.gallery.index``).

Recorded per (size, index):
* ``gallery_enrol_<n>``: one enrolment (one new identity, 3 templates: one SQLite transaction with
  ``synchronous=FULL`` + the faiss add) into a gallery of n identities. Acceptance: at the largest size it costs
  at most 2x what it costs at 10k, measured in the same run (a change's cost must not grow with the gallery).
* ``gallery_identify_<n>``: one probe, top 5 identities.
* ``gallery_remove_<n>``: one identity removed (the flat index compacts its array: O(rows); HNSW marks it; IVF
  finds the row's list slot through its hashtable and moves one row into the gap).
* load: opening a handle = reading every row from SQLite + building its index (for IVF: k-means on a sample,
  then assigning every row to a list; the training + fill time alone is printed as ``build``).
* memory: the process RSS growth when a handle loads the store and builds its index, and the index's own
  estimate (``VectorIndex.nbytes``); printed in the summary and stored in ``extra_info``.
* recall@1 of HNSW and of IVF against exact over 1000 probes; each must be >= 0.99.

Sizes: 10k and 100k; ``PPFR_BENCH_GALLERY_1M=1`` adds 1M (2 GB of vectors, ~2.2 GB of database; flat only unless
``PPFR_BENCH_GALLERY_HNSW_MAX`` allows it: building an HNSW graph of 1M 512-d vectors takes far longer than the
rest of the run on a small CPU; IVF runs at every size). ``PPFR_BENCH_GALLERY_SIZES=10000,50000`` overrides
the list. The qdrant backend is
not measured here: its embedded mode commits every point in its own SQLite transaction (tens of ms per embedding),
so it is a test double, and a Qdrant server's figures belong to that server.

    pytest benchmarks/bench_gallery.py --benchmark-only
"""

from __future__ import annotations

import itertools
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.conftest import measure, require_ratio
from ppfr.deploy.gallery import open_gallery

pytest.importorskip("faiss")

D = 512
_sizes_env = os.environ.get("PPFR_BENCH_GALLERY_SIZES")
SIZES = ([int(s) for s in _sizes_env.split(",")] if _sizes_env else
         [10_000, 100_000] + ([1_000_000] if os.environ.get("PPFR_BENCH_GALLERY_1M") == "1" else []))  # fmt: skip
HNSW_MAX = int(os.environ.get("PPFR_BENCH_GALLERY_HNSW_MAX", "100000"))
CENTRES = 1000
CHUNK = 50_000  # identities generated and enrolled per transaction while building
PROBES = 1000
CPU = torch.device("cpu")
FIGURES: dict[tuple[int, str], dict] = {}

_base = min(SIZES)
INDEXES = ["flat", "hnsw", "ivf"]
for _index, _sizes in (("flat", SIZES), ("hnsw", [n for n in SIZES if n <= HNSW_MAX]), ("ivf", SIZES)):
    _top = max(_sizes, default=_base)
    if _top > _base:  # time(10k) / time(largest) >= 0.5  <=>  the largest enrolment costs at most 2x
        require_ratio(f"gallery enrolment {_index}: {_top} vs {_base} identities", f"gallery_enrol_{_top}", _index,
                      f"gallery_enrol_{_base}", _index, 0.5)  # fmt: skip


def _rss_mb() -> float:
    """Resident set size now (Linux /proc), else the peak (getrusage), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Synthetic:
    """Deterministic clustered identities: ``chunk(i)`` = (names, (n, D) float32 unit vectors) of chunk i."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((CENTRES, D)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.seed = seed

    def chunk(self, i: int, n: int) -> tuple[list[str], np.ndarray]:
        rng = np.random.default_rng((self.seed, i))
        x = self.centres[rng.integers(0, CENTRES, n)] + rng.standard_normal((n, D)).astype(np.float32) / D**0.5
        return [f"id{i * CHUNK + j}" for j in range(n)], x / np.linalg.norm(x, axis=1, keepdims=True)

    @staticmethod
    def probes(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32) / D**0.5
        return p / np.linalg.norm(p, axis=1, keepdims=True)


class Store:
    """A built database of ``n`` identities, with PROBES probes (PROBES, D) of known identities ``names``."""

    def __init__(self, n: int, db: Path, probes: np.ndarray, names: list[str]) -> None:
        self.n, self.db, self.probes, self.names = n, db, probes, names
        self.handles: dict[str, object] = {}
        self.truth: list[str] | None = None  # exact top-1 identity of each probe (from the flat index)

    def handle(self, index: str):
        """An open gallery on the store with this index (opened once; load time and RSS growth recorded)."""
        if index not in self.handles:
            rss0, t0 = _rss_mb(), time.perf_counter()
            g = open_gallery(self.db, "bench", D, index=index)
            FIGURES[(self.n, index)] = {"load_s": time.perf_counter() - t0, "rss_growth_mb": _rss_mb() - rss0,
                                        "index_mb": g.index.nbytes() / 2**20}  # fmt: skip
            if index == "ivf":
                FIGURES[(self.n, index)] |= {"build_s": g.index.train_seconds, "nlist": g.index.nlist,
                                             "nprobe": g.index.ivf_nprobe}  # fmt: skip
            self.handles[index] = g
        return self.handles[index]


@pytest.fixture(scope="module", params=SIZES, ids=[f"n{n}" for n in SIZES])
def store(request, tmp_path_factory):
    """One size at a time (pytest groups the tests by this module-scoped parameter): built, used, deleted."""
    n = request.param
    db = tmp_path_factory.mktemp(f"gallery{n}") / "gallery.db"
    syn, chunks = Synthetic(), (n + CHUNK - 1) // CHUNK
    per_chunk = PROBES // chunks + 1
    t0 = time.perf_counter()
    keep_names: list[str] = []
    keep_x = []
    with open_gallery(db, "bench", D) as g:
        for i in range(chunks):
            names, x = syn.chunk(i, min(CHUNK, n - i * CHUNK))
            g.enrol_many([(nm, x[j: j + 1]) for j, nm in enumerate(names)])
            keep_names += names[:per_chunk]
            keep_x.append(x[:per_chunk].copy())
        del names, x
    print(f"\nbuilt a {n}-identity gallery in {time.perf_counter() - t0:.1f} s ({db.stat().st_size / 2**20:.0f} MiB)")
    s = Store(n, db, Synthetic.probes(np.concatenate(keep_x)[:PROBES], np.random.default_rng(n)), keep_names[:PROBES])
    yield s
    for g in s.handles.values():
        g.close()
    shutil.rmtree(db.parent, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def figures_table(request):
    def show():
        if not FIGURES:
            return
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        tr.section("gallery: load, memory, recall")
        for (n, index), f in sorted(FIGURES.items()):
            rec = f"  recall@1 vs exact {f['recall_at_1']:.4f}" if "recall_at_1" in f else ""
            own = f"  top-1 = own identity {f['top1_own']:.3f}" if "top1_own" in f else ""
            ivf = (f"  build {f['build_s']:6.1f} s (nlist {f['nlist']}, nprobe {f['nprobe']})"
                   if "build_s" in f else "")  # fmt: skip
            tr.write_line(f"{n:>8} {index:<5} load {f['load_s']:7.1f} s  RSS +{f['rss_growth_mb']:6.0f} MiB  "
                          f"index ~{f['index_mb']:6.0f} MiB{own}{rec}{ivf}")  # fmt: skip

    request.config.add_cleanup(show)


def _skip_big_hnsw(n: int, index: str) -> None:
    if index == "hnsw" and n > HNSW_MAX:
        pytest.skip(f"HNSW at {n} identities: building the graph exceeds this run (PPFR_BENCH_GALLERY_HNSW_MAX)")


def _bytes_scanned(g, n: int, index: str) -> int:
    """Vector bytes one probe reads: all of them (flat), the probed lists' share (a trained IVF), unknown (HNSW)."""
    if index == "flat" or (index == "ivf" and g.index.nlist == 0):
        return n * D * 4
    if index == "ivf":
        return int(n * D * 4 * min(1.0, g.index.ivf_nprobe / g.index.nlist))
    return 0


@pytest.mark.parametrize("index", INDEXES)
def test_gallery_enrol(benchmark, store, index):
    _skip_big_hnsw(store.n, index)
    g = store.handle(index)
    rng = np.random.default_rng(1)
    pool = [rng.standard_normal((3, D)).astype(np.float32) for _ in range(8)]
    counter = itertools.count()

    def enrol_one():
        i = next(counter)
        return g.enrol(f"bench-{index}-{i}", pool[i % len(pool)])

    measure(benchmark, enrol_one, case=f"gallery_enrol_{store.n}", provider=index, images=1,
            bytes_written=3 * D * 4, bytes_read=0, dev=CPU, rounds=40)  # fmt: skip
    benchmark.extra_info.update(FIGURES[(store.n, index)])


@pytest.mark.parametrize("index", INDEXES)
def test_gallery_identify(benchmark, store, index):
    _skip_big_hnsw(store.n, index)
    g = store.handle(index)
    it = itertools.cycle(range(len(store.probes)))
    measure(benchmark, lambda: g.search(store.probes[next(it)][None], top_k=5), case=f"gallery_identify_{store.n}",
            provider=index, images=1, bytes_written=0, bytes_read=_bytes_scanned(g, store.n, index), dev=CPU,
            rounds=30)  # fmt: skip
    found = [r[0].name for r in g.search(store.probes, top_k=1)]
    fig = FIGURES[(store.n, index)]
    fig["top1_own"] = float(np.mean([a == b for a, b in zip(found, store.names)]))
    if index == "flat":
        store.truth = found
    else:
        if store.truth is None:
            store.truth = [r[0].name for r in store.handle("flat").search(store.probes, top_k=1)]
        fig["recall_at_1"] = float(np.mean([a == b for a, b in zip(found, store.truth)]))
        assert fig["recall_at_1"] >= 0.99, f"{index} recall@1 {fig['recall_at_1']:.4f} < 0.99 at {store.n} identities"
    benchmark.extra_info.update(fig)


@pytest.mark.parametrize("index", INDEXES)
def test_gallery_remove(benchmark, store, index):
    _skip_big_hnsw(store.n, index)
    g = store.handle(index)
    start = store.n - 1 - INDEXES.index(index)  # the indexes remove different identities
    victims = iter(f"id{i}" for i in range(start, -1, -97))  # spread over the gallery, not only the tail
    measure(benchmark, lambda: g.remove(next(victims)), case=f"gallery_remove_{store.n}", provider=index, images=1,
            bytes_written=0, bytes_read=0, dev=CPU, rounds=10)  # fmt: skip
    benchmark.extra_info.update(FIGURES[(store.n, index)])
