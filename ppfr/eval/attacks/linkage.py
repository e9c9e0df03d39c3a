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

Forms (``AttackConfig.linkage_form``; ``auto`` = adapter, finetune and insider; the linkage figure is the strongest)
    * ``adapter`` -- payload -> image network -> *frozen* teacher. The network is a :class:`RecoveryAttacker`
      (payload stem + small U-Net + 1x1 shortcut). Where the payload is a known linear function of the face
      (``inversion.Inverter.for_method`` is not None) the closed-form estimate is both added to the network's
      input and the base of its output: image = estimate + learned correction, the correction initialised to
      exactly zero, so the untrained adapter *is* the inversion. Elsewhere the U-Net's head starts at zero and the
      shortcut is the least-squares per-pixel linear decoder of the payload, so the untrained adapter is the best
      linear read-out of the payload (for an image payload such as MinusFace's X_p or PRO-Face C's blurred face: a
      fixed affine colour map of it). The teacher keeps its weights (it gets no gradient, stays in eval mode);
      gradients flow through it into the adapter.
    * ``finetune`` -- FaceLinkGen's code path (``insight_train.py``): a *copy* of the teacher with every weight
      trainable, fed the payload as an image through the trained adapter (the fixed read-out above where the
      payload is an image; the learned stem where it is not: DCT channel stacks, feature maps). Recipe chosen by a
      sweep on public identities only (docs/attack.md): the adapter's weights as the start (a frozen first phase),
      then both trained, the copy at a tenth of the rate after a warm-up, on the batch-centred cosine (the plain
      1 - cos collapses on face-api.js, whose descriptors of different people have cosine ~0.9); queries and
      gallery are scored centred on their means over public faces; the start, middle or end of that phase is kept
      by linkage top-1 on public identities held out of it (:func:`finetune_linker`).
    * ``insider`` -- no training: the server trained the client together with its recogniser, so it holds both.
      Gallery = each identity's clean photo protected by the method's own client (independent secrets) and
      embedded by the method's own recogniser; queries likewise (:func:`insider_embeddings`).
    * ``student`` -- FaceLinkGen's paper form: a from-scratch IR-18 (base width 16) on the payload (through a
      :class:`PayloadStem` that standardises and projects the payload tensors to ``stem_width`` channels) trained
      to output the teacher's embedding of the clean face directly. Only when asked: it needs far more faces.

Protocol (held-out identities, ``ctx.val``)
    Identities from :func:`identity_index`. Gallery: the first face (by index) of every identity, *clean*, embedded
    by the teacher. Queries: every other face of the identities with >= 2 faces, *protected* with the evaluation
    secrets (``protect_with(..., EVAL_STREAM, batch_no)``), embedded by the linker. Reported (:func:`linkage_metrics`):
    top-1 and top-k identification rates, TAR at FMR 1e-2 / 1e-3 over all query x gallery cosine scores, and, when
    ``ctx.val`` is a pair list, the 10-fold verification accuracy of (protected a, clean b) pairs. Two anchor rows
    bound the figures: ``teacher_clean`` (clean queries through the teacher: what linkage can at best reach) and
    ``chance``.

