"""Evaluation: 10-fold verification, ROC / TPR@FPR, IJB template aggregation, the face-api judge, ``ppfr eval``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppfr.eval import ijb
from ppfr.eval.verification import (
    DEFAULT_FPRS, embed_source, kfold_ids, open_pairs, pair_scores, roc_curve, ten_fold, ten_fold_sqdist, tpr_at_fpr,
)  # fmt: skip
from ppfr.models import faceapi
from ppfr.models.checkpoints import CheckpointError
from tests.conftest import SHARED

FACEAPI = SHARED / "models" / "faceapi"
CELEBA = SHARED / "data" / "celeba112"


# ------------------------------------------------------------------------------------------ 10-fold
# two folds of three pairs, worked by hand: fold 0 is tested with the threshold learnt on fold 1 and vice versa
HAND_SIMS = np.array([0.9, 0.2, 0.6, 0.8, 0.5, 0.1])
HAND_SAME = np.array([1, 0, 0, 1, 1, 0], bool)
HAND_FOLDS = np.array([0, 0, 0, 1, 1, 1])


def test_ten_fold_hand_computed():
    # fold 1 -> best t = 0.5 (3/3); on fold 0: 0.9 ok, 0.2 ok, 0.6 >= 0.5 wrongly "same" -> 2/3
    # fold 0 -> best t = 0.9 (3/3); on fold 1: 0.8 and 0.5 wrongly "different", 0.1 ok -> 1/3
    r = ten_fold(HAND_SIMS, HAND_SAME, HAND_FOLDS)
    assert r.fold_accuracies == pytest.approx((2 / 3, 1 / 3))
    assert r.accuracy == pytest.approx(0.5) and r.std == pytest.approx(1 / 6)
    assert r.threshold == pytest.approx(0.7)
    assert r.auc == pytest.approx(8 / 9)  # positives beat negatives in 8 of 9 (pos, neg) pairs
    assert r.pairs == 6 and r.metric == "cosine"


def test_ten_fold_sqdist_reference_grid_hand_computed():
    # squared distances off the 0.01 grid; "same if d < t", the first best grid threshold
    d = np.array([0.205, 1.605, 0.805, 0.405, 1.005, 1.805])
    same = np.array([1, 0, 0, 1, 1, 0], bool)
    r = ten_fold_sqdist(d, same, HAND_FOLDS)
    # fold 0 tested with t from fold 1: first t > 1.005 is 1.01 -> 0.805 wrongly same -> 2/3
    # fold 1 tested with t from fold 0: first t > 0.205 is 0.21 -> 0.405, 1.005 wrongly different -> 1/3
    assert r.fold_thresholds == pytest.approx((1.01, 0.21))
    assert r.fold_accuracies == pytest.approx((2 / 3, 1 / 3))
    assert r.accuracy == pytest.approx(0.5) and r.metric == "sqdist"
    assert r.auc == pytest.approx(8 / 9)


def test_ten_fold_synthetic_embeddings_known_answer():
    # 100 pairs in 10 folds of 10; genuine pairs at cos 0.9, impostors at cos 0.1, except one impostor at 0.95 in
    # each of folds 0..4: no threshold can get those right, so folds 0..4 score 9/10 and the others 10/10.
    d = 128
    folds = np.repeat(np.arange(10), 10)
    same = np.tile([True] * 5 + [False] * 5, 10)
    target = np.where(same, 0.9, 0.1)
    target[[5, 15, 25, 35, 45]] = 0.95
    # pair i: a = e_i, b = cos * e_i + sin * e_(i+1): unit vectors at exactly the target cosine (bitwise equal
    # similarities within a class, so no threshold can fall between two genuine pairs)
    eye = np.eye(d)
    a = eye[np.arange(100)]
    b = target[:, None] * a + np.sqrt(1 - target[:, None] ** 2) * eye[np.arange(100) + 1]
    sims = (a * b).sum(1)
    r = ten_fold(sims, same, folds)
    assert r.fold_accuracies == pytest.approx([0.9] * 5 + [1.0] * 5)
    assert r.accuracy == pytest.approx(0.95) and r.std == pytest.approx(0.05)
    assert r.threshold == pytest.approx(0.9)
    r2 = ten_fold_sqdist(((a - b) ** 2).sum(1), same, folds)
    assert r2.accuracy == pytest.approx(0.95)
    assert 2 - 2 * 0.9 < r2.threshold <= 2 - 2 * 0.1  # between the genuine and the impostor distances


def test_ten_fold_refuses_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        ten_fold(np.array([0.1, np.nan]), np.array([True, False]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one length"):
        ten_fold(np.zeros(3), np.zeros(2, bool), np.zeros(3))
    assert kfold_ids(23).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] + sum(([k, k] for k in range(3, 10)), [])
    with pytest.raises(ValueError, match="folds"):
        kfold_ids(5)


# ------------------------------------------------------------------------------------------ ROC
def test_roc_and_tpr_at_fpr_hand_computed():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    fpr, tpr, thr = roc_curve(s, y, drop_intermediate=False)
    assert fpr.tolist() == [0, 0, 0.25, 0.25, 0.25, 0.5, 0.75, 0.75, 1]
    assert tpr.tolist() == [0, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 1, 1]
    assert thr[0] == np.inf and thr[1:].tolist() == s.tolist()
    # sklearn's default drops the points inside straight segments (here thresholds 0.7 and 0.5)
    fpr, tpr, thr = roc_curve(s, y)
    assert fpr.tolist() == [0, 0, 0.25, 0.25, 0.75, 0.75, 1]
    assert tpr.tolist() == [0, 0.25, 0.25, 0.75, 0.75, 1, 1]
    assert thr[1:].tolist() == [0.9, 0.8, 0.6, 0.4, 0.3, 0.2]
    # TFace's reading: nearest ROC point, ties to the first of the reversed arrays = the last in ROC order.
    # 0.01 -> fpr 0: (0, 0.25), the top of the FPR-0 segment, not the leading (0, 0); 0.25 -> (0.25, 0.75);
    # 0.5 is equidistant from 0.25 and 0.75 -> 0.75, whose top point is (0.75, 1); 0.8 -> (0.75, 1)
    got = tpr_at_fpr(s, y, (0.01, 0.25, 0.5, 0.8))
    assert got == {0.01: 0.25, 0.25: 0.75, 0.5: 1.0, 0.8: 1.0}
    assert got == _tface_tpr_at_fpr(y, s, (0.01, 0.25, 0.5, 0.8))
    # highest TPR with FPR <= target: 0.01 -> 0.25 (threshold 0.9), 0.25 and 0.5 -> 0.75, 0.8 -> 1.0
    assert tpr_at_fpr(s, y, (0.01, 0.25, 0.5, 0.8), rule="at_most") == {0.01: 0.25, 0.25: 0.75, 0.5: 0.75, 0.8: 1.0}


def _sklearn_roc_literal(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve(labels, scores)`` (drop_intermediate=True) written out with Python loops, as an
    independent reference: one point per distinct score (ties are one threshold), counting ``score >= t``; the
    first and last points and every point where the FP or TP count's second difference is non-zero are kept; a
    leading (0, 0); rates = counts / the last count."""
    pairs = list(zip(scores.tolist(), labels.tolist()))
    fps, tps = [], []
    for t in sorted(set(scores.tolist()), reverse=True):
        tps.append(sum(1 for v, y in pairs if v >= t and y))
        fps.append(sum(1 for v, y in pairs if v >= t and not y))
    if len(fps) > 2:
        inner = [i for i in range(1, len(fps) - 1)
                 if fps[i + 1] - 2 * fps[i] + fps[i - 1] != 0 or tps[i + 1] - 2 * tps[i] + tps[i - 1] != 0]  # fmt: skip
        keep = [0, *inner, len(fps) - 1]
        fps, tps = [fps[i] for i in keep], [tps[i] for i in keep]
    fps, tps = [0, *fps], [0, *tps]
    return np.array(fps, np.float64) / fps[-1], np.array(tps, np.float64) / tps[-1]


