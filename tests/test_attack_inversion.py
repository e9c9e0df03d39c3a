"""The closed-form inversion attack (ppfr.eval.attacks.inversion): the sparse solver against a dense reference,
exact recovery of fully observed payloads, the secret search over every rank space, and the attack end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ppfr
from ppfr.eval.attacks import build_attack
from ppfr.eval.attacks.common import AttackConfig, AttackContext, Target
from ppfr.eval.attacks.data import FaceSet
from ppfr.eval.attacks.results import merge_result
from ppfr.eval.attacks.inversion import (
    EXPLAINED, FreqInverter, Inverter, SecretSearch, dense_inversion_ref, images_to_planes, planes_to_images, true_keys,
)  # fmt: skip
from ppfr.eval.image_metrics import ssim
from ppfr.methods.base import FreqPayloadOperator
from ppfr.ops.freq import freq_encode
from ppfr.ops.sample_ranks import RankSpace


def smooth_faces(b: int, n: int, seed: int) -> torch.Tensor:
    """(b, 3, n, n) in [-1, 1]: a smooth face-like blob (bright oval, dark eyes) plus low-pass noise, per image."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    oval = torch.exp(-((xx / 0.6) ** 2 + (yy / 0.8) ** 2) * 2)
    eyes = sum(torch.exp(-(((xx - ex) / 0.12) ** 2 + ((yy + 0.2) / 0.08) ** 2)) for ex in (-0.3, 0.3))
    base = (oval - 0.6 * eyes)[None, None]
    noise = F.interpolate(torch.rand(b, 3, n // 8, n // 8, generator=g), size=(n, n), mode="bicubic",
                          align_corners=False)  # fmt: skip
    tint = torch.rand(b, 3, 1, 1, generator=g) * 0.4
    return (base * (0.8 + tint) + 0.5 * noise - 0.5).clamp(-1, 1)


def test_colour_maps_round_trip():
    x = smooth_faces(2, 16, 0)
    assert torch.allclose(planes_to_images(images_to_planes(x)).float(), x, atol=1e-6)


@pytest.mark.parametrize("n, channels", [
    (24, [64 * c + k for c in range(3) for k in RankSpace.code().subsets[1]]),  # u, v >= 1 everywhere: null space
    (32, [5, 70, 130, 7, 40]),  # colours with different channel sets; one colour ordering not ascending
    (16, list(range(192))),
])  # fmt: skip
def test_sparse_solver_matches_dense_reference(n, channels):
    x = smooth_faces(3, n, 1)
    ch = torch.tensor(channels)
    y = freq_encode(x, ch)
    mu = images_to_planes(smooth_faces(8, n, 2)).mean(0)
    got = FreqInverter(mu, 1e-9).solve(y, ch)
    want = dense_inversion_ref(y, ch, mu, 1e-9)
    assert torch.allclose(got, want, atol=1e-6 * want.abs().max().item(), rtol=0)


def test_fully_observed_payload_is_inverted_exactly():
    x = smooth_faces(2, 112, 3)
    mu = images_to_planes(smooth_faces(4, 112, 4)).mean(0)
    rec = FreqInverter(mu, 1e-9).images(freq_encode(x), torch.arange(192))
    assert (rec - x).abs().max() < 1e-3


def test_high_frequency_payloads_recover_smooth_faces():
    # DuetFace's server channels and every PartialFace subset: the mean face fills only the null space
    from ppfr.methods.duetface import SERVER_CHANNELS

    x = smooth_faces(4, 112, 5)
    inv = FreqInverter(images_to_planes(smooth_faces(16, 112, 6)).mean(0), 1e-9)
    sets = [torch.tensor(SERVER_CHANNELS)] + [torch.tensor([64 * c + k for c in range(3) for k in s])
                                              for s in RankSpace.code().subsets]  # fmt: skip
    for ch in sets:
        rec = inv.images(freq_encode(x, ch), ch)
        s = ssim(rec * 0.5 + 0.5, x * 0.5 + 0.5).mean().item()
        assert s > 0.8, (ch[:3].tolist(), s)


@pytest.mark.parametrize("space", [RankSpace.code(), RankSpace.paper(3), RankSpace.generate(6, 8, 5, seed=11)],
                         ids=["code", "paper", "keyed"])  # fmt: skip
def test_secret_search_finds_the_true_rank(space):
    n, b = 48, 12
    table = space.channel_table().reshape(space.m * space.n, -1)
    op = FreqPayloadOperator("dct", table, tuple(str(i) for i in range(len(table))))
    truth = torch.randint(0, len(table), (b,), generator=torch.Generator().manual_seed(7))
    x = smooth_faces(b, n, 8)
    y = freq_encode(x, table[truth])
    found, resid = SecretSearch(table, n, patch=16).search(y)
    assert torch.equal(found, truth) and resid.max() < EXPLAINED
    assert torch.equal(true_keys(x, y, op), truth)
    # a payload that no candidate produced is not explained
    _, resid = SecretSearch(table, n, patch=16).search(y.flip(1))
    assert resid.min() > EXPLAINED


def test_inverter_recovers_partialface_payloads_without_the_secret():
    method = ppfr.build_method("partialface", depth=18, width=8, rank_space="paper").eval()
    x = smooth_faces(6, 112, 9)
    with torch.no_grad():
        payload = method.protect(x, generator=torch.Generator().manual_seed(1))
    faces = FaceSet(((smooth_faces(16, 112, 10) + 1) * 127.5).round().to(torch.uint8), torch.zeros(16).long(),
                    SimpleNamespace(path="synthetic"))  # fmt: skip
    inv = Inverter.for_method(method, faces, AttackConfig(inversion_patch=24))
    rec = inv.recover(payload)
    assert torch.equal(inv.last_keys, true_keys(x, payload.tensors["dct"], method.payload_operator()))
    assert ssim(rec * 0.5 + 0.5, x * 0.5 + 0.5).mean() > 0.8
    assert Inverter.for_method(ppfr.build_method("minusface", depth=18, width=8, gen_width=4), faces,
                               AttackConfig()) is None  # fmt: skip


def test_attack_section_is_reproducible_and_schema_complete():
    from ppfr.eval.attacks.results import RESULT_KEYS

    def faceset(seed, n):
        return FaceSet(((smooth_faces(n, 112, seed) + 1) * 127.5).round().to(torch.uint8), torch.arange(n),
                       SimpleNamespace(path=f"synthetic{seed}"))  # fmt: skip

    method = ppfr.build_method("partialface", depth=18, width=8).eval()
    target = Target(method, "pf", "method:partialface", False)
    cfg = AttackConfig(eval_batch_size=4, grid_images=2, inversion_patch=24)
    attack = build_attack("inversion")
    runs = [attack.run(AttackContext(target, faceset(1, 8), faceset(2, 6), cfg, log=None)) for _ in range(2)]
    # the section: the schema keys inversion fills, and beyond the schema only these details
    details = {"ssim_std", "psnr_std", "psnr_median", "reid", "faces_per_s", "secret_space", "unexplained_faces",
               "operator", "prior", "search_patch", "_grid"}  # fmt: skip
    for r in runs:
        assert {"ssim", "psnr", "reid_acc", "key_recovery", "n_faces", "time_s"} <= set(r)
        assert set(r) - set(RESULT_KEYS) == details, set(r) - set(RESULT_KEYS) ^ details
        assert r["n_faces"] == 6 and r["key_recovery"] == 1.0
        assert r["_grid"].shape == (2, 3, 112, 112)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "faces_per_s", "_grid")}  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert attack.applies(ppfr.build_method("arcface", depth=18, width=8)) is not None
    assert attack.applies(method) is None
    # merged into result.json, every kind's section carries every schema key (None where it does not apply)
    merged = merge_result(None, target, {"inversion": dict(runs[0])})
    assert set(RESULT_KEYS) <= set(merged["kinds"]["inversion"]) and merged["kinds"]["inversion"]["linkage_top1"] is None


def test_operator_declarations_are_what_protect_sends():
    x = smooth_faces(2, 112, 12)
    for name in ("arcface_fd", "duetface"):
        m = ppfr.build_method(name, depth=18, width=8, **({"roi": "none"} if name == "duetface" else {})).eval()
        op = m.payload_operator()
        with torch.no_grad():
            y = m.protect(x).tensors[op.tensor]
        assert op.candidates.shape[0] == 1 and torch.allclose(y, freq_encode(x, op.candidates[0]), atol=1e-4)
    with pytest.raises(ValueError, match="int64"):
        FreqPayloadOperator("dct", torch.zeros(1, 3), ("a",))
    with pytest.raises(ValueError, match="labels"):
        FreqPayloadOperator("dct", torch.zeros(2, 3, dtype=torch.long), ("a",))
