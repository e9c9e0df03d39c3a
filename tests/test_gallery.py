"""Gallery stores behind ``open_gallery``: SQLite + faiss (flat, HNSW, IVF) and Qdrant's embedded mode, one suite.

Every backend is checked against brute force (an identity's score = its best cosine over its templates), for
persistence across reopen, for refusing bad input without changing anything, and the npz importer. SQLite alone:
two handles / two processes seeing each other's changes, and ``kill -9`` in the middle of enrolments.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ppfr.deploy.gallery import GalleryError, GalleryLike, Match, import_npz, main, open_gallery, read_npz
from ppfr.deploy.protocol import l2_normalize
from tests._cli import one_line_error
from tests._npz_gallery import write_npz_gallery

pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[1]
D = 16
BACKENDS = ["sqlite-flat", "sqlite-hnsw", "sqlite-ivf", "qdrant-local"]
# sqlite-ivf trains from 4 rows on (4 lists), so these small galleries run the trained IVF index (its adds, removals
# and retraining), scanning every list (the default nprobe 32 > 4): exact, so the brute-force checks hold;
# test_ivf_trains_and_stays_in_step covers recall at a realistic size
IVF_SMALL = {"ivf_min_rows": 4, "ivf_nlist": 4}


def _unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _uri(backend: str, folder: Path) -> tuple[str, str]:
    """(uri, index) for a backend in ``folder``."""
    if backend == "qdrant-local":
        pytest.importorskip("qdrant_client")
        return f"qdrant+local://{folder / 'qdrant'}", "flat"
    return f"sqlite://{folder / 'gallery.db'}", backend.split("-")[1]


@pytest.fixture(params=BACKENDS)
def opener(request, tmp_path):
    """open_(method="m", dim=D) -> a gallery handle of this backend in tmp_path; closed at teardown."""
    uri, index = _uri(request.param, tmp_path)
    options = IVF_SMALL if index == "ivf" else {}
    handles = []

    def open_(method: str = "m", dim: int = D):
        g = open_gallery(uri, method, dim, index=index, **options)
        handles.append(g)
        return g

    open_.backend = request.param
    yield open_
    for g in handles:
        try:
            g.close()
        except Exception:
            pass


def _brute(embs: dict[str, np.ndarray], q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    score = {n: (q @ e.T).max(axis=1) for n, e in embs.items()}
    return [sorted(((n, float(s[r])) for n, s in score.items()), key=lambda t: -t[1])[:k] for r in range(len(q))]


def _check_search(got: list[list[Match]], want: list[list[tuple[str, float]]]) -> None:
    assert [[m.name for m in r] for r in got] == [[n for n, _ in r] for r in want]
    np.testing.assert_allclose([[m.score for m in r] for r in got], [[s for _, s in r] for r in want], atol=1e-5)


# ----------------------------------------------------------------------------------------------- all backends
def test_enrol_identify_verify_remove(opener):
    rng = np.random.default_rng(0)
    g = opener()
    assert isinstance(g, GalleryLike)  # what the server relies on
    embs = {f"id{i}": _unit(rng, 1 + i % 3) for i in range(12)}
    counts = g.enrol_many(list(embs.items())[:6])
    assert counts == [1 + i % 3 for i in range(6)]
    for n, e in list(embs.items())[6:]:
        assert g.enrol(n, e * 3.0) == len(e)  # stored normalised: the scale of an enrolment does not matter
    more = _unit(rng, 2)
    assert g.enrol("id0", more) == 3  # templates add up
    embs["id0"] = np.concatenate([embs["id0"], more])
    assert g.identities() == {n: len(e) for n, e in sorted(embs.items())}
    assert len(g) == 12 and g.num_embeddings == sum(map(len, embs.values())) and "id3" in g and "nobody" not in g
    q = np.concatenate([_unit(rng, 3), embs["id7"][:1] + 0.05 * _unit(rng, 1)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k in (1, 4, 12, 50):  # 50 > identities: every identity, ranked
        _check_search(g.search(q, top_k=k), _brute(embs, q, k))
    assert g.search(q, 1)[3][0].name == "id7"
    np.testing.assert_allclose(g.verify("id0", q), (q @ embs["id0"].T).max(axis=1), atol=1e-5)
    got = g.embeddings("id2")
    assert got.shape == (3, D) and got.dtype == np.float32
    np.testing.assert_allclose(np.sort(got @ embs["id2"].T, axis=None)[-3:], 1.0, atol=1e-5)  # same rows, any order

    assert g.remove("id7") == 2
    del embs["id7"]
    assert "id7" not in g and len(g) == 11
    _check_search(g.search(q, top_k=5), _brute(embs, q, 5))
    with pytest.raises(KeyError):
        g.remove("id7")
    with pytest.raises(KeyError):
        g.verify("id7", q)
    assert g.enrol("id7", embs["id1"]) == 2  # a removed name can be enrolled again, afresh
    assert g.identities()["id7"] == 2
    if opener.backend == "sqlite-ivf":
        assert g._index.nlist == 4 and g._index.trainings >= 1  # the trained IVF answered, not the exact fallback


def test_many_templates_of_one_identity_do_not_hide_the_others(opener):
    """60 templates of one identity around the probe: the first rows found all belong to it, and the search must
    go deeper to rank k distinct identities."""
    rng = np.random.default_rng(1)
    g = opener()
    centre = _unit(rng, 1)
    embs = {"crowd": centre + 0.02 * rng.standard_normal((60, D)).astype(np.float32)}
    embs["crowd"] /= np.linalg.norm(embs["crowd"], axis=1, keepdims=True)
    embs |= {f"x{i}": _unit(rng, 1) for i in range(8)}
    g.enrol_many(list(embs.items()))
    _check_search(g.search(centre, top_k=4), _brute(embs, centre, 4))


def test_persistence_across_reopen(opener):
    rng = np.random.default_rng(2)
    g = opener()
    embs = {f"p{i}": _unit(rng, 2) for i in range(5)}
    g.enrol_many(list(embs.items()))
    g.remove("p1")
    del embs["p1"]
    q = _unit(rng, 2)
    before = g.search(q, 3)
    g.close()
    again = opener()
    assert again.identities() == {n: 2 for n in embs}
    assert [[m.name for m in r] for r in again.search(q, 3)] == [[m.name for m in r] for r in before]
    _check_search(again.search(q, 3), _brute(embs, q, 3))
    again.close()
    with pytest.raises(GalleryError, match="enrolled with method 'm'"):
        opener(method="other")
    with pytest.raises(GalleryError, match=f"{D}-d"):
        opener(dim=D * 2)


def test_bad_names_and_embeddings_are_refused_and_change_nothing(opener):
    rng = np.random.default_rng(3)
    g = opener()
    g.enrol("ok", _unit(rng, 1))
    before = g.identities()
    for name in ["", "a\nb", "x" * 257, 7, None]:
        with pytest.raises(ValueError, match="name"):
            g.enrol(name, _unit(rng, 1))
    bad = {"zero": np.zeros((1, D), np.float32), "nan": np.full((1, D), np.nan, np.float32), "1-d": _unit(rng, 1)[0],
           "wrong dim": _unit(rng, 1, D + 1), "empty": np.zeros((0, D), np.float32)}  # fmt: skip
    for case, emb in bad.items():
        with pytest.raises(ValueError):
            g.enrol("new", emb)
        # all or nothing: a good item beside a bad one is not enrolled either
        with pytest.raises(ValueError):
            g.enrol_many([("good", _unit(rng, 1)), ("new", emb)])
    assert g.identities() == before
    with pytest.raises(ValueError, match="top_k"):
        g.search(_unit(rng, 1), top_k=0)
    with pytest.raises(ValueError, match=f"{D}-d"):
        g.search(_unit(rng, 1, D + 1))
    g.close()
    assert opener().identities() == before


def test_npz_import(opener, tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "legacy"
    embs = {f"n{i}": _unit(rng, 1 + i % 2) for i in range(6)}
    write_npz_gallery(src, "m", embs)
    uri, index = _uri(opener.backend, tmp_path)
    assert import_npz(src, uri, index=index) == {"identities": 6, "embeddings": 9}
    with pytest.raises(GalleryError, match="already holds 6"):
        import_npz(src, uri, index=index)  # a second import would double every template
    g = opener()
    assert g.identities() == {n: len(e) for n, e in embs.items()}
    names, labels, rows, _ = read_npz(src / "gallery.npz")
    for i, n in enumerate(names):  # the file's rows through the one L2 rule every enrolment takes, bit for bit
        got, want = g.embeddings(n), l2_normalize(rows[labels == i])
        assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in want), n  # any order (qdrant)
    q = _unit(rng, 3)
    _check_search(g.search(q, 3), _brute(embs, q, 3))


def test_npz_import_is_bit_exact_at_the_models_size(tmp_path):
    """A legacy gallery of 512-d embeddings (the models' size) in the current store: the same names in the same
    order, the same template counts, and every row bit for bit the file's row, in file order."""
    rng = np.random.default_rng(7)
    embs = {f"person {i}": _unit(rng, 1 + i % 3, 512) for i in range(9)}
    src = write_npz_gallery(tmp_path / "legacy", "arcface", embs)
    names, labels, rows, meta = read_npz(src)
    assert names == list(embs) and meta["method"] == "arcface" and meta["embedding_size"] == 512
    assert import_npz(src, tmp_path / "new") == {"identities": 9, "embeddings": len(rows)}
    with open_gallery(tmp_path / "new", "arcface", 512) as g:
        assert list(g.identities()) == names and g.identities() == {n: len(e) for n, e in embs.items()}
        for i, n in enumerate(names):
            assert np.array_equal(g.embeddings(n), rows[labels == i]), n  # bit-exact, enrolment order
    with pytest.raises(GalleryError, match="enrolled with method 'arcface'"):  # the npz's model travels with it
        open_gallery(tmp_path / "new", "other", 512)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_corrupt_npz_is_a_one_line_error(tmp_path, capsys):
    """Every way a gallery.npz can be unusable is one GalleryError line naming the file (``ppfr gallery import``:
    exit 2, one line), and the file is never touched."""
    rng = np.random.default_rng(8)
    good = write_npz_gallery(tmp_path / "ok", "m", {"a": _unit(rng, 2, 8)}).read_bytes()
    meta = np.frombuffer(b'{"format": "ppfr-gallery", "version": 1, "method": "m", "embedding_size": 8, '
                         b'"names": ["a"]}', np.uint8)  # fmt: skip
    one = np.zeros(1, np.int64)
    corrupt = {
        "truncated": (good[: len(good) // 2], "unusable"),
        "garbage": (b"not a zip file at all", "unusable"),
        "pickled object array": (_npz_bytes(embeddings=np.array([object()], dtype=object), labels=one, meta=meta),
                                 "unusable"),  # fmt: skip
        "label out of range": (_npz_bytes(embeddings=_unit(rng, 1, 8), labels=np.array([3]), meta=meta), "label"),
        "not unit": (_npz_bytes(embeddings=np.ones((1, 8), np.float32), labels=one, meta=meta), "unit vectors"),
        "bad header": (_npz_bytes(embeddings=_unit(rng, 1, 8), labels=one, meta=np.frombuffer(b"{]", np.uint8)),
                       "not JSON"),  # fmt: skip
        "another format": (_npz_bytes(embeddings=_unit(rng, 1, 8), labels=one,
                                      meta=np.frombuffer(b'{"format": "x"}', np.uint8)), "not a ppfr-gallery"),  # fmt: skip
    }
    for case, (data, msg) in corrupt.items():
        path = tmp_path / case.replace(" ", "_") / "gallery.npz"
        path.parent.mkdir()
        path.write_bytes(data)
        with pytest.raises(GalleryError, match=msg) as e:
            read_npz(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), case
        rc = main(["import", str(path), str(tmp_path / f"dst_{case.replace(' ', '_')}")])
        one_line_error(capsys, rc, str(path), "unusable")
        assert path.read_bytes() == data, case  # never overwritten
    rc = main(["import", str(tmp_path / "absent.npz"), str(tmp_path / "dst")])
    one_line_error(capsys, rc, "no gallery file at")


# -------------------------------------------------------------------------------------------------- sqlite
def test_folder_with_npz_is_imported_once_and_left_as_backup(tmp_path, caplog):
    rng = np.random.default_rng(5)
    embs = {f"n{i}": _unit(rng, 2) for i in range(4)}
    write_npz_gallery(tmp_path, "m", embs)
    npz = (tmp_path / "gallery.npz").read_bytes()
    g = open_gallery(tmp_path, "m", D)  # a plain folder: folder/gallery.db, imported from folder/gallery.npz
    assert g.path == tmp_path / "gallery.db" and g.identities() == {n: 2 for n in embs}
    np.testing.assert_allclose(g.embeddings("n2"), embs["n2"], atol=1e-6)
    g.remove("n0")
    g.close()
    again = open_gallery(f"sqlite://{tmp_path}", "m", D)  # a folder behind sqlite:// too; no second import
    assert "n0" not in again and len(again) == 3
    again.close()
    assert (tmp_path / "gallery.npz").read_bytes() == npz
    assert not list(tmp_path.glob(".gallery.db.importing*"))
    # an unusable npz is skipped with a warning naming it (a server still starts) and left in place untouched
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "gallery.npz").write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="ppfr.deploy.gallery"):
        with open_gallery(bad, "m", D) as empty:
            assert len(empty) == 0
    assert any(str(bad / "gallery.npz") in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)
    assert (bad / "gallery.npz").read_bytes() == b"not a zip file"
    # the CLI entry point
    assert main(["import", str(tmp_path), str(tmp_path / "cli.db")]) == 0
    assert main(["import", str(tmp_path), str(tmp_path / "cli.db")]) == 2  # not into a non-empty gallery
    with open_gallery(tmp_path / "cli.db", "m", D) as c:
        assert len(c) == 4


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")  # qdrant-client, about the absent server
def test_uris(tmp_path):
    with pytest.raises(ValueError, match="unknown gallery URI scheme"):
        open_gallery("mongodb://x/y", "m", D)
    with pytest.raises(ValueError, match="qdrant://host:port/collection"):
        open_gallery("qdrant:///nohost", "m", D)
    pytest.importorskip("qdrant_client")
    with pytest.raises(GalleryError, match="cannot open Qdrant gallery qdrant://127.0"):
        open_gallery("qdrant://127.0.0.1:9/faces", "m", D, timeout=2)  # nothing listens on the discard port
    with pytest.raises(ValueError, match="index must be one of"):
        open_gallery(tmp_path / "g", "m", D, index="lsh")
    with open_gallery(f"sqlite://{tmp_path}/sub/x.db", "m", D) as g:
        assert g.path == tmp_path / "sub" / "x.db" and g.uri == f"sqlite://{tmp_path}/sub/x.db"
    with open_gallery(g.uri, "m", D) as again:  # a handle's uri opens the same database
        assert again.path == g.path
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    with pytest.raises(GalleryError, match="something else"):  # never turned into a gallery
        open_gallery(other, "m", D)
    with sqlite3.connect(other) as raw:
        assert [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    not_db = tmp_path / "junk.db"
    not_db.write_bytes(b"\0" * 4096)
    with pytest.raises(GalleryError, match="unusable|not a ppfr"):
        open_gallery(not_db, "m", D)


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_two_handles_see_each_others_changes(tmp_path, index):
    """Two handles (as two server processes would hold) on one database: each sees the other's enrolments and
    removals before its next search, applied incrementally (no full reload), and writes interleave safely."""
    rng = np.random.default_rng(6)
    a = open_gallery(tmp_path, "m", D, index=index)
    b = open_gallery(tmp_path, "m", D, index=index)
    embs: dict[str, np.ndarray] = {}
    for i in range(10):
        h = (a, b)[i % 2]
        embs[f"id{i}"] = _unit(rng, 1 + i % 2)
        h.enrol(f"id{i}", embs[f"id{i}"])
    assert a.remove("id3") == 2 and b.remove("id4") == 1
    del embs["id3"], embs["id4"]
    b.enrol("id0", embs["id0"])  # b adds templates to a's identity
    embs["id0"] = np.concatenate([embs["id0"], embs["id0"]])
    q = _unit(rng, 4)
    for h in (a, b):
        assert h.identities() == {n: len(e) for n, e in sorted(embs.items())}
        _check_search(h.search(q, 3), _brute(embs, q, 3))
        assert len(h.index) == sum(map(len, embs.values()))
    # a change made by another process (a real second interpreter)
    code = textwrap.dedent(f"""
        import numpy as np
        from ppfr.deploy.gallery import open_gallery
        g = open_gallery({str(tmp_path)!r}, "m", {D}, index={index!r})
        g.enrol("from_child", np.ones((2, {D}), np.float32))
        g.remove("id1")
        g.close()
    """)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    del embs["id1"]
    embs["from_child"] = np.full((2, D), D**-0.5, np.float32)
    assert a.identities() == {n: len(e) for n, e in sorted(embs.items())}
    _check_search(a.search(q, 4), _brute(embs, q, 4))
    assert a.search(np.ones((1, D), np.float32), 1)[0][0].name == "from_child"
    assert a.reloads == b.reloads == 1  # only the load at open: every change since was applied incrementally
    a.close()
    b.close()


_WRITER = """
import sys
import numpy as np
from ppfr.deploy.gallery import open_gallery
g = open_gallery(sys.argv[1], "m", {D}, index=sys.argv[3])
rng = np.random.default_rng(int(sys.argv[2]))
for i in range(20):
    g.enrol(f"w{{sys.argv[2]}}-{{i}}", rng.standard_normal((2, {D})).astype(np.float32))
    if i % 10 == 9:
        g.remove(f"w{{sys.argv[2]}}-{{i - 5}}")
print(sorted(g.identities().items()) == sorted((n, 2) for n in g.identities()), len(g))
"""


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_concurrent_writer_processes(tmp_path, index):
    """Two processes enrolling and removing at the same time (BEGIN IMMEDIATE + busy_timeout serialise them):
    no change is lost, and a third handle that was open all along ends up with exactly the database's state."""
    watcher = open_gallery(tmp_path, "m", D, index=index)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER.format(D=D), str(tmp_path), str(seed), index], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for seed in (1, 2)]  # fmt: skip
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.split()[0] == "True", out
    want = {f"w{s}-{i}" for s in (1, 2) for i in range(20)} - {f"w{s}-{i}" for s in (1, 2) for i in (4, 14)}
    assert set(watcher.identities()) == want and set(watcher.identities().values()) == {2}
    assert len(watcher.index) == 2 * len(want)
    fresh = open_gallery(tmp_path, "m", D, index=index)
    q = fresh.embeddings("w2-7")
    assert [m.name for m in watcher.search(q, 3)[0]] == [m.name for m in fresh.search(q, 3)[0]]
    assert watcher.search(q, 1)[0][0].name == "w2-7"
    watcher.close()
    fresh.close()


