"""Tests of the identity-linkage attack (ppfr.eval.attacks.linkage, .linkers, .linkage_score) on synthetic faces and a tiny random teacher.

No shared data or face-api weights: the teacher is ``Judge("toy", embed=<a small fixed conv net>)``; faces are
per-identity random patterns plus per-face noise. Figures checked exactly where they are hand-computable (the
metrics), and by invariants elsewhere (harness, determinism, anchors, frozen teacher).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.data.sources import PairSource
from ppfr.eval.attacks.common import AttackConfig, AttackContext, AttackError, resolve_target
from ppfr.eval.attacks.data import FaceSet, protect_with
from ppfr.eval.attacks.judge import Judge
from ppfr.eval.attacks.results import RESULT_KEYS
from ppfr.eval.attacks.linkage import LinkageAttack
from ppfr.eval.attacks.linkage_score import gallery_split, linkage_metrics, tar_at_fmr
from ppfr.eval.attacks.linkers import Linker, build_linker, frozen_teacher, inverter_for, train_linker

S = 112
N_ID, PER_ID = 6, 3


# ------------------------------------------------------------------------------------------------ fixtures
class ToyTeacher(nn.Module):
    """A fixed random conv net: (B, 3, 112, 112) in [-1, 1] -> (B, 16). Sensitive to the image layout (no global
    pooling before the last 4x4 map), so different random patterns get different embeddings."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.c1 = nn.Conv2d(3, 8, 8, stride=8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(max(p[0].numel(), 1))))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        h = F.adaptive_avg_pool2d(F.relu(self.c2(h)), 4)
        return self.fc(h.flatten(1))


def _faces(n_id: int, per_id: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_id * per_id, 3, S, S) uint8 faces (identity = a smooth random pattern, face = pattern + noise), (N,) ids."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n_id, 3, 14, 14, generator=g) * 2 - 1, size=(S, S), mode="bilinear",
                         align_corners=False)  # fmt: skip
    x = base.repeat_interleave(per_id, 0)
    x = x + noise * F.interpolate(torch.randn(len(x), 3, 28, 28, generator=g), size=(S, S), mode="bilinear",
                                  align_corners=False)  # fmt: skip
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return imgs, torch.arange(n_id).repeat_interleave(per_id)


class _Src:
    """A minimal non-pair source (identity_index reads the labels)."""

    path = "synthetic"


@pytest.fixture(scope="module")
def train() -> FaceSet:
    imgs, ids = _faces(8, 3, seed=1, noise=0.3)
    return FaceSet(imgs, ids, _Src())


@pytest.fixture(scope="module")
def val_pairs(tmp_path_factory) -> FaceSet:
    """Held-out faces behind a real PairSource (two folds of genuine + impostor pairs over 6 x 3 files)."""
    root = tmp_path_factory.mktemp("val")
    imgs, ids = _faces(N_ID, PER_ID, seed=2, noise=0.45)
    names = []
    for i, ident in enumerate(ids.tolist()):
        p = root / "val" / f"id{ident}" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")  # the pair list only needs the files to exist; the pixels come from `imgs`
        names.append(f"val/id{ident}/{i}.png")
    lines = []
    for ident in range(N_ID):
        a, b, c = (ident * PER_ID + k for k in range(PER_ID))
        fold = ident % 2
        lines += [f"{fold} 1 {names[a]} {names[b]}", f"{fold} 1 {names[b]} {names[c]}",
                  f"{fold} 0 {names[a]} {names[((ident + 1) % N_ID) * PER_ID]}",
                  f"{fold} 0 {names[c]} {names[((ident + 2) % N_ID) * PER_ID + 1]}"]  # fmt: skip
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    src = PairSource(root / "pairs.txt")
    order = [names.index(str(f.relative_to(root))) for f in src.files]
    return FaceSet(imgs[order], torch.from_numpy(src.labels), src)


@pytest.fixture(scope="module")
def teacher() -> ToyTeacher:
    return ToyTeacher()


