"""``ppfr study``: every method side by side on one image-folder dataset, accuracy and privacy, in one command.

For each method (default: arcface, arcface_fd, duetface, partialface, minusface, profacec) the study

1. trains its ``configs/<method>_tiny.yaml`` (one common CPU-scale backbone, IR-18 at base width 16, and one
   schedule: ``--epochs`` per stage) on ``--data``; a method with a frozen server recogniser (an option called
   ``server_ckpt``: PRO-Face C) gets the study's trained ``arcface`` model as that server;
2. evaluates 10-fold verification on the identity-disjoint ``--pairs`` (flip test-time augmentation through the
   method's own client: the flipped image is protected and recognised, and the two embeddings are summed);
3. times the client (``protect``) and the server (``recognize``) per image and measures the payload bytes per image;
4. runs every attack kind of ``ppfr attack`` that applies to the method (closed-form inversion of linear payloads
   with the secret searched, FaceLinkGen-style identity linkage through the independent judge as teacher, learned
   U-Net recovery), scored on held-out identities, and keeps the picture grid;
5. writes ``<out>/study.json`` and a Markdown report (``--report``, e.g. docs/results.md) with the papers' figures.

With ``--budget-min M`` the study first probes a few training steps of every run (each method from scratch and,
with ``--transfer``, the default then, with its ``<method>_transfer.yaml``), plans one common number of steps per epoch so that training, evaluation and attacks
fit in M minutes (attacks at their time in the ``<out>/elapsed.json`` ledger, else a share of the budget), prints
the plan, skips what no longer fits and reports it, and prints the estimated and actual totals.

With ``--holdout-ids N`` the study first takes N identities of ``--data`` out of training (a seeded draw; nobody,
attacker included, trains on them), writes ``<out>/holdout/train.txt`` (a TFace index of the rest, what every run
trains on) and ``<out>/holdout/pairs.txt`` (10 identity-disjoint folds over the held-out identities), evaluates
every trained model on those pairs too, and reports whether the methods keep their accuracy ordering there (the
recipes were chosen by measuring on ``--pairs``; the held-out pairs were never looked at).

Every step is resumable: a finished training run (``<out>/runs/<method>/model.pt``) and a finished attack
(``<out>/attack/<method>/result.json``) are reused, so a killed study continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_METHODS = ("arcface", "arcface_fd", "duetface", "partialface", "minusface", "profacec")

# The papers' figures (METHODS.md): LFW accuracy at full scale (IR-50, MS1Mv2; MinusFace paper Tab.1) and the
# white-box recovery attack (MinusFace paper Fig.6: U-Net trained on BUPT; SSIM / PSNR). PRO-Face C's paper text
# and numbers are not available (METHODS.md §6.6).
PAPER: dict[str, dict[str, Any]] = {
    "arcface": {"lfw": 99.77},
    # ArcFace-FD (all 192 DCT channels, no protection) is its own row of the PartialFace paper's Tab.1 (METHODS §4.5);
    # no paper measures a recovery attack on it (PPFR-FD's 99.69 / 0.70 / 15.21 are another method's figures)
    "arcface_fd": {"lfw": 99.78, "as": "ArcFace-FD, PartialFace paper Tab.1"},
    "duetface": {"lfw": 99.82, "ssim": 0.84, "psnr": 19.39},
    "partialface": {"lfw": 99.80, "ssim": 0.59, "psnr": 13.23},
    "minusface": {"lfw": 99.78, "ssim": 0.50, "psnr": 10.98},
    "profacec": {},
}


@dataclass(frozen=True)
class StudyConfig:
    """data: image-folder training set (identity sub-folders); pairs: identity-disjoint pair list
    (``fold same path_a path_b``); out: output folder; configs: folder with ``<method>_tiny.yaml``."""

    data: str
    pairs: str
    out: str
    image_root: str | None = None
    configs: str = "configs"
    methods: tuple[str, ...] = DEFAULT_METHODS
    epochs: int = 2
    server_method: str = "arcface"
    attack_steps: int = 300
    attack_train_images: int = 1500
    attack_pairs: int | None = 600
    attack_kinds: str = "all"
    linkage_steps: int = 100
    linkage_form: str = "auto"  # the linkage forms (auto: adapter, finetune, insider; the strongest is the figure)
    finetune_steps: int = 100  # the finetune form's unfrozen steps
    judge: str = "faceapi"
    judge_dir: str | None = None
    timing_batch: int = 32
    threads: int | None = None
    report: str | None = None
    seed: int = 1337
    max_steps_per_epoch: int | None = None  # a quick smoke run; None trains whole epochs
    batch_size: int | None = None  # None: the configs' batch size
    # a time budget for the whole study (minutes): the planner sets each run's steps per epoch (see plan_budget)
    budget_min: float | None = None
    transfer: bool = False  # also train each method with a pretrained transfer (+ distillation) where one applies
    # the transfer rows' schedule: "uniform" (``epochs`` per stage, as the scratch rows) or "config" (the epochs per
    # stage and lr steps of each ``<method>_transfer.yaml``: the recipe measured for it, docs/methods.md)
    transfer_schedule: str = "uniform"
    attack_share: float = 0.4  # the budget's share reserved for the attacks when the ledger has no measured figure
    probe_steps: int = 3  # training steps per stage the planner times for each run (the first is left out)
    holdout_ids: int = 0  # identities of ``data`` kept out of training for the ordering check (see split_holdout)
    holdout_pairs: str | None = None  # set by run_study: the held-out identities' pairs file

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.attack_steps < 1 or self.timing_batch < 1:
            raise ValueError("epochs, attack_steps and timing_batch must be positive")
        if self.budget_min is not None and not self.budget_min > 0:
            raise ValueError(f"--budget-min must be positive, got {self.budget_min}")
        if self.holdout_ids < 0 or 0 < self.holdout_ids < 20:
            raise ValueError(f"--holdout-ids must be 0 or at least 20 (10 folds of 2 identities), got "
                             f"{self.holdout_ids}")
        if self.transfer_schedule not in ("uniform", "config"):
            raise ValueError(f"--transfer-schedule must be uniform or config, got {self.transfer_schedule!r}")
        if not 0 <= self.attack_share < 1 or self.probe_steps < 1:
            raise ValueError("attack_share must be in [0, 1) and probe_steps positive")
        unknown = [m for m in self.methods if not (Path(self.configs) / f"{m}_tiny.yaml").is_file()]
        if unknown:
            raise ValueError(f"no {self.configs}/<method>_tiny.yaml for {unknown}")


# -------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One training run of the study: ``label`` names its run folder, row and attack folder; ``config`` is the YAML
    it starts from; ``training`` is the row's training column (scratch | transfer | distill | transfer+distill);
    ``overrides`` are extra ``key=value`` settings."""

    label: str
    method: str
    config: str
    training: str = "scratch"
    overrides: tuple[str, ...] = ()


