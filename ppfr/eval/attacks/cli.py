"""``ppfr attack``: run attack kinds on targets, write ``<out>/<target>/result.json``, one grid, a summary table.

:func:`run_target` is the runner every caller uses (the CLI, ``ppfr study``, the tests): it runs each requested
kind that applies to the target's method, records why the others do not apply, merges the sections into the
target's ``result.json`` and draws one picture grid with a row per attack that outputs faces.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ppfr.data.sources import PairSource
from ppfr.eval.attacks import available_attacks, build_attack
from ppfr.eval.attacks.common import (
    PAPER_PRIVACY, AttackConfig, AttackContext, AttackError, Target, payload_shapes, resolve_target,
)  # fmt: skip
from ppfr.eval.attacks.data import EVAL_STREAM, FaceSet, identity_overlap, load_faces, open_val, protect_with
from ppfr.eval.attacks.judge import Judge, judge_embeddings, make_judge, pair_verification
from ppfr.eval.attacks.results import merge_result, result_path, save_grid, visualise_payload
from ppfr.eval.verification import VerificationResult
from ppfr.methods.base import Payload
from ppfr.models.faceapi import FACEAPI_DIR_HELP


def parse_kinds(text: str) -> list[str]:
    """``all`` | a comma-separated list of kinds -> kinds in run order (inversion first: it seeds the others)."""
    known = available_attacks()
    asked = [k.strip() for k in text.split(",") if k.strip()]
    if not asked:
        raise AttackError("--kind: name at least one kind")
    if "all" in asked:
        return known
    bad = [k for k in asked if k not in known]
    if bad:
        raise AttackError(f"--kind: unknown kind {bad[0]!r}; choose from {', '.join(known)} or all")
    return [k for k in known if k in asked]


@torch.no_grad()
def _grid_heads(ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's first two rows: the original faces and what the wire shows -- each face protected in its own
    evaluation batch with that batch's secrets, so the row shows the very payload the kinds attacked."""
    bs, views = ctx.cfg.eval_batch_size, []
    idx = ctx.grid_index()
    for i in idx.tolist():
        k = i // bs
        x = ctx.val.batch(torch.arange(k * bs, min((k + 1) * bs, len(ctx.val)))).to(ctx.device)
        payload = protect_with(ctx.method, x, ctx.cfg, EVAL_STREAM, k)
        one = Payload(payload.method, {n: t[i - k * bs : i - k * bs + 1] for n, t in payload.tensors.items()})
        views.append(visualise_payload(one, getattr(ctx.method, "payload_spec", None)).cpu())
    return (ctx.val.batch(idx) * 0.5 + 0.5).cpu(), torch.cat(views)


def section_name(kind: str, secrets: str) -> str:
    """The key of a kind's section in result.json: ``linkage`` (fresh secrets) or ``linkage/fixed``."""
    return kind if secrets == "fresh" else f"{kind}/{secrets}"


