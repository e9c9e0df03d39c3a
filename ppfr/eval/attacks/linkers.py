"""Linkage attackers: the teacher and its clean-embedding cache, and the forms' models and training.

* :func:`frozen_teacher`, :class:`CleanEmbeddings` -- the pretrained teacher, frozen, and its embeddings of clean
  faces computed once per face (shared by every form and target of a run through the judge).
* :class:`Linker` -- payload -> teacher-space embedding: ``adapter`` (payload -> image -> frozen teacher),
  ``finetune`` (the adapter in front of a trainable teacher copy, :func:`finetune_linker`), ``student``.
* :func:`insider_embeddings` -- the insider form: the method's own client and recogniser, nothing trained.

The forms are described in :mod:`.linkage` and docs/attack.md; their scoring is :mod:`.linkage_score`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ppfr.eval.attacks.common import (
    AUTO_LINKAGE_FORMS, LINKAGE_FORMS, AttackConfig, AttackContext, AttackError, payload_shapes,
)  # fmt: skip
from ppfr.eval.attacks.data import EVAL_STREAM, NORM_STREAM, TRAIN_STREAM, FaceSet, identity_index, protect_with
from ppfr.eval.attacks.fit import fit_attacker
from ppfr.eval.attacks.judge import Judge
from ppfr.eval.attacks.linkage_score import gallery_split, linkage_metrics
from ppfr.eval.attacks.recovery import PayloadStem, RecoveryAttacker
from ppfr.methods.base import Method, Payload
from ppfr.models.ir import IRNet

# Name of the extra adapter input carrying the inversion estimate (the recovery kind's name for it too).
INVERSION_KEY = "inversion"
STUDENT_DEPTH, STUDENT_WIDTH = 18, 16
# 1 - cos below this over 10 steps: the linker already reproduces the teacher (cos > 0.9999, e.g. through an exact
# inversion of ArcFace-FD's payload); more steps cannot change the figures, only cost minutes.
CONVERGED_LOSS = 1e-4


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


def clean_embeddings(judge: Judge, faces: FaceSet, device: torch.device | str = "cpu",
                     batch_size: int = 64) -> CleanEmbeddings:  # fmt: skip
    """The judge's :class:`CleanEmbeddings` of ``faces`` (made on first use, with ``batch_size``; keyed by the image
    tensor itself). The held-out set's is made with the evaluation batch size, so that its rows are bit-identical
    to what the same teacher gives a linker's evaluation batches (the identity harness then ties exactly)."""
    key = ("clean", id(faces.images))
    entry = judge.cache.get(key)
    if entry is None or entry.faces.images is not faces.images:
        entry = judge.cache[key] = CleanEmbeddings(judge, faces, device, batch_size)
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


# At most this many public identities select the finetune checkpoint: each candidate is scored by protecting and
# linking every face of them (with the payload's inversion where it has one), three times per run; 16 identities
# (~120 faces of celeba112) separate the candidates that matter at a fraction of the cost of 20 % of 1500 faces.
SELECT_MAX_IDS = 16


def split_identities(faces: FaceSet, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, select) indices into ``faces``: a ``share`` of its identities with >= 2 faces (at least 2, at most
    :data:`SELECT_MAX_IDS` identities) go to select, the rest to fit. Identity-disjoint: what selects a model never
    trained it."""
    ids = identity_index(faces)
    uniq, counts = torch.unique(ids, return_counts=True)
    multi = uniq[counts >= 2]
    if len(multi) < 4:
        raise AttackError(f"finetune needs at least 4 public identities with 2+ faces to hold some out for its "
                          f"model selection; --data has {len(multi)}")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    n_sel = min(max(2, round(share * len(multi))), len(multi) - 2, SELECT_MAX_IDS)
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
    row i = held-out face i protected with the evaluation secrets (``EVAL_STREAM``, as every form's queries), and
    the server's own enrolment of it: the mean of ``cfg.insider_views`` embeddings of the clean photo protected
    with independent secrets (:data:`INSIDER_GALLERY_STREAM`; the fixed key under ``secrets=fixed``), every other
    view of the mirrored photo -- the flip-TTA template a recogniser enrols with, which the insider can build
    because it holds the clean photo. All through ``method.recognize``; nothing is trained. NotImplementedError where
    the method has no server."""
    cfg, val, method = ctx.cfg, ctx.val, ctx.method
    q, g = [], []
    for k, start in enumerate(range(0, len(val), cfg.eval_batch_size)):
        x = val.batch(torch.arange(start, min(start + cfg.eval_batch_size, len(val)))).to(ctx.device)
        q.append(F.normalize(method.recognize(protect_with(method, x, cfg, EVAL_STREAM, k)).float(), dim=1).cpu())
        views = [F.normalize(method.recognize(protect_with(method, x.flip(-1) if v % 2 else x, cfg,
                                                           INSIDER_GALLERY_STREAM, k * cfg.insider_views + v)).float(),
                             dim=1) for v in range(cfg.insider_views)]  # fmt: skip
        g.append(F.normalize(torch.stack(views).sum(0), dim=1).cpu())
    return torch.cat(q), torch.cat(g)
