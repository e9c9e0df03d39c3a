"""Identity linkage: link protected queries to a clean gallery through a pretrained recogniser's embedding space.

A FaceLinkGen-style attack (Guo & Du 2026). It asks the question a privacy claim has to answer first: not "can the
face be redrawn?" but "can the person be found?".

Threat model
    The attacker sees a protected payload (exactly what leaves the client, ``Method.protect``) and holds a *clean
    gallery* of the people it looks for: one ordinary photo per identity. It owns a pretrained face recogniser, the
    *teacher* (``ctx.judge``: the face-api.js judge by default, or any ``model.pt``), and public faces of other
    people (``ctx.train``, identities disjoint from the held-out ones) that it can protect itself: it knows the
    method (white box) but, under ``secrets=fresh``, not the per-image secret of any payload (PartialFace's rank,
    ...); under ``secrets=fixed`` it holds the client's one key. It trains a model that maps payloads into the
    teacher's embedding space, loss ``1 - cos(linker(protect(x)), teacher(x))`` on its public faces, and then ranks
    the gallery by cosine similarity to each linked query.

Forms (``AttackConfig.linkage_form``; ``auto`` = ``adapter``, the strongest that applies)
    * ``adapter`` -- payload -> image network -> *frozen* teacher. The network is a :class:`RecoveryAttacker`
      (payload stem + small U-Net + 1x1 shortcut). Where the payload is a known linear function of the face
      (``inversion.Inverter.for_method`` is not None) the closed-form estimate is both added to the network's
      input and the base of its output: image = estimate + learned correction, the correction initialised to
      exactly zero, so the untrained adapter *is* the inversion. Elsewhere the U-Net's head starts at zero and the
      shortcut is the least-squares per-pixel linear decoder of the payload, so the untrained adapter is the best
      linear read-out of the payload (for the plain image: the image itself). The teacher keeps its weights (it
      gets no gradient, stays in eval mode); gradients flow through it into the adapter.
    * ``student`` -- FaceLinkGen's own form: a from-scratch IR-18 (base width 16) on the payload (through a
      :class:`PayloadStem` that standardises and projects the payload tensors to ``stem_width`` channels) trained to
      output the teacher's embedding of the clean face directly.

Protocol (held-out identities, ``ctx.val``)
    Identities from :func:`identity_index`. Gallery: the first face (by index) of every identity, *clean*, embedded
    by the teacher. Queries: every other face of the identities with >= 2 faces, *protected* with the evaluation
    secrets (``protect_with(..., EVAL_STREAM, batch_no)``), embedded by the linker. Reported (:func:`linkage_metrics`):
    top-1 and top-k identification rates, TAR at FMR 1e-2 / 1e-3 over all query x gallery cosine scores, and, when
    ``ctx.val`` is a pair list, the 10-fold verification accuracy of (protected a, clean b) pairs. Two anchor rows
    bound the figures: ``teacher_clean`` (clean queries through the teacher: what linkage can at best reach) and
    ``chance``.

Nothing is cached across images: the inversion estimate is computed per batch from that batch's payload, and the
held-out faces are only ever scored, never trained on.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.data.sources import PairSource
from ppfr.eval.attacks import register_attack
from ppfr.eval.attacks.common import (
    EVAL_STREAM, NORM_STREAM, RESULT_KEYS, TRAIN_STREAM, Attack, AttackConfig, AttackContext, AttackError, FaceSet,
    Judge, fit_attacker, identity_index, payload_shapes, protect_with,
)  # fmt: skip
from ppfr.eval.attacks.recovery import PayloadStem, RecoveryAttacker
from ppfr.eval.verification import VerificationResult, ten_fold
from ppfr.methods.base import Method, Payload
from ppfr.models.ir import IRNet

# The FMRs of ``tar_at_fmr``, keyed as they appear in result.json.
FMRS: dict[str, float] = {"1e-2": 1e-2, "1e-3": 1e-3}
# Name of the extra adapter input carrying the inversion estimate (the recovery kind's name for it too).
INVERSION_KEY = "inversion"
STUDENT_DEPTH, STUDENT_WIDTH = 18, 16
# 1 - cos below this over 10 steps: the linker already reproduces the teacher (cos > 0.9999, e.g. through an exact
# inversion of ArcFace-FD's payload); more steps cannot change the figures, only cost minutes.
CONVERGED_LOSS = 1e-4


# ------------------------------------------------------------------------------------------------ metrics
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


def cross_pair_verification(query_emb: torch.Tensor, ref_emb: torch.Tensor, labels: torch.Tensor,
                            pairs: np.ndarray) -> VerificationResult | None:  # fmt: skip
    """10-fold verification of asymmetric pairs: row (fold, same, a, b) of a pair list compares image a's *query*
    embedding with image b's *reference* embedding (protected a vs clean b).

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
    sims = (q[a[keep]] * r[b[keep]]).sum(1).numpy()
    kept = pairs[keep.numpy()]
    return ten_fold(sims, kept[:, 1].astype(bool), kept[:, 0])