def _training_mode(path: Path, overrides: tuple[str, ...] = ()) -> str:
    from ppfr.train.config import load_config

    c = load_config(path, list(overrides)) if overrides else load_config(path)
    t, d = c.transfer.source is not None, c.distill.teacher is not None
    return "transfer+distill" if t and d else "transfer" if t else "distill" if d else "scratch"


def study_runs(cfg: StudyConfig) -> list[Run]:
    """Every method from scratch (``<method>_tiny.yaml``) and, with ``cfg.transfer``, right after it the method with
    its ``<method>_transfer.yaml`` where the configs folder has one."""
    runs: list[Run] = []
    for m in cfg.methods:
        runs.append(Run(m, m, str(Path(cfg.configs) / f"{m}_tiny.yaml")))
        if not cfg.transfer:
            continue
        tpath = Path(cfg.configs) / f"{m}_transfer.yaml"
        if tpath.is_file():
            over = ()
            if cfg.judge_dir:  # the face-api.js weights the judge reads serve the transfer and the teacher too
                over = (f"transfer.source_dir={cfg.judge_dir}", f"distill.teacher_dir={cfg.judge_dir}")
            runs.append(Run(f"{m}_transfer", m, str(tpath), _training_mode(tpath, over), over))
    return runs


# ------------------------------------------------------------------------------------------------- steps
def train_config(cfg: StudyConfig, method: str | Run, runs: Path, server: Path | None,
                 max_steps_per_epoch: int | None = None, epochs: int | None = None):  # fmt: skip
    """The run's config with the study's data, schedule (``epochs`` / ``max_steps_per_epoch`` override the study's,
    for the planner) and (where the method has one) server.

    The schedule is ``cfg.epochs`` per stage (lr decayed for the last epoch), except for a transfer row under
    ``transfer_schedule="config"``, which keeps its config's epochs, stages and lr steps (an explicit ``epochs``,
    the probe's, is uniform for every row)."""
    from ppfr.methods import method_class
    from ppfr.train.config import load_config

    run = method if isinstance(method, Run) else Run(method, method, str(Path(cfg.configs) / f"{method}_tiny.yaml"))
    uniform = epochs is not None or run.training == "scratch" or cfg.transfer_schedule == "uniform"
    epochs = epochs or cfg.epochs
    steps = max_steps_per_epoch or cfg.max_steps_per_epoch
    path = Path(run.config)
    base = load_config(path)
    over = [f"name={run.label}", f"out_dir={runs}", f"data.source={cfg.data}", f"eval.pairs={cfg.pairs}",
            "eval.before=true", "eval.after=false", f"seed={cfg.seed}", "progress=lines"]  # fmt: skip
    if uniform:
        over += [f"epochs={epochs}", f"optim.lr_steps=[{max(epochs - 1, 1)}]"]
    over += list(run.overrides)
    if cfg.image_root:
        over.append(f"eval.image_root={cfg.image_root}")
    if steps:
        over.append(f"max_steps_per_epoch={steps}")
    if cfg.batch_size:
        over.append(f"data.batch_size={cfg.batch_size}")
    fields = {f.name for f in dataclasses.fields(method_class(base.method).Options)}
    if "server_ckpt" in fields and base.transfer.source is None:  # a frozen server: the study's unprotected model
        if server is None:
            raise ValueError(f"{run.method} needs a trained {cfg.server_method!r} model as its server; list "
                             f"{cfg.server_method} before {run.method} in --methods")  # fmt: skip
        # the given server replaces the config's own server stage: train the stages the method then has
        over += [f"method_options.server_ckpt={server}", "stages=[]"]
    elif base.stages and uniform:
        over.append("stages=[" + ", ".join(f"{{name: {s.name}, epochs: {epochs}}}" for s in base.stages) + "]")
    return load_config(path, over)


