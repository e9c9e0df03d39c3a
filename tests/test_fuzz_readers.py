"""Property / fuzz tests of every file reader (issue 29): image folder, TFace 2- and 4-field index, TFRecord, RecordIO
+ ``.idx``, pair lists (fold list and LFW ``pairs.txt``), verification ``.bin`` and ``gallery.npz``.

Each property starts from a small valid file set (built once per module) and mutates one file: truncation, flipped
and inserted bytes, interesting integers written over binary fields, and -- for text -- numbers replaced with huge or
negative values and lines dropped or duplicated. Whatever comes in, opening and scanning the source succeeds or
raises the reader's one error type (``DataFormatError``; ``GalleryError`` for a gallery), never a numpy ValueError,
an OverflowError, a struct.error, a MemoryError...

The budget is fixed (``EXAMPLES`` per property, derandomized: the same inputs on every run; about 15 s in all on 2
busy cores), so CI stays bounded and a failure reproduces. ``PPFR_FUZZ_EXAMPLES=5000`` runs a longer, random
campaign by hand. The second half is the regression corpus: each reproducer of the issue, through the API and
through the CLI (one line on stderr, exit 2, no traceback).
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppfr.cli import main as ppfr_main
from ppfr.data import DataFormatError, binset, open_source, pairs, recordio, scan, tfrecord
from ppfr.data._common import MAX_LABEL
from ppfr.deploy.gallery import GalleryError, read_npz
from tests._cli import one_line_error
from tests._npz_gallery import write_npz_gallery

EXAMPLES = int(os.environ.get("PPFR_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="PPFR_FUZZ_EXAMPLES" not in os.environ,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])  # fmt: skip

# Numbers a hostile file declares: the bounds that matter and their neighbours, then anything.
NUMBERS = st.one_of(st.sampled_from([-1, -5, 0, 1, 2**24, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**20]),
                    st.integers(-(2**70), 2**70))  # fmt: skip
# ... and as raw little-endian fields of binary formats (lengths, flags, offsets, CRCs).
FIELDS = st.sampled_from([b"\xff" * 4, b"\xff" * 8, b"\0" * 4, struct.pack("<I", 2**31), struct.pack("<Q", 2**63),
                          struct.pack("<I", recordio.MAGIC), struct.pack("<f", float("nan")),
                          struct.pack("<f", float("inf")), struct.pack("<f", 1e30), b"PK\x03\x04"])  # fmt: skip


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """``data`` after 1-4 edits: truncate, flip a bit, insert / overwrite bytes, write an interesting field."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "overwrite", "field"]))
        pos = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "truncate":
            del b[pos:]
        elif op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "overwrite":
            blob = draw(st.binary(min_size=1, max_size=16))
            b[pos : pos + len(blob)] = blob
        else:
            blob = draw(FIELDS)
            b[pos : pos + len(blob)] = blob
    return bytes(b)


@st.composite
def mutated_text(draw, text: str) -> bytes:
    """``text`` with numbers replaced by hostile ones, lines dropped / duplicated / garbled, or bytes mutated."""
    op = draw(st.sampled_from(["numbers", "numbers", "lines", "bytes"]))
    if op == "numbers":
        parts = re.split(r"(\d+)", text)
        for _ in range(draw(st.integers(1, 3))):
            parts[draw(st.sampled_from(range(1, len(parts), 2)))] = str(draw(NUMBERS))
        return "".join(parts).encode()
    if op == "lines":
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["drop", "dup", "garble"]))
        if edit == "drop":
            del lines[i]
        elif edit == "dup":
            lines.insert(i, lines[i])
        else:
            lines[i] = draw(st.text(max_size=40)) + "\n"
        return "".join(lines).encode("utf-8", "surrogatepass")
    return draw(mutated_bytes(text.encode()))