# ------------------------------------------------------------------------------------------------ teacher
def _teacher_modules(judge: Judge) -> list[nn.Module]:
    """The nn.Modules behind ``judge.embed``: the callable itself, the object of a bound method, or modules the
    closure captured (``make_judge``'s lambdas). Best effort: a module reached otherwise is not found, which only
    costs the gradients of its weights (the optimiser never holds them)."""
    found: list[nn.Module] = []
    explicit = getattr(judge, "module", None)
    for obj in (explicit, judge.embed, getattr(judge.embed, "__self__", None)):
        if isinstance(obj, nn.Module):
            found.append(obj)
    for cell in getattr(judge.embed, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(v, nn.Module):
            found.append(v)
    return list({id(m): m for m in found}.values())


@contextlib.contextmanager
def frozen_teacher(judge: Judge) -> Iterator[None]:
    """Put the teacher's modules in eval mode with ``requires_grad=False`` for the duration (BN statistics and
    weights must not move; gradients still flow through it to its input), then restore their flags: the judge is
    shared with the other attack kinds of the run."""
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in _teacher_modules(judge)]
    for m, _, _ in saved:
        m.eval().requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


@torch.no_grad()
def teacher_embed(judge: Judge, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, D) L2-normalised float32 teacher embeddings, without gradients."""
    return F.normalize(judge.embed(x).float(), dim=1)


# ------------------------------------------------------------------------------------------------ linkers
def inverter_for(ctx: AttackContext) -> Any | None:
    """The closed-form inverter of the target's payload (``inversion.Inverter``), or None where the payload is not
    linear. Shared with the other kinds of the run through ``ctx.shared["inverter"]``: it holds only the public
    prior (the mean training face) and data-independent factorisations, nothing of the held-out faces."""
    inv = ctx.shared.get("inverter")
    if inv is None:
        from ppfr.eval.attacks.inversion import Inverter

        inv = Inverter.for_method(ctx.method, ctx.train, ctx.cfg)
        if inv is not None:
            ctx.shared["inverter"] = inv
    return inv


class Linker:
    """A trained (or being trained) linkage model: payload -> teacher-space embedding.

    ``net`` holds every trainable parameter; the teacher and the inverter are used, never owned (their weights are
    not in ``net.parameters()``, so the optimiser cannot move them).
    """

    def __init__(self, form: str, net: nn.Module, inverter: Any | None = None) -> None:
        self.form, self.net, self.inverter = form, net, inverter

    @property
    def produces_images(self) -> bool:
        return self.form == "adapter"

    def inputs(self, payload: Payload) -> dict[str, torch.Tensor]:
        """The network's input tensors: the payload's, plus (seeded adapter) the inversion estimate
        ``INVERSION_KEY`` (B, 3, H, W) in [-1, 1], computed from this batch's payload alone."""
        tensors = dict(payload.tensors)
        if self.inverter is not None:
            with torch.no_grad():
                tensors[INVERSION_KEY] = self.inverter.recover(payload).float()
        return tensors

    def images(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Adapter only: (B, 3, H, W) face images, nominally [-1, 1] but unclamped (the teacher sees the raw
        output, so the gradient never vanishes at a clamp). ``2 * net - 1`` (+ the inversion estimate when
        seeded: the net's zero-initialised correction is centred on 0.5)."""
        out = 2.0 * self.net(tensors) - 1.0
        if INVERSION_KEY in tensors:
            out = out + tensors[INVERSION_KEY]
        return out

    def embed(self, payload: Payload, judge: Judge) -> torch.Tensor:
        """(B, D) raw embeddings of a payload batch; differentiable in ``net``'s parameters."""
        tensors = self.inputs(payload)
        if self.form == "adapter":
            return judge.embed(self.images(tensors).contiguous())
        return self.net(tensors)


class StudentNet(nn.Module):
    """FaceLinkGen's student: :class:`PayloadStem` (-> ``width`` channels at 112x112) then IR-18 (base width 16)
    -> (B, D) embedding. forward({name: (B, C_i, H_i, W_i)}) -> (B, D)."""

    def __init__(self, shapes: dict[str, tuple[int, int, int]], width: int, embedding_size: int,
                 size: int = 112) -> None:  # fmt: skip
        super().__init__()
        self.stem = PayloadStem(shapes, width, size)
        self.ir = IRNet(depth=STUDENT_DEPTH, in_channels=width, embedding_size=embedding_size, input_size=size,
                        base_width=STUDENT_WIDTH)  # fmt: skip

    def forward(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.ir(self.stem(tensors))


def resolve_form(cfg: AttackConfig) -> str:
    """``auto`` -> ``adapter`` (a pretrained teacher's whole feature hierarchy beats a student trained from
    scratch on a few thousand faces); otherwise the form asked for."""
    return "adapter" if cfg.linkage_form == "auto" else cfg.linkage_form


def _norm_batches(method: Method, train: FaceSet, cfg: AttackConfig, inverter: Any | None,
                  device: torch.device | str) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:  # fmt: skip
    """``cfg.norm_batches`` (clean faces (B, 3, S, S) in [-1, 1], network inputs) of training faces, for the
    stem's standardisation and the adapter's least-squares read-out."""
    g = torch.Generator().manual_seed(cfg.seed * 2 + 1)
    linker = Linker("probe", nn.Identity(), inverter)
    out = []
    for i in range(cfg.norm_batches):
        idx = torch.randint(len(train), (min(cfg.linkage_batch_size, len(train)),), generator=g)
        x = train.batch(idx).to(device)
        out.append((x, linker.inputs(protect_with(method, x, cfg, NORM_STREAM, i))))
    return out


@torch.no_grad()
def _fit_readout(net: RecoveryAttacker, batches: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 ridge: float = 1e-6) -> None:  # fmt: skip
    """Set the adapter's 1x1 shortcut to the least-squares per-pixel map from stem features to the clean face
    (``shortcut(h) + 0.5 ~ x / 2 + 1 / 2``), with a ridge of ``ridge`` x the mean feature energy; float64 normal
    equations, accumulated per batch. With the U-Net's head at zero the adapter then starts as the best per-pixel
    linear decoder of the payload: exactly the image for the identity payload."""
    w = net.shortcut.in_channels
    hth = torch.zeros(w + 1, w + 1, dtype=torch.float64)
    hty = torch.zeros(w + 1, 3, dtype=torch.float64)
    for x, tensors in batches:
        h = net.stem(tensors).double().permute(0, 2, 3, 1).reshape(-1, w).cpu()
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=torch.float64)], dim=1)
        y = (x.double() * 0.5).permute(0, 2, 3, 1).reshape(-1, 3).cpu()
        hth += h.T @ h
        hty += h.T @ y
    reg = ridge * float(hth.diagonal()[:w].mean()) * torch.eye(w + 1, dtype=torch.float64)
    reg[w, w] = 0.0  # the bias is not shrunk
    sol = torch.linalg.solve(hth + reg, hty)  # (w + 1, 3)
    dev = net.shortcut.weight.device
    net.shortcut.weight.copy_(sol[:w].T.reshape(3, w, 1, 1).to(dev, torch.float32))
    net.shortcut.bias.copy_(sol[w].to(dev, torch.float32))


