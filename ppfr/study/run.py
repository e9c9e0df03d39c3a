"""Running the study: train, evaluate, time and attack every row, reusing what a killed study already finished."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ppfr.study.budget import BudgetError, BudgetPlan, duration, keep_first_plan, plan_budget, probe_costs
from ppfr.study.config import PAPER, StudyConfig, study_runs, train_config
from ppfr.study.holdout import ordering_check, split_holdout
from ppfr.study.report import write_report
from ppfr.study.evaluation import load_rgb, cost, verify_cached, verify_tags


@torch.no_grad()
def payload_fingerprint(method, images: torch.Tensor) -> str:
    """SHA-256 of what ``method``'s client sends for ``images`` (B, 3, S, S) in [-1, 1], secrets drawn from a
    generator seeded 0: the tensors' names, shapes, dtypes and bytes. Every attack sees only the payload, so two
    rows with one fingerprint (a transfer row whose client has nothing trained, as its scratch row's: ArcFace's
    image, PartialFace's DCT ranks) face the same attacks with the same figures."""
    import hashlib

    payload = method.protect(images, generator=torch.Generator().manual_seed(0))
    h = hashlib.sha256()
    for name in sorted(payload.tensors):
        t = payload.tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def refresh_insider(target, attack_dir: Path, train, val, acfg, judge, log=print) -> dict[str, Any] | None:
    """Re-run the insider linkage form of a row whose other attacks were reused (:func:`reuse_attacks`): the insider
    links with the row's *own* recogniser, which a bit-identical payload does not make the twin's. Merges the new
    insider section into the row's linkage section and recomputes the strongest form; None when the study runs no
    insider form."""
    from ppfr.eval.attacks.cli import run_target
    from ppfr.eval.attacks.linkage import combine_forms
    from ppfr.eval.attacks.linkers import resolve_forms

    path = attack_dir / target.label / "result.json"
    res = json.loads(path.read_text())
    link = res.get("kinds", {}).get("linkage")
    if not link or "insider" not in resolve_forms(acfg) or "forms" not in link:
        return None
    fresh = run_target(target, ["linkage"], train, val, dataclasses.replace(acfg, linkage_form="insider"), None,
                       judge, log=log)["kinds"]["linkage"]  # fmt: skip
    forms = {**link["forms"], "insider": fresh["forms"]["insider"]}
    res["kinds"]["linkage"] = {"applies": True, "kind": "linkage", "secrets": link.get("secrets"),
                               **combine_forms(forms)}  # fmt: skip
    res["insider_rerun"] = True
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, path)
    return res


def reuse_attacks(twin: Path, dest: Path, label: str, twin_label: str) -> dict[str, Any]:
    """Copy an earlier row's finished attacks (``<attack>/<twin>/result.json`` and its grid) as ``label``'s, marked
    ``reused_from``: the two rows' payloads are bit-identical (:func:`payload_fingerprint`)."""
    res = json.loads((twin / "result.json").read_text())
    res.update(label=label, reused_from=twin_label)
    dest.mkdir(parents=True, exist_ok=True)
    if (twin / "grid.png").is_file():
        shutil.copyfile(twin / "grid.png", dest / "grid.png")
    tmp = dest / "result.json.tmp"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, dest / "result.json")
    return res