# ------------------------------------------------------------------------------------------ the valid seed set
def _jpeg(seed: int) -> bytes:
    from PIL import Image

    px = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """One valid file of every format ppfr reads, over 3 identities x 2 tiny JPEGs."""
    root = tmp_path_factory.mktemp("seeds")
    images, labels, rels = [], [], []
    for k, ident in enumerate(("a", "b", "c")):
        (root / "faces" / ident).mkdir(parents=True)
        for j in range(2):
            data = _jpeg(2 * k + j)
            (root / "faces" / ident / f"{j}.jpg").write_bytes(data)
            images.append(data)
            labels.append(k)
            rels.append(f"faces/{ident}/{j}.jpg")
    (root / "index.txt").write_text("".join(f"{r}\t{lab}\n" for r, lab in zip(rels, labels)))
    (root / "small").mkdir()
    lines = []
    with tfrecord.TFRecordWriter(root / "small" / "small-00000.tfrecord") as w:
        for img, lab in zip(images, labels):
            lines.append(f"small\t0\t{w.write(tfrecord.encode_example(img, lab))}\t{lab}\n")
    (root / "small.txt").write_text("".join(lines))
    (root / "one.tfrecord").write_bytes((root / "small" / "small-00000.tfrecord").read_bytes())
    recordio.write_face_pack(root / "face.rec", root / "face.idx", images, labels)
    plist = [pairs.Pair(f, s, root / rels[2 * (f % 3)], root / rels[2 * (f % 3) + (1 if s else 0)] if s else
                        root / rels[2 * ((f + 1) % 3)]) for f in range(3) for s in (True, False)]  # fmt: skip
    pairs.write_pairs_folds(root / "pairs.txt", plist)
    (root / "lfw" / "a").mkdir(parents=True)
    (root / "lfw" / "b").mkdir()
    for name, j in (("a", 1), ("a", 2), ("b", 1)):
        (root / "lfw" / name / f"{name}_{j:04d}.jpg").write_bytes(images[j])
    (root / "lfw_pairs.txt").write_text("2\t1\na\t1\t2\na\t1\tb\t1\na\t2\t1\nb\t1\ta\t2\n")
    binset.write_bin(root / "ver.bin", images[:4] * 5, [True, False] * 5)
    write_npz_gallery(root / "gallery", "arcface", {"x": np.eye(4, dtype=np.float32)[:2],
                                                    "y": np.eye(4, dtype=np.float32)[2:]})  # fmt: skip
    return root


def _opens_or_refuses(path: Path, **kw) -> None:
    """Open ``path`` as ppfr does (``ppfr data inspect``: open, scan, info): success or DataFormatError only."""
    try:
        src = open_source(path, **kw)
    except DataFormatError:
        return
    scan(src, "header")
    src.info()


def _mutate_and_open(seeds: Path, target: str, data: bytes, open_as: str | None = None) -> None:
    """Write ``data`` over a copy of the seed ``target`` (in a scratch copy of the set), then open ``open_as``."""
    path = seeds / target
    original = path.read_bytes()
    try:
        path.write_bytes(data)
        _opens_or_refuses(seeds / (open_as or target))
    finally:
        path.write_bytes(original)


def test_every_seed_is_valid(seeds):
    for name in ("faces", "index.txt", "small.txt", "one.tfrecord", "face.rec", "pairs.txt", "lfw_pairs.txt",
                 "ver.bin"):  # fmt: skip
        src = open_source(seeds / name)
        assert len(src) and scan(src, "header").bad == [], name
    assert len(read_npz(seeds / "gallery" / "gallery.npz")[0]) == 2


# --------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("target", ["index.txt", "small.txt", "pairs.txt", "lfw_pairs.txt"])
def test_text_listings_fuzz(seeds, target):
    @FUZZ
    @given(mutated_text((seeds / target).read_text()))
    def run(data):
        _mutate_and_open(seeds, target, data)

    run()


@pytest.mark.parametrize("target, open_as", [
    ("face.rec", None), ("face.idx", "face.rec"),  # .idx as text and as bytes: the binary .idx of the issue
    ("one.tfrecord", None), ("small/small-00000.tfrecord", "small.txt"),
    ("ver.bin", None), ("faces/b/1.jpg", "faces"),
])  # fmt: skip
def test_binary_files_fuzz(seeds, target, open_as):
    @FUZZ
    @given(mutated_bytes((seeds / target).read_bytes()))
    def run(data):
        _mutate_and_open(seeds, target, data, open_as)

    run()


def test_idx_numbers_fuzz(seeds):
    @FUZZ
    @given(mutated_text((seeds / "face.idx").read_text()))
    def run(data):
        _mutate_and_open(seeds, "face.idx", data, "face.rec")

    run()