def build_linker(form: str, method: Method, train: FaceSet, cfg: AttackConfig, embedding_size: int,
                 device: torch.device | str = "cpu", inverter: Any | None = None) -> Linker:  # fmt: skip
    """A linker of ``form`` sized for ``method``'s payload, its stem standardisation fitted on training payloads.

    Adapter: seeded with ``inverter`` when given (:func:`inverter_for`; head and shortcut at zero: the untrained
    output is the estimate), else head at zero and the shortcut the least-squares read-out. Student: IR-18 on the
    stem (``inverter`` ignored: FaceLinkGen's student sees the payload only). ``embedding_size``: the teacher's D.
    Parameter init draws from the global RNG; :meth:`LinkageAttack.run` seeds and restores it around this.
    """
    if form != "adapter":
        inverter = None
    batches = _norm_batches(method, train, cfg, inverter, device)
    shapes = payload_shapes(Payload("probe", batches[0][1]))
    size = int(train.images.shape[-1])
    if form == "adapter":
        net: nn.Module = RecoveryAttacker(shapes, stem_width=cfg.stem_width, base_width=cfg.base_width, size=size)
        net.to(device)
        net.stem.fit(t for _, t in batches)
        nn.init.zeros_(net.unet.head.weight)
        nn.init.zeros_(net.unet.head.bias)
        if inverter is not None:
            nn.init.zeros_(net.shortcut.weight)
            nn.init.zeros_(net.shortcut.bias)
        else:
            _fit_readout(net, batches)
    elif form == "student":
        net = StudentNet(shapes, cfg.stem_width, embedding_size, size).to(device)
        net.stem.fit(t for _, t in batches)
    else:
        raise AttackError(f"AttackConfig.linkage_form: unknown form {form!r} (auto|adapter|student)")
    return Linker(form, net, inverter)