def _cfg(**kw) -> AttackConfig:
    base = dict(linkage_steps=3, linkage_batch_size=4, linkage_lr=1e-3, linkage_topk=2, stem_width=4, base_width=2,
                norm_batches=2, eval_batch_size=8, grid_images=3, log_every=1, seed=0)  # fmt: skip
    base.update(kw)
    return AttackConfig(**base)


def _ctx(target: str, train: FaceSet, val: FaceSet, teacher: nn.Module | None, **kw) -> AttackContext:
    judge = Judge("toy", embed=teacher) if teacher is not None else None
    return AttackContext(resolve_target(target), train, val, _cfg(**kw), judge, log=None)


# ------------------------------------------------------------------------------------------------ metrics
def test_tar_at_fmr_exact():
    impostor = np.arange(10) / 10.0  # 0.0 .. 0.9
    genuine = np.array([0.95, 0.85, 0.75, 0.1])
    # fmr 0.1 of 10 impostors: 1 may exceed the threshold -> t = 0.8 (2nd largest); 0.95, 0.85 pass
    assert tar_at_fmr(genuine, impostor, 0.1) == 0.5
    # fmr 0.05: none may exceed -> t = 0.9 (the largest); only 0.95 passes
    assert tar_at_fmr(genuine, impostor, 0.05) == 0.25
    # fmr 0.3: t = 0.6 -> 0.95, 0.85, 0.75
    assert tar_at_fmr(genuine, impostor, 0.3) == 0.75
    # genuine equal to the threshold does not pass (strictly above)
    assert tar_at_fmr([0.8], impostor, 0.1) == 0.0
    assert tar_at_fmr(genuine, impostor, 1.0) == 1.0
    assert tar_at_fmr([], impostor, 0.1) is None and tar_at_fmr(genuine, [], 0.1) is None


def test_linkage_metrics_hand_made():
    # gallery: identities 10, 20, 30 on three orthogonal axes; queries at known angles
    gallery = torch.eye(3)
    g_ids = torch.tensor([10, 20, 30])
    queries = torch.tensor([
        [1.0, 0.1, 0.0],   # id 10: nearest 10 (rank 1)
        [0.0, 2.0, 0.5],   # id 20: nearest 20 (rank 1); scale does not matter
        [0.9, 0.0, 0.5],   # id 30: nearest 10, then 30 (rank 2)
        [0.2, 0.3, 1.0],   # id 10: nearest 30, then 20, then 10 (rank 3)
    ])  # fmt: skip
    q_ids = torch.tensor([10, 20, 30, 10])
    m = linkage_metrics(queries, gallery, q_ids, g_ids, topk=2)
    assert m["linkage_top1"] == 0.5
    assert m["linkage_topk"] == 0.75
    assert m["topk"] == 2 and m["n_queries"] == 4 and m["n_gallery"] == 3
    # 4 genuine cosines (0.995, 0.970, 0.486, 0.188) and 8 impostors, the largest 0.941 (query 3 vs id 30). FMR
    # 1e-2 / 1e-3 of 8 impostors -> floor(...) = 0 may pass: t = 0.941, and 2 of 4 genuine scores exceed it
    assert m["tar_at_fmr"] == {"1e-2": 0.5, "1e-3": 0.5}
    # top-k = gallery size: every query whose identity is in the gallery hits
    assert linkage_metrics(queries, gallery, q_ids, g_ids, topk=3)["linkage_topk"] == 1.0
    # a query of an identity absent from the gallery always misses
    m2 = linkage_metrics(queries[:1], gallery, torch.tensor([99]), g_ids, topk=3)
    assert m2["linkage_top1"] == 0.0 and m2["linkage_topk"] == 0.0
    with pytest.raises(ValueError, match="topk"):
        linkage_metrics(queries, gallery, q_ids, g_ids, topk=4)