# Over 120 lines on purpose: the study is one resumable sequence (setup, plan, then per row train -> evaluate -> time
# -> attack, with the ledger and the budget threaded through); split, its state would travel through every piece.
def run_study(cfg: StudyConfig, log=print) -> list[dict[str, Any]]:
    from ppfr.eval.attacks.cli import parse_kinds, run_target, write_summary
    from ppfr.eval.attacks.common import AttackConfig, resolve_target
    from ppfr.eval.attacks.data import load_faces, open_val
    from ppfr.eval.attacks.judge import judge_embeddings, make_judge, pair_verification
    from ppfr.methods import load_method
    from ppfr.train.trainer import Trainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    runs, attack_dir = out / "runs", out / "attack"
    out.mkdir(parents=True, exist_ok=True)
    t_study = time.perf_counter()
    user_cfg = cfg  # what the user typed: the report prints it
    if cfg.holdout_ids:
        train_index, held_pairs = split_holdout(cfg.data, cfg.holdout_ids, out / "holdout", cfg.seed)
        cfg = dataclasses.replace(cfg, data=str(train_index), holdout_pairs=str(held_pairs))
        log(f"study: {cfg.holdout_ids} identities held out of training; every run trains on {train_index}, and is "
            f"also evaluated on {held_pairs}")  # fmt: skip
    ledger_path = out / "elapsed.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {"seconds": 0.0, "invocations": 0}
    ledger.setdefault("runs", {})
    study = study_runs(cfg)
    acfg = AttackConfig(steps=cfg.attack_steps, max_train_images=cfg.attack_train_images,
                        max_pairs=cfg.attack_pairs, seed=0, linkage_steps=cfg.linkage_steps,
                        linkage_form=cfg.linkage_form, finetune_steps=cfg.finetune_steps)  # fmt: skip
    kinds = parse_kinds(cfg.attack_kinds)
    val_src = open_val(cfg.pairs, acfg.max_pairs)
    judge = make_judge(cfg.judge, cfg.judge_dir) if cfg.judge != "none" else None
    attack_train = load_faces(cfg.data, max_images=acfg.max_train_images, seed=acfg.seed)
    attack_val = load_faces(val_src, max_images=acfg.max_val_images, seed=acfg.seed)
    judge_orig = None
    if judge is not None:
        emb = judge_embeddings(judge, (attack_val.batch(torch.arange(i, min(i + 32, len(attack_val))))
                                       for i in range(0, len(attack_val), 32)))  # fmt: skip
        judge_orig = pair_verification(emb, attack_val.labels, attack_val.source.pairs)
        log(f"study: judge {judge.name} on the original held-out faces: {judge_orig}")
    timing_images = load_rgb(cfg, cfg.timing_batch)

    plan: BudgetPlan | None = None
    deadline = float("inf")
    if cfg.budget_min is not None:
        # the budget covers every invocation of a resumed study: what earlier ones spent is spent
        left = cfg.budget_min * 60 - ledger["seconds"]
        deadline = t_study + left
        costs = probe_costs(cfg, study, out, timing_images, ledger, tuple(kinds), log=log)
        try:
            plan = plan_budget(costs, deadline - time.perf_counter(), cfg.attack_share)
        except BudgetError as exc:  # the user's figure, and what of it was left after the setup and the probe
            spent = f", after {ledger['seconds'] / 60:.1f} min of earlier invocations" if ledger["seconds"] else ""
            raise BudgetError(f"--budget-min {cfg.budget_min:g}: {exc}; that is what was left after the setup and "
                              f"the probe{spent}") from None
        plan_path = out / "plan.json"
        if plan_path.is_file():  # one schedule for the whole study: a resumed one keeps the first plan's steps
            old = json.loads(plan_path.read_text())["steps"]
            plan = dataclasses.replace(plan, steps=keep_first_plan(old, plan.steps))
            log("study: keeping the steps per epoch of the first invocation's plan (plan.json)")
        else:
            plan_path.write_text(json.dumps({"budget_min": cfg.budget_min, "steps": plan.steps}, indent=2) + "\n")
        for line in plan.lines():
            log("study: " + line)

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    server_model: Path | None = None
    attacked: dict[str, str] = {}  # payload fingerprint -> the label of a row whose attacks (every kind) finished
    for run in study:
        name = run.label
        row: dict[str, Any] = {"method": run.method, "label": name, "training": run.training,
                               "paper": PAPER.get(run.method, {}) if run.training == "scratch" else {}}  # fmt: skip
        spent = ledger["runs"].setdefault(name, {})
        try:
            tcfg = train_config(cfg, run, runs, server_model, plan.steps[name] if plan else None)
        except ValueError as exc:
            if plan is None:
                raise
            skipped.append(f"{name}: {exc}")  # its server or transfer source was skipped for the budget
            log(f"study: {name}: skipped ({exc})")
            continue
        model_pt = tcfg.run_dir / "model.pt"
        t0 = time.perf_counter()
        if model_pt.is_file():
            log(f"study: {name}: reusing {model_pt}")
            row["train"] = json.loads((tcfg.run_dir / "summary.json").read_text())
        else:
            if plan is not None and t0 + plan.train_s[name] + plan.fixed_s[name] > deadline:
                need = plan.train_s[name] + plan.fixed_s[name]
                skipped.append(f"{name}: training and attacks (needs about {duration(need)}, "
                               f"{duration(max(deadline - t0, 0))} of the budget left)")  # fmt: skip
                log(f"study: {name}: skipped, the budget is spent")
                continue
            log(f"study: {name}: training {tcfg.run_dir}")
            summary = Trainer(tcfg).fit(resume=True)
            row["train"] = {"stages": summary["stages"], "seconds": round(time.perf_counter() - t0, 1),
                            "max_steps_per_epoch": tcfg.max_steps_per_epoch,
                            **{k: dataclasses.asdict(summary[k]) for k in ("before", "after") if k in summary}}
            (tcfg.run_dir / "summary.json").write_text(json.dumps(row["train"], indent=2) + "\n")
            spent.update(train_s=row["train"]["seconds"], steps_per_epoch=tcfg.max_steps_per_epoch)
        if name == cfg.server_method:
            server_model = model_pt
        t1 = time.perf_counter()
        method = load_method(model_pt)
        for vcfg, tag in verify_tags(cfg):
            row["verification" if tag == "pairs" else "holdout"] = verify_cached(method, vcfg, model_pt, tag)
        t_cost = time.perf_counter()
        row["cost"] = cost(method, timing_images)
        spent["cost_s"] = round(time.perf_counter() - t_cost, 1)
        spent["eval_s"] = round(time.perf_counter() - t1, 1)
        held = f", held-out ids {row['holdout']['flip']['accuracy'] * 100:.2f} %" if "holdout" in row else ""
        log(f"study: {name}: acc {row['verification']['flip']['accuracy'] * 100:.2f} % (flip TTA){held}, "
            f"payload {row['cost']['payload_bytes']} B, client {row['cost']['client_ms']:.1f} ms, "
            f"server {row['cost']['server_ms']:.1f} ms per image")  # fmt: skip
        res_path = attack_dir / name / "result.json"
        done = json.loads(res_path.read_text()).get("kinds", {}) if res_path.is_file() else {}
        todo = [k for k in kinds if k not in done]  # a killed study re-runs only the kinds it has not finished
        fp = payload_fingerprint(method, timing_images[:8])
        twin = attacked.get(fp)
        if todo and twin is not None:  # the same payload as an earlier row: the same attacks, already run
            reuse_attacks(attack_dir / twin, attack_dir / name, name, twin)
            log(f"study: {name}: its payload is bit-identical to {twin}'s: {twin}'s payload-only attacks apply, "
                "reused")  # fmt: skip
            target = dataclasses.replace(resolve_target(str(model_pt)), label=name)
            refresh_insider(target, attack_dir, attack_train, attack_val, acfg, judge, log)
            todo = []
        if todo and time.perf_counter() >= deadline:
            skipped.append(f"{name}: attacks {', '.join(todo)} (the budget is spent)")
            log(f"study: {name}: attacks skipped, the budget is spent")
        elif todo:
            t2 = time.perf_counter()
            target = dataclasses.replace(resolve_target(str(model_pt)), label=name)
            run_target(target, todo, attack_train, attack_val, acfg, attack_dir, judge, judge_orig, log=log)
            spent["attack_s"] = round(spent.get("attack_s", 0.0) * (len(done) > 0) + time.perf_counter() - t2, 1)
        row["attack"] = json.loads(res_path.read_text()) if res_path.is_file() else {"kinds": {}}
        if set(kinds) <= set(row["attack"].get("kinds", {})):
            attacked.setdefault(fp, name)
        rows.append(row)
        (out / "study.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    if any((attack_dir / r["label"] / "result.json").is_file() for r in rows):
        write_summary(attack_dir)
    seconds = time.perf_counter() - t_study
    # a resumed study reuses finished steps: the report states the time of all invocations together
    total = {"seconds": ledger["seconds"] + seconds, "invocations": ledger["invocations"] + 1}
    ledger_path.write_text(json.dumps({**total, "runs": ledger["runs"]}, indent=2) + "\n")
    log(f"study: done in {seconds / 60:.1f} min"
        + (f" (estimated {plan.total_s / 60:.1f} min; budget {cfg.budget_min:g} min, all invocations "
           f"{total['seconds'] / 60:.1f} min)" if plan else ""))  # fmt: skip
    for s_ in skipped:
        log(f"study: skipped {s_}")
    check = ordering_check(rows)
    if check is not None:
        log(f"study: ordering on the held-out identities: {'kept' if check['kept'] else 'changed'} (Kendall tau "
            f"{check['kendall_tau']:.2f}, {len(check['swaps'])} swapped pair(s))")  # fmt: skip
        (out / "ordering.json").write_text(json.dumps(check, indent=2) + "\n")
    if cfg.report:
        write_report(user_cfg, rows, Path(cfg.report), seconds, judge_orig, total, skipped, plan)
        log(f"study: wrote {cfg.report} and {Path(cfg.report).parent / 'privacy_utility.png'}")
    return rows