def _tface_tpr_at_fpr(labels, scores, targets) -> dict[float, float]:
    """TFace ``recognition/test/IJB_Evaluation.py``'s reading, literally: flipud, then min over (distance, index)."""
    fpr, tpr = _sklearn_roc_literal(np.asarray(labels), np.asarray(scores, np.float64))
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for x in targets:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)))))
        out[float(x)] = float(tpr[min_index])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_tpr_at_fpr_is_tfaces_rule_on_tie_heavy_scores(seed):
    rng = np.random.default_rng(seed)
    n_neg = [64, 256, 1000, 4096, 37, 2048][seed]  # powers of two make the FPRs dyadic: exact distance ties below
    n_pos = int(rng.integers(20, 400))
    levels = int(rng.integers(3, 25))  # few distinct scores: most of them shared by genuine and impostor pairs
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    s = np.r_[rng.integers(levels // 3, levels + 1, n_pos), rng.integers(0, levels - levels // 3, n_neg)]
    s = s / levels - 0.5
    perm = rng.permutation(len(y))
    y, s = y[perm], s[perm]
    fpr, tpr, _ = roc_curve(s, y)
    ref_fpr, ref_tpr = _sklearn_roc_literal(y, s)
    assert np.array_equal(fpr, ref_fpr) and np.array_equal(tpr, ref_tpr)  # the ROC itself, bit for bit
    ranks = np.unique(fpr)
    mids = (ranks[1:] + ranks[:-1]) / 2  # exactly between two ROC FPRs: the tie rule decides
    targets = [*DEFAULT_FPRS, 0.0, 1.0, *ranks.tolist(), *mids.tolist(), 0.5 / n_neg, 1.5 / n_neg]
    got = tpr_at_fpr(s, y, targets)
    assert got == _tface_tpr_at_fpr(y, s, targets)  # exactly
    if n_neg & (n_neg - 1) == 0:  # dyadic FPRs: the midpoints are exact ties, where "first point" would differ
        assert any(got[float(m)] != tpr[int(np.argmin(np.abs(fpr - m)))] for m in mids)
    assert ijb.tpr_at_fpr is tpr_at_fpr  # the IJB evaluation reads its TPRs with this rule


def test_tpr_at_fpr_reads_the_top_of_a_vertical_segment():
    # FPR 0 is reached by 3 of 4 genuine pairs: the nearest point to 1e-6 is at FPR 0 and TFace's rule reads its top
    s = np.array([0.9, 0.8, 0.8, 0.3, 0.7, 0.2])
    y = np.array([1, 1, 1, 1, 0, 0], bool)
    assert tpr_at_fpr(s, y, (1e-6,)) == {1e-6: 0.75} == _tface_tpr_at_fpr(y, s, (1e-6,))
    # all-distinct scores, no ties anywhere: same as the plain nearest reading
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=600), rng.random(600) < 0.3
    assert tpr_at_fpr(s, y) == _tface_tpr_at_fpr(y, s, DEFAULT_FPRS)


def test_roc_ties_are_one_point():
    s = np.array([0.5, 0.5, 0.5, 0.1])
    y = np.array([1, 0, 1, 0], bool)
    fpr, tpr, _ = roc_curve(s, y, drop_intermediate=False)
    assert fpr.tolist() == [0, 0.5, 1] and tpr.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="both"):
        roc_curve(s, np.ones(4, bool))