@torch.no_grad()
def has_secrets(method: Any, images: torch.Tensor) -> bool:
    """True when the payload depends on the protection generator (a per-image secret: rank, shuffle, layout)."""
    a = method.protect(images, generator=torch.Generator().manual_seed(1))
    b = method.protect(images, generator=torch.Generator().manual_seed(2))
    return any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def run_target(target: Target, kinds: Iterable[str], train: FaceSet, val: FaceSet, cfg: AttackConfig,
               out_dir: Path | None = None, judge: Judge | None = None,
               judge_original: VerificationResult | None = None, device: torch.device | str = "cpu",
               log: Callable[[str], None] | None = print, secrets: Iterable[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``kinds`` on one target under each secrets mode (default: ``cfg.secrets``); returns (and with
    ``out_dir`` writes) the merged result. Sections are keyed by :func:`section_name`; ``fixed`` is skipped with a
    note for a method whose payload has no per-image secret (it would repeat ``fresh``)."""
    modes = list(secrets or [cfg.secrets])
    kinds = list(kinds)
    if modes != ["fresh"] and not has_secrets(target.method, train.batch(torch.arange(min(2, len(train)))).to(device)):
        if log:
            log(f"[{target.label}] the payload has no per-image secret: 'fixed' would repeat 'fresh', skipped")
        modes = [m for m in modes if m == "fresh"] or ["fresh"]
    result: dict[str, Any] = {}
    for mode in modes:
        result = _run_mode(target, kinds, train, val, dataclasses.replace(cfg, secrets=mode), out_dir, judge,
                           judge_original, device, log)  # fmt: skip
    return result


def _run_mode(target: Target, kinds: list[str], train: FaceSet, val: FaceSet, cfg: AttackConfig,
              out_dir: Path | None, judge: Judge | None, judge_original: VerificationResult | None,
              device: torch.device | str, log: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
    ctx = AttackContext(target, train, val, cfg, judge, judge_original, device, log,
                        save_dir=Path(out_dir) / target.label if out_dir is not None else None)
    t0 = time.perf_counter()
    with torch.no_grad():
        probe = protect_with(target.method, train.batch(torch.arange(min(2, len(train)))).to(device), cfg, 0, 0)
    shapes = payload_shapes(probe)
    if log:
        desc = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())
        log(f"[{target.label}] payload {desc}; {len(train)} public / {len(val)} held-out faces; secrets {cfg.secrets}")
    sections: dict[str, dict[str, Any]] = {}
    rows: list[tuple[str, torch.Tensor]] = []
    for kind in kinds:
        attack = build_attack(kind)
        reason = attack.applies(target.method)
        if reason is not None:
            sections[section_name(kind, cfg.secrets)] = {"applies": False, "reason": reason}
            if log:
                log(f"[{target.label}] {kind}: does not apply ({reason})")
            continue
        if log:
            log(f"[{target.label}] {kind}: {attack.description}")
        sec = attack.run(ctx)
        grid = sec.pop("_grid", None)
        name = section_name(kind, cfg.secrets)
        if grid is not None and len(grid):
            rows.append((name, grid.cpu()))
        sections[name] = {"applies": True, "kind": kind, "secrets": cfg.secrets, **sec}
        if log:
            log(f"[{target.label}] {name}: {one_line(sections[name])}")
    extra = {"payload": {k: list(v) for k, v in shapes.items()}, "payload_channels": sum(v[0] for v in shapes.values()),
             "train_images": len(train), "train_identities": int(torch.unique(train.labels).numel()),
             "heldout_images": len(val), "identity_overlap": identity_overlap(train.source, val.source),
             "paper": PAPER_PRIVACY.get(target.method.name, []), "seconds_total": round(time.perf_counter() - t0, 2)}
    if out_dir is not None and rows:
        orig, view = _grid_heads(ctx)
        d = Path(out_dir) / target.label
        d.mkdir(parents=True, exist_ok=True)
        suffix = "" if cfg.secrets == "fresh" else f"_{cfg.secrets}"
        save_grid([orig, view, *[r for _, r in rows]], d / f"grid{suffix}.png")
        extra[f"grid{suffix}"] = {"file": f"grid{suffix}.png", "rows": ["original", "payload", *[k for k, _ in rows]]}
    return merge_result(out_dir, target, sections, extra)


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v * 100:.1f}"


def _num(v: Any, spec: str) -> str:
    return "–" if not isinstance(v, (int, float)) else format(v, spec)


def one_line(sec: dict[str, Any]) -> str:
    """A kind's headline figures in one line (for logs)."""
    parts = []
    if sec.get("ssim") is not None:
        parts.append(f"SSIM {sec['ssim']:.4f}, PSNR {sec['psnr']:.2f} dB")
    if sec.get("reid_acc") is not None:
        parts.append(f"re-id {sec['reid_acc'] * 100:.2f} %")
    if sec.get("linkage_top1") is not None:
        forms = sec.get("forms") or {}
        each = (" (" + ", ".join(f"{f} {_pct(v.get('linkage_top1'))}" for f, v in forms.items()) + ")"
                if len(forms) > 1 else "")  # fmt: skip
        parts.append(f"linkage top-1 {sec['linkage_top1'] * 100:.1f} % [{sec.get('form')}]{each}")
    if sec.get("key_recovery") is not None:
        parts.append(f"key recovery {sec['key_recovery'] * 100:.1f} %")
    if sec.get("skipped"):
        parts.append(f"skipped: {sec['skipped']}")
    parts.append(f"{sec.get('time_s') or 0:.0f}s")
    return ", ".join(parts)


def markdown_table(results: list[dict]) -> str:
    """One row per (target, kind): held-out SSIM/PSNR, re-identification, linkage, key recovery; the papers'
    figures for the method below the table."""
    lines = [
        "| target | method | kind | secrets | SSIM ↓ | PSNR dB ↓ | re-id acc % ↓ | linkage top-1 % ↓ (teacher / chance) "
        "| TAR@FMR 1e-3 % ↓ | key recovery % ↓ | faces | time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    papers: dict[str, list] = {}
    for r in results:
        for kind, s in r.get("kinds", {}).items():
            if not s.get("applies", True):
                lines.append(f"| {r['label']} | {r['method']} | {kind} | – | n/a: {s.get('reason', '')} "
                             "| | | | | | | |")  # fmt: skip
                continue
            link = "–"
            if s.get("linkage_top1") is not None:
                t, c = (s.get("teacher_clean") or {}), (s.get("chance") or {})
                link = f"{_pct(s['linkage_top1'])} ({_pct(t.get('linkage_top1'))} / {_pct(c.get('linkage_top1'))})"
                if len(s.get("forms") or {}) > 1:
                    link += f" = {s['strongest']}; " + ", ".join(f"{f} {_pct(v.get('linkage_top1'))}"
                                                                 for f, v in s["forms"].items())  # fmt: skip
            tar = (s.get("tar_at_fmr") or {}).get("1e-3")
            lines.append(f"| {r['label']} | {r['method']} | {kind} | {s.get('secrets', '–')} | "
                         f"{_num(s.get('ssim'), '.3f')} | {_num(s.get('psnr'), '.2f')} | {_pct(s.get('reid_acc'))} | "
                         f"{link} | {_pct(tar)} | {_pct(s.get('key_recovery'))} | {s.get('n_faces', '–')} | "
                         f"{_num(s.get('time_s'), '.0f')} |")  # fmt: skip
        if r.get("paper"):
            papers[r["method"]] = r["paper"]
    lines.append("")
    lines.append("SSIM: Wang et al. 2004, 11×11 Gaussian σ=1.5 (ppfr.eval.image_metrics); PSNR on [0, 1]; re-id: "
                 "10-fold accuracy of the judge on recovered faces (held-out pairs); linkage: protected queries "
                 "against a clean gallery in the teacher's embedding space (docs/attack.md). ↓ = lower is more "
                 "private.")  # fmt: skip
    for m, ps in sorted(papers.items()):
        txt = "; ".join(f"SSIM {p['ssim']:.3f} / PSNR {p['psnr']:.2f}"
                        + (f" / re-id {p['reid_acc'] * 100:.2f} %" if "reid_acc" in p else "") + f" ({p['source']})"
                        for p in ps)  # fmt: skip
        lines.append(f"- paper, {m} (full-scale U-Net recovery on BUPT): {txt}")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path) -> tuple[Path, Path]:
    """Collect every ``out_dir/*/result.json`` into ``results.json`` and ``results.md``."""
    out_dir = Path(out_dir)
    results = []
    for p in sorted(out_dir.glob("*/result.json")):
        try:
            results.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable {p}: {exc}", stacklevel=2)
    results.sort(key=lambda r: r.get("label", ""))
    jp, mp = out_dir / "results.json", out_dir / "results.md"
    jp.write_text(json.dumps(results, indent=2) + "\n")
    mp.write_text("# Attack results\n\n" + markdown_table(results))
    return jp, mp


# --------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = AttackConfig()
    ap = argparse.ArgumentParser(
        prog="ppfr attack",
        description="Privacy attacks on a method's real payload, scored on held-out identities: closed-form "
        "inversion of linear payloads (secret searched), FaceLinkGen-style identity linkage through a pretrained "
        "teacher, learned U-Net recovery (docs/attack.md).",
    )
    ap.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="runs/<name>/model.pt, a run folder, 'identity' (harness check: payload = the RGB image), or "
                         "'method:NAME[:key=value,...]' (an untrained method with the fixed seed every verb uses, "
                         "e.g. method:partialface:depth=18)")
    ap.add_argument("--kind", default="all",
                    help=f"attack kinds, comma-separated: {', '.join(available_attacks())}, or all (default: all "
                         "that apply)")  # fmt: skip
    ap.add_argument("--data", required=True, help="the attacker's public faces (identities disjoint from --val)")
    ap.add_argument("--val", required=True,
                    help="held-out faces: a pair list (enables re-identification and pair linkage) or a folder")
    ap.add_argument("--judge", default="faceapi",
                    help="judge and linkage teacher: faceapi (default), a model.pt, or none")
    ap.add_argument("--judge-dir", default=None, help=FACEAPI_DIR_HELP)
    ap.add_argument("--out", default="runs/attack", help="output folder (default runs/attack)")
    ap.add_argument("--secrets", default=d.secrets, choices=["fresh", "fixed", "both"],
                    help="fresh per-image secrets (default), one fixed key for every face (an attacker holding the "
                         "client's key), or both side by side")
    ap.add_argument("--init", default=d.init, choices=["none", "inversion"],
                    help="learned kinds also see the closed-form inversion estimate (where the payload is linear)")
    ap.add_argument("--steps", type=int, default=d.steps, help="recovery training steps (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="recovery faces per step")
    ap.add_argument("--lr", type=float, default=d.lr, help="recovery Adam lr, cosine-decayed (default %(default)s)")
    ap.add_argument("--width", type=int, default=d.base_width, help="U-Net base width (default %(default)s)")
    ap.add_argument("--stem-width", type=int, default=d.stem_width,
                    help="channels of the payload projection (default %(default)s)")
    ap.add_argument("--loss", default=d.loss, choices=["l1", "l1+ssim"], help="recovery loss (default %(default)s)")
    ap.add_argument("--inversion-ridge", type=float, default=d.inversion_ridge,
                    help="inversion: Tikhonov weight toward the public mean face (default %(default)s)")
    ap.add_argument("--inversion-patch", type=int, default=d.inversion_patch,
                    help="inversion: side of the patch the secret search scores (default %(default)s)")
    ap.add_argument("--linkage-form", default=d.linkage_form,
                    help="linkage forms, comma-separated: adapter (+ frozen teacher), finetune (a trainable copy of "
                         "the teacher), insider (the server's own client + recogniser, no training), student "
                         "(from scratch); auto (default) = adapter,finetune,insider, the strongest is the figure")
    ap.add_argument("--linkage-steps", type=int, default=d.linkage_steps, help="linkage training steps")
    ap.add_argument("--linkage-batch-size", type=int, default=d.linkage_batch_size, help="linkage faces per step")
    ap.add_argument("--linkage-lr", type=float, default=d.linkage_lr, help="linkage Adam lr")
    ap.add_argument("--linkage-topk", type=int, default=d.linkage_topk, help="k of top-k linkage")
    ap.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                    help="finetune form: steps with the teacher copy unfrozen (default %(default)s)")
    ap.add_argument("--finetune-lr-mult", type=float, default=d.finetune_lr_mult,
                    help="finetune form: the teacher copy's lr as a multiple of --linkage-lr (default %(default)s)")
    ap.add_argument("--finetune-loss", default=d.finetune_loss, choices=["centred", "cosine"],
                    help="finetune form: batch-centred cosine (default) or FaceLinkGen's plain 1 - cos")
    ap.add_argument("--insider-views", type=int, default=d.insider_views,
                    help="insider form: protections of each clean photo averaged into its enrolment, every other "
                         "one mirrored (default %(default)s)")
    ap.add_argument("--linkage-init", default=None, metavar="LINKER_PT",
                    help="start the linker from a linker_<form>.pt an earlier run wrote (few-shot transfer)")
    ap.add_argument("--max-train-images", type=int, default=d.max_train_images,
                    help="public faces kept in memory, a random subset (default %(default)s)")
    ap.add_argument("--max-val-images", type=int, default=None, help="held-out folder: score a random subset")
    ap.add_argument("--max-pairs", type=int, default=None, help="held-out pair list: a balanced subset of pairs")
    ap.add_argument("--no-flip", action="store_true", help="no random flips of the training faces")
    ap.add_argument("--time-limit", type=float, default=None, help="stop training each learned attacker after SECONDS")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return ap


def config_from_args(args: argparse.Namespace) -> AttackConfig:
    return AttackConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, stem_width=args.stem_width,
                        base_width=args.width, loss=args.loss, max_train_images=args.max_train_images,
                        max_val_images=args.max_val_images, max_pairs=args.max_pairs, flip=not args.no_flip,
                        seed=args.seed, time_limit=args.time_limit, secrets="fresh" if args.secrets == "both"
                        else args.secrets, init=args.init,
                        inversion_ridge=args.inversion_ridge, inversion_patch=args.inversion_patch,
                        linkage_form=args.linkage_form, linkage_steps=args.linkage_steps,
                        linkage_batch_size=args.linkage_batch_size, linkage_lr=args.linkage_lr,
                        linkage_topk=args.linkage_topk, finetune_steps=args.finetune_steps,
                        finetune_lr_mult=args.finetune_lr_mult, finetune_loss=args.finetune_loss,
                        linkage_init=args.linkage_init, insider_views=args.insider_views)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        cfg = config_from_args(args)
        kinds = parse_kinds(args.kind)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise AttackError("--device cuda: no CUDA device is available")
        # resolve everything that can fail on user input before spending minutes on training
        targets = [resolve_target(c, device) for c in args.checkpoints]
        val_src = open_val(args.val, cfg.max_pairs)
        judge = make_judge(args.judge, args.judge_dir, device)
        train = load_faces(args.data, max_images=cfg.max_train_images, seed=cfg.seed)
        val = load_faces(val_src, max_images=cfg.max_val_images, seed=cfg.seed)
    except AttackError as exc:
        print(f"ppfr attack: {exc}", file=sys.stderr)
        return 2
    overlap = identity_overlap(train.source, val.source)
    if overlap:
        print(f"ppfr attack: warning: {overlap} identities appear in both --data and --val; held-out figures are "
              "optimistic for the attacker", file=sys.stderr)  # fmt: skip
    print(f"ppfr attack: kinds {', '.join(kinds)}; {len(train)} public faces "
          f"({int(torch.unique(train.labels).numel())} identities), {len(val)} held-out faces; torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    original = None
    if judge is not None and isinstance(val.source, PairSource):
        t0 = time.perf_counter()
        emb = judge_embeddings(judge, (val.batch(torch.arange(i, min(i + cfg.eval_batch_size, len(val)))).to(device)
                                       for i in range(0, len(val), cfg.eval_batch_size)))  # fmt: skip
        original = pair_verification(emb, val.labels, val.source.pairs)
        print(f"judge {judge.name} on the original faces: {original} ({time.perf_counter() - t0:.0f}s)")
    out = Path(args.out)
    for target in targets:
        try:
            modes = ["fresh", "fixed"] if args.secrets == "both" else [args.secrets]
            run_target(target, kinds, train, val, cfg, out, judge, original, device, secrets=modes)
        except AttackError as exc:
            print(f"ppfr attack: {target.label}: {exc}", file=sys.stderr)
            return 2
    jp, mp = write_summary(out)
    written = ", ".join(f"{result_path(out, t.label)} + grid.png" for t in targets)
    print(f"wrote {written}, {jp}, {mp}")
    print(mp.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
