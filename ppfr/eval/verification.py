"""10-fold verification (METHODS.md §7.1): LFW-style accuracy with a threshold chosen on the other nine folds.

Embeddings are L2-normalised and compared by cosine similarity. For fold k the threshold maximising accuracy on the
other folds is applied to fold k; the result is the mean and std of the ten test accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float
    std: float
    threshold: float
    auc: float
    pairs: int

    def __str__(self) -> str:
        return f"acc {self.accuracy * 100:.2f} +- {self.std * 100:.2f} % (thr {self.threshold:.3f}, AUC {self.auc:.4f}, {self.pairs} pairs)"


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


def ten_fold(sims: np.ndarray, same: np.ndarray, folds: np.ndarray) -> VerificationResult:
    """sims (P,) similarities, same (P,) bool, folds (P,) fold ids -> accuracy over held-out folds."""
    sims, same, folds = np.asarray(sims, np.float64), np.asarray(same, bool), np.asarray(folds)
    accs, thrs = [], []
    for f in np.unique(folds):
        test = folds == f
        t = _best_threshold(sims[~test], same[~test]) if (~test).any() else 0.0
        accs.append(float(((sims[test] >= t) == same[test]).mean()))
        thrs.append(t)
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), float(np.mean(thrs)), auc_score(sims, same),
                              len(sims))  # fmt: skip


@torch.no_grad()
def evaluate_pairs(embed, pairs_file: str, *, batch_size: int = 64, image_root: str | None = None,
                   generator_seed: int = 0, num_workers: int = 0, max_pairs: int | None = None) -> VerificationResult:  # fmt: skip
    """Embed every image of a pair list with ``embed(images (B,3,112,112) in [-1,1]) -> (B, D)`` and run 10-fold."""
    from ppfr.data.config import DataConfig
    from ppfr.data.loader import make_loader
    from ppfr.data.sources import PairSource

    src = PairSource(pairs_file, image_root)
    loader = make_loader(DataConfig(source=pairs_file, backend="torch", batch_size=batch_size, train=False,
                                    num_workers=num_workers, world_size=1, rank=0), source=src)  # fmt: skip
    chunks, idx = [], []
    for images, labels in loader:
        chunks.append(F.normalize(embed(images).float(), dim=1))
        idx.append(labels)
    emb = torch.zeros(len(src.files), chunks[0].shape[1])
    emb[torch.cat(idx)] = torch.cat(chunks)
    pairs = src.pairs if max_pairs is None else src.pairs[:max_pairs]
    sims = (emb[pairs[:, 2]] * emb[pairs[:, 3]]).sum(1).numpy()
    return ten_fold(sims, pairs[:, 1].astype(bool), pairs[:, 0])