# ------------------------------------------------------------------------------------------ IJB
def test_template_aggregation_media_weighted():
    # template 1: media 10 = {a, b} (averaged), media 11 = {c}; template 2: one image
    feats = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    tids, tf = ijb.template_features(feats, np.array([1, 1, 1, 2]), np.array([10, 10, 11, 12]))
    assert tids.tolist() == [1, 2]
    np.testing.assert_allclose(tf[0], np.array([3.0, 1.0]) / math.sqrt(10))  # (0.5, 0.5) + (1, 0), normalised
    np.testing.assert_allclose(tf[1], [0, 1])
    score = ijb.template_scores(tids, tf, np.array([[1, 2], [2, 2]]))
    # a plain image average would give (2, 1)/sqrt(5) and a score of 1/sqrt(5): the media weighting matters
    np.testing.assert_allclose(score, [1 / math.sqrt(10), 1.0])
    with pytest.raises(ValueError, match="without features"):
        ijb.template_scores(tids, tf, np.array([[1, 3]]))


def _png(path: Path, rgb: tuple[int, int, int], size: int = 112, noise_seed: int | None = None) -> None:
    arr = np.empty((size, size, 3), np.uint8)
    arr[:] = rgb
    if noise_seed is not None:  # a little texture so images of one colour differ
        noise = np.random.default_rng(noise_seed).integers(-3, 4, arr.shape)
        arr = np.clip(arr.astype(int) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _colour_embed(x: torch.Tensor) -> torch.Tensor:
    """A fake recogniser: the mean colour of the image (B, 3), centred, so identity = colour."""
    return x.mean(dim=(2, 3))


COLOURS = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40)]


def _template_dir(root: Path) -> Path:
    """ppfr layout: 4 subjects (colours), 2 templates each (2k and 2k+1 = subject k), 2 single-image media each;
    pairs: the 4 genuine (2k, 2k+1) and 4 impostor (2k, 2k+2) template pairs."""
    lines = []
    for k, c in enumerate(COLOURS):
        for t in (2 * k, 2 * k + 1):
            for j in range(2):
                _png(root / f"s{k}" / f"t{t}_{j}.png", c, noise_seed=10 * t + j)
                lines.append(f"s{k}/t{t}_{j}.png {t} {100 * t + j}")
    (root / "templates.txt").write_text("# path template media\n" + "\n".join(lines) + "\n")
    pairs = [(2 * k, 2 * k + 1, 1) for k in range(4)] + [(2 * k, (2 * k + 2) % 8, 0) for k in range(4)]
    (root / "template_pairs.txt").write_text("".join(f"{a} {b} {s}\n" for a, b, s in pairs))
    return root


def test_ijb_listing_end_to_end(tmp_path):
    listing = ijb.open_ijb_dir(_template_dir(tmp_path))
    assert len(listing.files) == 16 and listing.landmarks is None
    r = ijb.evaluate_templates(_colour_embed, listing, batch_size=5, flip=True)
    assert r.unreadable == 0 and r.templates == 8
    assert (r.scores[:4] > 0.99).all() and (r.scores[4:] < 0.9).all()
    assert r.auc == 1.0
    # 4 impostors: FPR 0.1 is not resolvable; the reference's rule reads the nearest FPR, 0, at the top of its
    # vertical segment (0, 1) -- as does "at most"
    assert r.tpr_at_fpr[1e-1] == 1.0
    assert tpr_at_fpr(r.scores, r.labels, (1e-1,), rule="at_most") == {1e-1: 1.0}
    # a pair naming a template without images is refused
    (tmp_path / "template_pairs.txt").write_text("0 99 1\n")
    with pytest.raises(ijb.DataFormatError, match="99"):
        ijb.open_ijb_dir(tmp_path)


