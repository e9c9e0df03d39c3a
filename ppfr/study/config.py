"""The study's configuration and its rows: one typed config, one ``Run`` per trained row, their trainer configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any



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
