"""Data layer: formats round-trip through the CLI, the .bin reader refuses hostile pickles, bad files are counted.

Real faces come from ../shared/data/celeba112 (read in place; tests copy a few files to tmp_path only where they
must add corrupt files beside them). Loader equivalence, sharding and epochs: tests/test_data_loaders.py.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ppfr.cli import main as ppfr_main
from ppfr.data import (
    CorruptDataWarning,
    CorruptSampleError,
    DataConfig,
    DataFormatError,
    make_loader,
    open_source,
)
from ppfr.data import binset, crc32c, pairs, recordio, tfrecord
from ppfr.data.image import decode, sniff
from ppfr.data.sources import FolderSource, scan

CELEBA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba112"
needs_celeba = pytest.mark.skipif(not CELEBA.is_dir(), reason=f"real faces not found at {CELEBA} (shared/ data absent)")


def cli(*args: str) -> int:
    return ppfr_main(["data", *map(str, args)])


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """6 identities x 8 real faces from celeba112/train, copied (so sibling tests can add bad files elsewhere)."""
    if not CELEBA.is_dir():
        pytest.skip(f"real faces not found at {CELEBA}")
    root = tmp_path_factory.mktemp("faces")
    for ident in sorted(p for p in (CELEBA / "train").iterdir() if p.is_dir())[:6]:
        (root / ident.name).mkdir()
        for f in sorted(ident.iterdir())[:8]:
            shutil.copyfile(f, root / ident.name / f.name)
    return root


def folder_truth(root: Path) -> tuple[list[bytes], list[int]]:
    ids = sorted(d for d in root.iterdir() if d.is_dir())
    data, labels = [], []
    for k, d in enumerate(ids):
        for f in sorted(d.iterdir()):
            data.append(f.read_bytes())
            labels.append(k)
    return data, labels


# ------------------------------------------------------------------------------------------------ CRC32C
def test_crc32c_known_values_and_both_implementations_agree():
    # RFC 3720 B.4 test vectors and the classic check value
    assert crc32c.crc32c_py(b"123456789") == 0xE3069283
    assert crc32c.crc32c_py(bytes(32)) == 0x8A9136AA
    assert crc32c.crc32c_py(b"\xff" * 32) == 0x62A8AB43
    assert crc32c.crc32c_py(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 100, 4099):
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c.crc32c(b) == crc32c.crc32c_py(b)
        assert crc32c.crc32c(b[n // 2 :], crc32c.crc32c(b[: n // 2])) == crc32c.crc32c_py(b)


# -------------------------------------------------------------------------------------------- TFRecord
def test_tfrecord_frame_and_example_roundtrip_and_crc_detects_corruption(tmp_path):
    payloads = [
        tfrecord.encode_example(b"\xff\xd8jpeg" * k, label) for k, label in ((1, 0), (5, 7), (300, -3), (2, 1 << 40))
    ]
    path = tmp_path / "x.tfrecord"
    with tfrecord.TFRecordWriter(path) as w:
        offsets = [w.write(p) for p in payloads]
    assert [o for o, _ in tfrecord.iter_records(path)] == offsets
    with open(path, "rb") as f:
        for off, p, (k, label) in zip(offsets, payloads, ((1, 0), (5, 7), (300, -3), (2, 1 << 40))):
            got = tfrecord.read_record(f, off)
            assert got == p
            ex = tfrecord.decode_example(got)
            assert ex["image"] == [b"\xff\xd8jpeg" * k] and ex["label"] == [label]
    raw = bytearray(path.read_bytes())
    raw[offsets[1] + 20] ^= 0x01  # one bit of the second payload
    path.write_bytes(bytes(raw))
    with open(path, "rb") as f:
        assert tfrecord.read_record(f, offsets[0]) == payloads[0]
        with pytest.raises(CorruptSampleError, match="payload CRC mismatch"):
            tfrecord.read_record(f, offsets[1])
        assert tfrecord.read_record(f, offsets[1], check_crc=False) != payloads[1]


def test_example_decodes_unpacked_int64_as_protobuf_allows():
    # Int64List.value written unpacked (one tag per value) must read like the packed form
    unpacked = tfrecord._field(
        3, tfrecord._varint(1 << 3 | 0) + tfrecord._varint(5) + tfrecord._varint(1 << 3 | 0) + tfrecord._varint(9)
    )
    entry = tfrecord._field(1, tfrecord._field(1, b"label") + tfrecord._field(2, unpacked))
    assert tfrecord.decode_example(tfrecord._field(1, entry)) == {"label": [5, 9]}


# -------------------------------------------------------------------------------------------- RecordIO
def test_recordio_multipart_records_and_irheader(tmp_path):
    magic = struct.pack("<I", recordio.MAGIC)
    # payloads with the magic word at aligned positions force dmlc's part splitting (cflag 1/2/3)
    cases = [b"", b"abc", magic, b"abcd" + magic + b"xy", magic * 3 + b"tail!", b"ab" + magic + b"cd"]
    rec, idx = tmp_path / "m.rec", tmp_path / "m.idx"
    with recordio.RecordIOWriter(rec, idx) as w:
        for k, c in enumerate(cases):
            w.write(k, c)
    enc = recordio.encode_record(b"abcd" + magic + b"xy")
    assert struct.unpack_from("<I", enc, 4)[0] >> 29 == 1 and magic not in enc[8:12]
    r = recordio.RecordIOReader(rec, idx)
    assert [r.read(k) for k in range(len(cases))] == cases
    assert r.header0 is None and r.image_keys == list(range(len(cases)))
    for label in (3.0, (1.0, 2.5, -4.0)):
        h, img = recordio.unpack_irheader(recordio.pack_irheader(recordio.IRHeader(0, label, 17, 2), b"IMG"))
        assert img == b"IMG" and h.id == 17 and h.id2 == 2 and h.label == label
        assert h.flag == (len(label) if isinstance(label, tuple) else 0)
    with pytest.raises(CorruptSampleError, match="bad RecordIO magic"):
        recordio.decode_record(rec.read_bytes(), 2)


# ---------------------------------------------------------------------------------- CLI pack round trips
@pytest.mark.parametrize("fmt", ["rec", "tfrecord", "list"])
def test_pack_roundtrip_bit_identical(faces, tmp_path, fmt):
    out = {"rec": tmp_path / "faces.rec", "tfrecord": tmp_path / "tfr", "list": tmp_path / "idx" / "faces.txt"}[fmt]
    assert cli("pack", faces, out, "--format", fmt, "--name", "faces_TFR") == 0
    back = open_source({"rec": out, "tfrecord": tmp_path / "tfr" / "faces_TFR.txt", "list": out}[fmt])
    data, labels = folder_truth(faces)
    assert len(back) == len(data) > 40
    assert [back.read(i) for i in range(len(back))] == data  # bit-identical encoded bytes
    assert back.labels.tolist() == labels and back.labels.dtype == np.int64
    if fmt == "rec":  # insightface layout: header record 0, identity records after the images
        assert back.kind == "recordio" and back.reader.header0 is not None
        n, first = len(data), labels.count(0)
        assert back.reader.header0.label == (n + 1.0, n + 7.0)
        assert recordio.unpack_irheader(back.reader.read(n + 1))[0].label == (1.0, first + 1.0)
    if fmt == "tfrecord":
        assert back.kind == "tfrecord-index"
        assert (tmp_path / "tfr" / "faces_TFR" / "faces_TFR-00000.tfrecord").is_file()
        line = (tmp_path / "tfr" / "faces_TFR.txt").read_text().splitlines()[1].split("\t")
        assert line[:2] == ["faces_TFR", "0"] and int(line[3]) == 0
        single = open_source(tmp_path / "tfr" / "faces_TFR" / "faces_TFR-00000.tfrecord")  # no index: scanned
        assert [single.read(i) for i in range(len(single))] == data and single.labels.tolist() == labels


def test_pack_skips_and_counts_bad_files(faces, tmp_path, capsys):
    root = tmp_path / "mixed"
    shutil.copytree(faces, root)
    first = sorted((root / sorted(os.listdir(root))[0]).iterdir())[0]
    (first.parent / "cut.jpg").write_bytes(first.read_bytes()[:1500])
    assert cli("pack", root, tmp_path / "m.rec", "--format", "rec") == 0
    assert "skipped 1 bad sample" in capsys.readouterr().out
    assert len(open_source(tmp_path / "m.rec")) == len(folder_truth(faces)[0])


# ------------------------------------------------------------------------------------ pairs and .bin
def _identity(p: Path) -> str:
    return p.parent.name


def test_pairs_cli_identity_disjoint_folds_both_formats(faces, tmp_path):
    out = tmp_path / "pairs.txt"
    assert cli("pairs", faces, out, "--folds", "3", "--per-fold", "6", "--seed", "1") == 0
    got = pairs.read_pairs(out)
    assert len(got) == 3 * 12
    seen_pairs = set()
    ids_of_fold: dict[int, set[str]] = {}
    for q in got:
        assert (_identity(q.a) == _identity(q.b)) == q.same and q.a != q.b
        ids_of_fold.setdefault(q.fold, set()).update({_identity(q.a), _identity(q.b)})
        assert (q.a, q.b) not in seen_pairs
        seen_pairs.add((q.a, q.b))
    folds = list(ids_of_fold.values())
    assert all(not (folds[i] & folds[j]) for i in range(3) for j in range(i + 1, 3))  # identity-disjoint
    assert [sum(q.same for q in got if q.fold == f) for f in range(3)] == [6, 6, 6]
    lfw = tmp_path / "lfw_pairs.txt"
    assert cli("pairs", faces, lfw, "--folds", "3", "--per-fold", "6", "--seed", "1", "--format", "lfw") == 0
    assert lfw.read_text().splitlines()[0] == "3\t6"
    assert [(q.fold, q.same, q.a.resolve(), q.b.resolve()) for q in pairs.read_pairs(lfw, image_root=faces)] == [
        (q.fold, q.same, q.a.resolve(), q.b.resolve()) for q in got
    ]
    assert cli("pairs", faces, tmp_path / "x.txt", "--folds", "5") == 1  # 6 identities cannot fill 5 folds of 2+


def test_lfw_pairs_with_lfw_file_names(tmp_path):
    jpg = b"\xff\xd8\xff\xe0" + b"\0" * 16 + b"\xff\xd9"
    for name, n in (("Ann_Lee", 3), ("Bo_Chen", 1)):
        (tmp_path / "lfw" / name).mkdir(parents=True)
        for k in range(1, n + 1):
            (tmp_path / "lfw" / name / f"{name}_{k:04d}.jpg").write_bytes(jpg)
    (tmp_path / "pairs.txt").write_text(
        "2\t1\nAnn_Lee\t1\t3\nAnn_Lee\t2\tBo_Chen\t1\nAnn_Lee\t2\t3\nBo_Chen\t1\tAnn_Lee\t1\n"
    )
    got = pairs.read_pairs(tmp_path / "pairs.txt")
    assert [(q.fold, q.same, q.a.name, q.b.name) for q in got] == [
        (0, True, "Ann_Lee_0001.jpg", "Ann_Lee_0003.jpg"), (0, False, "Ann_Lee_0002.jpg", "Bo_Chen_0001.jpg"),
        (1, True, "Ann_Lee_0002.jpg", "Ann_Lee_0003.jpg"), (1, False, "Bo_Chen_0001.jpg", "Ann_Lee_0001.jpg"),
    ]  # fmt: skip
    (tmp_path / "bad.txt").write_text("1\t1\nAnn_Lee\t1\t9\n")
    with pytest.raises(DataFormatError, match="image 9 of 'Ann_Lee' not found"):
        pairs.read_pairs(tmp_path / "bad.txt")


@needs_celeba
def test_real_pair_list_is_identity_disjoint():
    src = open_source(CELEBA / "val_pairs.txt")
    assert src.kind == "pairs" and len(src.pairs) == 3000
    folds: dict[int, set[str]] = {}
    for fold, same, a, b in src.pairs.tolist():
        ia, ib = src.files[a].parent.name, src.files[b].parent.name
        assert (ia == ib) == bool(same)
        folds.setdefault(fold, set()).update({ia, ib})
    assert len(folds) == 10 and sum(len(s) for s in folds.values()) == len(set().union(*folds.values()))


def test_bin_roundtrip_through_cli(faces, tmp_path):
    pl = tmp_path / "pairs.txt"
    assert cli("pairs", faces, pl, "--folds", "3", "--per-fold", "4") == 0
    out = tmp_path / "val.bin"
    assert cli("pack", pl, out, "--format", "bin") == 0
    got = binset.read_bin(out)
    expect = pairs.read_pairs(pl)
    assert got.issame == [q.same for q in expect]
    assert got.images == [p.read_bytes() for q in expect for p in (q.a, q.b)]
    src = open_source(out)
    assert src.kind == "bin" and src.labels.tolist() == list(range(len(got.images)))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_bin_reader_accepts_every_benign_protocol(protocol):
    imgs, same = [b"\xff\xd8abc", b"\x00\x01\xff", b"", b"z" * 300], [True, False]
    got = binset.loads_bin(pickle.dumps((imgs, same), protocol=protocol))  # protocol <= 2 uses _codecs.encode
    assert got.images == imgs and got.issame == same


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_hostile_bin_is_refused_and_never_executes(tmp_path, protocol, capsys):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(([b"\xff\xd8", b"\xff\xd8"], [_Exploit(marker)]), protocol=protocol)
    pickle.loads(evil)  # sanity: a plain pickle.load WOULD run it
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "lfw.bin"
    path.write_bytes(evil)
    with pytest.raises(DataFormatError, match=r"refusing .*lfw\.bin.*(posix\.system|STACK_GLOBAL|opcode)"):
        binset.read_bin(path)
    with pytest.raises(DataFormatError):
        open_source(path)
    assert cli("inspect", path) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, why",
    [({"a": 1}, "opcode"), (([b"a", b"b"], [(True,)]), "list of bools"), (([b"a"], [True]), "2 per pair"),
     (([b"a", "s"], [True]), "list of bytes"), ((b"x",), "pair")],
)  # fmt: skip
def test_bin_reader_refuses_other_structures(obj, why):
    with pytest.raises(DataFormatError, match=why):
        binset.loads_bin(pickle.dumps(obj, protocol=4))


def test_bin_reader_refuses_codecs_abuse_and_garbage():
    # GLOBAL _codecs encode is admitted only to rebuild bytes from a latin-1 str
    payload = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x03\x00\x00\x00hexq\x02\x86q\x03Rq\x04."
    with pytest.raises(DataFormatError, match="encode"):
        binset.loads_bin(payload)
    with pytest.raises(DataFormatError, match="not a valid pickle|unpickling failed"):
        binset.loads_bin(b"\x80\x04garbage")


# ------------------------------------------------------------------------------ corrupt and odd files
def _corrupt_folder(faces: Path, root: Path) -> int:
    """Copy two identities and add four bad files; returns the number of good images."""
    good = 0
    for ident in sorted(faces.iterdir())[:2]:
        (root / ident.name).mkdir(parents=True)
        for f in sorted(ident.iterdir())[:5]:
            shutil.copyfile(f, root / ident.name / f.name)
            good += 1
    a, b = sorted(root.iterdir())
    jpg = sorted(a.iterdir())[0].read_bytes()
    (a / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (a / "notes.txt").write_text("not a face")
    (b / "fake.jpg").write_text("<html>404 not found</html>")
    (b / "empty.png").write_bytes(b"")
    (root / "README.md").write_text("files at the root are not samples")
    return good


def test_sniff_and_decode_reasons(faces):
    jpg = sorted(sorted(faces.iterdir())[0].iterdir())[0].read_bytes()
    assert sniff(jpg) == "jpeg" and decode(jpg, "cv2").shape == decode(jpg, "pil").shape == (112, 112, 3)
    assert np.array_equal(decode(jpg, "cv2"), decode(jpg, "pil"))  # both libjpeg-turbo islow + fancy upsampling
    for data, reason in ((jpg[:3000], "truncated"), (b"", "empty"), (b"GIF89a...", "not an image")):
        with pytest.raises(CorruptSampleError, match=reason):
            sniff(data)
    with pytest.raises(CorruptSampleError, match="does not decode"):
        decode(b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9", "cv2")


_DALI_MISSING = __import__("ppfr.pipelines", fromlist=["x"]).dali_unavailable_reason()


@pytest.mark.parametrize(
    "backend, verify",
    [("torch", "header"), ("torch", "none"),
     pytest.param("dali", "header", marks=pytest.mark.skipif(_DALI_MISSING is not None, reason=str(_DALI_MISSING)))],
)  # fmt: skip
def test_bad_files_are_skipped_counted_and_warned_once(faces, tmp_path, backend, verify):
    root = tmp_path / "bad"
    good = _corrupt_folder(faces, root)
    cfg = DataConfig(source=str(root), backend=backend, batch_size=4, train=False, verify=verify, num_workers=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loader = make_loader(cfg)
        batches = [list(loader) for _ in range(2)]  # two epochs: the second must not warn again
    msgs = [x for x in w if issubclass(x.category, CorruptDataWarning)]
    assert len(msgs) == 1, [str(m.message) for m in msgs]
    assert "skipped 4 of 14" in str(msgs[0].message)
    assert loader.skipped == 4
    assert sorted(r for _, r in loader.skipped_samples) == ["empty", "not an image", "not an image", "truncated"]
    # every yielded image is one of the good faces ('none' fills the bad positions with their neighbours)
    good_faces = {decode(f.read_bytes()).transpose(2, 0, 1).tobytes()
                  for d in root.iterdir() if d.is_dir() for f in d.iterdir() if f.name[0].isdigit()}  # fmt: skip
    assert len(good_faces) == good
    for epoch in batches:
        got = [
            ((x * 127.5 + 127.5).round().to(torch.uint8).numpy().tobytes(), int(y))
            for xb, yb in epoch
            for x, y in zip(xb, yb)
        ]
        assert len(got) == (good if verify == "header" else good + 4)
        assert all(g in good_faces for g, _ in got)
        if verify == "header":
            assert len({g for g, _ in got}) == good  # each good face exactly once
    res = scan(FolderSource(root), "header")
    assert len(res.bad) == 4 and res.good.size == good


def test_inspect_reports_bad_files_and_strict_exit(faces, tmp_path, capsys):
    root = tmp_path / "bad"
    good = _corrupt_folder(faces, root)
    assert cli("inspect", root) == 0
    out = capsys.readouterr().out
    assert f"usable: {good}" in out and "bad: 4" in out and "truncated.jpg: truncated" in out
    assert cli("inspect", root, "--strict") == 1
    assert cli("inspect", tmp_path / "missing") == 2


# ------------------------------------------------------------------------------------------------ config
def test_config_validation_names_the_key():
    for kw, key in ((dict(batch_size=0), "batch_size"), (dict(backend="gpu"), "backend"),
                    (dict(last_batch="keep"), "last_batch"), (dict(verify="full"), "verify"),
                    (dict(world_size=2, rank=2), "rank"), (dict(num_workers=-1), "num_workers"),
                    (dict(train="yes"), "train"), (dict(backend="dali", verify="none"), "verify")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"DataConfig\.{key}"):
            DataConfig(**kw)
    with pytest.raises(ValueError, match=r"unknown DataConfig key\(s\) \['batchsize'\]"):
        DataConfig.from_dict({"batchsize": 3})
    cfg = DataConfig.from_dict({"source": "x", "batch_size": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 4  # type: ignore[misc]
    assert cfg.replace(batch_size=5).batch_size == 5


def test_open_source_refuses_unknown_files(tmp_path):
    (tmp_path / "weird.txt").write_text("a b c d e f\n")
    with pytest.raises(DataFormatError, match="unrecognised text format"):
        open_source(tmp_path / "weird.txt")
    (tmp_path / "blob.dat").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataFormatError, match="binary file of unknown format"):
        open_source(tmp_path / "blob.dat")
    (tmp_path / "x.rec").write_bytes(b"\0" * 64)
    (tmp_path / "x.idx").write_text("0\t0\n")
    with pytest.raises(DataFormatError, match="record 0 is unreadable"):
        open_source(tmp_path / "x.rec")