def test_bin_pairs_for_eval_fuzz(seeds):
    """``ppfr eval --data x.bin`` path: the 10-fold split of a .bin (8 pairs was a traceback) is the file's error."""
    from ppfr.eval.verification import open_pairs

    @FUZZ
    @given(st.integers(0, 24), st.binary(max_size=8))
    def run(n, img):
        path = seeds / "fuzz_n.bin"
        binset.write_bin(path, [img] * (2 * n), [bool(i % 2) for i in range(n)])
        try:
            src, rows = open_pairs(str(path))
        except DataFormatError:
            assert n < 10
            return
        assert rows.shape == (n, 4) and len(src) == 2 * n

    run()


def _gallery_or_refuses(path: Path) -> None:
    try:
        names, labels, emb, meta = read_npz(path)
    except GalleryError:
        return
    assert emb.shape == (len(labels), meta["embedding_size"]) and labels.max(initial=-1) < len(names)


def test_gallery_npz_bytes_fuzz(seeds, tmp_path):
    valid = (seeds / "gallery" / "gallery.npz").read_bytes()

    @FUZZ
    @given(mutated_bytes(valid))
    def run(data):
        (tmp_path / "gallery.npz").write_bytes(data)
        _gallery_or_refuses(tmp_path / "gallery.npz")

    run()


def _npz_declaring(valid: bytes, member: str, shape: tuple, descr: str = "<f4") -> bytes:
    """``valid`` with ``member``'s .npy header rewritten to declare ``shape`` (zip CRCs recomputed: a well-formed
    zip that lies only about its array's size, the 934-byte gallery.npz of the issue)."""
    zin = zipfile.ZipFile(io.BytesIO(valid))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zo:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == member:
                head = np.lib.format.read_array_header_1_0(io.BytesIO(data[8:]))  # after magic + version
                body = data[10 + struct.unpack("<H", data[8:10])[0]:]
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": head[1],
                                                              "shape": shape})  # fmt: skip
                data = data[:8] + header.getvalue()[8:] + body
            zo.writestr(info, data)
    return out.getvalue()


def test_gallery_npz_declared_shapes_fuzz(seeds, tmp_path):
    valid = (seeds / "gallery" / "gallery.npz").read_bytes()

    @FUZZ
    @given(st.sampled_from(["embeddings.npy", "labels.npy", "meta.npy"]),
           st.lists(st.one_of(st.integers(0, 4), NUMBERS.filter(lambda x: -(2**63) <= x < 2**63)), max_size=4),
           st.sampled_from(["<f4", "<i8", "|u1", "<f8", "|b1"]))  # fmt: skip
    def run(member, shape, descr):
        (tmp_path / "gallery.npz").write_bytes(_npz_declaring(valid, member, tuple(shape), descr))
        _gallery_or_refuses(tmp_path / "gallery.npz")

    run()


# ------------------------------------------------------------------------------------ the regression corpus