def test_gallery_split_first_face_of_each_identity():
    gal, qry = gallery_split(torch.tensor([3, 3, 1, 3, 1, 7]))
    assert gal.tolist() == [0, 2, 5] and qry.tolist() == [1, 3, 4]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("key, value", [
    ("linkage_form", "teacher"), ("linkage_form", ""), ("linkage_steps", 0), ("linkage_steps", 2.5),
    ("linkage_batch_size", 1), ("linkage_lr", 0.0), ("linkage_lr", -1e-3), ("linkage_lr", float("nan")),
    ("linkage_lr", True), ("linkage_topk", 0), ("linkage_topk", "5"),
])  # fmt: skip
def test_malformed_linkage_options_name_the_option(key, value):
    with pytest.raises(AttackError, match=f"AttackConfig.{key}"):
        AttackConfig(**{key: value})


def test_topk_larger_than_gallery_is_refused_before_training(train, val_pairs, teacher):
    ctx = _ctx("identity", train, val_pairs, teacher, linkage_topk=N_ID + 1)
    with pytest.raises(AttackError, match="linkage_topk"):
        LinkageAttack().run(ctx)


def test_no_teacher_is_skipped_with_the_reason(train, val_pairs):
    sec = LinkageAttack().run(_ctx("identity", train, val_pairs, None))
    assert "teacher" in sec["skipped"]
    assert all(k in sec for k in RESULT_KEYS) and sec["linkage_top1"] is None


# ------------------------------------------------------------------------------------------------ the attack
def test_identity_adapter_starts_as_the_identity(train, teacher):
    """The untrained adapter on the identity payload outputs the image itself (least-squares read-out)."""
    cfg = _cfg()
    method = resolve_target("identity").method
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linker = build_linker("adapter", method, train, cfg, embedding_size=16)
    x = train.batch(torch.arange(4))
    with torch.no_grad():
        img = linker.images(linker.inputs(protect_with(method, x, cfg, 2, 0)))
    assert linker.inverter is None
    assert torch.allclose(img, x, atol=1e-3)


def test_identity_harness_matches_the_teacher(train, val_pairs, teacher):
    # lr ~0: the untrained identity adapter already reproduces the teacher (loss ~1e-7), and Adam would normalise
    # those float-noise gradients into lr-sized steps that flip near-ties; this checks the data path and scoring
    sec = LinkageAttack().run(_ctx("identity", train, val_pairs, teacher, linkage_form="adapter", linkage_lr=1e-9))
    tc = sec["teacher_clean"]
    assert 0.0 < tc["linkage_top1"] < 1.0  # the toy problem is neither trivial nor hopeless
    assert sec["linkage_top1"] == tc["linkage_top1"]
    assert sec["linkage_topk"] == tc["linkage_topk"]
    assert sec["pair_acc"] == pytest.approx(tc["pair_acc"], abs=0.1)


def test_section_carries_result_keys_anchors_and_grid(train, val_pairs, teacher):
    sec = LinkageAttack().run(_ctx("identity", train, val_pairs, teacher, linkage_steps=1, linkage_form="adapter"))
    assert all(k in sec for k in RESULT_KEYS)
    assert sec["n_faces"] == N_ID * PER_ID
    assert sec["n_gallery"] == N_ID and sec["n_queries"] == N_ID * (PER_ID - 1)
    assert sec["form"] == "adapter" and sec["seeded_with_inversion"] is False
    assert set(sec["tar_at_fmr"]) == {"1e-2", "1e-3"}
    assert sec["pair_acc"] is not None and sec["pair"]["pairs"] == 4 * N_ID
    assert sec["chance"] == {"linkage_top1": 1 / N_ID, "linkage_topk": 2 / N_ID,
                             "tar_at_fmr": {"1e-2": 1e-2, "1e-3": 1e-3}, "pair_acc": 0.5}  # fmt: skip
    for k in ("linkage_top1", "linkage_topk", "tar_at_fmr", "pair_acc"):
        assert k in sec["teacher_clean"]
    assert sec["train"]["steps"] == 1 and sec["train"]["loss_first"] is not None
    assert sec["time_s"] > 0
    grid = sec["_grid"]
    assert grid.shape == (3, 3, S, S) and grid.min() >= 0 and grid.max() <= 1
    # the grid rows are the adapter's images of the grid faces (here ~ the faces themselves)
    ctx = _ctx("identity", train, val_pairs, teacher)
    assert torch.allclose(grid, val_pairs.batch(ctx.grid_index()) * 0.5 + 0.5, atol=0.02)


