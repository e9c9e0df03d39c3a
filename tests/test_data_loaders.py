"""Loaders: DALI (CPU mode, device_id=None) and PyTorch give the same batches; sharding, epochs and len.

Real faces are read in place from ../shared/data/celeba112; tests skip with that reason where it is absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppfr.cli import main as ppfr_main
from ppfr.data import DataConfig, make_loader, open_source
from ppfr.data.loader import AUTO_CPU_BACKEND, resolve_backend, resolve_world
from ppfr.pipelines import DALILoader, ShardPlan, dali_unavailable_reason, shard_bounds

CELEBA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba112"
needs_celeba = pytest.mark.skipif(not CELEBA.is_dir(), reason=f"real faces not found at {CELEBA} (shared/ data absent)")
needs_dali = pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
# Both decoders are libjpeg-turbo (islow IDCT, fancy upsampling): identical on celeba112 here. Allow one JPEG level
# of difference (1/127.5 after normalisation) for decoder builds that round differently (nvJPEG on a GPU).
JPEG_TOL = 1.0 / 127.5 + 1e-6


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    xs, ys, sizes = [], [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 112, 112)
        xs.append(x)
        ys.append(y)
        sizes.append(x.shape[0])
    return torch.cat(xs), torch.cat(ys), sizes


@pytest.fixture(scope="module")
def val() -> Path:
    if not CELEBA.is_dir():
        pytest.skip(f"real faces not found at {CELEBA}")
    return CELEBA / "val"


@pytest.fixture(scope="module")
def unique_index(tmp_path_factory, val) -> Path:
    """A TFace 2-field index over 300 celeba112 val faces, label = position: every sample is identifiable."""
    files = sorted(val.glob("*/*.jpg"))[:300]
    p = tmp_path_factory.mktemp("idx") / "unique.txt"
    p.write_text("".join(f"{f}\t{i}\n" for i, f in enumerate(files)))
    return p


# ------------------------------------------------------------------------------------------- ShardPlan
def test_shard_plan_every_rank_same_batches_disjoint_shards():
    for n in range(1, 23):
        for w in range(1, 5):
            for b in range(1, 6):
                for policy in ("drop", "pad", "partial"):
                    try:
                        plans = [ShardPlan(n, b, w, r, policy) for r in range(w)]
                    except ValueError as exc:
                        # refused exactly when a rank would get no batch or ranks unequal last batches
                        assert n < w or (policy == "drop" and n // w < b) or (policy == "partial" and n % w), exc
                        continue
                    for e in range(2):
                        seen = []
                        shapes = []
                        for p in plans:
                            batches = [p.positions(e, s) for s in range(p.steps)]
                            shapes.append([len(x) for x in batches])
                            lo, hi = shard_bounds(n, w, p.shard(e))
                            flat = np.concatenate(batches)
                            assert flat.min() >= lo and flat.max() < hi  # inside this rank's shard
                            seen.append(set(flat.tolist()))
                            real = sum(p.real(e, s) for s in range(p.steps))
                            assert real == (hi - lo if policy != "drop" else p.steps * b)
                        assert all(s == shapes[0] for s in shapes)  # same number and sizes of batches on every rank
                        assert all(not (seen[i] & seen[j]) for i in range(w) for j in range(i + 1, w))
                        if policy != "drop":
                            assert set().union(*seen) == set(range(n))


def test_shard_plan_refusals_name_the_setting():
    with pytest.raises(ValueError, match="last_batch='drop' with batch_size=64 leaves no batch"):
        ShardPlan(100, 64, 2, 0, "drop")
    with pytest.raises(ValueError, match="last_batch='partial' would give ranks last batches of different sizes"):
        ShardPlan(101, 8, 2, 1, "partial")
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\)"):
        ShardPlan(100, 8, 2, 2)


# ------------------------------------------------------------------------------ DALI == PyTorch on faces
@needs_dali
@needs_celeba
def test_dali_and_torch_give_the_same_images_and_labels(val, tmp_path):
    base = dict(batch_size=64, train=False, num_workers=2)
    ref = make_loader(DataConfig(source=str(val), backend="torch", **base))
    x0, y0, sizes = epoch(ref)
    assert x0.shape[0] == 845 and sizes == [64] * 13 + [13] and len(ref) == 14  # partial: every face once
    assert x0.min() >= -1 and x0.max() <= 1 and y0.unique().numel() == 40
    # the same faces through DALI's file reader, and through packs read by DALI's RecordIO / TFRecord readers
    assert ppfr_main(["data", "pack", str(val), str(tmp_path / "val.rec"), "--format", "rec"]) == 0
    assert ppfr_main(["data", "pack", str(val), str(tmp_path / "tfr"), "--format", "tfrecord", "--name", "val"]) == 0
    for src in (val, tmp_path / "val.rec", tmp_path / "tfr" / "val.txt"):
        dl = make_loader(DataConfig(source=str(src), backend="dali", **base))
        assert type(dl.inner) is DALILoader and len(dl) == 14
        x1, y1, s1 = epoch(dl)
        assert s1 == sizes and torch.equal(y1, y0), src
        assert (x1 - x0).abs().max() <= JPEG_TOL, src


@needs_dali
@needs_celeba
def test_dali_external_source_matches_torch_order_even_shuffled(val, tmp_path):
    # a verification .bin has no DALI reader: the external source follows the PyTorch path's plan exactly
    pl = tmp_path / "pairs.txt"
    lines = (CELEBA / "val_pairs.txt").read_text().splitlines()[1:61]
    pl.write_text("\n".join(" ".join(ln.split()[:2] + [str(CELEBA / p) for p in ln.split()[2:]]) for ln in lines))
    assert ppfr_main(["data", "pack", str(pl), str(tmp_path / "v.bin"), "--format", "bin"]) == 0
    cfg = DataConfig(source=str(tmp_path / "v.bin"), batch_size=16, train=True, flip=False, last_batch="pad",
                     num_workers=1)  # fmt: skip
    ref, dl = make_loader(cfg.replace(backend="torch")), make_loader(cfg.replace(backend="dali"))
    for _ in range(2):  # shuffled epochs: identical order on both backends, different between epochs
        x0, y0, _ = epoch(ref)
        x1, y1, _ = epoch(dl)
        assert torch.equal(y0, y1) and (x1 - x0).abs().max() <= JPEG_TOL
    assert not torch.equal(y0, torch.sort(y0).values)


@needs_dali
@needs_celeba
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_random_flip_mirrors_about_half(val, backend):
    cfg = DataConfig(source=str(val), backend=backend, batch_size=64, train=False, num_workers=1, last_batch="drop")
    plain = next(iter(make_loader(cfg)))[0]
    flipped = next(iter(make_loader(cfg.replace(flip=True))))[0]
    same = (flipped - plain).abs().amax(dim=(1, 2, 3)) <= JPEG_TOL
    mirrored = (flipped - plain.flip(-1)).abs().amax(dim=(1, 2, 3)) <= JPEG_TOL
    assert bool((same | mirrored).all())  # nothing else changed
    assert 12 <= int(mirrored.sum()) <= 52  # Binomial(64, 0.5): outside this range with p < 1e-5


# --------------------------------------------------------------------------------- sharding and epochs
@needs_celeba
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("policy", ["drop", "pad"])
def test_two_ranks_disjoint_shards_equal_batches(unique_index, backend, policy):
    runs = []
    for rank in (0, 1):
        cfg = DataConfig(source=str(unique_index), backend=backend, batch_size=32, world_size=2, rank=rank,
                         train=False, last_batch=policy, num_workers=1)  # fmt: skip
        loader = make_loader(cfg)
        ep0, ep1 = epoch(loader), epoch(loader)
        runs.append((len(loader), ep0, ep1))
    (len0, a0, a1), (len1, b0, b1) = runs
    assert len0 == len1 == (4 if policy == "drop" else 5)  # 150 per rank: floor / ceil of 150 / 32
    for ea, eb in ((a0, b0), (a1, b1)):
        assert ea[2] == eb[2] == [32] * len0  # equal-sized batches on both ranks
        sa, sb = set(ea[1].tolist()), set(eb[1].tolist())
        assert not sa & sb  # disjoint shards
        assert len(sa) == len(sb) == (128 if policy == "drop" else 150)
    assert set(a0[1].tolist()) == set(b1[1].tolist())  # shards rotate between epochs (DALI's stick_to_shard=False)
    assert a0[1].tolist()[:4] == [0, 1, 2, 3] and b0[1].tolist()[:4] == [150, 151, 152, 153]
    if policy == "pad":  # the tail repeats the shard's last sample
        assert a0[1].tolist()[-10:] == [149] * 10 and b0[1].tolist()[-10:] == [299] * 10


@needs_celeba
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_epoch_boundary_len_and_abandoned_epoch(unique_index, backend):
    cfg = DataConfig(source=str(unique_index), backend=backend, batch_size=64, train=True, flip=False,
                     last_batch="partial", num_workers=1, shuffle_buffer=64)  # fmt: skip
    loader = make_loader(cfg)
    assert len(loader) == 5 and loader.num_samples == 300 and loader.num_classes == 300
    orders = []
    for e in range(3):
        if e == 1:  # abandon an epoch after two batches: the next epoch must still start at its beginning
            it = iter(loader)
            next(it), next(it)
            del it
            loader.reset()
        x, y, sizes = epoch(loader)
        assert sizes == [64, 64, 64, 64, 44]
        assert sorted(y.tolist()) == list(range(300))  # every sample exactly once per epoch
        orders.append(y.tolist())
    assert orders[0] != orders[1] != orders[2]  # shuffled per epoch
    assert loader.epoch == 4


@needs_celeba
def test_drop_policy_len_and_epochs(unique_index):
    loader = make_loader(DataConfig(source=str(unique_index), backend="torch", batch_size=64, num_workers=0,
                                    last_batch="drop"))  # fmt: skip
    for _ in range(2):
        _, y, sizes = epoch(loader)
        assert len(loader) == 4 and sizes == [64] * 4 and len(set(y.tolist())) == 256


# --------------------------------------------------------------------------------- backends and imports
def test_synthetic_backend_arcface_convention():
    loader = make_loader(DataConfig(source="synthetic", backend="synthetic", batch_size=8, num_samples=50,
                                    num_classes=10, world_size=2, rank=1))  # fmt: skip
    assert loader.backend == "synthetic" and len(loader) == 3  # floor(25 / 8)
    batches = list(loader)
    assert len(batches) == 3 and all(torch.equal(b[0], batches[0][0]) for b in batches)  # one fixed batch
    x, y = batches[0]
    assert x.shape == (8, 3, 112, 112) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10


def test_synthetic_source_through_the_decode_path():
    src = open_source("synthetic", num_samples=20, num_classes=4)
    assert src.read(3) == src.read(3) and src.read(3) != src.read(4)
    loader = make_loader(DataConfig(source="synthetic", backend="torch", batch_size=8, num_samples=20,
                                    num_classes=4, num_workers=0, train=False))  # fmt: skip
    x, y, sizes = epoch(loader)
    assert sizes == [8, 8, 4] and torch.equal(y, torch.from_numpy(src.labels))


def test_world_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert resolve_world(DataConfig()) == (4, 3)  # torchrun's variables when the config leaves them open
    assert resolve_world(DataConfig(world_size=2, rank=0)) == (2, 0)
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"DataConfig\.rank must lie in \[0, world_size=4\)"):
        resolve_world(DataConfig())


def test_auto_backend_on_this_machine():
    cfg = DataConfig(source="x", backend="auto", device="cpu")
    assert resolve_backend(cfg) == (AUTO_CPU_BACKEND if dali_unavailable_reason() is None else "torch")
    assert resolve_backend(cfg.replace(source="synthetic")) == "synthetic"


def test_import_and_torch_path_without_dali(tmp_path):
    code = (
        "import sys; sys.modules['nvidia'] = None\n"  # makes `import nvidia.dali` fail like an absent install
        "import ppfr, ppfr.pipelines, ppfr.data\n"
        "from ppfr.data import DataConfig, make_loader\n"
        "from ppfr.data.loader import resolve_backend\n"
        "assert ppfr.pipelines.dali_unavailable_reason() is not None\n"
        "assert resolve_backend(DataConfig(source='x', device='cpu')) == 'torch'\n"
        "try:\n"
        "    make_loader(DataConfig(source='synthetic', backend='dali', num_samples=8, batch_size=4))\n"
        "except ImportError as e:\n"
        "    print('REFUSED', e)\n"
        "cfg = DataConfig(source='synthetic', backend='torch', num_samples=8, batch_size=4, num_workers=0)\n"
        "print(len(make_loader(cfg)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REFUSED DataConfig.backend='dali': NVIDIA DALI is not installed" in out.stdout
    assert "pip install nvidia-dali-cuda130==2.4.0" in out.stdout and out.stdout.strip().endswith("2")
