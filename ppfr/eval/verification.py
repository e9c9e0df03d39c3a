"""Verification metrics (METHODS.md §7.1, §7.2): 10-fold accuracy, AUC, ROC and TPR at fixed FPR.

Two 10-fold protocols over pairs ``(fold, same, a, b)``; embeddings are L2-normalised first.

* :func:`ten_fold` (``protocol="exact"``, the trainer's quick check): cosine similarity; for fold k the threshold
  maximising accuracy on the other nine folds is searched over every observed similarity ("same if sim >= t")
  and applied to fold k.
* :func:`ten_fold_sqdist` (``protocol="reference"``, what ``ppfr eval`` reports): exactly TFace/insightface
  ``test/verification.py``: squared Euclidean distance between the normalised embeddings, thresholds
  0.00, 0.01, ..., 3.99, "same if dist < t", the first (smallest) best threshold of the nine training folds.

Both return the mean and (population) std of the ten held-out accuracies. For unit vectors ``dist = 2 - 2 cos``,
so the two differ only in where the threshold may fall (any observed value vs. a 0.01 grid).

ROC / TPR@FPR follow the IJB evaluation (§7.2): :func:`roc_curve` reproduces ``sklearn.metrics.roc_curve``
(one point per distinct score, so tied scores are one threshold; with ``drop_intermediate`` the points whose
second differences of FP and TP counts are both zero dropped; a leading (0, 0) point), and :func:`tpr_at_fpr`
ports TFace's ``IJB_Evaluation.py`` reading: the ROC arrays are reversed (``np.flipud``) and, for each target, the
point minimising ``|fpr - target|`` is taken, ties to the first of the *reversed* arrays (``min`` over
``(distance, index)`` pairs) -- i.e. among equally near points the one with the highest FPR, then highest TPR. No
interpolation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ppfr.data._common import DataFormatError

DEFAULT_FPRS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
REFERENCE_THRESHOLDS = np.arange(0, 4, 0.01)  # TFace / insightface verification.py


@dataclass(frozen=True)
class VerificationResult:
    """accuracy/std in [0, 1]; ``threshold`` is a cosine similarity (``metric="cosine"``, "same if >= t") or a
    squared distance between normalised embeddings (``metric="sqdist"``, "same if < t"), averaged over folds."""

    accuracy: float
    std: float
    threshold: float
    auc: float
    pairs: int
    metric: str = "cosine"
    fold_accuracies: tuple[float, ...] = field(default=(), repr=False)
    fold_thresholds: tuple[float, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        thr = "thr" if self.metric == "cosine" else "sq-dist thr"
        return (f"acc {self.accuracy * 100:.2f} +- {self.std * 100:.2f} % ({thr} {self.threshold:.3f}, "
                f"AUC {self.auc:.4f}, {self.pairs} pairs)")  # fmt: skip


def _best_threshold(sims: np.ndarray, same: np.ndarray) -> float:
    cand = np.unique(sims)
    # accuracy of "same if sim >= t" for every candidate t, vectorised by sorting
    order = np.argsort(sims)
    s, y = sims[order], same[order].astype(np.int64)
    n = len(s)
    neg_below = np.concatenate([[0], np.cumsum(1 - y)])  # negatives strictly below position i
    pos_at_or_above = y.sum() - np.concatenate([[0], np.cumsum(y)])
    idx = np.searchsorted(s, cand, side="left")
    acc = (neg_below[idx] + pos_at_or_above[idx]) / n
    return float(cand[int(np.argmax(acc))])


def auc_score(sims: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    sims, same = np.asarray(sims, np.float64), np.asarray(same, bool)
    pos, neg = sims[same], sims[~same]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _check_pairs(scores: np.ndarray, same: np.ndarray, folds: np.ndarray | None = None) -> None:
    if scores.ndim != 1 or same.shape != scores.shape or (folds is not None and folds.shape != scores.shape):
        raise ValueError(f"scores, labels (and folds) must be 1-D of one length, got {scores.shape}, {same.shape}"
                         + (f", {folds.shape}" if folds is not None else ""))  # fmt: skip
    if len(scores) == 0:
        raise ValueError("no pairs to evaluate")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} non-finite score(s): the embeddings contain NaN/inf")


def ten_fold(sims: np.ndarray, same: np.ndarray, folds: np.ndarray) -> VerificationResult:
    """sims (P,) cosine similarities, same (P,) bool, folds (P,) fold ids -> accuracy over held-out folds."""
    sims, same, folds = np.asarray(sims, np.float64), np.asarray(same, bool), np.asarray(folds)
    _check_pairs(sims, same, folds)
    accs, thrs = [], []
    for f in np.unique(folds):
        test = folds == f
        t = _best_threshold(sims[~test], same[~test]) if (~test).any() else 0.0
        accs.append(float(((sims[test] >= t) == same[test]).mean()))
        thrs.append(t)
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), float(np.mean(thrs)), auc_score(sims, same),
                              len(sims), "cosine", tuple(accs), tuple(thrs))  # fmt: skip


def ten_fold_tar(sims: np.ndarray, same: np.ndarray, folds: np.ndarray, fmr: float) -> dict[str, float]:
    """1:1 TAR at a false match rate with the threshold chosen on the *training* folds only.

    sims (P,) similarities (higher = more alike), same (P,) bool, folds (P,) fold ids. For each fold f: the
    threshold t_f is the one ``tar_at_fmr`` takes on the impostor scores of the other folds (the
    ``floor(fmr * I) + 1``-th largest); the fold's TAR is the fraction of its genuine scores strictly above t_f and its
    FMR the fraction of its impostor scores above t_f. Returns the means over folds: {"tar", "fmr" (measured on the
    test folds), "threshold"}; a fold without genuine (impostor) pairs is left out of the TAR (FMR) mean.
    """
    sims, same, folds = np.asarray(sims, np.float64), np.asarray(same, bool), np.asarray(folds)
    _check_pairs(sims, same, folds)
    if not 0.0 <= fmr <= 1.0:
        raise ValueError(f"fmr must be in [0, 1], got {fmr}")
    tars, fmrs, thrs = [], [], []
    for f in np.unique(folds):
        test = folds == f
        imp = np.sort(sims[~test & ~same])[::-1]
        if imp.size == 0:
            continue
        k = int(np.floor(fmr * imp.size + 1e-9))  # + 1e-9: fmr * I is an integer more often than floats say
        t = -np.inf if k >= imp.size else float(imp[k])
        thrs.append(t)
        if (test & same).any():
            tars.append(float((sims[test & same] > t).mean()))
        if (test & ~same).any():
            fmrs.append(float((sims[test & ~same] > t).mean()))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"tar": mean(tars), "fmr": mean(fmrs), "threshold": mean(thrs)}


def ten_fold_sqdist(dists: np.ndarray, same: np.ndarray, folds: np.ndarray,
                    thresholds: np.ndarray = REFERENCE_THRESHOLDS) -> VerificationResult:  # fmt: skip
    """§7.1 exactly: dists (P,) squared L2 between normalised embeddings (in [0, 4]), same (P,) bool, folds (P,).

    For each fold: accuracy of "same if dist < t" on the other folds for every t of ``thresholds``; the first
    maximiser is applied to the held-out fold. AUC is computed on ``-dists``.
    """
    dists, same, folds = np.asarray(dists, np.float64), np.asarray(same, bool), np.asarray(folds)
    _check_pairs(dists, same, folds)
    thresholds = np.asarray(thresholds, np.float64)
    pred = dists[None, :] < thresholds[:, None]  # (T, P): a few MB even for 7000 pairs
    correct = pred == same[None, :]
    accs, thrs = [], []
    for f in np.unique(folds):
        test = folds == f
        train = ~test
        t = thresholds[int(np.argmax(correct[:, train].mean(1)))] if train.any() else thresholds[0]
        accs.append(float(((dists[test] < t) == same[test]).mean()))
        thrs.append(float(t))
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), float(np.mean(thrs)), auc_score(-dists, same),
                              len(dists), "sqdist", tuple(accs), tuple(thrs))  # fmt: skip


def kfold_ids(n: int, k: int = 10) -> np.ndarray:
    """(n,) fold ids of ``sklearn.model_selection.KFold(k, shuffle=False)``: contiguous, the first n % k folds one
    longer (how the reference splits a ``.bin``'s pairs)."""
    if n < k:
        raise ValueError(f"{n} pairs cannot be split into {k} folds")
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    return np.repeat(np.arange(k), sizes)


# -------------------------------------------------------------------------------------- ROC, TPR@FPR
def roc_curve(scores: np.ndarray, labels: np.ndarray,
              drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """ROC of "positive if score >= threshold" as ``sklearn.metrics.roc_curve`` computes it.

    scores (P,) higher = more similar, labels (P,) bool/{0,1}. Returns (fpr, tpr, thresholds), each (K,): one
    point per distinct score in decreasing order, preceded by (0, 0) at threshold +inf; with
    ``drop_intermediate`` the points on straight segments are dropped (sklearn's default, used by the IJB
    evaluation). Needs at least one positive and one negative.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    _check_pairs(scores, labels)
    if labels.all() or not labels.any():
        raise ValueError("roc_curve needs both positive and negative pairs")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    thr = s[last]
    if drop_intermediate and len(fps) > 2:
        keep = np.nonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps, tps, thr = np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thr]
    return fps / fps[-1], tps / tps[-1], thr


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS,
               rule: str = "nearest") -> dict[float, float]:  # fmt: skip
    """TPR at each target FPR, read off the ROC (sklearn semantics, see :func:`roc_curve`).

    rule ``"nearest"`` (the IJB reference, §7.2; TFace/insightface ``IJB_Evaluation.py`` exactly):
    ``fpr, tpr, _ = roc_curve(label, score)`` (``drop_intermediate=True``), both reversed with ``np.flipud``, then
    per target ``min(zip(abs(fpr - target), range(len(fpr))))``: the nearest ROC point, ties to the first of the
    reversed arrays = the last in ROC order (highest FPR, then highest TPR among equally near points; on a vertical
    ROC segment its top). A target below half the smallest non-zero FPR lands on FPR 0 and reads the highest TPR
    reached there (the fraction of genuine pairs scoring above every impostor), which is not a measurement at the
    target FPR: mind ``1 / negatives``.
    rule ``"at_most"``: the highest TPR among ROC points with FPR <= target (the usual operating-point reading;
    defined at every target).
    """
    if rule not in ("nearest", "at_most"):
        raise ValueError(f"rule must be 'nearest' or 'at_most', got {rule!r}")
    fpr, tpr, _ = roc_curve(scores, labels, drop_intermediate=rule == "nearest")
    if rule == "nearest":
        rf, rt = fpr[::-1], tpr[::-1]  # np.flipud; np.argmin's first minimum == min over (distance, index)
        return {float(t): float(rt[int(np.argmin(np.abs(rf - t)))]) for t in fprs}
    return {float(t): float(tpr[fpr <= t].max()) for t in fprs}


# ------------------------------------------------------------------------------------------- embedding
@dataclass
class PairScores:
    """Per-pair results of embedding a verification set: sims (P,) cosine, dists (P,) squared L2 of the normalised
    embeddings, same (P,) bool, folds (P,) fold ids; ``unreadable`` = images that could not be decoded;
    ``listed`` = pairs in the set (more than P when ``max_pairs`` cut it)."""

    sims: np.ndarray
    dists: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    images: int
    unreadable: int = 0
    listed: int = 0


def open_pairs(data: str, image_root: str | None = None):
    """(source, pairs (P, 4) int64 rows (fold, same, a, b)) for a pair list or an insightface ``.bin``."""
    from ppfr.data.sources import BinSource, PairSource

    if str(data).lower().endswith(".bin"):
        src = BinSource(data)
        p = src.set.num_pairs
        try:
            folds = kfold_ids(p)
        except ValueError as exc:  # too few pairs: the file's fault, so the data layer's one error type
            raise DataFormatError(f"{data}: {exc} (a .bin is evaluated in 10 contiguous folds)") from None
        pairs = np.stack([folds, src.issame.astype(np.int64), 2 * np.arange(p), 2 * np.arange(p) + 1], axis=1)
        return src, pairs.astype(np.int64)
    src = PairSource(data, image_root)
    return src, src.pairs


@torch.no_grad()
def embed_source(embed: Callable[[torch.Tensor], torch.Tensor], source, *, batch_size: int = 64, flip: bool = False,
                 num_workers: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
    """Embed every image of ``source`` (in source order) with ``embed(images (B,3,112,112) in [-1,1]) -> (B, D)``.

    flip: test-time augmentation of §7.1, ``embed(x) + embed(x.flip(-1))`` (the flip happens on the RGB image,
    before whatever client transform ``embed`` applies). ``progress(done, total)`` is called after every batch.
    Returns (L2-normalised embeddings (N, D) float32, ok (N,) bool): rows of images that could not be decoded are
    zero and ``ok`` is False there.
    """
    from ppfr.data.config import DataConfig
    from ppfr.data.loader import make_loader

    loader = make_loader(DataConfig(source=str(source.path), backend="torch", batch_size=batch_size, train=False,
                                    num_workers=num_workers, world_size=1, rank=0), source=source)  # fmt: skip
    chunks, idx = [], []
    for images, labels in loader:
        e = embed(images).float()
        if flip:
            e = e + embed(images.flip(-1)).float()
        chunks.append(F.normalize(e, dim=1).cpu())
        idx.append(labels)
        if progress is not None:
            progress(sum(len(i) for i in idx), len(source))
    emb = torch.zeros(len(source), chunks[0].shape[1])
    ok = np.zeros(len(source), dtype=bool)
    idx_all = torch.cat(idx)
    emb[idx_all] = torch.cat(chunks)
    ok[idx_all.numpy()] = True
    return emb, ok


def pair_scores(embed: Callable[[torch.Tensor], torch.Tensor], data: str, *, image_root: str | None = None,
                batch_size: int = 64, flip: bool = False, num_workers: int = 0,
                max_pairs: int | None = None, progress: Callable[[int, int], None] | None = None) -> PairScores:  # fmt: skip
    """Embed a pair list / ``.bin`` (see :func:`embed_source`) and score every pair."""
    src, pairs = open_pairs(data, image_root)
    emb, ok = embed_source(embed, src, batch_size=batch_size, flip=flip, num_workers=num_workers, progress=progress)
    listed = len(pairs)
    if max_pairs is not None and max_pairs < listed:
        # an even spread over the listing, not its head: pair lists are grouped (LFW's first 300 pairs are all
        # genuine), so the first N pairs could hold one label and one fold only
        pairs = pairs[np.unique(np.linspace(0, listed - 1, max_pairs).round().astype(np.int64))]
    if max_pairs is not None and len(np.unique(pairs[:, 1])) < 2:
        raise DataFormatError(f"{data}: the {len(pairs)} pair(s) evaluated are all "
                              f"{'genuine' if pairs[0, 1] else 'impostor'}; verification needs both kinds "
                              "(raise max_pairs)")  # fmt: skip
    a, b = emb[pairs[:, 2]].double(), emb[pairs[:, 3]].double()
    sims = (a * b).sum(1).numpy()
    dists = (a - b).pow(2).sum(1).numpy()
    return PairScores(sims, dists, pairs[:, 1].astype(bool), pairs[:, 0], len(src), int((~ok).sum()), listed)


def evaluate_pairs(embed, pairs_file: str, *, batch_size: int = 64, image_root: str | None = None,
                   generator_seed: int = 0, num_workers: int = 0, max_pairs: int | None = None,
                   flip: bool = False, protocol: str = "exact") -> VerificationResult:  # fmt: skip
    """Embed every image of a pair list (or ``.bin``) with ``embed(images (B,3,112,112) in [-1,1]) -> (B, D)`` and
    run 10-fold: ``protocol="exact"`` (:func:`ten_fold`) or ``"reference"`` (:func:`ten_fold_sqdist`, §7.1)."""
    if protocol not in ("exact", "reference"):
        raise ValueError(f"protocol must be 'exact' or 'reference', got {protocol!r}")
    s = pair_scores(embed, pairs_file, image_root=image_root, batch_size=batch_size, flip=flip,
                    num_workers=num_workers, max_pairs=max_pairs)  # fmt: skip
    if protocol == "exact":
        return ten_fold(s.sims, s.same, s.folds)
    return ten_fold_sqdist(s.dists, s.same, s.folds)