def test_same_seed_same_figures_and_global_rng_untouched(train, val_pairs, teacher):
    before = torch.random.get_rng_state()
    a = LinkageAttack().run(_ctx("identity", train, val_pairs, teacher, linkage_form="student", linkage_steps=2))
    after = torch.random.get_rng_state()
    b = LinkageAttack().run(_ctx("identity", train, val_pairs, teacher, linkage_form="student", linkage_steps=2))
    c = LinkageAttack().run(_ctx("identity", train, val_pairs, teacher, linkage_form="student", linkage_steps=2,
                                 seed=1))  # fmt: skip
    assert torch.equal(before, after)
    keys = ("linkage_top1", "linkage_topk", "tar_at_fmr", "pair_acc")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"]
    assert a["train"]["loss_curve"] != c["train"]["loss_curve"]
    assert a["form"] == "student" and "_grid" not in a


def test_teacher_frozen_but_differentiable(train, teacher):
    """Training moves the adapter (its zero-initialised U-Net head gets gradients *through* the teacher) and never
    the teacher; the teacher's flags are restored afterwards."""
    teacher.train()  # a caller's module in train mode: the attack must still use it in eval mode
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    judge = Judge("toy", embed=teacher)
    method = resolve_target("identity").method
    cfg = _cfg(linkage_steps=2, linkage_lr=1e-2)

    with frozen_teacher(judge):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        with torch.random.fork_rng():
            torch.manual_seed(0)
            linker = build_linker("adapter", method, train, cfg, embedding_size=16)
        with torch.no_grad():  # a caller's no_grad must not stop the training
            train_linker(linker, method, judge, train, cfg, log=None)
    assert linker.net.unet.head.weight.abs().sum() > 0
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    teacher.eval()


def test_seeded_adapter_starts_as_the_inversion(train, teacher):
    """On a linear payload (PartialFace: its payload does not depend on weights) the untrained adapter's image is
    exactly the closed-form estimate."""
    # a small search patch: the first search builds a basis per candidate rank (~20 s at the default 32)
    ctx = _ctx("method:partialface:depth=18,width=2", train, train, teacher, inversion_patch=8)
    inv = inverter_for(ctx)
    assert inv is not None and ctx.shared["inverter"] is inv
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linker = build_linker("adapter", ctx.method, train, ctx.cfg, 16, inverter=inv)
    assert isinstance(linker, Linker) and linker.inverter is inv
    payload = protect_with(ctx.method, train.batch(torch.arange(2)), ctx.cfg, 2, 0)
    with torch.no_grad():
        tensors = linker.inputs(payload)
        img = linker.images(tensors)
    assert torch.equal(img, tensors["inversion"])
    # the identity payload has no linear operator declared: no inverter
    assert inverter_for(_ctx("identity", train, train, teacher)) is None


def test_fixed_secrets_run(train, val_pairs, teacher):
    sec = LinkageAttack().run(_ctx("identity", train, val_pairs, teacher, secrets="fixed", linkage_steps=1,
                                   linkage_form="adapter"))  # fmt: skip
    assert sec["secrets"] == "fixed" and sec["linkage_top1"] == sec["teacher_clean"]["linkage_top1"]


def test_time_limit_stops_training(train, val_pairs, teacher):
    cfg = replace(_cfg(), linkage_steps=50, time_limit=1e-6)
    ctx = AttackContext(resolve_target("identity"), train, val_pairs, cfg, Judge("toy", embed=teacher), log=None)
    sec = LinkageAttack().run(ctx)
    assert sec["train"]["steps"] == 1