def test_ijb_release_layout_aligns_loose_crops(tmp_path):
    # an aligned 112 face pasted into a bigger loose crop at scale 1.5 and offset (30, 20): the 5-point alignment
    # must undo it and return (about) the original crop
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:112, 0:112]
    face = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 7.0),
                     128 + 60 * np.sin((xx + yy) / 11.0)], -1)  # fmt: skip
    big = Image.fromarray(face.astype(np.uint8)).resize((168, 168), Image.BILINEAR)
    canvas = np.zeros((220, 240, 3), np.uint8)
    canvas[20:188, 30:198] = np.asarray(big)
    (tmp_path / "loose_crop").mkdir()
    Image.fromarray(canvas).save(tmp_path / "loose_crop" / "1.png")
    Image.fromarray(canvas[:, ::-1].copy()).save(tmp_path / "loose_crop" / "2.png")
    Image.fromarray(255 - canvas).save(tmp_path / "loose_crop" / "3.png")  # another "subject": inverted colours
    lm = faceapi.ARCFACE_TEMPLATE_112 * 1.5 + 0.25 + np.array([30.0, 20.0])  # pixel centres: (x + .5) * 1.5 - .5
    lm2 = lm.copy()
    lm2[:, 0] = 239 - lm[:, 0]
    lm2 = lm2[[1, 0, 2, 4, 3]]  # mirrored image: left and right swap
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "ijbx_face_tid_mid.txt").write_text("1.png 1 1\n2.png 2 2\n3.png 3 3\n")
    (meta / "ijbx_template_pair_label.txt").write_text("1 2 1\n1 3 0\n")
    (meta / "ijbx_name_5pts_score.txt").write_text(
        "".join(f"{n} " + " ".join(f"{v:.3f}" for v in p.ravel()) + " 0.99\n"
                for n, p in (("1.png", lm), ("2.png", lm2), ("3.png", lm)))
    )
    listing = ijb.open_ijb_dir(tmp_path)
    assert listing.name == "ijbx" and listing.landmarks.shape == (3, 5, 2)
    img = np.asarray(Image.open(tmp_path / "loose_crop" / "1.png").convert("RGB"))
    aligned = ijb.align_to_arcface(img, listing.landmarks[0])
    ref = torch.from_numpy(face).permute(2, 0, 1).float() / 127.5 - 1
    err = (aligned - ref)[:, 4:-4, 4:-4].abs().mean().item()  # away from the border, where resampling differs
    assert err < 0.03, err
    img2 = np.asarray(Image.open(tmp_path / "loose_crop" / "2.png").convert("RGB"))
    aligned2 = ijb.align_to_arcface(img2, listing.landmarks[1])
    # the mirrored crop aligns to the mirrored face (up to the template's 0.4 px asymmetry)
    assert (aligned2.flip(-1) - ref)[:, 4:-4, 4:-4].abs().mean().item() < 0.06

    def mirror_invariant(x):  # a fake recogniser that ignores left/right: 8x8 pooled image + its mirror
        p = torch.nn.functional.avg_pool2d(x, 14)
        return (p + p.flip(-1)).flatten(1)

    r = ijb.evaluate_templates(mirror_invariant, listing, batch_size=2)
    assert r.scores[0] > 0.98 and r.scores[1] < 0 and r.auc == 1.0


# ------------------------------------------------------------------------------------------ verification pipeline
def _pair_dataset(root: Path, n_pairs: int = 20) -> Path:
    """4 identities (colours) x 3 images; ``n_pairs`` pairs over 10 folds, alternating genuine / impostor."""
    for k, c in enumerate(COLOURS):
        for j in range(3):
            _png(root / "faces" / f"id{k}" / f"{j}.png", c, noise_seed=10 * k + j)
    rows = []
    for i in range(n_pairs):
        k = i % 4
        if i % 2 == 0:
            rows.append(f"{i % 10} 1 faces/id{k}/{i % 3}.png faces/id{k}/{(i + 1) % 3}.png")
        else:
            rows.append(f"{i % 10} 0 faces/id{k}/{i % 3}.png faces/id{(k + 1) % 4}/{i % 3}.png")
    path = root / "pairs.txt"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_pair_scores_flip_goes_through_embed(tmp_path):
    pairs = _pair_dataset(tmp_path)
    calls = []

    def spy(x):
        calls.append(x.clone())
        return _colour_embed(x)

    s = pair_scores(spy, str(pairs), flip=True, batch_size=4)
    assert len(calls) % 2 == 0 and torch.equal(calls[1], calls[0].flip(-1))  # f(x), then f(flip x) of the batch
    assert s.images == 12 and s.unreadable == 0 and len(s.sims) == 20
    r = ten_fold_sqdist(s.dists, s.same, s.folds)  # genuine pairs at distance ~0, impostors >= 0.6
    assert r.accuracy == 1.0 and r.auc == 1.0 and r.threshold == pytest.approx(0.01)
    np.testing.assert_allclose(s.dists, 2 - 2 * s.sims, atol=1e-6)  # float32 embeddings
    # the .bin route: the same pairs packed into an insightface .bin, folds = contiguous KFold(10)
    from ppfr.data.binset import write_bin

    src, rows = open_pairs(str(pairs))
    imgs = [src.read(int(i)) for r_ in rows for i in (r_[2], r_[3])]
    write_bin(tmp_path / "set.bin", imgs, [bool(r_[1]) for r_ in rows])
    sb = pair_scores(_colour_embed, str(tmp_path / "set.bin"))
    np.testing.assert_allclose(sb.sims, s.sims, atol=1e-6)
    assert sb.folds.tolist() == kfold_ids(20).tolist()


def test_embed_source_marks_unreadable(tmp_path):
    pairs = _pair_dataset(tmp_path)
    (tmp_path / "faces" / "id0" / "1.png").write_bytes(b"not a png")
    src, _ = open_pairs(str(pairs))
    with pytest.warns(Warning):
        emb, ok = embed_source(_colour_embed, src, batch_size=4)
    bad = [i for i, f in enumerate(src.files) if f.name == "1.png" and f.parent.name == "id0"]
    assert (~ok).nonzero()[0].tolist() == bad and emb[bad].abs().sum() == 0


