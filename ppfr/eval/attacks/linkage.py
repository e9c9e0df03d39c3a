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
      then both trained, the copy at a hundredth of the rate after a warm-up, on the batch-centred cosine (the plain
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

import time
from pathlib import Path
from typing import Any

import torch

from ppfr.eval.attacks import register_attack
from ppfr.eval.attacks.common import Attack, AttackContext, AttackError
from ppfr.eval.attacks.data import FaceSet, identity_index
from ppfr.eval.attacks.judge import Judge
from ppfr.eval.attacks.results import RESULT_KEYS
from ppfr.eval.attacks.linkage_score import score_linkage
from ppfr.eval.attacks.linkers import (
    Linker, build_linker, centred, clean_embeddings, embed_heldout, finetune_linker, frozen_teacher,
    insider_embeddings, inverter_for, load_linker_init, resolve_forms, save_linker, teacher_embed, train_linker,
)  # fmt: skip
from ppfr.methods.base import Method


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
        if ctx.judge is None:
            # every figure of the kind is read against the teacher's clean-gallery anchor; a run without a judge
            # records each form as skipped, the insider included, rather than a table without its anchor row
            return combine_forms({f: _skipped(self.NO_TEACHER, f) for f in forms})
        n_gallery = len(torch.unique(identity_index(ctx.val)))
        if cfg.linkage_topk > n_gallery:
            raise AttackError(f"AttackConfig.linkage_topk={cfg.linkage_topk} exceeds the {n_gallery} held-out "
                              "identities of the gallery; pass a smaller linkage_topk")  # fmt: skip
        sections: dict[str, dict[str, Any]] = {}
        grid_images = None
        adapter: Linker | None = None
        anchor = clean_embeddings(ctx.judge, ctx.val, ctx.device, cfg.eval_batch_size).all()
        for form in forms:
            t0 = time.perf_counter()
            if form == "insider":
                sections[form] = self.run_insider(ctx, anchor, t0)
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

    def run_insider(self, ctx: AttackContext, anchor: torch.Tensor, t0: float) -> dict[str, Any]:
        cfg = ctx.cfg
        try:
            queries, refs = insider_embeddings(ctx)
        except NotImplementedError:
            return _skipped(f"{ctx.method.name} has no server recogniser to link with (insider form)", "insider")
        sec = score_linkage(queries, refs, ctx.val, cfg.linkage_topk, anchor)
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