The teacher's clean embeddings are computed once per face and shared by every form and target
(:class:`CleanEmbeddings`); the inversion estimate is computed per batch from that batch's payload, and the held-out
faces are only ever scored, never trained on. 1:1 figures (``pair``): 10-fold accuracy and TAR@FMR of (protected a,
reference b) pairs, each fold's threshold chosen on the other nine.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.data.sources import PairSource
from ppfr.eval.attacks import register_attack
from ppfr.eval.attacks.common import (
    AUTO_LINKAGE_FORMS, EVAL_STREAM, LINKAGE_FORMS, NORM_STREAM, RESULT_KEYS, TRAIN_STREAM, Attack, AttackConfig,
    AttackContext, AttackError, FaceSet, Judge, fit_attacker, identity_index, payload_shapes, protect_with,
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


class CleanEmbeddings:
    """The teacher's embeddings of one FaceSet's clean faces, plain and mirrored: (N, D) L2-normalised float32 on
    the CPU, each face computed on first use and kept.

    Linkage asks the teacher for the same faces again and again (every training step's targets, every form's and
    every target's gallery); through :func:`clean_embeddings` the cache lives on the judge, so a study's rows and a
    run's forms share it. Always the original (frozen) teacher, never a fine-tuned copy.
    """

    def __init__(self, judge: Judge, faces: FaceSet, device: torch.device | str, batch_size: int = 64) -> None:
        self.judge, self.faces, self.device, self.batch_size = judge, faces, device, batch_size
        self.emb: dict[bool, torch.Tensor] = {}
        self.have: dict[bool, torch.Tensor] = {}

    def get(self, idx: torch.Tensor, flipped: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) embeddings of faces ``idx`` (B,), mirrored where ``flipped`` (B,) bool is True."""
        idx = torch.as_tensor(idx).long().cpu()
        flipped = torch.zeros(len(idx), dtype=torch.bool) if flipped is None else torch.as_tensor(flipped).cpu()
        out = None
        for flip in (False, True):
            sel = flipped == flip
            if not bool(sel.any()):
                continue
            rows = self._rows(idx[sel], flip)
            out = torch.empty(len(idx), rows.shape[1]) if out is None else out
            out[sel] = rows
        return out

    def all(self) -> torch.Tensor:
        """(N, D): every face, not mirrored."""
        return self.get(torch.arange(len(self.faces)))

    def _rows(self, idx: torch.Tensor, flip: bool) -> torch.Tensor:
        if flip not in self.have:
            self.have[flip] = torch.zeros(len(self.faces), dtype=torch.bool)
        missing = torch.unique(idx[~self.have[flip][idx]])
        for start in range(0, len(missing), self.batch_size):
            part = missing[start : start + self.batch_size]
            x = self.faces.batch(part)
            e = teacher_embed(self.judge, (x.flip(-1) if flip else x).to(self.device)).cpu()
            if flip not in self.emb:
                self.emb[flip] = torch.zeros(len(self.faces), e.shape[1])
            self.emb[flip][part] = e
            self.have[flip][part] = True
        return self.emb[flip][idx]


def clean_embeddings(judge: Judge, faces: FaceSet, device: torch.device | str = "cpu") -> CleanEmbeddings:
    """The judge's :class:`CleanEmbeddings` of ``faces`` (made on first use; keyed by the image tensor itself)."""
    key = ("clean", id(faces.images))
    entry = judge.cache.get(key)
    if entry is None or entry.faces.images is not faces.images:
        entry = judge.cache[key] = CleanEmbeddings(judge, faces, device)
    return entry


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

    ``net`` holds every trainable parameter: the :class:`RecoveryAttacker` (``adapter``), a ModuleDict of that
    adapter and the teacher copy (``finetune``), or a :class:`StudentNet`. The frozen teacher and the inverter are
    used, never owned (their weights are not in ``net.parameters()``, so the optimiser cannot move them).
    ``teacher``: the fine-tuned copy's judge (``finetune``), else None (the run's frozen teacher embeds).
    ``centre``: (query mean (D,), gallery mean (D,)) subtracted before scoring, estimated on public faces
    (``finetune`` with the centred loss), else None.
    """

    def __init__(self, form: str, net: nn.Module, inverter: Any | None = None, teacher: Judge | None = None) -> None:
        self.form, self.net, self.inverter, self.teacher = form, net, inverter, teacher
        self.centre: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def produces_images(self) -> bool:
        return self.form in ("adapter", "finetune")

    @property
    def adapter(self) -> nn.Module:
        """The payload -> image network (adapter and finetune forms)."""
        return self.net["adapter"] if self.form == "finetune" else self.net

    def inputs(self, payload: Payload) -> dict[str, torch.Tensor]:
        """The network's input tensors: the payload's, plus (seeded adapter) the inversion estimate
        ``INVERSION_KEY`` (B, 3, H, W) in [-1, 1], computed from this batch's payload alone."""
        tensors = dict(payload.tensors)
        if self.inverter is not None:
            with torch.no_grad():
                tensors[INVERSION_KEY] = self.inverter.recover(payload).float()
        return tensors

    def images(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Adapter and finetune: (B, 3, H, W) face images, nominally [-1, 1] but unclamped (the teacher sees the
        raw output, so the gradient never vanishes at a clamp). ``2 * adapter - 1`` (+ the inversion estimate when
        seeded: the adapter's zero-initialised correction is centred on 0.5)."""
        out = 2.0 * self.adapter(tensors) - 1.0
        if INVERSION_KEY in tensors:
            out = out + tensors[INVERSION_KEY]
        return out

    def embed_inputs(self, tensors: dict[str, torch.Tensor], judge: Judge) -> torch.Tensor:
        """(B, D) raw embeddings of network inputs (:meth:`inputs`); differentiable in ``net``'s parameters."""
        if self.produces_images:
            return (self.teacher or judge).embed(self.images(tensors).contiguous())
        return self.net(tensors)

    def embed(self, payload: Payload, judge: Judge) -> torch.Tensor:
        """(B, D) raw embeddings of a payload batch; differentiable in ``net``'s parameters."""
        return self.embed_inputs(self.inputs(payload), judge)


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


def resolve_forms(cfg: AttackConfig) -> list[str]:
    """The forms a run trains, in run order (the adapter before finetune, which starts from it): ``auto`` ->
    adapter, finetune and insider (the student only when asked: from scratch on a few thousand faces it learns
    nothing, docs/attack.md); otherwise the forms listed."""
    if cfg.linkage_form == "auto":
        return list(AUTO_LINKAGE_FORMS)
    asked = {f.strip() for f in cfg.linkage_form.split(",")}
    return [f for f in LINKAGE_FORMS if f in asked]


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
    """A linker of ``form`` (``adapter`` or ``student``) sized for ``method``'s payload, its stem standardisation
    fitted on training payloads (``finetune`` is built from a trained adapter: :func:`finetune_linker`).

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
        raise AttackError(f"build_linker: form {form!r} is not built here (adapter|student)")
    return Linker(form, net, inverter)


# Keys of a saved linker that belong to one payload and are rebuilt for every target: the stem (its standardisation
# and projection are fitted to the payload's channels) and the least-squares read-out.
_PAYLOAD_SPECIFIC = ("stem.", "shortcut.")


def load_linker_init(linker: Linker, path: str | Path, log: Callable[[str], None] | None = None,
                     only: str | None = None) -> int:  # fmt: skip
    """Start ``linker`` from a ``linker_<form>.pt`` of an earlier run (few-shot transfer): every tensor whose name
    and shape match, except the payload-specific ones (:data:`_PAYLOAD_SPECIFIC`); an adapter's tensors fill a
    finetune linker's adapter and back; ``only``: just the names under that prefix (``teacher.``). Read with
    ``weights_only``. Returns how many tensors were loaded."""
    from ppfr.models.checkpoints import CheckpointError, safe_load

    try:
        saved = safe_load(path)
    except CheckpointError as exc:
        raise AttackError(f"--linkage-init: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("net"), dict):
        raise AttackError(f"--linkage-init: {path} is not a linker file (no 'net' state)")
    state = saved["net"]
    if saved.get("form") == "adapter":
        state = {f"adapter.{k}": v for k, v in state.items()}
    own = linker.net.state_dict()
    if linker.form != "finetune":
        own = {f"adapter.{k}": v for k, v in own.items()}
    take = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
            and not k.removeprefix("adapter.").startswith(_PAYLOAD_SPECIFIC)
            and (only is None or k.startswith(only))}  # fmt: skip
    if not take:
        raise AttackError(f"--linkage-init: no tensor of {path} fits this {linker.form} linker")
    strip = (lambda k: k) if linker.form == "finetune" else (lambda k: k[len("adapter."):])
    linker.net.load_state_dict({strip(k): v for k, v in take.items()}, strict=False)
    if log:
        log(f"[linkage] {linker.form}: {len(take)} of {len(own)} tensors from {path} (form {saved.get('form')}, "
            f"method {saved.get('method')})")  # fmt: skip
    return len(take)


def save_linker(linker: Linker, path: Path, method: Method) -> None:
    """Keep a trained linker (atomically, with its digest) for ``--linkage-init``."""
    from ppfr.models.checkpoints import save_checkpoint

    save_checkpoint({"form": linker.form, "method": method.name, "net": linker.net.state_dict()}, path)


def _cosine_loss(z: torch.Tensor, target: torch.Tensor, centred: bool) -> torch.Tensor:
    """1 - mean cos(z, target); ``centred``: each side minus its batch mean first (face-api.js descriptors of
    different people have cosine ~0.9, so a constant output already scores ~0.1 on the plain loss and the copy
    collapses to it; centred, a constant output scores 1)."""
    z = z.float()
    if centred:
        z, target = z - z.mean(0, keepdim=True), target - target.mean(0, keepdim=True)
    return 1.0 - F.cosine_similarity(z, target, dim=1).mean()


def train_linker(linker: Linker, method: Method, judge: Judge, train: FaceSet, cfg: AttackConfig,
                 device: torch.device | str = "cpu",
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:  # fmt: skip
    """Train ``linker.net`` (adapter or student) for ``cfg.linkage_steps`` steps of ``cfg.linkage_batch_size``
    training faces.

    Each step: random faces (random flips when ``cfg.flip``), protected under ``cfg.secrets`` (fresh secrets per
    step, or the fixed key), loss ``1 - cos(linker(payload), teacher(clean face))`` averaged over the batch (the
    targets from the judge's :class:`CleanEmbeddings`); Adam at ``cfg.linkage_lr``, cosine-decayed to 0. Stops
    early at ``cfg.time_limit`` seconds. Returns steps, seconds, images/s, first/last loss (means over
    ``log_every``-step windows) and the loss curve.
    """
    targets = clean_embeddings(judge, train, device)

    def loss_fn(x: torch.Tensor, step: int, draw: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        payload = protect_with(method, x, cfg, TRAIN_STREAM, step)
        return _cosine_loss(F.normalize(linker.embed(payload, judge).float(), dim=1), targets.get(*draw).to(x.device),
                            centred=False)  # fmt: skip

    return fit_attacker(linker.net, loss_fn, train, cfg, steps=cfg.linkage_steps, lr=cfg.linkage_lr,
                        batch_size=cfg.linkage_batch_size, seed=cfg.seed * 2 + 2, name="linkage", device=device,
                        log=log, stop_below=CONVERGED_LOSS)  # fmt: skip


def split_identities(faces: FaceSet, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, select) indices into ``faces``: a ``share`` of its identities with >= 2 faces (at least 2 identities)
    go to select, the rest to fit. Identity-disjoint: what selects a model never trained it."""
    ids = identity_index(faces)
    uniq, counts = torch.unique(ids, return_counts=True)
    multi = uniq[counts >= 2]
    if len(multi) < 4:
        raise AttackError(f"finetune needs at least 4 public identities with 2+ faces to hold some out for its "
                          f"model selection; --data has {len(multi)}")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    n_sel = min(max(2, round(share * len(multi))), len(multi) - 2)
    chosen = multi[torch.randperm(len(multi), generator=g)[:n_sel]]
    is_sel = torch.isin(ids, chosen)
    return torch.nonzero(~is_sel).flatten(), torch.nonzero(is_sel).flatten()


@torch.no_grad()
def _embed_faces(linker: Linker, method: Method, judge: Judge, faces: FaceSet, cfg: AttackConfig, stream: int,
                 device: torch.device | str, offset: int = 0) -> torch.Tensor:  # fmt: skip
    """(N, D) L2-normalised linker embeddings of ``faces``, protected batch by batch (``stream``, steps from
    ``offset``)."""
    linker.net.eval()
    out = []
    for k, start in enumerate(range(0, len(faces), cfg.eval_batch_size)):
        x = faces.batch(torch.arange(start, min(start + cfg.eval_batch_size, len(faces)))).to(device)
        out.append(F.normalize(linker.embed(protect_with(method, x, cfg, stream, offset + k), judge).float(),
                               dim=1).cpu())  # fmt: skip
    return torch.cat(out)


def centred(emb: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """``emb`` (N, D) minus ``mean`` (D,) (None: unchanged)."""
    return emb if mean is None else emb - mean


class _FinetuneNet(nn.ModuleDict):
    """The finetune form's trainable modules: ``adapter`` and ``teacher`` (the copy). ``train()`` leaves the copy in
    eval mode: its weights train, its BatchNorm statistics (where it has any) stay the pretrained teacher's, as
    small payload batches would otherwise overwrite them."""

    def train(self, mode: bool = True) -> _FinetuneNet:
        super().train(mode)
        self["teacher"].eval()
        return self


def finetune_linker(adapter: Linker, method: Method, judge: Judge, train: FaceSet, cfg: AttackConfig,
                    device: torch.device | str = "cpu",
                    log: Callable[[str], None] | None = print) -> tuple[Linker, dict[str, Any]]:  # fmt: skip
    """The ``finetune`` form: a trained adapter in front of a copy of the teacher, every weight of both trainable.

    ``cfg.finetune_steps`` steps on the public identities outside the selection split (:func:`split_identities`),
    the adapter at ``cfg.linkage_lr``, the teacher copy at ``cfg.finetune_lr_mult`` x that with a linear warm-up of
    ``cfg.finetune_warmup`` steps, both cosine-decayed; loss :func:`_cosine_loss` (``cfg.finetune_loss``).
    The weights at the start (the adapter itself), half-way and at the end are scored by linkage top-1 on the
    selection identities (protected with other secrets than training's, gallery = their first clean face) and
    the best kept (ties: the earlier). ``adapter`` is not modified. Returns (linker, summary with the selection).
    """
    import copy

    teacher = judge.trainable_copy()
    if teacher is None:
        raise AttackError("finetune needs a teacher whose network is known (faceapi or a model.pt)")
    net = _FinetuneNet({"adapter": copy.deepcopy(adapter.net), "teacher": teacher.module})
    linker = Linker("finetune", net, adapter.inverter, teacher)
    if cfg.linkage_init:  # the adapter took its part of the init before its own training
        load_linker_init(linker, cfg.linkage_init, log, only="teacher.")
    fit_idx, sel_idx = split_identities(train, cfg.select_share, cfg.seed * 2 + 3)
    fit = FaceSet(train.images[fit_idx], train.labels[fit_idx], train.source)
    sel = FaceSet(train.images[sel_idx], train.labels[sel_idx], train.source)
    targets = clean_embeddings(judge, train, device)
    use_centre = cfg.finetune_loss == "centred"
    sel_clean = targets.get(sel_idx)
    sel_ids = identity_index(sel)
    s_gal, s_qry = gallery_split(sel_ids)

    def select_score() -> tuple[float, torch.Tensor]:
        z = _embed_faces(linker, method, judge, sel, cfg, NORM_STREAM, device, offset=1000)
        mq, mg = (z.mean(0), sel_clean.mean(0)) if use_centre else (None, None)
        m = linkage_metrics(centred(z, mq)[s_qry], centred(sel_clean, mg)[s_gal], sel_ids[s_qry], sel_ids[s_gal], 1)
        return m["linkage_top1"], z.mean(0)

    picks: list[tuple[str, float, dict[str, torch.Tensor], torch.Tensor]] = []

    def snapshot(name: str) -> None:
        top1, zmean = select_score()
        picks.append((name, top1, copy.deepcopy(net.state_dict()), zmean))
        net.train()
        if log:
            log(f"  finetune selection: {name} top-1 {top1 * 100:.1f} % on {len(s_qry)} held-out public queries")

    def loss_fn(x: torch.Tensor, step: int, draw: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        payload = protect_with(method, x, cfg, TRAIN_STREAM, 500_000 + step)
        t = targets.get(fit_idx[draw[0]], draw[1]).to(x.device)
        return _cosine_loss(linker.embed(payload, judge), t, centred=use_centre)

    snapshot("start (the adapter)")
    half = max(1, cfg.finetune_steps // 2)
    groups = [{"params": list(net["adapter"].parameters()), "lr": cfg.linkage_lr},
              {"params": list(net["teacher"].parameters()), "lr": cfg.linkage_lr * cfg.finetune_lr_mult,
               "warmup": cfg.finetune_warmup}]  # fmt: skip
    summary = fit_attacker(net, loss_fn, fit, cfg, steps=cfg.finetune_steps, lr=cfg.linkage_lr,
                           batch_size=cfg.linkage_batch_size, seed=cfg.seed * 2 + 4, name="finetune", device=device,
                           log=log, groups=groups,
                           on_step=lambda s: snapshot(f"step {s}") if s == half < cfg.finetune_steps else None)
    snapshot(f"step {summary['steps']}")
    best = max(range(len(picks)), key=lambda i: (picks[i][1], -i))
    name, _, state, zmean = picks[best]
    net.load_state_dict(state)
    net.eval()
    if use_centre:  # both means over public faces: the selection faces, protected / clean
        linker.centre = (zmean, sel_clean.mean(0))
    summary["selection"] = {"split": {"fit_faces": len(fit), "select_faces": len(sel),
                                      "select_identities": int(len(s_gal))},
                            "candidates": {n: t for n, t, _, _ in picks}, "chosen": name,
                            "loss": cfg.finetune_loss, "lr_mult": cfg.finetune_lr_mult}  # fmt: skip
    return linker, summary


@torch.no_grad()
def embed_heldout(linker: Linker, ctx: AttackContext, grid: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Every held-out face protected (evaluation secrets, batch k of ``cfg.eval_batch_size`` faces in index order
    -> ``protect_with(..., EVAL_STREAM, k)``) through the linker.

    Returns linked (N, D) L2-normalised float32 on the CPU, and for the image-producing forms the images
    (len(grid), 3, H, W) in [0, 1] of the held-out faces ``grid`` (from the same evaluation pass), else None. The
    network inputs of a batch are kept in ``ctx.shared`` while they fit :data:`PAYLOAD_CACHE_BYTES`, so the
    adapter and finetune forms protect (and invert) each held-out face once.
    """
    cfg, val = ctx.cfg, ctx.val
    linker.net.eval()
    picks = {int(i): j for j, i in enumerate(grid.tolist())} if grid is not None and len(grid) else {}
    cache = ctx.shared.setdefault(("heldout_inputs", cfg.secrets, linker.inverter is not None), {})
    linked = []
    shots: dict[int, torch.Tensor] = {}
    for k, start in enumerate(range(0, len(val), cfg.eval_batch_size)):
        idx = torch.arange(start, min(start + cfg.eval_batch_size, len(val)))
        tensors = cache.get(k)
        if tensors is None:
            tensors = linker.inputs(protect_with(ctx.method, val.batch(idx).to(ctx.device), cfg, EVAL_STREAM, k))
            if _nbytes(cache) + _nbytes({0: tensors}) <= PAYLOAD_CACHE_BYTES:
                cache[k] = tensors
        if linker.produces_images:
            img = linker.images(tensors)
            linked.append(F.normalize((linker.teacher or ctx.judge).embed(img.contiguous()).float(), dim=1).cpu())
            for r, i in enumerate(idx.tolist()):
                if i in picks:
                    shots[picks[i]] = (img[r] * 0.5 + 0.5).clamp(0, 1).float().cpu()
        else:
            linked.append(F.normalize(linker.net(tensors).float(), dim=1).cpu())
    images = torch.stack([shots[j] for j in range(len(picks))]) if picks and linker.produces_images else None
    return torch.cat(linked), images


# Held-out network inputs kept between forms up to this size (a DuetFace payload is 8.6 MB per face: not kept).
PAYLOAD_CACHE_BYTES = 768 * 2**20


def _nbytes(cache: dict[int, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for d in cache.values() for t in d.values())


INSIDER_GALLERY_STREAM = 3  # the insider's gallery secrets: independent of the queries' (EVAL_STREAM)


@torch.no_grad()
def insider_embeddings(ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The insider form: the server holds the client it trained, so it protects each held-out face itself and
    embeds it with its own recogniser. Returns (queries, references), each (N, D) L2-normalised float32 on the CPU:
    row i = held-out face i protected with the evaluation secrets (``EVAL_STREAM``, as every form's queries) /
    with independent secrets (:data:`INSIDER_GALLERY_STREAM`; the fixed key under ``secrets=fixed``), both through
    ``method.recognize``. Nothing is trained. NotImplementedError where the method has no server."""
    cfg, val, method = ctx.cfg, ctx.val, ctx.method
    q, g = [], []
    for k, start in enumerate(range(0, len(val), cfg.eval_batch_size)):
        x = val.batch(torch.arange(start, min(start + cfg.eval_batch_size, len(val)))).to(ctx.device)
        q.append(F.normalize(method.recognize(protect_with(method, x, cfg, EVAL_STREAM, k)).float(), dim=1).cpu())
        g.append(F.normalize(method.recognize(protect_with(method, x, cfg, INSIDER_GALLERY_STREAM, k)).float(),
                             dim=1).cpu())  # fmt: skip
    return torch.cat(q), torch.cat(g)


def _pair_row(res: VerificationResult | None, tar: dict[str, dict[str, float]] | None = None) -> dict[str, Any] | None:
    return None if res is None else {"accuracy": res.accuracy, "std": res.std, "threshold": res.threshold,
                                     "auc": res.auc, "pairs": res.pairs, "tar_at_fmr": tar}  # fmt: skip


def cross_pair_tar(query_emb: torch.Tensor, ref_emb: torch.Tensor, labels: torch.Tensor,
                   pairs: np.ndarray) -> dict[str, dict[str, float]] | None:  # fmt: skip
    """1:1 TAR at each FMR of :data:`FMRS` over the (protected a, reference b) pairs of a pair list, the threshold
    of each fold chosen on the other nine (:func:`ppfr.eval.verification.ten_fold_tar`)."""
    from ppfr.eval.verification import ten_fold_tar

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
    return {name: ten_fold_tar(sims, kept[:, 1].astype(bool), kept[:, 0], f) for name, f in FMRS.items()}


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
            vr = cross_pair_verification(q, r, val.labels, pairs)
            res["pair"] = _pair_row(vr, cross_pair_tar(q, r, val.labels, pairs) if vr is not None else None)
            res["pair_acc"] = vr.accuracy if vr is not None else None
    chance = chance_metrics(len(gal), topk)
    if out["pair_acc"] is None:
        chance["pair_acc"] = None
    out["teacher_clean"] = {k: anc[k] for k in ("linkage_top1", "linkage_topk", "tar_at_fmr", "pair_acc", "pair")}
    out["chance"] = chance
    return out


# ------------------------------------------------------------------------------------------------- plugin
def _probe_dim(judge: Judge, train: FaceSet, device: torch.device | str) -> int:
    return int(teacher_embed(judge, train.batch(torch.arange(min(2, len(train)))).to(device)).shape[1])


def _skipped(reason: str, form: str) -> dict[str, Any]:
    """The section of a run that could not attack: every result key None, and why."""
    return {**dict.fromkeys(RESULT_KEYS), "skipped": reason, "form": form}


def strongest(forms: dict[str, dict[str, Any]]) -> str | None:
    """The form with the highest linkage top-1 (ties: the first in run order); None when none has a figure."""
    scored = [(f, s["linkage_top1"]) for f, s in forms.items() if s.get("linkage_top1") is not None]
    return max(scored, key=lambda t: t[1])[0] if scored else None  # max keeps the first of equal values


def combine_forms(forms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The linkage section of several forms: the strongest form's figures at the top level (``form`` names it),
    every form's own section under ``forms`` (a skipped form with its reason: never silently missing)."""
    best = strongest(forms)
    if best is None:
        why = "; ".join(f"{f}: {s.get('skipped')}" for f, s in forms.items())
        return {**_skipped(why, ",".join(forms)), "forms": forms}
    return {**forms[best], "form": best, "strongest": best, "forms": forms}


@register_attack
class LinkageAttack(Attack):
    """FaceLinkGen-style identity linkage in every form the run asks for (``auto``: adapter, finetune and insider),
    the strongest reported as the linkage figure; see the module docstring."""

    name = "linkage"
    description = ("identity linkage: a payload->teacher-space model links protected queries to a clean gallery "
                   "(top-1/top-k, TAR@FMR, protected-vs-clean pair accuracy)")  # fmt: skip
    produces_images = True  # the adapter and finetune forms; the student and insider forms return no grid

    NO_TEACHER = "linkage needs a teacher: pass a judge (--judge faceapi or a model.pt), not none"

    def applies(self, method: Method) -> str | None:
        # Any payload of (B, C, H, W) tensors can be linked; only the teacher can be missing, and that is a property
        # of the run, not the method: run() records it.
        return None

    def run(self, ctx: AttackContext) -> dict[str, Any]:
        """Run every form of ``cfg.linkage_form`` on ``ctx.train`` / ``ctx.val``; returns this kind's result
        section (:func:`combine_forms`), with ``_grid`` (G, 3, H, W) in [0, 1] from the first image-producing
        form."""
        cfg = ctx.cfg
        forms = resolve_forms(cfg)
        n_gallery = len(torch.unique(identity_index(ctx.val)))
        if cfg.linkage_topk > n_gallery:
            raise AttackError(f"AttackConfig.linkage_topk={cfg.linkage_topk} exceeds the {n_gallery} held-out "
                              "identities of the gallery; pass a smaller linkage_topk")  # fmt: skip
        sections: dict[str, dict[str, Any]] = {}
        grid_images = None
        adapter: Linker | None = None
        anchor = clean_embeddings(ctx.judge, ctx.val, ctx.device).all() if ctx.judge is not None else None
        for form in forms:
            t0 = time.perf_counter()
            if form == "insider":
                sections[form] = self.run_insider(ctx, anchor, t0)
                continue
            if ctx.judge is None:
                sections[form] = _skipped(self.NO_TEACHER, form)
                continue
            try:
                if form == "finetune" and adapter is None:
                    adapter, _ = self.train_form(ctx, "adapter")  # the frozen first phase
                if form == "finetune":
                    with frozen_teacher(ctx.judge), torch.random.fork_rng(devices=self._devices(ctx)):
                        torch.manual_seed(cfg.seed + 1)
                        linker, summary = finetune_linker(adapter, ctx.method, ctx.judge, ctx.train, cfg,
                                                          ctx.device, ctx.log)  # fmt: skip
                else:
                    linker, summary = self.train_form(ctx, form)
            except AttackError as exc:
                if form != "finetune":
                    raise
                sections[form] = _skipped(str(exc), form)
                continue
            if form == "adapter":
                adapter = linker
            sec, images = self.score_linker(ctx, linker, summary, anchor, t0)
            if images is not None and grid_images is None:
                grid_images = images
            sections[form] = sec
        out = combine_forms(sections)
        if grid_images is not None:
            out["_grid"] = grid_images
        if ctx.log and len(sections) > 1 and out.get("strongest"):
            ctx.log("[linkage] " + ", ".join(f"{f} {_pct(s.get('linkage_top1'))}" for f, s in sections.items())
                    + f"; strongest: {out['strongest']}")  # fmt: skip
        return out

    @staticmethod
    def _devices(ctx: AttackContext) -> list:
        return [ctx.device] if torch.device(ctx.device).type == "cuda" else []

    def train_form(self, ctx: AttackContext, form: str) -> tuple[Linker, dict[str, Any]]:
        """Build (from ``cfg.linkage_init`` where given) and train an adapter or student linker."""
        cfg, log = ctx.cfg, ctx.log
        # Parameter init (and the student's dropout) draw from the global RNG: seed it for reproducibility and
        # restore it afterwards, so this attack neither depends on nor disturbs anyone else's random stream.
        with frozen_teacher(ctx.judge), torch.random.fork_rng(devices=self._devices(ctx)):
            torch.manual_seed(cfg.seed)
            dim = _probe_dim(ctx.judge, ctx.train, ctx.device)
            inverter = inverter_for(ctx) if form == "adapter" else None
            linker = build_linker(form, ctx.method, ctx.train, cfg, dim, ctx.device, inverter)
            if cfg.linkage_init:
                load_linker_init(linker, cfg.linkage_init, log)
            n_params = sum(p.numel() for p in linker.net.parameters())
            if log:
                log(f"[linkage] form {form}{' (seeded with the inversion)' if linker.inverter is not None else ''}, "
                    f"teacher {ctx.judge.name} ({dim}-d), {n_params / 1e6:.2f} M parameters; {len(ctx.train)} train"
                    f" / {len(ctx.val)} held-out faces, secrets {cfg.secrets}")  # fmt: skip
            summary = train_linker(linker, ctx.method, ctx.judge, ctx.train, cfg, ctx.device, log)
        return linker, summary

    def score_linker(self, ctx: AttackContext, linker: Linker, summary: dict[str, Any], anchor: torch.Tensor,
               t0: float) -> tuple[dict[str, Any], torch.Tensor | None]:  # fmt: skip
        cfg = ctx.cfg
        grid = ctx.grid_index() if linker.produces_images else None
        with frozen_teacher(ctx.judge):
            linked, images = embed_heldout(linker, ctx, grid)
        mq, mg = linker.centre or (None, None)
        sec = score_linkage(centred(linked, mq), centred(anchor, mg), ctx.val, cfg.linkage_topk, anchor)
        if ctx.save_dir is not None:
            suffix = "" if cfg.secrets == "fresh" else f"_{cfg.secrets}"
            save_linker(linker, Path(ctx.save_dir) / f"linker_{linker.form}{suffix}.pt", ctx.method)
        sec.update({
            "ssim": None, "psnr": None, "reid_acc": None, "key_recovery": None,
            "form": linker.form, "teacher": ctx.judge.name, "secrets": cfg.secrets,
            "seeded_with_inversion": linker.inverter is not None, "centred_scoring": linker.centre is not None,
            "n_faces": len(ctx.val), "parameters": sum(p.numel() for p in linker.net.parameters()),
            "train": summary, "time_s": round(time.perf_counter() - t0, 2),
        })  # fmt: skip
        self._log(ctx, sec)
        return sec, images

    def run_insider(self, ctx: AttackContext, anchor: torch.Tensor | None, t0: float) -> dict[str, Any]:
        cfg = ctx.cfg
        try:
            queries, refs = insider_embeddings(ctx)
        except NotImplementedError:
            return _skipped(f"{ctx.method.name} has no server recogniser to link with (insider form)", "insider")
        sec = score_linkage(queries, refs, ctx.val, cfg.linkage_topk, anchor if anchor is not None else refs)
        sec.update({
            "ssim": None, "psnr": None, "reid_acc": None, "key_recovery": None, "form": "insider",
            "teacher": None, "secrets": cfg.secrets, "n_faces": len(ctx.val), "parameters": 0, "train": None,
            "time_s": round(time.perf_counter() - t0, 2),
        })  # fmt: skip
        self._log(ctx, sec)
        return sec

    @staticmethod
    def _log(ctx: AttackContext, sec: dict[str, Any]) -> None:
        if not ctx.log:
            return
        tc, ch = sec["teacher_clean"], sec["chance"]
        pa = f", 1:1 acc {sec['pair_acc'] * 100:.1f} %" if sec["pair_acc"] is not None else ""
        ctx.log(f"[linkage] {sec['form']}: top-1 {_pct(sec['linkage_top1'])} % (teacher on clean "
                f"{_pct(tc['linkage_top1'])} %, chance {_pct(ch['linkage_top1'])} %), top-{ctx.cfg.linkage_topk} "
                f"{_pct(sec['linkage_topk'])} %{pa}; {sec['n_queries']} queries, {sec['n_gallery']} gallery "
                f"({sec['time_s']:.0f}s)")  # fmt: skip


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v * 100:.1f}"