def test_hnsw_marks_deletions_and_rebuilds(tmp_path):
    """HNSW cannot delete: removed rows are filtered out of results, and once they pass the threshold (20% of
    the graph by default) the index is rebuilt without them."""
    rng = np.random.default_rng(7)
    g = open_gallery(tmp_path, "m", D, index="hnsw")
    embs = {f"id{i}": _unit(rng, 2) for i in range(40)}
    g.enrol_many(list(embs.items()))
    g.remove("id0")  # 2 of 80 rows: marked only
    assert g.index.deleted == 2 and g.index.rebuilds == 0 and len(g.index) == 78
    assert all(m.name != "id0" for m in g.search(embs["id0"], 40)[0])
    for i in range(1, 9):  # 18 of 80 deleted > 16: rebuilt
        g.remove(f"id{i}")
    assert g.index.rebuilds == 1 and g.index.deleted == 0 and len(g.index) == 62
    for i in range(9):
        del embs[f"id{i}"]
    q = _unit(rng, 3)
    _check_search(g.search(q, 5), _brute(embs, q, 5))
    g.close()


def test_hnsw_recall_against_exact(tmp_path):
    """recall@1 of HNSW identity search vs exact on clustered embeddings (identities around shared centres)."""
    rng = np.random.default_rng(8)
    n, d = 2000, 32
    centres = _unit(rng, 20, d)
    x = centres[rng.integers(0, 20, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    probes = x[rng.integers(0, n, 200)] + 0.1 * rng.standard_normal((200, d)).astype(np.float32)
    items = [(f"id{i}", x[i: i + 1]) for i in range(n)]
    exact = open_gallery(tmp_path / "flat.db", "m", d)
    approx = open_gallery(tmp_path / "hnsw.db", "m", d, index="hnsw")
    exact.enrol_many(items)
    approx.enrol_many(items)
    top = [r[0].name for r in exact.search(probes, 1)]
    recall = np.mean([r[0].name == t for r, t in zip(approx.search(probes, 1), top)])
    assert recall >= 0.99, recall
    exact.close()
    approx.close()


def test_ivf_trains_and_stays_in_step(tmp_path):
    """IVF on 5000 clustered rows (past ``ivf_min_rows``): it trains at open, recall@1 vs exact >= 0.99, removals
    and enrolments reach it in place, and 4x growth retrains it; below the minimum it is exact."""
    rng = np.random.default_rng(10)
    n, d = 5000, 32
    centres = _unit(rng, 50, d)
    x = centres[rng.integers(0, 50, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    items = [(f"id{i}", x[i: i + 1]) for i in range(n)]
    probes = x[rng.integers(0, n, 300)] + 0.1 * rng.standard_normal((300, d)).astype(np.float32)
    exact = open_gallery(tmp_path / "flat.db", "m", d)
    exact.enrol_many(items)
    exact.close()
    shutil.copy(tmp_path / "flat.db", tmp_path / "ivf.db")  # WAL checkpointed at close: the .db is complete
    exact = open_gallery(tmp_path / "flat.db", "m", d)
    approx = open_gallery(tmp_path / "ivf.db", "m", d, index="ivf")
    assert approx.index.trainings == 1 and approx.index.nlist == round(n**0.5) and len(approx.index) == n

    def recall() -> float:
        top = [r[0].name for r in exact.search(probes, 1)]
        return float(np.mean([r[0].name == t for r, t in zip(approx.search(probes, 1), top)]))

    assert recall() >= 0.99
    gone = [f"id{i}" for i in range(0, n, 7)]  # 715 identities removed: in place, no retraining
    for name in gone:
        assert exact.remove(name) == approx.remove(name) == 1
    assert len(approx.index) == n - len(gone) and approx.index.trainings == 1
    found = {m.name for r in approx.search(x[: 7 * 40: 7], 5) for m in r}  # probes = the removed rows themselves
    assert found and not found & set(gone)
    new = [(f"new{i}", _unit(rng, 2, d)) for i in range(20)]
    exact.enrol_many(new)
    approx.enrol_many(new)
    for t in (0, 1):  # either template finds its identity at cosine 1: an identity scores its best template
        got = approx.search(np.stack([e[t] for _, e in new]), 1)
        assert [r[0].name for r in got] == [nm for nm, _ in new]
        np.testing.assert_allclose([r[0].score for r in got], 1.0, atol=1e-5)
    assert recall() >= 0.99
    for r in approx.search(probes[:50], 8):  # k distinct identities, best first
        assert len({m.name for m in r}) == 8 and all(a.score >= b.score for a, b in zip(r, r[1:]))
    approx.close()
    exact.close()
    # growth: trained on 2048 rows, retrained at 4x; and an index below ivf_min_rows searches exactly
    from ppfr.deploy.gallery.index import VectorIndex

    idx = VectorIndex(d, "ivf", ivf_min_rows=2048)
    idx.add(np.arange(2047), np.arange(2047), x[:2047] / np.linalg.norm(x[:2047], axis=1, keepdims=True))
    assert idx.nlist == 0 and idx.trainings == 0  # exact flat fallback
    idx.add(np.arange(2047, 4096), np.arange(2047, 4096), x[2047:4096] / np.linalg.norm(x[2047:4096], axis=1,
                                                                                     keepdims=True))  # fmt: skip
    assert idx.trainings == 1 and idx.trained_rows == 4096  # one add crossed the line: trained once, on all
    more = _unit(rng, 4 * 4096 - 4096, d)
    idx.add(np.arange(4096, 4 * 4096), np.arange(4096, 4 * 4096), more)
    assert idx.trainings == 2 and idx.trained_rows == 4 * 4096 and idx.nlist == 128 and len(idx) == 4 * 4096
    assert idx.search(more[:3], 1) == [[(4096 + i, pytest.approx(1.0, abs=1e-5))] for i in range(3)]


_KILL_CHILD = """
import sys
import numpy as np
from ppfr.deploy.gallery import open_gallery
g = open_gallery(sys.argv[1], "m", {D})
rng = np.random.default_rng(0)
print("ready", flush=True)
for i in range(100000):
    g.enrol_many([(f"id{{i}}", rng.standard_normal((3, {D})).astype(np.float32) + 0.1)])
"""


def test_kill_9_during_enrolment_leaves_a_consistent_gallery(tmp_path):
    """SIGKILL a process that enrols in a loop (3 templates per transaction): the database passes SQLite's
    integrity check and holds whole enrolments only, id0 .. id{n-1} with 3 templates each."""
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD.format(D=D), str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        watcher = open_gallery(tmp_path, "m", D)
        deadline = time.monotonic() + 60
        while len(watcher) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)  # each len() first catches up with the child's commits
        assert len(watcher) >= 30
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(tmp_path / "gallery.db") as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    g = open_gallery(tmp_path, "m", D)
    ids = g.identities()
    assert set(ids.values()) == {3}
    assert sorted(ids, key=lambda n: int(n[2:])) == [f"id{i}" for i in range(len(ids))]
    assert watcher.identities() == ids  # the old handle catches up with the state the child left
    assert g.search(g.embeddings("id5")[:1], 1)[0][0].name == "id5"
    assert g.enrol("after", _unit(np.random.default_rng(9), 1)) == 1  # and it takes new enrolments
    watcher.close()
    g.close()


def test_qdrant_local_is_one_process_at_a_time(tmp_path):
    pytest.importorskip("qdrant_client")
    uri = f"qdrant+local://{tmp_path}?collection=faces"
    g = open_gallery(uri, "m", D)
    with pytest.raises(GalleryError, match="cannot open"):
        open_gallery(uri, "m", D)
    g.close()
