"""Linkage scoring: closed-set identification (1:N) and asymmetric pair verification (1:1) of embeddings.

What every linkage form is scored with (:func:`score_linkage`), separate from how the forms are trained
(:mod:`.linkers`) and run (:mod:`.linkage`). 1:N: top-1 / top-k and TAR at FMR over all query x gallery scores.
1:1: 10-fold accuracy and TAR@FMR of (query a, reference b) pairs of a pair list, each fold's threshold chosen on
the other nine folds only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppfr.data.sources import PairSource
from ppfr.eval.attacks.common import AttackError
from ppfr.eval.attacks.data import FaceSet, identity_index
from ppfr.eval.verification import ten_fold

# The FMRs of ``tar_at_fmr``, keyed as they appear in result.json.
FMRS: dict[str, float] = {"1e-2": 1e-2, "1e-3": 1e-3}


def tar_at_fmr(genuine: torch.Tensor | np.ndarray, impostor: torch.Tensor | np.ndarray, fmr: float) -> float | None:
    """True accept rate at a false match rate, exactly (no interpolation).

    genuine (G,), impostor (I,) similarity scores (higher = more alike). The threshold t is the score that
    ``floor(fmr * I)`` impostor scores exceed: the ``floor(fmr * I) + 1``-th largest impostor score, so that at most
    ``fmr * I`` impostors score strictly above it (fewer where scores tie). TAR = fraction of genuine scores
    strictly above t. None when either list is empty.
    """
    gen = np.asarray(genuine, dtype=np.float64).ravel()
    imp = np.sort(np.asarray(impostor, dtype=np.float64).ravel())[::-1]
    if gen.size == 0 or imp.size == 0:
        return None
    if not 0.0 <= fmr <= 1.0:
        raise ValueError(f"fmr must be in [0, 1], got {fmr}")
    k = int(math.floor(fmr * imp.size + 1e-9))  # + 1e-9: fmr * I is an integer more often than floats say
    if k >= imp.size:  # every impostor may pass: accept everything
        return 1.0
    return float((gen > imp[k]).mean())


def linkage_metrics(query_emb: torch.Tensor, gallery_emb: torch.Tensor, query_ids: torch.Tensor,
                    gallery_ids: torch.Tensor, topk: int) -> dict[str, Any]:  # fmt: skip
    """Closed-set identification and verification figures of queries against a gallery, by cosine similarity.

    query_emb (Q, D), gallery_emb (G, D) (any scale: L2-normalised here); query_ids (Q,), gallery_ids (G,) integer
    identities. Returns ``linkage_top1`` / ``linkage_topk``: fraction of queries with an entry of their identity
    among the 1 / ``topk`` most similar gallery entries (ties broken by gallery order; a query whose identity is not
    in the gallery always misses); ``tar_at_fmr``: {"1e-2": TAR, "1e-3": TAR} (:func:`tar_at_fmr`) over all
    Q x G scores, genuine = same identity; ``topk``; ``n_queries``; ``n_gallery``.
    """
    if query_emb.dim() != 2 or gallery_emb.dim() != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"embeddings must be (Q, D) and (G, D), got {tuple(query_emb.shape)} and "
                         f"{tuple(gallery_emb.shape)}")  # fmt: skip
    q_ids, g_ids = torch.as_tensor(query_ids).long().cpu(), torch.as_tensor(gallery_ids).long().cpu()
    if q_ids.shape != (query_emb.shape[0],) or g_ids.shape != (gallery_emb.shape[0],):
        raise ValueError("query_ids / gallery_ids must give one identity per embedding row")
    if len(g_ids) == 0 or len(q_ids) == 0:
        raise ValueError("linkage needs at least one query and one gallery entry")
    if not 1 <= topk <= len(g_ids):
        raise ValueError(f"topk must be in [1, {len(g_ids)}] (the gallery size), got {topk}")
    scores = F.normalize(query_emb.double().cpu(), dim=1) @ F.normalize(gallery_emb.double().cpu(), dim=1).T
    # stable descending sort: equal scores keep gallery order, so the figures are reproducible
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :topk]
    hit = g_ids[order] == q_ids[:, None]  # (Q, k)
    same = q_ids[:, None] == g_ids[None, :]  # (Q, G)
    return {
        "linkage_top1": float(hit[:, 0].double().mean()),
        "linkage_topk": float(hit.any(dim=1).double().mean()),
        "tar_at_fmr": {name: tar_at_fmr(scores[same], scores[~same], f) for name, f in FMRS.items()},
        "topk": int(topk),
        "n_queries": int(len(q_ids)),
        "n_gallery": int(len(g_ids)),
    }


def chance_metrics(n_gallery: int, topk: int) -> dict[str, Any]:
    """What a guesser gets: top-1 1/G, top-k k/G, TAR@FMR = the FMR, pair accuracy 0.5."""
    return {"linkage_top1": 1.0 / n_gallery, "linkage_topk": min(topk, n_gallery) / n_gallery,
            "tar_at_fmr": dict(FMRS), "pair_acc": 0.5}  # fmt: skip


def gallery_split(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery, queries) indices into ``ids`` (N,): the first face of every identity, and every other face."""
    ids = torch.as_tensor(ids).long()
    first: dict[int, int] = {}
    for i, v in enumerate(ids.tolist()):
        first.setdefault(v, i)
    is_gallery = torch.zeros(len(ids), dtype=torch.bool)
    is_gallery[list(first.values())] = True
    return torch.nonzero(is_gallery).flatten(), torch.nonzero(~is_gallery).flatten()