def train_linker(linker: Linker, method: Method, judge: Judge, train: FaceSet, cfg: AttackConfig,
                 device: torch.device | str = "cpu",
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:  # fmt: skip
    """Train ``linker.net`` for ``cfg.linkage_steps`` steps of ``cfg.linkage_batch_size`` training faces.

    Each step: random faces (random flips when ``cfg.flip``), protected under ``cfg.secrets`` (fresh secrets per
    step, or the fixed key), loss ``1 - cos(linker(payload), teacher(clean face))`` averaged over the batch; Adam at
    ``cfg.linkage_lr``, cosine-decayed to 0. Stops early at ``cfg.time_limit`` seconds. Returns steps, seconds,
    images/s, first/last loss (means over ``log_every``-step windows) and the loss curve.
    """

    def loss_fn(x: torch.Tensor, step: int) -> torch.Tensor:
        target = teacher_embed(judge, x)
        payload = protect_with(method, x, cfg, TRAIN_STREAM, step)
        z = F.normalize(linker.embed(payload, judge).float(), dim=1)
        return 1.0 - (z * target).sum(1).mean()

    return fit_attacker(linker.net, loss_fn, train, cfg, steps=cfg.linkage_steps, lr=cfg.linkage_lr,
                        batch_size=cfg.linkage_batch_size, seed=cfg.seed * 2 + 2, name="linkage", device=device,
                        log=log, stop_below=CONVERGED_LOSS)  # fmt: skip


@torch.no_grad()
def embed_heldout(linker: Linker, ctx: AttackContext, grid: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Every held-out face, clean through the teacher and protected (evaluation secrets, batch k of
    ``cfg.eval_batch_size`` faces in index order -> ``protect_with(..., EVAL_STREAM, k)``) through the linker.

    Returns (linked (N, D), clean (N, D)), both L2-normalised float32 on the CPU, and for the adapter the images
    (len(grid), 3, H, W) in [0, 1] of the held-out faces ``grid`` (from the same evaluation pass), else None.
    """
    cfg, val = ctx.cfg, ctx.val
    linker.net.eval()
    picks = {int(i): j for j, i in enumerate(grid.tolist())} if grid is not None and len(grid) else {}
    linked, clean = [], []
    shots: dict[int, torch.Tensor] = {}
    for k, start in enumerate(range(0, len(val), cfg.eval_batch_size)):
        idx = torch.arange(start, min(start + cfg.eval_batch_size, len(val)))
        x = val.batch(idx).to(ctx.device)
        clean.append(teacher_embed(ctx.judge, x).cpu())
        tensors = linker.inputs(protect_with(ctx.method, x, cfg, EVAL_STREAM, k))
        if linker.produces_images:
            img = linker.images(tensors)
            linked.append(F.normalize(ctx.judge.embed(img.contiguous()).float(), dim=1).cpu())
            for r, i in enumerate(idx.tolist()):
                if i in picks:
                    shots[picks[i]] = (img[r] * 0.5 + 0.5).clamp(0, 1).float().cpu()
        else:
            linked.append(F.normalize(linker.net(tensors).float(), dim=1).cpu())
    images = torch.stack([shots[j] for j in range(len(picks))]) if picks and linker.produces_images else None
    return torch.cat(linked), torch.cat(clean), images


def _pair_row(res: VerificationResult | None) -> dict[str, Any] | None:
    return None if res is None else {"accuracy": res.accuracy, "std": res.std, "threshold": res.threshold,
                                     "auc": res.auc, "pairs": res.pairs}  # fmt: skip


def score_linkage(linked: torch.Tensor, clean: torch.Tensor, val: FaceSet, topk: int) -> dict[str, Any]:
    """The protocol of the module docstring on held-out embeddings: linked (N, D) = protected faces through the
    linker, clean (N, D) = clean faces through the teacher, row i = ``val`` face i. Returns the attack's metrics
    (+ ``pair_acc`` / ``pair``) and the ``teacher_clean`` and ``chance`` anchor rows."""
    ids = identity_index(val)
    gal, qry = gallery_split(ids)
    if len(qry) == 0:
        raise AttackError("linkage needs held-out identities with at least 2 faces (one gallery face, one query)")
    out = linkage_metrics(linked[qry], clean[gal], ids[qry], ids[gal], topk)
    anchor = linkage_metrics(clean[qry], clean[gal], ids[qry], ids[gal], topk)
    out["pair_acc"] = anchor["pair_acc"] = None
    out["pair"] = anchor["pair"] = None
    if isinstance(val.source, PairSource):
        vr, vr_clean = (cross_pair_verification(e, clean, val.labels, val.source.pairs) for e in (linked, clean))
        out["pair"], anchor["pair"] = _pair_row(vr), _pair_row(vr_clean)
        out["pair_acc"] = vr.accuracy if vr is not None else None
        anchor["pair_acc"] = vr_clean.accuracy if vr_clean is not None else None
    chance = chance_metrics(len(gal), topk)
    if out["pair_acc"] is None:
        chance["pair_acc"] = None
    out["teacher_clean"] = {k: anchor[k] for k in ("linkage_top1", "linkage_topk", "tar_at_fmr", "pair_acc", "pair")}
    out["chance"] = chance
    return out


# ------------------------------------------------------------------------------------------------- plugin
def _probe_dim(judge: Judge, train: FaceSet, device: torch.device | str) -> int:
    return int(teacher_embed(judge, train.batch(torch.arange(min(2, len(train)))).to(device)).shape[1])


def _skipped(reason: str, form: str) -> dict[str, Any]:
    """The section of a run that could not attack: every result key None, and why."""
    return {**dict.fromkeys(RESULT_KEYS), "skipped": reason, "form": form}


@register_attack
class LinkageAttack(Attack):
    """FaceLinkGen-style identity linkage through the teacher (``ctx.judge``); see the module docstring."""

    name = "linkage"
    description = ("identity linkage: a payload->teacher-space model links protected queries to a clean gallery "
                   "(top-1/top-k, TAR@FMR, protected-vs-clean pair accuracy)")  # fmt: skip
    produces_images = True  # the default (adapter) form; the student form returns no grid

    NO_TEACHER = "linkage needs a teacher: pass a judge (--judge faceapi or a model.pt), not none"

    def applies(self, method: Method) -> str | None:
        # Any payload of (B, C, H, W) tensors can be linked; only the teacher can be missing, and that is a property
        # of the run, not the method: run() records it.
        return None

    def run(self, ctx: AttackContext) -> dict[str, Any]:
        """Train the linker on ``ctx.train`` and score it on ``ctx.val``; returns this kind's result section
        (module docstring), with ``_grid`` (G, 3, H, W) in [0, 1] for the adapter form."""
        cfg = ctx.cfg
        form = resolve_form(cfg)
        if ctx.judge is None:
            return _skipped(self.NO_TEACHER, form)
        n_gallery = len(torch.unique(identity_index(ctx.val)))
        if cfg.linkage_topk > n_gallery:
            raise AttackError(f"AttackConfig.linkage_topk={cfg.linkage_topk} exceeds the {n_gallery} held-out "
                              "identities of the gallery; pass a smaller linkage_topk")  # fmt: skip
        t0 = time.perf_counter()
        log = ctx.log
        devices = [ctx.device] if torch.device(ctx.device).type == "cuda" else []
        # Parameter init (and the student's dropout) draw from the global RNG: seed it for reproducibility and
        # restore it afterwards, so this attack neither depends on nor disturbs anyone else's random stream.
        with frozen_teacher(ctx.judge), torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            dim = _probe_dim(ctx.judge, ctx.train, ctx.device)
            inverter = inverter_for(ctx) if form == "adapter" else None
            linker = build_linker(form, ctx.method, ctx.train, cfg, dim, ctx.device, inverter)
            n_params = sum(p.numel() for p in linker.net.parameters())
            if log:
                log(f"[linkage] form {form}{' (seeded with the inversion)' if linker.inverter is not None else ''}, "
                    f"teacher {ctx.judge.name} ({dim}-d), {n_params / 1e6:.2f} M parameters; {len(ctx.train)} train"
                    f" / {len(ctx.val)} held-out faces, secrets {cfg.secrets}")  # fmt: skip
            summary = train_linker(linker, ctx.method, ctx.judge, ctx.train, cfg, ctx.device, log)
            grid = ctx.grid_index() if linker.produces_images else None
            linked, clean, images = embed_heldout(linker, ctx, grid)
        sec = score_linkage(linked, clean, ctx.val, cfg.linkage_topk)
        sec.update({
            "ssim": None, "psnr": None, "reid_acc": None, "key_recovery": None,
            "form": form, "teacher": ctx.judge.name, "secrets": cfg.secrets,
            "seeded_with_inversion": linker.inverter is not None,
            "n_faces": len(ctx.val), "parameters": n_params, "train": summary,
            "time_s": round(time.perf_counter() - t0, 2),
        })  # fmt: skip
        if images is not None:
            sec["_grid"] = images
        if log:
            tc, ch = sec["teacher_clean"], sec["chance"]
            pa = f", pair acc {sec['pair_acc'] * 100:.1f} %" if sec["pair_acc"] is not None else ""
            log(f"[linkage] top-1 {sec['linkage_top1'] * 100:.1f} % (teacher on clean {tc['linkage_top1'] * 100:.1f}"
                f" %, chance {ch['linkage_top1'] * 100:.1f} %), top-{cfg.linkage_topk} "
                f"{sec['linkage_topk'] * 100:.1f} %{pa}; {sec['n_queries']} queries, {sec['n_gallery']} gallery "
                f"({sec['time_s']:.0f}s)")  # fmt: skip
        return sec
