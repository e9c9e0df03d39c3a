"""The budget: probe every run's step time, plan steps per epoch so training, evaluation and attacks fit."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppfr.study.config import Run, StudyConfig, stage_epochs, train_config
from ppfr.study.evaluation import median_time, cached_verification, cost, verify_tags


class BudgetError(ValueError):
    """The budget cannot hold the smallest plan (one step per epoch for every run)."""


@dataclass(frozen=True)
class RunCost:
    """What the planner knows of one run, in seconds: ``step_s`` = one step in every epoch of every stage (so the
    run's training costs ``steps_per_epoch * step_s``); ``fixed_s`` = model build, data, verification before and
    after, client/server timing; ``attack_s`` = its attacks (None: unmeasured, the planner reserves a share);
    ``full_steps``: steps in a whole epoch (the cap); ``done``: already trained (resumed: costs no training)."""

    label: str
    step_s: float
    fixed_s: float
    full_steps: int
    attack_s: float | None = None
    done: bool = False


@dataclass(frozen=True)
class BudgetPlan:
    steps: dict[str, int]  # label -> max_steps_per_epoch
    train_s: dict[str, float]  # label -> estimated training seconds (0 for a finished run)
    fixed_s: dict[str, float]
    attack_s: dict[str, float]
    budget_s: float

    @property
    def total_s(self) -> float:
        return sum(self.train_s.values()) + sum(self.fixed_s.values()) + sum(self.attack_s.values())

    def lines(self) -> list[str]:
        out = [f"plan: {len(self.steps)} runs in {duration(self.budget_s)} left of the budget (estimated "
               f"{duration(self.total_s)}: training {duration(sum(self.train_s.values()))}, build/eval/timing "
               f"{duration(sum(self.fixed_s.values()))}, attacks {duration(sum(self.attack_s.values()))})"]  # fmt: skip
        for k, n in self.steps.items():
            out.append(f"plan:   {k:<24} {n:>5} steps/epoch  train {duration(self.train_s[k]):>8}  eval "
                       f"{duration(self.fixed_s[k]):>8}  attacks {duration(self.attack_s[k]):>8}")  # fmt: skip
        return out


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def plan_budget(costs: list[RunCost], budget_s: float, attack_share: float = 0.4) -> BudgetPlan:
    """Steps per epoch for every run so that training + evaluation + attacks fit ``budget_s`` seconds.

    Every run gets the same steps per epoch (capped at its whole epoch), so methods are compared at one schedule;
    the largest such number that fits is taken, so the plan grows monotonically with the budget. Attacks cost
    their measured ``attack_s`` where known, else an equal part of ``attack_share * budget_s``. BudgetError (one
    line) when even one step per epoch does not fit."""
    if not costs:
        raise BudgetError("the study has no runs to plan")
    share = attack_share * budget_s / len(costs)  # per run: the runs without a measured figure take it
    attack = {c.label: share if c.attack_s is None else c.attack_s for c in costs}
    fixed = {c.label: c.fixed_s for c in costs}

    def train(s: int) -> dict[str, float]:
        return {c.label: 0.0 if c.done else min(s, c.full_steps) * c.step_s for c in costs}

    def need(s: int) -> float:
        return sum(train(s).values()) + sum(fixed.values()) + sum(attack.values())

    if need(1) > budget_s:
        raise BudgetError(f"{max(budget_s, 0) / 60:.2f} min is too small: the smallest plan (1 step per epoch for "
                          f"{len(costs)} runs, their evaluation and attacks) needs about "
                          f"{need(1) / 60:.1f} min")  # fmt: skip
    lo, hi = 1, max(c.full_steps for c in costs)
    while lo < hi:  # need() is non-decreasing in s: the largest s that fits, by bisection
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= budget_s else (lo, mid - 1)
    return BudgetPlan({c.label: min(lo, c.full_steps) for c in costs}, train(lo), fixed, attack, budget_s)


def keep_first_plan(first: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """A resumed study's steps per epoch: every run keeps the first invocation's (``plan.json``), and a run new since
    then (a config added) gets that plan's common number, so the whole study has one schedule. (A run the plan
    cannot fit any more is skipped at its turn, as in the first invocation.)"""
    common = min(first.values()) if first else None
    return {k: first.get(k, common if common is not None else v) for k, v in now.items()}


def probe_costs(cfg: StudyConfig, runs: list[Run], out: Path, timing_images: torch.Tensor, ledger: dict[str, Any],
                kinds: tuple[str, ...] = (), log=print) -> list[RunCost]:  # fmt: skip
    """Time ``cfg.probe_steps`` steps of one epoch per stage of every run (in ``<out>/probe``, removed after) and
    the method's embedding of the timing batch, for the planner. Cached in ``<out>/probe.json`` so a resumed study
    does not probe again. The probe's own time is spent from the budget like any other step."""
    from ppfr.eval.verification import open_pairs
    from ppfr.methods import load_method
    from ppfr.train.trainer import Trainer

    cache_path = out / "probe.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    k = cfg.probe_steps
    key = f"steps={k} batch={cfg.batch_size} data={cfg.data}"
    cache = cache if cache.get("key") == key else {"key": key, "runs": {}}
    n_images = len(open_pairs(cfg.pairs, cfg.image_root)[0])
    n_held = len(open_pairs(cfg.holdout_pairs)[0]) if cfg.holdout_pairs else 0
    probe_dir = out / "probe"
    server: Path | None = None
    costs = []
    for run in runs:
        c = cache["runs"].get(run.label)
        if c is None:
            tcfg = train_config(cfg, run, probe_dir, server, max_steps_per_epoch=k, epochs=1)
            tcfg = dataclasses.replace(tcfg, eval=dataclasses.replace(tcfg.eval, before=False, after=False))
            shutil.rmtree(tcfg.run_dir, ignore_errors=True)  # a killed probe's leftovers would be "resumed"
            t0 = time.perf_counter()
            trainer = Trainer(tcfg, quiet=True)
            summary = trainer.fit()
            wall = time.perf_counter() - t0
            full = len(trainer.make_loader())
            batch = tcfg.data.batch_size
            # a stage's steps at its steady step time (its first step, allocation and lazy loads, left out: timed
            # in, it made study5's plan ~1.5x too slow); the rest of fit() is the fixed part, paid once per run
            stage_s = sum(min(k, full) * (st.get("steady_step_s") or batch / max(st["images_per_s"], 1e-9))
                          for st in summary["stages"])  # fmt: skip
            method = load_method(tcfg.run_dir / "model.pt")
            t1 = time.perf_counter()
            cost(method, timing_images)
            cost_s = time.perf_counter() - t1
            per_image = median_time(lambda: method.embed(timing_images, generator=torch.Generator().manual_seed(0)),
                                     repeat=1) / timing_images.shape[0]  # fmt: skip
            # verification: two views (flip) after training and one before (+ two views of the held-out pairs);
            # x1.5 for decoding and the fold sweep
            eval_s = 1.5 * (3 * n_images + 2 * n_held) * per_image
            c = {"step_s": stage_s / min(k, full), "fixed_s": max(wall - stage_s, 0.0) + eval_s + cost_s,
                 "full_steps": full,
                 "stage_step_s": [st.get("steady_step_s") or batch / max(st["images_per_s"], 1e-9)
                                  for st in summary["stages"]]}  # fmt: skip
            cache["runs"][run.label] = c
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
            log(f"study: probe {run.label}: {c['step_s']:.2f} s per step (all stages, one epoch), fixed "
                f"{c['fixed_s']:.1f} s, {full} steps per epoch")  # fmt: skip
        if run.label == cfg.server_method:
            server = probe_dir / run.label / "model.pt"
        past = (ledger.get("runs") or {}).get(run.label) or {}
        res = out / "attack" / run.label / "result.json"
        finished = res.is_file() and set(kinds) <= set(json.loads(res.read_text()).get("kinds", {}))
        model_pt = out / "runs" / run.label / "model.pt"
        fixed = c["fixed_s"]
        if model_pt.is_file() and all(cached_verification(cfg_, model_pt, tag) is not None for cfg_, tag in
                                      verify_tags(cfg)):  # trained and evaluated: only the client/server timing
            fixed = past.get("cost_s", 5.0)
        per_stage = c.get("stage_step_s")
        if per_stage:  # one step per epoch of every stage, at the run's own schedule
            epochs = stage_epochs(train_config(cfg, run, probe_dir, server), len(per_stage))
            step_s = sum(e * t for e, t in zip(epochs, per_stage))
        else:  # a probe cached by an older version: the uniform schedule
            step_s = cfg.epochs * c["step_s"]
        costs.append(RunCost(run.label, step_s, fixed, c["full_steps"],
                             0.0 if finished else past.get("attack_s"),  # a resumed run's finished attacks: free
                             model_pt.is_file()))  # fmt: skip
    shutil.rmtree(probe_dir, ignore_errors=True)
    return costs