def cross_pair_scores(query_emb: torch.Tensor, ref_emb: torch.Tensor, labels: torch.Tensor,
                      pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:  # fmt: skip
    """Asymmetric pairs: row (fold, same, a, b) of a pair list compares image a's *query* embedding with image b's
    *reference* embedding (protected a vs clean b). Returns (sims (P,), same (P,) bool, folds (P,)), cosine.

    query_emb, ref_emb (N, D): row i is the held-out face whose pair-list file index is ``labels[i]``. Pairs that
    name an image not loaded are left out; None when none is left.
    """
    labels = torch.as_tensor(labels).long()
    n = int(max(int(labels.max()), int(pairs[:, 2:].max()))) + 1
    row = torch.full((n,), -1, dtype=torch.long)
    row[labels] = torch.arange(len(labels))
    a, b = row[torch.from_numpy(pairs[:, 2])], row[torch.from_numpy(pairs[:, 3])]
    keep = (a >= 0) & (b >= 0)
    if not bool(keep.any()):
        return None
    q, r = F.normalize(query_emb.double(), dim=1), F.normalize(ref_emb.double(), dim=1)
    kept = pairs[keep.numpy()]
    return (q[a[keep]] * r[b[keep]]).sum(1).numpy(), kept[:, 1].astype(bool), kept[:, 0]


def one_to_one(query_emb: torch.Tensor, ref_emb: torch.Tensor, labels: torch.Tensor,
               pairs: np.ndarray) -> dict[str, Any] | None:  # fmt: skip
    """The 1:1 row of :func:`cross_pair_scores`' pairs: 10-fold accuracy (:func:`ten_fold`) and TAR at each FMR of
    :data:`FMRS` (:func:`ten_fold_tar`), every fold's threshold chosen on the other nine; None without pairs."""
    from ppfr.eval.verification import ten_fold_tar

    scores = cross_pair_scores(query_emb, ref_emb, labels, pairs)
    if scores is None:
        return None
    res = ten_fold(*scores)
    return {"accuracy": res.accuracy, "std": res.std, "threshold": res.threshold, "auc": res.auc,
            "pairs": res.pairs, "tar_at_fmr": {k: ten_fold_tar(*scores, f) for k, f in FMRS.items()}}  # fmt: skip


def score_linkage(linked: torch.Tensor, ref: torch.Tensor, val: FaceSet, topk: int,
                  anchor: torch.Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """The protocol of the module docstring on held-out embeddings: linked (N, D) = protected faces through the
    attacker, ref (N, D) = the gallery side (clean faces through the teacher; the insider's own protection), row
    i = ``val`` face i; ``anchor`` (N, D): clean faces through the teacher (default ``ref``). Returns the attack's
    metrics (1:N; ``pair_acc`` / ``pair``: the 1:1 10-fold accuracy and TAR@FMR with thresholds from the training
    folds) and the ``teacher_clean`` and ``chance`` anchor rows."""
    anchor = ref if anchor is None else anchor
    ids = identity_index(val)
    gal, qry = gallery_split(ids)
    if len(qry) == 0:
        raise AttackError("linkage needs held-out identities with at least 2 faces (one gallery face, one query)")
    out = linkage_metrics(linked[qry], ref[gal], ids[qry], ids[gal], topk)
    anc = linkage_metrics(anchor[qry], anchor[gal], ids[qry], ids[gal], topk)
    out["pair_acc"] = anc["pair_acc"] = None
    out["pair"] = anc["pair"] = None
    if isinstance(val.source, PairSource):
        pairs = val.source.pairs
        for res, (q, r) in ((out, (linked, ref)), (anc, (anchor, anchor))):
            res["pair"] = one_to_one(q, r, val.labels, pairs)
            res["pair_acc"] = res["pair"]["accuracy"] if res["pair"] is not None else None
    chance = chance_metrics(len(gal), topk)
    if out["pair_acc"] is None:
        chance["pair_acc"] = None
    out["teacher_clean"] = {k: anc[k] for k in ("linkage_top1", "linkage_topk", "tar_at_fmr", "pair_acc", "pair")}
    out["chance"] = chance
    return out
