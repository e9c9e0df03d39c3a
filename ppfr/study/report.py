"""The study's Markdown report (tables, the measured privacy ordering, the budget, the command) and its chart."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from ppfr.study.budget import BudgetPlan
from ppfr.study.config import DEFAULT_METHODS, StudyConfig
from ppfr.study.holdout import ordering_check


def _f(v: Any, spec: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, spec)


def _kind(sec: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    """A kind's figure for the table: n/a where the kind does not apply, – where it has no such figure."""
    if sec and sec.get("applies") is False:
        return "n/a"
    return _f(sec.get(key) if sec else None, spec, scale)


def form_figures(link: dict[str, Any]) -> str:
    """``adapter / finetune / insider`` top-1 % of a linkage section (– for a form not run; the reason's first words
    for one that could not run)."""
    forms = link.get("forms") or {}
    cells = []
    for f in ("adapter", "finetune", "insider"):
        s = forms.get(f)
        cells.append("–" if s is None else "skipped" if s.get("skipped") else _f(s.get("linkage_top1"), ".1f", 100))
    return " / ".join(cells)


def privacy_ordering(rows: list[dict[str, Any]]) -> list[str]:
    """One line per method, most private first: the strongest attacks' figures beside the paper's claim."""
    items = []
    for r in rows:
        kinds = (r.get("attack") or {}).get("kinds", {})
        link = (kinds.get("linkage") or {}).get("linkage_top1")
        reids = [kinds[k]["reid_acc"] for k in ("inversion", "recovery")
                 if (kinds.get(k) or {}).get("reid_acc") is not None]  # fmt: skip
        reid = max(reids) if reids else None
        items.append((1.0 if link is None else link, 1.0 if reid is None else reid, r, link, reid))
    items.sort(key=lambda t: (t[0], t[1]))
    lines = []
    for i, (_, _, r, link, reid) in enumerate(items, 1):
        inv = ((r.get("attack") or {}).get("kinds", {}).get("inversion")) or {}
        chance = (((r.get("attack") or {}).get("kinds", {}).get("linkage") or {}).get("chance") or {}).get("linkage_top1")
        times = f" ({link / chance:.0f}× chance)" if link is not None and chance else ""
        form = (((r.get("attack") or {}).get("kinds", {}).get("linkage") or {}).get("form"))
        by = f" (by the {form} form)" if form and link is not None else ""
        txt = (f"{i}. `{r.get('label', r['method'])}`: linkage top-1 {_f(link, '.1f', 100)} %{times}{by}, best "
               f"re-id {_f(reid, '.1f', 100)} %")  # fmt: skip
        if inv.get("ssim") is not None:
            txt += f", closed-form inversion SSIM {inv['ssim']:.3f}"
            if inv.get("key_recovery") is not None:
                txt += f" with the secret found for {inv['key_recovery'] * 100:.1f} % of faces"
        p = r["paper"]
        if "ssim" in p:
            best = max([s for s in (inv.get("ssim"), ((r.get("attack") or {}).get("kinds", {}).get("recovery") or {})
                                    .get("ssim")) if s is not None], default=None)  # fmt: skip
            if best is not None and best > p["ssim"]:
                txt += (f"; the paper's recovery SSIM {p['ssim']:.2f} does **not** survive (measured {best:.3f}: "
                        "the face is recovered better than the paper says)")
            else:
                txt += f"; the paper's recovery SSIM {p['ssim']:.2f} is consistent with what these attacks recover"
                if link is not None and chance and link >= 5 * chance:
                    txt += (", but linkage still finds the person far above chance: the pixel metric understates "
                            "the identity leak")
        lines.append(txt + ".")
    return lines


def _held(r: dict[str, Any]) -> str:
    h = (r.get("holdout") or {}).get("flip")
    return f"{h['accuracy'] * 100:.2f} ± {h['std'] * 100:.2f}" if h else "–"


def ordering_lines(check: dict[str, Any] | None, holdout_ids: int) -> list[str]:
    """The report's paragraph on the held-out identities' ordering check (nothing without ``--holdout-ids``)."""
    if check is None:
        return []
    verdict = ("**kept**" if check["kept"] else
               "**kept up to noise**: every swapped pair is within one std of a set" if check["kept_beyond_noise"]
               else "**changed**")  # fmt: skip
    out = ["", f"**Ordering on identities nobody trained on** ({holdout_ids} identities of the training "
           "folder held out of every run and of the attacker's training set; 10 identity-disjoint folds of pairs of "
           f"them, `acc % held-out ids`): {verdict}; Kendall τ {check['kendall_tau']:.2f} between the two columns.",
           "", f"- by `--pairs`: {' > '.join(check['order_pairs'])}",
           f"- by held-out ids: {' > '.join(check['order_holdout'])}"]  # fmt: skip
    for sw in check["swaps"]:
        out.append(f"- swapped: `{sw['above']}` above `{sw['below']}` on `--pairs` by {sw['gap_pairs'] * 100:.2f} "
                   f"points, below it on the held-out ids by {sw['gap_holdout'] * 100:.2f}"
                   + (" (within one std: noise)" if sw["within_std"] else ""))  # fmt: skip
    return out