# ------------------------------------------------------------------------------------------------ the forms
def test_linkage_forms_parse_and_refuse():
    assert _cfg(linkage_form="insider,adapter").linkage_form == "insider,adapter"
    from ppfr.eval.attacks.linkers import resolve_forms

    assert resolve_forms(_cfg()) == ["adapter", "finetune", "insider"]  # auto: every form but the student
    assert resolve_forms(_cfg(linkage_form="insider,adapter")) == ["adapter", "insider"]  # run order
    for bad in ("adapter,", "adapter,teacher", "auto,adapter"):
        with pytest.raises(AttackError, match="linkage_form"):
            _cfg(linkage_form=bad)
    with pytest.raises(AttackError, match="finetune_loss"):
        _cfg(finetune_loss="l2")
    with pytest.raises(AttackError, match="linkage_init"):
        _cfg(linkage_init="no/such/linker.pt")


def _closed_set_top1(method, val: FaceSet) -> float:
    """Closed-set identification of a method's own embeddings, computed here without the attack's code: gallery =
    the first face of every identity enrolled with flip TTA, queries = the rest, nearest gallery face by cosine."""
    names = [p.parent.name for p in val.source.files]
    ident = np.array([names[i] for i in val.labels.tolist()])
    with torch.no_grad():
        x = val.batch(torch.arange(len(val)))
        emb = F.normalize(method.embed(x), dim=1)
        # the enrolled template: flip TTA (ArcFace has no secret, so the insider's extra protections are repeats)
        enrolled = F.normalize(F.normalize(method.embed(x), dim=1) + F.normalize(method.embed(x.flip(-1)), dim=1), dim=1)
    first = {}
    for i, n in enumerate(ident):
        first.setdefault(n, i)
    gal = sorted(first.values())
    qry = [i for i in range(len(val)) if i not in set(gal)]
    sims = emb[qry] @ enrolled[gal].T
    hits = [ident[gal[int(j)]] == ident[q] for q, j in zip(qry, sims.argmax(1))]
    return float(np.mean(hits))


def test_insider_on_arcface_is_its_own_closed_set_identification(train, val_pairs, teacher):
    ctx = _ctx("method:arcface:depth=18,width=2", train, val_pairs, teacher, linkage_form="insider")
    before = {k: v.clone() for k, v in ctx.method.state_dict().items()}
    sec = LinkageAttack().run(ctx)
    assert sec["form"] == "insider" and sec["train"] is None and sec["parameters"] == 0
    assert sec["linkage_top1"] == pytest.approx(_closed_set_top1(ctx.method, val_pairs), abs=1e-12)
    assert all(torch.equal(before[k], v) for k, v in ctx.method.state_dict().items())  # nothing trained
    assert sec["pair"]["tar_at_fmr"].keys() == {"1e-2", "1e-3"}


def test_auto_reports_every_form_and_the_strongest(train, val_pairs, teacher):
    """auto runs adapter, finetune and insider; a form that cannot run is recorded with its reason, and the
    top-level figure is the maximum over the forms."""
    sec = LinkageAttack().run(_ctx("identity", train, val_pairs, teacher, finetune_steps=2))
    assert set(sec["forms"]) == {"adapter", "finetune", "insider"}
    assert "no server" in sec["forms"]["insider"]["skipped"]
    top = max(f["linkage_top1"] for f in sec["forms"].values() if f.get("linkage_top1") is not None)
    assert sec["linkage_top1"] == top and sec["forms"][sec["strongest"]]["linkage_top1"] == top
    sel = sec["forms"]["finetune"]["train"]["selection"]
    assert sel["chosen"] in sel["candidates"] and "start (the adapter)" in sel["candidates"]
    assert sel["candidates"][sel["chosen"]] == max(sel["candidates"].values())  # the best on public identities