def _reproducer(seeds: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    """(the file to open, a word its error must contain) for one reproducer of issue 29, built in ``tmp_path``."""
    (tmp_path / "faces").symlink_to(seeds / "faces", target_is_directory=True)
    (tmp_path / "small").symlink_to(seeds / "small", target_is_directory=True)
    if name == "index label 2**31":  # bincount asked for 16 GiB
        p = tmp_path / "index.txt"
        p.write_text(f"faces/a/0.jpg\t{2**31}\n")
        return p, "label 2147483648"
    if name == "index label 10**20":  # OverflowError
        p = tmp_path / "index.txt"
        p.write_text(f"faces/a/0.jpg\t{10**20}\n")
        return p, "label 100000000000000000000"
    if name == "tfrecord index label -1":  # ValueError
        p = tmp_path / "small.txt"
        p.write_text("small 0 0 -1\n")
        return p, "label -1"
    if name == "tfrecord index offset -5":  # OSError from seek
        p = tmp_path / "small.txt"
        p.write_text("small 0 -5 1\n")
        return p, "offset must be >= 0"
    if name == "truncated .rec":  # struct.error
        data = (seeds / "face.rec").read_bytes()
        (tmp_path / "t.rec").write_bytes(data[: len(data) // 2])
        (tmp_path / "t.idx").write_bytes((seeds / "face.idx").read_bytes())
        return tmp_path / "t.rec", "past the end"
    if name == "binary .idx":  # UnicodeDecodeError
        (tmp_path / "b.rec").write_bytes((seeds / "face.rec").read_bytes())
        (tmp_path / "b.idx").write_bytes(b"\x00\xff\xfe\x81" * 8)
        return tmp_path / "b.rec", "not a RecordIO index"
    if name == "pair-list fold 10**20":  # OverflowError
        p = tmp_path / "pairs.txt"
        p.write_text(f"{10**20} 1 faces/a/0.jpg faces/a/1.jpg\n0 0 faces/a/0.jpg faces/b/0.jpg\n")
        return p, "fold 100000000000000000000"
    if name == "8-pair .bin":  # "cannot be split into 10 folds", as a traceback from ppfr eval
        p = tmp_path / "eight.bin"
        binset.write_bin(p, [_jpeg(0)] * 16, [True, False] * 4)
        return p, "cannot be split into 10 folds"
    raise AssertionError(name)


REPRODUCERS = ["index label 2**31", "index label 10**20", "tfrecord index label -1", "tfrecord index offset -5",
               "truncated .rec", "binary .idx", "pair-list fold 10**20"]  # fmt: skip


@pytest.mark.parametrize("name", REPRODUCERS)
def test_reproducers_are_one_error_from_the_api(seeds, tmp_path, name):
    path, needle = _reproducer(seeds, tmp_path, name)
    with pytest.raises(DataFormatError, match=re.escape(needle)):
        open_source(path)


@pytest.mark.parametrize("name", REPRODUCERS)
def test_reproducers_are_one_line_exit_2_from_data_inspect(seeds, tmp_path, capsys, name):
    path, needle = _reproducer(seeds, tmp_path, name)
    one_line_error(capsys, ppfr_main(["data", "inspect", str(path)]), needle)


def test_labels_at_the_bound(seeds, tmp_path):
    (tmp_path / "faces").symlink_to(seeds / "faces", target_is_directory=True)
    (tmp_path / "index.txt").write_text(f"faces/a/0.jpg\t{MAX_LABEL - 1}\nfaces/a/1.jpg\t0\n")
    src = open_source(tmp_path / "index.txt")  # the largest label admitted: info() costs ~ samples, not ~ label
    assert src.num_classes == MAX_LABEL and src.info()["identities"] == 2


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    """A model.pt as ``ppfr train`` writes it (state dict + method name + options), without training."""
    import ppfr

    path = tmp_path_factory.mktemp("model") / "model.pt"
    options = {"depth": 18, "width": 4}
    torch.save({"model": ppfr.build_method("arcface", **options).state_dict(), "method": "arcface",
                "method_options": options}, path)  # fmt: skip
    return path


@pytest.mark.parametrize("name", ["pair-list fold 10**20", "8-pair .bin"])
def test_reproducers_are_one_line_exit_2_from_eval(seeds, tmp_path, capsys, model_pt, name):
    path, needle = _reproducer(seeds, tmp_path, name)
    rc = ppfr_main(["eval", str(model_pt), "--data", str(path), "--out", str(tmp_path / "ev")])
    one_line_error(capsys, rc, needle, str(path))


def test_gallery_npz_declaring_10e12_floats(seeds, tmp_path, capsys, caplog):
    """934 bytes declaring 10**12 float32: np.load asked for 3.64 TiB (MemoryError) from `ppfr gallery import`,
    and a server whose gallery folder held it died at start-up."""
    from ppfr.deploy.gallery import open_gallery

    bad = tmp_path / "bad"
    bad.mkdir()
    data = _npz_declaring((seeds / "gallery" / "gallery.npz").read_bytes(), "embeddings.npy", (250_000_000_000, 4))
    assert len(data) < 1024
    (bad / "gallery.npz").write_bytes(data)
    with pytest.raises(GalleryError, match=r"declares shape \(250000000000, 4\)"):
        read_npz(bad / "gallery.npz")
    rc = ppfr_main(["gallery", "import", str(bad / "gallery.npz"), str(tmp_path / "dst")])
    one_line_error(capsys, rc, str(bad / "gallery.npz"), "declares shape")
    pytest.importorskip("faiss")
    with open_gallery(bad, "arcface", 4) as g:  # the server's auto-import: skipped, with a warning naming the file
        assert len(g) == 0
    assert any(str(bad / "gallery.npz") in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