# Over 120 lines on purpose: the report is one document written top to bottom; its tables share the rows' lookups.
def write_report(cfg: StudyConfig, rows: list[dict[str, Any]], path: Path, seconds: float, judge_orig,
                 total: dict[str, Any] | None = None, skipped: list[str] | None = None,
                 plan: BudgetPlan | None = None) -> None:  # fmt: skip
    """docs/results.md: the table (a ``training`` column: scratch or the transfer/teacher a run used), the papers'
    figures, the privacy-utility chart (``privacy_utility.png`` next to the report), the pictures (with the run),
    what a budget skipped, the command."""
    # The pictures show faces of the dataset: they stay with the run (``<out>/pictures``), never next to a report
    # that may be committed, since a dataset's licence need not allow redistributing its images.
    pics = Path(cfg.out) / "pictures"
    pics.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(pics, path.parent))
    lines = [
        "# Results: all methods side by side (small scale, real faces)",
        "",
        "Measured by `ppfr study` in one run; rerun it with the command below on any image-folder dataset with a "
        "pairs file. The papers' figures come from METHODS.md (IR-50 on MS1Mv2 for accuracy, LFW; a full-scale "
        "U-Net recovery attack trained on BUPT for SSIM/PSNR). This study trains a narrow IR-18 for "
        f"{cfg.epochs} epoch(s) per stage"
        f"{f' of at most {cfg.max_steps_per_epoch} steps' if cfg.max_steps_per_epoch and not plan else ''}"
        + (f" of at most {max(plan.steps.values())} steps (planned for a {cfg.budget_min:g} min budget)"
           if plan else "")
        + (" (the transfer rows at their configs' own epochs per stage, the Training table's `stages` column)"
           if _own_recipes(cfg) else "")
        + " on a few thousand faces, so absolute accuracies are far lower: "
        "compare methods with each other and with the unprotected `arcface` row, the reference point. The "
        "`training` column says how a row was trained: `scratch` (the method's tiny config from random weights) or "
        "with a pretrained `transfer` (face-api.js) and/or a `distill` "
        "teacher (docs/methods.md \"Transfer and distillation\"); a method's transfer row follows its scratch row.",
        "",
        "![privacy vs utility](privacy_utility.png)",
        "",
        "*Privacy vs utility*: x = verification accuracy; left, identity-linkage top-1; right, the best inversion / "
        "recovery SSIM (lower = more private on both); the marker is the training mode, the star the ArcFace "
        "reference.",
        "",
        "Privacy is what survives the strongest attacks known (docs/attack.md), scored on held-out identities: "
        "**inversion** solves for the face in closed form where the payload is linear in it, with the per-image "
        "secret searched, not given; **linkage** (FaceLinkGen-style) trains a model so that the independent "
        "judge's embedding space links protected queries to a clean gallery; **recovery** is the papers' learned "
        "U-Net. ↓ = lower is more private; n/a = the kind does not apply to the payload.",
        "",
        "| method | training | acc % (10-fold, flip) | acc % held-out ids | AUC | inversion SSIM ↓ | key rec. % "
        "| recovery SSIM ↓ | best re-id % ↓ "
        "| linkage top-1 % ↓ (strongest form) | adapter / finetune / insider top-1 % | linkage TAR@1e-3 % ↓ "
        "| 1:1 acc % ↓ | payload B/img | client ms/img | server ms/img | paper LFW % | paper SSIM / PSNR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    anchors = None
    for r in rows:
        v, c, p = r["verification"]["flip"], r["cost"], r["paper"]
        kinds = (r.get("attack") or {}).get("kinds", {})
        inv, rec, link = (kinds.get(k) or {} for k in ("inversion", "recovery", "linkage"))
        reids = [s["reid_acc"] for s in (inv, rec) if s.get("reid_acc") is not None]
        paper_priv = f"{p['ssim']:.2f} / {p['psnr']:.2f}" if "ssim" in p else "–"
        if link.get("teacher_clean"):
            anchors = link
        lines.append(
            f"| {r['method']} | {r.get('training', 'scratch')} | {v['accuracy'] * 100:.2f} ± {v['std'] * 100:.2f} | "
            f"{_held(r)} | {v['auc']:.4f} | "
            f"{_kind(inv, 'ssim', '.3f')} | {_kind(inv, 'key_recovery', '.1f', 100)} | {_kind(rec, 'ssim', '.3f')} | "
            f"{_f(max(reids) if reids else None, '.2f', 100)} | {_kind(link, 'linkage_top1', '.1f', 100)}"
            f"{' (' + link['form'] + ')' if link.get('form') and link.get('linkage_top1') is not None else ''} | "
            f"{form_figures(link)} | "
            f"{_f((link.get('tar_at_fmr') or {}).get('1e-3'), '.1f', 100)} | {_kind(link, 'pair_acc', '.1f', 100)} | "
            f"{c['payload_bytes']:,} | "
            f"{c['client_ms']:.1f} | {c['server_ms']:.1f} | {_f(p.get('lfw'), '.2f')}"
            f"{' (' + p['as'] + ')' if 'as' in p else ''} | {paper_priv} |"
        )
        grid = Path(cfg.out) / "attack" / r.get("label", r["method"]) / "grid.png"
        if grid.is_file():
            shutil.copyfile(grid, pics / f"{r.get('label', r['method'])}.png")
    if anchors:
        t, ch = anchors["teacher_clean"], anchors["chance"]
        lines.append(f"| *anchor: the judge on clean queries (upper bound)* | | | | | | | | | "
                     f"{_f(t.get('linkage_top1'), '.1f', 100)} | | {_f((t.get('tar_at_fmr') or {}).get('1e-3'), '.1f', 100)} "
                     f"| {_f(t.get('pair_acc'), '.1f', 100)} | | | | | |")  # fmt: skip
        lines.append(f"| *anchor: chance* | | | | | | | | 50.00 | {_f(ch.get('linkage_top1'), '.1f', 100)} | | "
                     f"{_f((ch.get('tar_at_fmr') or {}).get('1e-3'), '.1f', 100)} | 50.0 | | | | | |")  # fmt: skip
    jo = f"{judge_orig.accuracy * 100:.2f} ± {judge_orig.std * 100:.2f} %" if judge_orig is not None else "n/a"
    n_val = next((s.get("n_faces") for r in rows for s in (r.get("attack") or {}).get("kinds", {}).values()
                  if s.get("n_faces")), "?")  # fmt: skip
    lines += ordering_lines(ordering_check(rows), cfg.holdout_ids)
    lines += ["", "**Measured privacy ordering** (most private first, by linkage top-1, the strongest attack that "
              "applies to every method; ties broken by the best re-identification):", ""]  # fmt: skip
    lines += privacy_ordering(rows)
    lines += [
        "",
        f"- Re-identification: 10-fold accuracy of the independent judge ({cfg.judge}) on the faces an attack "
        f"recovered from the payloads of {n_val} held-out images (pairs subset); the judge on the original faces: "
        f"{jo}. Chance is 50 %.",
        "- SSIM (Wang et al. 2004, Gaussian 11, σ 1.5) and PSNR on [0, 1] between held-out faces and the attack's "
        "recovery. `arcface` sends the face itself.",
        "- Linkage: each held-out identity's first face, clean, is the gallery (embedded by the judge); every other "
        "face, protected, is a query; top-1 = the nearest gallery face is the query's identity. Forms "
        "(docs/attack.md): `adapter` (payload → image network → frozen judge), `finetune` (the adapter in front of a "
        "copy of the judge with every weight trained, FaceLinkGen's code path), `insider` (no training: the server "
        "protects the gallery face with its own client and embeds both sides with its own recogniser). The linkage "
        "figure is the strongest form's; 1:1 acc = 10-fold accuracy of (protected, gallery-side) pairs, thresholds "
        "from the training folds.",
        *[f"- `{r['label']}` sends bit-identical payloads to `{r['attack']['reused_from']}`'s (checked on the timing "
          f"batch: the same client): its payload-only attacks are `{r['attack']['reused_from']}`'s, not re-run; "
          "the insider form, which uses the row's own recogniser, is re-run."
          for r in rows if (r.get("attack") or {}).get("reused_from")],
        "- Client/server time: median over 3 batches of "
        f"{cfg.timing_batch} images on this CPU with {torch.get_num_threads()} thread(s), CPU backends.",
    ]
    lines += [
        "",
        "## Training",
        "",
        "Verification accuracy without flip TTA before training (the same model, untrained) and after.",
        "",
        "| method | training | acc % untrained → trained | stages (×epochs): loss first → last | images/s "
        "| train time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = "; ".join(_stage_text(s) for s in r["train"]["stages"])
        ips = ", ".join(f"{s['images_per_s']:.1f}" for s in r["train"]["stages"])
        before = r["train"].get("before", {}).get("accuracy")
        after = r["verification"]["plain"]["accuracy"]
        lines.append(f"| {r['method']} | {r.get('training', 'scratch')} | {_f(before, '.2f', 100)} → "
                     f"{after * 100:.2f} | {st} | {ips} | "
                     f"{r['train'].get('seconds', 0) / 60:.1f} min |")  # fmt: skip
    lines += ["", "## Pictures (original / payload / one row per attack)", "",
              f"One grid per method is written to `{cfg.out}/pictures/` by the run (not committed: they show faces of "
              "the dataset).", ""]  # fmt: skip
    for r in rows:
        lab = r.get("label", r["method"])
        if (pics / f"{lab}.png").is_file():
            lines.append(f"- {lab}: [{lab}.png]({(rel / (lab + '.png')).as_posix()})")
    lines.append("")
    if plan is not None or skipped:
        lines += ["## Budget", ""]
        if plan is not None:
            lines += ["Planned before training (probe of each run's steps; attacks at their ledger time or a share of "
                      "the budget):", "", "```", *plan.lines(), "```", ""]  # fmt: skip
        lines += [f"Skipped for the budget: {'; '.join(skipped)}." if skipped else "Nothing was skipped.", ""]
    import ppfr

    lines += [
        "## How this was produced",
        "",
        "```",
        "ppfr study " + " ".join(_argv(cfg)),
        "```",
        "",
        (f"Whole run: {total['seconds'] / 60:.1f} min over {total['invocations']} invocations (the last, which "
         f"reused every finished step, {seconds / 60:.1f} min)" if total and total["invocations"] > 1 else
         f"Whole run: {seconds / 60:.1f} min")
        + f" on {platform.processor() or platform.machine()} with "
        f"{torch.get_num_threads()} torch thread(s). Versions: ppfr {ppfr.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    from ppfr.eval.chart import privacy_utility_chart

    if rows:  # after the tables: a missing matplotlib then stops with the report already written
        privacy_utility_chart(rows, path.parent / "privacy_utility.png", title=chart_title(cfg, len(rows)))


def _own_recipes(cfg: StudyConfig) -> bool:
    """Whether the study has transfer rows that train their configs' own schedules (the report says so)."""
    return cfg.transfer and cfg.transfer_schedule == "config"


def chart_title(cfg: StudyConfig, n_rows: int) -> str:
    """The chart's title: the rows and their schedule (the transfer rows' own recipes under
    ``transfer_schedule="config"``)."""
    recipes = ", transfer rows at their configs' recipes" if _own_recipes(cfg) else ""
    return f"ppfr study: {n_rows} rows, {cfg.epochs} epoch(s) per stage{recipes}"


def _stage_text(stage: dict[str, Any]) -> str:
    """``server ×3: 42.23 → 32.61``: a stage's name, its epochs (where recorded) and its first and last loss."""
    ep = f" ×{stage['epochs']}" if stage.get("epochs") else ""
    return f"{stage['stage']}{ep}: {stage['loss_first']:.2f} → {stage['loss_last']:.2f}"


def _argv(cfg: StudyConfig) -> list[str]:
    args = [f"--data {cfg.data}", f"--pairs {cfg.pairs}", f"--out {cfg.out}", f"--epochs {cfg.epochs}",
            f"--attack-steps {cfg.attack_steps}"]  # fmt: skip
    if cfg.attack_kinds != StudyConfig.attack_kinds:
        args.append(f"--attack-kinds {cfg.attack_kinds}")
    if cfg.linkage_steps != StudyConfig.linkage_steps:
        args.append(f"--linkage-steps {cfg.linkage_steps}")
    if cfg.linkage_form != StudyConfig.linkage_form:
        args.append(f"--linkage-form {cfg.linkage_form}")
    if cfg.finetune_steps != StudyConfig.finetune_steps:
        args.append(f"--finetune-steps {cfg.finetune_steps}")
    for flag, value, default in (("--max-steps-per-epoch", cfg.max_steps_per_epoch, None),
                                 ("--attack-train-images", cfg.attack_train_images, StudyConfig.attack_train_images),
                                 ("--attack-pairs", cfg.attack_pairs, StudyConfig.attack_pairs),
                                 ("--batch-size", cfg.batch_size, None), ("--judge", cfg.judge, StudyConfig.judge),
                                 ("--threads", cfg.threads, None)):  # fmt: skip
        if value != default:
            args.append(f"{flag} {value}")
    if cfg.budget_min is not None:
        args.append(f"--budget-min {cfg.budget_min:g}")
        if cfg.attack_share != StudyConfig.attack_share:
            args.append(f"--attack-share {cfg.attack_share:g}")
    if cfg.transfer != (cfg.budget_min is not None):
        args.append("--transfer" if cfg.transfer else "--no-transfer")
    if _own_recipes(cfg):
        args.append(f"--transfer-schedule {cfg.transfer_schedule}")
    if cfg.holdout_ids:
        args.append(f"--holdout-ids {cfg.holdout_ids}")
    if cfg.report:
        args.append(f"--report {cfg.report}")
    if tuple(cfg.methods) != DEFAULT_METHODS:
        args.append("--methods " + " ".join(cfg.methods))
    return args