def test_finetune_trains_a_copy_never_the_teacher(train, teacher):
    from ppfr.eval.attacks.linkers import finetune_linker, split_identities

    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    judge = Judge("toy", embed=teacher)
    method = resolve_target("identity").method
    cfg = _cfg(finetune_steps=3, linkage_lr=1e-2, finetune_warmup=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        adapter = build_linker("adapter", method, train, cfg, embedding_size=16)
        with frozen_teacher(judge):
            linker, summary = finetune_linker(adapter, method, judge, train, cfg, log=None)
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    copy_state = linker.net["teacher"].state_dict()
    moved = [k for k in state if not torch.equal(state[k], copy_state[k])]
    assert moved or summary["selection"]["chosen"].startswith("start")  # the copy trained (unless start won)
    assert linker.teacher is not None and linker.teacher.module is linker.net["teacher"]
    fit, sel = split_identities(train, 0.2, 0)
    assert not set(identity_index_of(train, fit)) & set(identity_index_of(train, sel))  # identity-disjoint


def identity_index_of(faces: FaceSet, idx: torch.Tensor) -> list[int]:
    return faces.labels[idx].tolist()


def test_clean_embeddings_computed_once_per_face(train):
    from ppfr.eval.attacks.linkers import clean_embeddings

    calls = []
    net = ToyTeacher()

    def embed(x):
        calls.append(len(x))
        return net(x)

    judge = Judge("counting", embed=embed)
    cache = clean_embeddings(judge, train)
    a = cache.get(torch.tensor([0, 1, 2, 1]), torch.tensor([False, False, True, True]))
    b = cache.get(torch.tensor([1, 2]), torch.tensor([True, True]))
    assert sum(calls) == 4  # 0, 1 plain; 2, 1 mirrored: each once
    assert clean_embeddings(judge, train) is cache
    with torch.no_grad():
        want = F.normalize(net(train.batch(torch.tensor([2])).flip(-1)), dim=1)
    assert torch.allclose(a[2], want[0], atol=1e-6) and torch.equal(a[3], b[0])


def test_linkage_init_loads_all_but_the_payload_specific_part(train, tmp_path):
    from ppfr.eval.attacks.linkers import load_linker_init, save_linker

    method = resolve_target("identity").method
    cfg = _cfg()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = build_linker("adapter", method, train, cfg, embedding_size=16)
        torch.manual_seed(1)
        b = build_linker("adapter", method, train, cfg, embedding_size=16)
    with torch.no_grad():
        for p in a.net.unet.parameters():
            p.add_(1.0)
    save_linker(a, tmp_path / "linker_adapter.pt", method)
    stem_before = {k: v.clone() for k, v in b.net.stem.state_dict().items()}
    n = load_linker_init(b, tmp_path / "linker_adapter.pt")
    assert n == len(a.net.unet.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.net.unet.state_dict().values(), b.net.unet.state_dict().values()))
    assert all(torch.equal(stem_before[k], v) for k, v in b.net.stem.state_dict().items())


def test_one_to_one_thresholds_come_from_the_training_folds_only():
    """Each fold's threshold is set on the other nine: moving the test fold's own scores must not move it."""
    from ppfr.eval.verification import ten_fold_tar

    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(10), 40)
    same = np.tile(np.r_[np.ones(20, bool), np.zeros(20, bool)], 10)
    sims = np.where(same, rng.normal(0.6, 0.2, len(same)), rng.normal(0.0, 0.2, len(same)))
    base = ten_fold_tar(sims, same, folds, 1e-2)
    # a hand computation for fold 0: the training folds' 180 impostors, floor(0.01 * 180) = 1 -> the 2nd largest
    imp = np.sort(sims[(folds != 0) & ~same])[::-1]
    tar0 = float((sims[(folds == 0) & same] > imp[1]).mean())
    moved = sims.copy()
    moved[(folds == 0) & ~same] += 5.0  # the test fold's impostors now beat every genuine score
    leak = ten_fold_tar(moved, same, folds, 1e-2)
    # a leaked threshold would rise above the moved impostors and drop fold 0's TAR to 0
    per_fold_tar = [float((moved[(folds == f) & same] > np.sort(moved[(folds != f) & ~same])[::-1][1]).mean())
                    for f in range(10)]  # fmt: skip
    assert per_fold_tar[0] == tar0
    assert leak["tar"] == pytest.approx(np.mean(per_fold_tar))
    assert leak["fmr"] > base["fmr"]  # fold 0's impostors pass its (training-fold) threshold: measured, not hidden