def stage_epochs(tcfg, n_stages: int) -> list[int]:
    """Epochs of each of a run's ``n_stages`` training stages (its config's ``stages``, else ``epochs`` each)."""
    if tcfg.stages and len(tcfg.stages) == n_stages:
        return [int(s.epochs) for s in tcfg.stages]
    return [int(tcfg.epochs)] * n_stages


# ----------------------------------------------------------------------------------------------- holdout
HOLDOUT_PAIRS_PER_FOLD = 150  # genuine and impostor pairs per fold, as celeba112's val_pairs.txt and LFW (300/fold)


def split_holdout(data: str | Path, n: int, folder: Path, seed: int) -> tuple[Path, Path]:
    """Take ``n`` identities of the image folder ``data`` out of training (seeded draw): write ``folder/train.txt``
    (TFace 2-field index of the other identities, labels 0..K-1) and ``folder/pairs.txt`` (10 identity-disjoint
    folds of the held-out identities, ``HOLDOUT_PAIRS_PER_FOLD`` genuine + impostor pairs each, fewer where the
    identities hold fewer). Returns (train index, pairs file). Idempotent for the same arguments (a resumed study
    trains on the same split: the draw is seeded). HoldoutError: ``data`` is not an image folder, or too few identities."""
    import random

    from ppfr.data import DataFormatError
    from ppfr.data.pairs import make_pairs, write_pairs_folds
    from ppfr.data.sources import FolderSource

    try:
        src = FolderSource(data)
    except DataFormatError as exc:
        raise HoldoutError(f"--holdout-ids needs --data to be an image folder: {exc}") from None
    ids = list(src.identities)
    if n > len(ids) - 2:
        raise HoldoutError(f"--holdout-ids {n}: {data} has {len(ids)} identities; at least 2 must stay for training")
    held = set(random.Random(seed).sample(ids, n))
    folder.mkdir(parents=True, exist_ok=True)
    by_id: dict[str, list[Path]] = {}
    for f, y in zip(src.files, src.labels):
        by_id.setdefault(ids[int(y)], []).append(Path(f).resolve())
    keep = [i for i in ids if i not in held]
    label = {name: k for k, name in enumerate(keep)}
    train = folder / "train.txt"
    body = "".join(f"{f}\t{label[i]}\n" for i in keep for f in by_id[i])
    pairs = folder / "pairs.txt"
    held_images = {i: by_id[i] for i in sorted(held)}
    per_fold = HOLDOUT_PAIRS_PER_FOLD
    while True:  # the largest per-fold count (up to 150) the held-out identities can fill
        try:
            drawn = make_pairs(held_images, folds=10, per_fold=per_fold, seed=seed)
            break
        except ValueError:
            if per_fold == 1:
                raise HoldoutError(f"--holdout-ids {n}: the held-out identities hold too few images for 10 folds "
                                 "of pairs") from None
            per_fold = max(1, per_fold * 2 // 3)
    train.write_text(f"# ppfr study: training identities ({len(keep)}; {n} held out)\n" + body)
    write_pairs_folds(pairs, drawn)
    return train, pairs


def ordering_check(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Do the rows keep their accuracy (flip TTA) ordering on the held-out identities? Kendall's tau-a over the
    rows both sets scored, and every swapped pair with its gaps (a swap inside one std of either set is noise)."""
    scored = [(r.get("label", r["method"]), r["verification"]["flip"], r["holdout"]["flip"]) for r in rows
              if r.get("holdout")]  # fmt: skip
    if len(scored) < 2:
        return None
    concordant = discordant = 0
    swaps = []
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            (a, va, ha), (b, vb, hb) = scored[i], scored[j]
            dv, dh = va["accuracy"] - vb["accuracy"], ha["accuracy"] - hb["accuracy"]
            if dv * dh > 0:
                concordant += 1
            elif dv * dh < 0:
                discordant += 1
                hi, lo = (a, b) if dv > 0 else (b, a)
                noise = max(va["std"], vb["std"], ha["std"], hb["std"])
                swaps.append({"above": hi, "below": lo, "gap_pairs": abs(dv), "gap_holdout": abs(dh),
                              "within_std": max(abs(dv), abs(dh)) <= noise})  # fmt: skip
    n_pairs = len(scored) * (len(scored) - 1) // 2
    by_v = [s[0] for s in sorted(scored, key=lambda s: -s[1]["accuracy"])]
    by_h = [s[0] for s in sorted(scored, key=lambda s: -s[2]["accuracy"])]
    return {"kendall_tau": (concordant - discordant) / n_pairs, "swaps": swaps, "order_pairs": by_v,
            "order_holdout": by_h, "kept": not swaps, "kept_beyond_noise": all(s["within_std"] for s in swaps)}


# ------------------------------------------------------------------------------------------------ budget
class BudgetError(ValueError):
    """The budget cannot hold the smallest plan (one step per epoch for every run)."""


class HoldoutError(ValueError):
    """``--holdout-ids`` cannot be carved out of ``--data`` (not an image folder, too few identities or images)."""


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
        out = [f"plan: {len(self.steps)} runs in {_dur(self.budget_s)} left of the budget (estimated "
               f"{_dur(self.total_s)}: training {_dur(sum(self.train_s.values()))}, build/eval/timing "
               f"{_dur(sum(self.fixed_s.values()))}, attacks {_dur(sum(self.attack_s.values()))})"]  # fmt: skip
        for k, n in self.steps.items():
            out.append(f"plan:   {k:<24} {n:>5} steps/epoch  train {_dur(self.train_s[k]):>8}  eval "
                       f"{_dur(self.fixed_s[k]):>8}  attacks {_dur(self.attack_s[k]):>8}")  # fmt: skip
        return out


def _dur(seconds: float) -> str:
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


def _median_time(fn, repeat: int = 3) -> float:
    fn()  # warm-up (lazy extension loads, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def cost(method, images: torch.Tensor) -> dict[str, float]:
    """Client and server milliseconds per image (median of 3 batches) and payload bytes per image."""
    g = torch.Generator().manual_seed(0)
    payload = method.protect(images, generator=g)
    n = images.shape[0]
    client = _median_time(lambda: method.protect(images, generator=torch.Generator().manual_seed(0)))
    server = _median_time(lambda: method.recognize(payload))
    return {"client_ms": 1000 * client / n, "server_ms": 1000 * server / n,
            "payload_bytes": payload.nbytes_per_sample()}  # fmt: skip


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


@torch.no_grad()
def verify(method, cfg: StudyConfig) -> dict[str, Any]:
    """10-fold verification of the trained method, plain and with flip TTA through its client (the flipped image is
    protected and recognised), both from one pass: ``embed_source`` embeds each image as [e(x), e(flip x)]."""
    from ppfr.eval.verification import embed_source, open_pairs, ten_fold

    def both_views(x: torch.Tensor) -> torch.Tensor:  # the client's secrets are fixed: both views get the same draw
        # each view normalised before the sum (``ppfr eval`` sums the raw views; docs/results.md used this rule)
        views = [F.normalize(method.embed(v, generator=torch.Generator().manual_seed(0)).float(), dim=1)
                 for v in (x, x.flip(-1))]  # fmt: skip
        return torch.cat(views, dim=1)

    src, pairs = open_pairs(cfg.pairs, cfg.image_root)
    emb, _ = embed_source(both_views, src)
    d = emb.shape[1] // 2
    out = {}
    # a common positive scale of both halves (embed_source's normalisation) cancels in each normalisation below
    for key, e in (("plain", emb[:, :d]), ("flip", emb[:, :d] + emb[:, d:])):
        e = F.normalize(e, dim=1)
        r = ten_fold((e[pairs[:, 2]] * e[pairs[:, 3]]).sum(1).numpy(), pairs[:, 1].astype(bool), pairs[:, 0])
        out[key] = {"accuracy": r.accuracy, "std": r.std, "auc": r.auc, "threshold": r.threshold, "pairs": r.pairs}
    return out


def _verify_key(cfg: StudyConfig, model_pt: Path) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    return {"model_sha256": digest, "pairs": str(cfg.pairs), "image_root": cfg.image_root and str(cfg.image_root)}


def cached_verification(cfg: StudyConfig, model_pt: Path, tag: str, key: dict[str, Any] | None = None
                        ) -> dict[str, Any] | None:  # fmt: skip
    """The result ``verify_cached`` kept for this model and these pairs, or None (absent, stale or torn).
    ``key``: the model's :func:`_verify_key` when the caller has it (the model file is hashed once)."""
    path = model_pt.parent / f"verify_{tag}.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    key = key or _verify_key(cfg, model_pt)
    ok = isinstance(old, dict) and old.get("key") == key and isinstance(old.get("result"), dict)
    return old["result"] if ok else None


def verify_tags(cfg: StudyConfig) -> list[tuple[StudyConfig, str]]:
    """The verifications every trained run gets: ``--pairs`` and, with held-out identities, their pairs."""
    tags = [(cfg, "pairs")]
    if cfg.holdout_pairs:
        tags.append((dataclasses.replace(cfg, pairs=cfg.holdout_pairs, image_root=None), "holdout"))
    return tags


def verify_cached(method, cfg: StudyConfig, model_pt: Path, tag: str) -> dict[str, Any]:
    """:func:`verify`, kept in ``<run dir>/verify_<tag>.json`` with the SHA-256 of ``model_pt`` and the pairs it
    read: a resumed study re-evaluates a reused model only when the model or the pairs changed."""
    key = _verify_key(cfg, model_pt)
    hit = cached_verification(cfg, model_pt, tag, key)
    if hit is not None:
        return hit
    path = model_pt.parent / f"verify_{tag}.json"
    result = verify(method, cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    os.replace(tmp, path)
    return result


def _load_rgb(cfg: StudyConfig, n: int) -> torch.Tensor:
    from ppfr.data.config import DataConfig
    from ppfr.data.loader import make_loader

    loader = make_loader(DataConfig(source=cfg.data, backend="torch", batch_size=n, train=False, num_workers=0,
                                    world_size=1, rank=0))  # fmt: skip
    return next(iter(loader))[0]


# ------------------------------------------------------------------------------------------------- probe
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
            per_image = _median_time(lambda: method.embed(timing_images, generator=torch.Generator().manual_seed(0)),
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


# --------------------------------------------------------------------------------------------- the study
def run_study(cfg: StudyConfig, log=print) -> list[dict[str, Any]]:
    from ppfr.eval.attacks import common as atk
    from ppfr.eval.attacks.cli import parse_kinds, run_target, write_summary
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
    acfg = atk.AttackConfig(steps=cfg.attack_steps, max_train_images=cfg.attack_train_images,
                            max_pairs=cfg.attack_pairs, seed=0, linkage_steps=cfg.linkage_steps,
                            linkage_form=cfg.linkage_form, finetune_steps=cfg.finetune_steps)  # fmt: skip
    kinds = parse_kinds(cfg.attack_kinds)
    val_src = atk.open_val(cfg.pairs, acfg.max_pairs)
    judge = atk.make_judge(cfg.judge, cfg.judge_dir) if cfg.judge != "none" else None
    attack_train = atk.load_faces(cfg.data, max_images=acfg.max_train_images, seed=acfg.seed)
    attack_val = atk.load_faces(val_src, max_images=acfg.max_val_images, seed=acfg.seed)
    judge_orig = None
    if judge is not None:
        emb = atk.judge_embeddings(judge, (attack_val.batch(torch.arange(i, min(i + 32, len(attack_val))))
                                           for i in range(0, len(attack_val), 32)))  # fmt: skip
        judge_orig = atk.pair_verification(emb, attack_val.labels, attack_val.source.pairs)
        log(f"study: judge {judge.name} on the original held-out faces: {judge_orig}")
    timing_images = _load_rgb(cfg, cfg.timing_batch)

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
                skipped.append(f"{name}: training and attacks (needs about {_dur(need)}, "
                               f"{_dur(max(deadline - t0, 0))} of the budget left)")  # fmt: skip
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
            target = dataclasses.replace(atk.resolve_target(str(model_pt)), label=name)
            refresh_insider(target, attack_dir, attack_train, attack_val, acfg, judge, log)
            todo = []
        if todo and time.perf_counter() >= deadline:
            skipped.append(f"{name}: attacks {', '.join(todo)} (the budget is spent)")
            log(f"study: {name}: attacks skipped, the budget is spent")
        elif todo:
            t2 = time.perf_counter()
            target = dataclasses.replace(atk.resolve_target(str(model_pt)), label=name)
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


# ------------------------------------------------------------------------------------------------ report
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


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    d = StudyConfig
    ap = argparse.ArgumentParser(prog="ppfr study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="training image folder (identity sub-folders)")
    ap.add_argument("--pairs", required=True, help="identity-disjoint pairs: 'fold same path_a path_b' per line")
    ap.add_argument("--out", required=True, help="output folder (runs, attacks, study.json)")
    ap.add_argument("--image-root", default=None, help="root of the pair paths (default: the pairs file's folder)")
    ap.add_argument("--configs", default=d.configs, help="folder with <method>_tiny.yaml (default: configs)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--epochs", type=int, default=d.epochs, help="epochs per training stage")
    ap.add_argument("--attack-steps", type=int, default=d.attack_steps)
    ap.add_argument("--attack-train-images", type=int, default=d.attack_train_images)
    ap.add_argument("--attack-pairs", type=int, default=d.attack_pairs)
    ap.add_argument("--attack-kinds", default=d.attack_kinds, help="attack kinds (comma-separated) or all")
    ap.add_argument("--linkage-steps", type=int, default=d.linkage_steps, help="linkage attacker training steps")
    ap.add_argument("--linkage-form", default=d.linkage_form,
                    help="linkage forms (comma-separated) or auto: adapter, finetune, insider (the figure is the "
                         "strongest)")  # fmt: skip
    ap.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                    help="the finetune linkage form's steps with the judge copy unfrozen")
    ap.add_argument("--judge", default=d.judge, help="faceapi | none | a model.pt")
    ap.add_argument("--judge-dir", default=None, help="face-api weights folder (default ../shared/models/faceapi)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the configs')")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="fit the whole study (training, evaluation, attacks) in this many minutes: probe each run, "
                         "plan its steps per epoch, print the plan, skip what the budget cannot hold")
    ap.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=None,
                    help="also train each method with pretrained transfer (+ distillation) where it applies "
                         "(default: on with --budget-min, off without)")
    ap.add_argument("--transfer-schedule", choices=("uniform", "config"), default=d.transfer_schedule,
                    help="the transfer rows' epochs: uniform (--epochs per stage, as the scratch rows) or config "
                         "(each <method>_transfer.yaml's own stages, epochs and lr steps: its measured recipe)")
    ap.add_argument("--attack-share", type=float, default=d.attack_share,
                    help="with --budget-min: the budget's share the planner reserves for attacks it has not timed "
                         f"(default {d.attack_share})")
    ap.add_argument("--holdout-ids", type=int, default=0,
                    help="keep this many identities of --data out of training and check on pairs of them that the "
                         "methods keep their accuracy ordering (0: off; at least 20)")
    ap.add_argument("--report", default=None, help="write the Markdown report here (e.g. docs/results.md)")
    a = ap.parse_args(argv)
    try:
        cfg = StudyConfig(data=a.data, pairs=a.pairs, out=a.out, image_root=a.image_root, configs=a.configs,
                          methods=tuple(a.methods), epochs=a.epochs, attack_steps=a.attack_steps,
                          attack_train_images=a.attack_train_images, attack_pairs=a.attack_pairs,
                          attack_kinds=a.attack_kinds, linkage_steps=a.linkage_steps, judge=a.judge,
                          linkage_form=a.linkage_form, finetune_steps=a.finetune_steps,
                          judge_dir=a.judge_dir, threads=a.threads, report=a.report,
                          max_steps_per_epoch=a.max_steps_per_epoch, batch_size=a.batch_size,
                          budget_min=a.budget_min, holdout_ids=a.holdout_ids,
                          attack_share=a.attack_share, transfer_schedule=a.transfer_schedule,
                          transfer=a.transfer if a.transfer is not None else a.budget_min is not None)  # fmt: skip
        from ppfr.eval.attacks.cli import parse_kinds

        parse_kinds(cfg.attack_kinds)
    except ValueError as exc:
        print(f"ppfr study: {exc}", file=sys.stderr)
        return 2
    from ppfr.eval.attacks.common import AttackError
    from ppfr.models.checkpoints import CheckpointError

    try:
        run_study(cfg)
    # a damaged run folder, bad attack input or a budget too small: say which, no traceback
    except (CheckpointError, AttackError, BudgetError, HoldoutError) as exc:
        print(f"ppfr study: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