# ------------------------------------------------------------------------------------------ face-api judge
def _write_manifest(d: Path, groups: list[tuple[list[str], list[dict], list[bytes]]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    manifest = []
    for paths, weights, blobs in groups:
        for p, b in zip(paths, blobs):
            (d / p).write_bytes(b)
        manifest.append({"paths": paths, "weights": weights})
    (d / faceapi.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_manifest_parsing_dequantises(tmp_path):
    q = np.arange(6, dtype=np.uint8)
    f = np.array([1.5, -2.25], np.float32)
    u16 = np.array([0, 65535], np.uint16)
    blob = q.tobytes() + f.tobytes() + u16.astype("<u2").tobytes()
    weights = [
        {"name": "a", "shape": [2, 3], "dtype": "float32",
         "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}},
        {"name": "b", "shape": [2], "dtype": "float32"},
        {"name": "c", "shape": [2], "dtype": "float32", "quantization": {"dtype": "uint16", "scale": 1e-4, "min": 2.0}},
    ]
    # the group's bytes are split over two shards, mid-weight, as tfjs does at 4 MB boundaries
    _write_manifest(tmp_path, [(["s1", "s2"], weights, [blob[:4], blob[4:]]),
                               (["g2"], [{"name": "d", "shape": [], "dtype": "float32"}], [np.float32(7).tobytes()])])  # fmt: skip
    w = faceapi.read_manifest(tmp_path)
    assert set(w) == {"a", "b", "c", "d"}
    assert w["a"].shape == (2, 3) and torch.equal(w["a"], torch.tensor([[-1.0, -0.5, 0.0], [0.5, 1.0, 1.5]]))
    assert w["b"].tolist() == [1.5, -2.25]
    assert w["c"].tolist() == pytest.approx([2.0, 2.0 + 65535e-4])
    assert w["d"].shape == () and w["d"].item() == 7.0
    assert faceapi.read_manifest(tmp_path / faceapi.MANIFEST_NAME).keys() == w.keys()  # the file itself also works
    with pytest.raises(CheckpointError, match="missing"):
        faceapi.load_faceapi_judge(tmp_path)  # parses, but is not FaceRecognitionNet


@pytest.mark.parametrize("damage, match", [
    ("truncate", "truncated or corrupt"),
    ("extra", "left over"),
    ("no_shard", "cannot read shard"),
    ("bad_json", "cannot read manifest"),
    ("no_manifest", "has no face_recognition_model"),
    ("escape", "outside"),
    ("nan", "non-finite"),
    ("dtype", "unsupported"),
])  # fmt: skip
def test_manifest_corruption_is_a_clear_error(tmp_path, damage, match):
    weights = [{"name": "a", "shape": [4], "dtype": "float32"}]
    blob = np.array([1, 2, 3, np.nan if damage == "nan" else 4], np.float32).tobytes()
    if damage == "dtype":
        weights[0]["quantization"] = {"dtype": "int4", "scale": 1, "min": 0}
    _write_manifest(tmp_path, [(["w.bin"], weights, [blob])])
    mf = tmp_path / faceapi.MANIFEST_NAME
    if damage == "truncate":
        (tmp_path / "w.bin").write_bytes(blob[:10])
    elif damage == "extra":
        (tmp_path / "w.bin").write_bytes(blob + b"\0")
    elif damage == "no_shard":
        (tmp_path / "w.bin").unlink()
    elif damage == "bad_json":
        mf.write_text("[{]")
    elif damage == "no_manifest":
        mf.unlink()
    elif damage == "escape":
        mf.write_text(json.dumps([{"paths": ["../w.bin"], "weights": weights}]))
    with pytest.raises(CheckpointError, match=match):
        faceapi.read_manifest(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        faceapi.load_faceapi_judge(tmp_path / "nowhere")


def _random_faceapi_dir(d: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A complete FaceRecognitionNet manifest with random uint8 weights (TF layouts); returns the float values."""
    rng = np.random.default_rng(seed)
    judge = faceapi.FaceApiJudge()
    shapes: dict[str, tuple[int, ...]] = {}
    for k, v in judge.state_dict().items():
        shapes[k] = tuple(v.shape)
    weights, blobs, values = [], [], {}
    names = sorted(faceapi._expected_manifest_names())
    for name in names:
        if name == "fc":
            shape = [256, 128]
        else:
            layer, kind = name.rsplit("/", 2)[0], "/".join(name.rsplit("/", 2)[1:])
            module = "conv32_down" if layer == "conv32_down" else "blocks." + layer.replace("/", ".")
            cout, cin, kh, kw = shapes[f"{module}.conv.weight"]
            shape = [kh, kw, cin, cout] if kind == "conv/filters" else [cout]
        if len(shape) > 1:  # filters / fc: uniform, zero-mean, std 1/sqrt(fan_in) so activations stay bounded
            c = math.sqrt(3.0 / math.prod(shape[:-1]))
            scale, vmin = 2 * c / 255, -c
        elif name.endswith("scale/weights"):
            scale, vmin = 0.4 / 255, 0.3  # in [0.3, 0.7]
        else:  # biases in [-0.1, 0.1]
            scale, vmin = 0.2 / 255, -0.1
        q = rng.integers(0, 256, math.prod(shape), dtype=np.uint8)
        values[name] = (q * scale + vmin).reshape(shape)
        weights.append({"name": name, "shape": shape, "dtype": "float32",
                        "quantization": {"dtype": "uint8", "scale": scale, "min": vmin}})  # fmt: skip
        blobs.append(q.tobytes())
    _write_manifest(d, [(["face_recognition_model.bin"], weights, [b"".join(blobs)])])
    return values


def test_judge_loads_tf_layouts_and_shapes(tmp_path):
    values = _random_faceapi_dir(tmp_path)
    judge = faceapi.load_faceapi_judge(tmp_path)
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    # filters are HWIO in the manifest, OIHW in torch
    w = values["conv64_down/conv1/conv/filters"]  # (3, 3, 32, 64)
    assert judge.blocks["conv64_down"].conv1.conv.weight[5, 7, 2, 1].item() == pytest.approx(w[2, 1, 7, 5], rel=1e-6)
    assert torch.allclose(judge.fc, torch.from_numpy(values["fc"]).float())
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for b in judge.blocks.values()]
    out = judge(torch.rand(2, 3, 150, 150) * 255)
    for h in hooks:
        h.remove()
    assert out.shape == (2, 128)
    assert sizes == [35] * 3 + [17] * 4 + [8] * 3 + [4] * 3 + [2]  # 150 -> 72 -> 35 -> 17 -> 8 -> 4 -> 2
    e = judge.embed(torch.rand(3, 3, 112, 112) * 2 - 1)
    assert e.shape == (3, 128) and torch.isfinite(e).all()
    with pytest.raises(ValueError, match="112, 112"):
        judge.embed(torch.zeros(1, 3, 150, 150))


def test_chip_warp_geometry():
    a = faceapi.arcface_to_chip()
    # a similarity: equal scale on both axes, no shear; scale ~1.45 (the chip shows the face larger)
    assert a[0, 0] == pytest.approx(a[1, 1]) and a[0, 1] == pytest.approx(-a[1, 0])
    mapped = (a[:, :2] @ faceapi.ARCFACE_TEMPLATE_112.T).T + a[:, 2]
    chip = 150 * (0.25 + faceapi.dlib_template_5pts()) / 1.5
    assert np.abs(mapped - chip).max() < 4.0  # least-squares fit of two 5-point templates: a few pixels apart
    # the grid sends a chip pixel back to the crop point the inverse transform gives
    grid = faceapi.chip_sampling_grid()
    u, v = 75, 60
    src = np.linalg.solve(a[:, :2], np.array([u, v]) - a[:, 2])
    assert grid[0, v, u].tolist() == pytest.approx(((2 * src + 1) / 112 - 1).tolist(), abs=1e-5)
    # a bright dot at the ArcFace nose tip lands on the chip near dlib's nose tip
    img = -torch.ones(1, 3, 112, 112)
    nx, ny = faceapi.ARCFACE_TEMPLATE_112[2].round().astype(int)
    img[..., ny - 1 : ny + 2, nx - 1 : nx + 2] = 1
    chip_img = faceapi.FaceApiJudge().warp(img)[0, 0]
    peak = np.unravel_index(int(chip_img.argmax()), chip_img.shape)
    assert abs(peak[1] - chip[2, 0]) < 4 and abs(peak[0] - chip[2, 1]) < 4


@pytest.mark.skipif(not (FACEAPI / faceapi.MANIFEST_NAME).is_file() or not CELEBA.is_dir(),
                    reason="needs ../shared/models/faceapi and ../shared/data/celeba112 (the shared reference data)")  # fmt: skip
def test_real_judge_separates_identities():
    judge = faceapi.load_faceapi_judge(FACEAPI)
    ids = sorted(p for p in (CELEBA / "val").iterdir() if p.is_dir())[:3]
    files = [sorted(d.iterdir())[j] for d in ids for j in range(2)]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() for f in files])
    with torch.no_grad():
        e = judge.embed(x / 127.5 - 1)
    assert e.shape == (6, 128)
    # dlib descriptors are not unit vectors; this port's have norm ~1.5 on celeba112 (docs/eval.md)
    assert ((e.norm(dim=1) > 1.0) & (e.norm(dim=1) < 2.0)).all()
    d = torch.cdist(e, e)
    label = torch.arange(6) // 2
    same = label[:, None] == label[None, :]
    genuine = d[same & ~torch.eye(6, dtype=torch.bool)]
    impostor = d[~same]
    assert genuine.max() < impostor.min(), (genuine, impostor)
    assert genuine.max() < 0.6 < impostor.min()  # dlib's usual same-person bound (measured: <= 0.43 vs >= 0.83)


# ------------------------------------------------------------------------------------------ ppfr eval
def _tiny_model(tmp_path: Path) -> Path:
    from ppfr.methods import build_method

    opts = {"depth": 18, "width": 8}
    m = build_method("partialface", **opts)
    path = tmp_path / "runs" / "tiny" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": m.state_dict(), "method": "partialface", "method_options": opts}, path)
    return path


def test_cli_eval_end_to_end(tmp_path, capsys):
    from ppfr.cli import main

    pairs = _pair_dataset(tmp_path)
    model = _tiny_model(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", str(model), "--data", str(pairs), "--out", str(out), "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "verification [exact 10-fold (METHODS §7.1 reference" in printed
    assert "flip TTA on] (20 pairs, 10 folds)" in printed
    m = json.loads((out / "metrics.json").read_text())
    v = m["verification"]
    assert m["model"]["method"] == "partialface" and m["flip"] is True
    assert v["pairs"] == 20 and v["folds"] == 10 and len(v["fold_accuracies"]) == 10
    assert 0 <= v["accuracy"] <= 1 and set(v["tpr_at_fpr"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert "| accuracy (%) |" in (out / "metrics.md").read_text()
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same run folder (model.pt inside) and no flip; the run is reproducible (seeded client draws)
    out2 = tmp_path / "eval2"
    args = ["--data", str(pairs), "--out", str(out2), "--no-flip", "--batch-size", "8"]
    assert main(["eval", str(model.parent), *args]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["flip"] is False
    out3 = tmp_path / "eval3"
    assert main(["eval", str(model), "--data", str(pairs), "--out", str(out3), "--no-flip", "--batch-size", "8"]) == 0
    v2, v3 = (json.loads((o / "metrics.json").read_text())["verification"] for o in (out2, out3))
    assert v3["auc"] == v2["auc"] and v3["fold_accuracies"] == v2["fold_accuracies"]


def test_cli_eval_judge_autodetected_and_errors(tmp_path, capsys):
    from ppfr.eval.cli import main as eval_main

    def main(argv):  # the verb's own entry point (``python -m ppfr.eval.cli``), without the leading "eval"
        assert argv[0] == "eval"
        return eval_main(argv[1:])

    pairs = _pair_dataset(tmp_path)
    _random_faceapi_dir(tmp_path / "judge")
    out = tmp_path / "eval"
    tdir = _template_dir(tmp_path / "tpl")
    argv = ["eval", str(tmp_path / "judge"), "--data", str(pairs), "--ijb-dir", str(tdir), "--out", str(out), "--no-flip"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["judge"] == "faceapi" and m["embedding_norm"]["mean"] > 0
    assert m["verification"]["pairs"] == 20
    assert m["ijb"]["template_pairs"] == 8 and m["ijb"]["templates"] == 8 and m["ijb"]["images"] == 16
    assert "## 1:1 template verification" in (out / "metrics.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "missing.pt"), "--data", str(pairs), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--data", str(pairs)]) == 2
    assert "without model.pt" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "judge"), "--judge", "faceapi"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "judge"), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_cli_eval_labels_protocol_and_flip(tmp_path, capsys, monkeypatch):
    from ppfr.eval.cli import main as eval_main

    pairs = _pair_dataset(tmp_path)
    _random_faceapi_dir(tmp_path / "judge")
    tdir = _template_dir(tmp_path / "tpl")
    seen = []
    real = ijb.evaluate_templates

    def spy(*args, **kwargs):
        seen.append(kwargs["flip"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ijb, "evaluate_templates", spy)
    out = tmp_path / "a"
    assert eval_main([str(tmp_path / "judge"), "--data", str(pairs), "--ijb-dir", str(tdir), "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "%" in ln or "AUC" in ln]
    v_line, v_tpr, j_line, j_tpr = lines[:4]
    # defaults: the exact 10-fold protocol with flip TTA; IJB without flip TTA (the reference's use_flip_test=False)
    assert v_line.startswith("verification [exact 10-fold (METHODS §7.1 reference") and "flip TTA on]" in v_line
    assert "TFace IJB_Evaluation rule; flip TTA on]" in v_tpr
    assert j_line.startswith("templates [IJB 1:1 templates (METHODS §7.2 reference") and "flip TTA off]" in j_line
    assert "flip TTA off]" in j_tpr and seen == [False]
    m = json.loads((out / "metrics.json").read_text())
    v, j = m["verification"], m["ijb"]
    assert (v["protocol"], v["flip"], v["full_set"], v["tta"]) == ("reference", True, True, "flip TTA on")
    assert v["protocol_label"].startswith("exact 10-fold") and v["pairs_listed"] == 20
    assert (j["protocol"], j["flip"], j["tta"]) == ("ijb", False, "flip TTA off") and j["protocol_label"]
    assert m["flip"] is True and m["ijb_flip"] is False and "TFace" in v["tpr_rule"] == j["tpr_rule"]
    md = (out / "metrics.md").read_text()
    assert "10-fold verification: exact 10-fold" in md and "; flip TTA on" in md and "; flip TTA off" in md
    # the quick protocol on a subset, IJB flip on, 10-fold flip off; "exact" is the quick protocol's old name
    for name in ("quick", "exact"):
        out = tmp_path / name
        args = [str(tmp_path / "judge"), "--data", str(pairs), "--ijb-dir", str(tdir), "--out", str(out),
                "--protocol", name, "--no-flip", "--ijb-flip", "--max-pairs", "10"]  # fmt: skip
        assert eval_main(args) == 0
        printed = capsys.readouterr().out
        m = json.loads((out / "metrics.json").read_text())
        v, j = m["verification"], m["ijb"]
        assert v["protocol"] == "quick" and v["protocol_label"].startswith("quick 10-fold")
        assert v["protocol_label"].endswith("10 of 20 pairs only (an even spread)") and v["full_set"] is False
        assert v["flip"] is False and j["flip"] is True and m["ijb_flip"] is True and seen[-1] is True
        assert "verification [quick 10-fold" in printed and "10 of 20 pairs only (an even spread); flip TTA off]" in printed
        assert "templates [IJB 1:1" in printed and "; flip TTA on]" in printed
    # the embedding reports its progress on stderr, ending with every image
    capsys.readouterr()
    assert eval_main([str(tmp_path / "judge"), "--data", str(pairs), "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^embedding: (\d+)/\1 images \(\d+ s\)$", err, re.M), err


def test_cli_eval_per_rank_rows_and_summary(tmp_path, capsys):
    """--per-rank: each of PartialFace's m * n ranks pinned (PFpaper Tab.2), min / max / mean beside the main row."""
    from ppfr.eval.cli import main as eval_main, secret_variants
    from ppfr.methods import load_method
    from ppfr.ops.freq import freq_encode

    pairs = _pair_dataset(tmp_path)
    model = _tiny_model(tmp_path)
    out = tmp_path / "eval"
    assert eval_main([str(model), "--data", str(pairs), "--out", str(out), "--per-rank", "--no-flip",
                      "--batch-size", "8"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    method = load_method(model)
    n_ranks = method.space.m * method.space.n  # the code's space: 6 x 3
    b = m["per_rank"]
    assert b["count"] == n_ranks == 18 and list(b["rows"]) == [f"S{i}P{j}" for i in range(6) for j in range(3)]
    accs = [r["accuracy"] for r in b["rows"].values()]
    assert b["min"] == min(accs) and b["max"] == max(accs) and b["mean"] == pytest.approx(np.mean(accs))
    assert all(r["pairs"] == 20 for r in b["rows"].values()) and "verification" in m  # the random-rank row stays
    assert sum(ln.startswith("  S") and "acc" in ln for ln in printed.splitlines()) == n_ranks
    assert f"over {n_ranks} ranks" in printed and "min " in printed and "/ max " in printed and "/ mean " in printed
    assert "min / max / mean over 18" in (out / "metrics.md").read_text()
    # a pinned variant is the server on that one rank's channels, for every image
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    table = method.space.channel_table()
    with torch.no_grad():
        got = secret_variants(method, "cpu")["S2P1"](x)
        ref = method.server(freq_encode(x, table[2, 1]))
    assert torch.allclose(got, ref, atol=1e-5)
    # without --per-rank: no rows; a method without a secret space declares none
    assert eval_main([str(model), "--data", str(pairs), "--out", str(tmp_path / "e2"), "--no-flip"]) == 0
    assert "per_rank" not in json.loads((tmp_path / "e2" / "metrics.json").read_text())
    from ppfr.methods import build_method

    assert secret_variants(build_method("arcface", depth=18, width=4), "cpu") == {}


def test_cli_eval_profacec_rows_per_blur_and_no_flip_by_default(tmp_path, capsys):
    """PRO-Face C (METHODS §6.6): one row per test blur (Gaussian, median, pixelate, hybrid), no flip TTA unless
    asked; the evaluator takes both from the method, not from its name."""
    from ppfr.eval.cli import main as eval_main
    from ppfr.methods import build_method

    pairs = _pair_dataset(tmp_path)
    opts = {"depth": 18, "width": 4}
    m = build_method("profacec", **opts)
    model = tmp_path / "runs" / "pfc" / "model.pt"
    model.parent.mkdir(parents=True)
    torch.save({"model": m.state_dict(), "method": "profacec", "method_options": opts}, model)
    out = tmp_path / "eval"
    assert eval_main([str(model), "--data", str(pairs), "--out", str(out), "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    v, b = metrics["verification"], metrics["variants"]
    assert metrics["flip"] is False and v["flip"] is False and "flip TTA off]" in printed
    assert list(b["rows"]) == ["gaussian", "median", "pixelate", "hybrid"] and b["tta"] == "flip TTA off"
    assert b["rows"]["hybrid"]["accuracy"] == v["accuracy"]  # the configured blur is the main row
    for kind in b["rows"]:
        assert any(ln.startswith(f"  {kind}: acc") for ln in printed.splitlines()), kind
    assert "| gaussian |" in (out / "metrics.md").read_text()
    # --flip turns the TTA on for every row
    out2 = tmp_path / "eval2"
    assert eval_main([str(model), "--data", str(pairs), "--out", str(out2), "--flip", "--batch-size", "8",
                      "--max-pairs", "10"]) == 0  # fmt: skip
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["flip"] is True and m2["variants"]["tta"] == "flip TTA on"


def test_max_pairs_takes_an_even_spread_with_both_labels(tmp_path):
    """A pair list grouped by label (LFW's first 300 pairs are genuine): max_pairs must not keep one label only."""
    from ppfr.data._common import DataFormatError
    from ppfr.eval.verification import pair_scores

    faces = tmp_path / "f"
    faces.mkdir()
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(8):
        img = (torch.rand(112, 112, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(faces / f"{i}.png")
        names.append(f"{i}.png")
    lines = [f"{k % 2} 1 {names[k]} {names[k + 1]}" for k in range(4)]  # genuine first ...
    lines += [f"{k % 2} 0 {names[k]} {names[7 - k]}" for k in range(4)]  # ... impostors after
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")

    def embed(x):
        return x.flatten(1)[:, :16]

    s = pair_scores(embed, str(pairs), image_root=str(faces), max_pairs=4)
    assert len(s.same) == 4 and s.same.any() and not s.same.all() and s.listed == 8
    with pytest.raises(DataFormatError, match="all genuine"):
        pair_scores(embed, str(pairs), image_root=str(faces), max_pairs=1)
