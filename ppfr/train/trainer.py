"""One Trainer for every method: stages, SGD with parameter groups, step schedule with warm-up, NaN guard, gradient
clipping, CSV/TensorBoard logs, atomic checkpoints with exact resume, and data-parallel training.

The trainer never asks which method it runs: it asks the method for its stages (``set_stage`` freezes what a stage
does not train) and calls ``training_step``. Randomness is explicit: the method's per-step draws (PartialFace ranks,
MinusFace permutations, PRO-Face C blurs) come from a generator seeded by (seed, stage, epoch, step, rank), and the
global RNG (dropout) is re-seeded from the same value every step; the data order is a function of (seed, epoch). So a
run killed mid-epoch and resumed ends with exactly the parameters of an uninterrupted run.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) each process trains on its shard (gloo on CPU, NCCL on GPU); the
margin head is class-sharded with a distributed cross-entropy over the global batch, so backbone gradients are
partial sums that one all-reduce completes.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from ppfr.methods import Method, build_method
from ppfr.data._common import DataFormatError
from ppfr.models.checkpoints import (
    CheckpointError, check_finite, digest_path, remove_checkpoint, safe_load, save_checkpoint,
)  # fmt: skip
from ppfr.models.heads import ArcFaceHead, CosFaceHead, ShardedMarginHead
from ppfr.train.config import ConfigError, StageConfig, TrainConfig
from ppfr.train.distributed import all_reduce_grads, convert_batchnorm, train_device
from ppfr.train.logs import TrainLog


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message says where and what to try."""


# ------------------------------------------------------------------------------------------------ checkpoints
def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a half file.

    Used for model.pt, which gets no digest sidecar: it is often copied or replaced by hand, and a sidecar left stale
    by that would make a good file look corrupt. Training checkpoints get one (``Trainer.checkpoint``)."""
    save_checkpoint(obj, path, digest=False)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's ``checkpoints/step_<digits>.pt``, oldest first. Other ``step_*.pt`` names (a hand-made
    ``step_final.pt``) are not the trainer's: ignored with a warning, never resumed from nor pruned."""
    found, stray = [], []
    for p in (run_dir / "checkpoints").glob("step_*.pt"):
        (found if re.fullmatch(r"step_[0-9]+", p.stem) else stray).append(p)
    if stray:
        warnings.warn(f"ignoring {', '.join(sorted(p.name for p in stray))} in {run_dir / 'checkpoints'}: not a "
                      "checkpoint name the trainer writes (step_<number>.pt)", stacklevel=2)  # fmt: skip
    return sorted(found, key=_step)


def _step(path: Path) -> int:
    return int(path.stem.split("_")[1])


def load_latest(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest intact checkpoint of the run, or None if it has none.

    Each candidate, newest first, must match its SHA-256 sidecar (written with it), pass its zip CRCs, and load
    with ``weights_only=True`` as a ppfr training checkpoint. One without a sidecar (an older ppfr, or a sidecar
    lost in a copy) must also hold only finite weights: the CRCs and that are all that vouch for it. A newer one
    that fails is skipped with a warning naming it and the checkpoint used instead. If there are checkpoints but
    none is usable, CheckpointError: resuming from scratch would silently throw the run away and then overwrite and
    prune its checkpoints, so nothing is touched and the caller stops.
    """
    paths = list_checkpoints(run_dir)
    skipped: list[CheckpointError] = []
    for path in reversed(paths):
        try:
            ckpt = safe_load(path)  # checks the digest and the zip CRCs first
            if "model" not in ckpt or "global_step" not in ckpt:
                raise CheckpointError(f"{path} is not a ppfr training checkpoint")
            signed = digest_path(path).exists()
            if not signed:
                check_finite({k: ckpt[k] for k in ("model", "head") if isinstance(ckpt.get(k), dict)}, path)
        except CheckpointError as exc:
            skipped.append(exc)
            continue
        for exc in skipped:  # each message names its file
            warnings.warn(f"skipping unusable checkpoint: {exc}; resuming from {path} instead", stacklevel=2)
        if not signed:
            warnings.warn(f"checkpoint {path} has no digest ({digest_path(path).name}; written by an older ppfr): "
                          "it cannot be verified beyond its zip CRCs and finite weights", stacklevel=2)  # fmt: skip
        return ckpt, path
    if skipped:
        reasons = "; ".join(map(str, skipped))
        raise CheckpointError(f"no usable checkpoint in {run_dir / 'checkpoints'} ({len(skipped)} found, none intact: "
                              f"{reasons}). Refusing to resume; nothing was changed. Restore a good checkpoint, or "
                              f"move the folder away to train from scratch")  # fmt: skip
    return None


# ------------------------------------------------------------------------------------------------ optimiser
def no_decay_params(method: nn.Module, rule: str) -> set[int]:
    """ids of the parameters that get no weight decay under ``rule`` (``OptimConfig.no_decay``).

    ``tface``: TFace's split (METHODS §1.5) exempts parameters whose *reference* name contains ``bn``. The reference
    MobileFaceNet keeps its BatchNorms in ``.bn`` attributes, its IR nets keep them in ``Sequential``s named by index;
    ppfr names both by index, so the rule is applied by what the reference calls them: every BatchNorm parameter
    inside a MobileFaceNet (DuetFace's and PRO-Face C's clients) is exempt, everything else (IR nets, U-Net, PReLU
    slopes, biases) decays. ``1d``: every parameter of at most one dimension is exempt."""
    from ppfr.models.mobilefacenet import ClientMobileFaceNet, MobileFaceNet

    if rule == "1d":
        return {id(p) for p in method.parameters() if p.ndim <= 1}
    exempt: set[int] = set()
    for mod in method.modules():
        if isinstance(mod, (MobileFaceNet, ClientMobileFaceNet)):
            for sub in mod.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    exempt.update(id(p) for p in sub.parameters())
    return exempt


def prepare_batchnorm(method: nn.Module, mode: str, world: int) -> int:
    """``TrainConfig.batchnorm``: with ``global`` and several ranks, every BatchNorm becomes a DistBatchNorm (statistics
    over the global batch, also on CPU); ``per_rank`` (TFace) leaves them per GPU. Returns how many were converted."""
    if world <= 1 or mode != "global":
        return 0
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules())
    convert_batchnorm(method)
    return before


def build_optimizer(method: Method, head: nn.Module, cfg: TrainConfig,
                    pretrained: set[int] | frozenset[int] = frozenset(),
                    extra: nn.Module | None = None) -> torch.optim.SGD:  # fmt: skip
    """SGD over the trainable method parameters (groups: generator, pretrained (``transfer.lr_mult``), decay /
    no-decay), the head, and ``extra`` (the distillation projection; trained like the head). ``pretrained``: ids of
    the transferred recogniser's parameters; their group is built even while they are frozen (SGD skips parameters
    without a gradient), so the optimiser and its checkpoints keep one layout through the freeze schedule."""
    o = cfg.optim
    groups: dict[str, dict] = {}
    exempt = no_decay_params(method, o.no_decay)
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        gen = name.startswith("generator.")
        pre = id(p) in pretrained
        key = ("gen_" if gen else "pre_" if pre else "") + ("nodecay" if id(p) in exempt else "decay")
        mult = o.generator_lr_mult if gen else cfg.transfer.lr_mult if pre else 1.0
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if key.endswith("nodecay") else o.weight_decay,
                                    "lr_mult": mult, "name": key})  # fmt: skip
        g["params"].append(p)
    head_wd = o.weight_decay if o.head_weight_decay is None else o.head_weight_decay
    groups["head"] = {"params": list(head.parameters()), "weight_decay": head_wd, "lr_mult": 1.0, "name": "head"}
    if extra is not None and list(extra.parameters()):
        groups["distill"] = {"params": list(extra.parameters()), "weight_decay": head_wd, "lr_mult": 1.0,
                             "name": "distill"}  # fmt: skip
    return torch.optim.SGD(list(groups.values()), lr=o.lr, momentum=o.momentum)


def lr_at(cfg: TrainConfig, epoch: int, global_step: int) -> float:
    o = cfg.optim
    lr = o.lr * o.lr_decay ** sum(epoch >= s for s in o.lr_steps)
    if o.warmup_steps > 0 and global_step < o.warmup_steps:
        lr *= (global_step + 1) / o.warmup_steps
    return lr


def build_head(cfg: TrainConfig, num_classes: int, embedding_size: int) -> nn.Module:
    cls = ArcFaceHead if cfg.head.type == "arcface" else CosFaceHead
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ShardedMarginHead(cls, embedding_size, num_classes, cfg.head.s, cfg.head.m)
    return cls(embedding_size, num_classes, cfg.head.s, cfg.head.m)


# ------------------------------------------------------------------------------------------------ the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, *, quiet: bool = False) -> None:
        self.cfg = cfg
        self.quiet = quiet
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        try:  # under torchrun each rank trains on its own GPU, cuda:LOCAL_RANK
            self.device = train_device(cfg.device, os.environ)
        except ValueError as exc:
            raise ConfigError(f"device: {exc}") from None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL, DALI and any bare .cuda() use the rank's GPU too
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cpu":
            from ppfr.runtime import keep_freed_memory

            keep_freed_memory()
        self.run_dir = cfg.run_dir
        self.is_main = self.rank == 0
        # fp16 needs loss scaling (CUDA); bf16 and fp32 do not: a disabled scaler passes everything through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.transfer = None  # a ppfr.train.transfer.TransferPlan once fit() has applied ``transfer:``
        self.distiller = None  # a ppfr.train.transfer.Distiller when ``distill:`` names a teacher
        self._distill_last: torch.Tensor | None = None

    # -- helpers ---------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_main and not self.quiet:
            print(msg, flush=True)

    def stage_plan(self, method: Method) -> list[StageConfig]:
        if self.cfg.stages:
            known = {s.name for s in method.stages()}
            for s in self.cfg.stages:
                if s.name not in known:
                    raise ConfigError(f"stages: {self.cfg.method} has no stage {s.name!r} (has {sorted(known)})")
            return list(self.cfg.stages)
        return [StageConfig(s.name, self.cfg.epochs) for s in method.stages()]

    def step_seed(self, stage_idx: int, epoch: int, step: int) -> int:
        return (((self.cfg.seed * 1009 + stage_idx) * 100_003 + epoch) * 1_000_003 + step * 131 + self.rank) % (2**63)

    def make_loader(self):
        from ppfr.data.loader import make_loader

        data = self.cfg.data
        if self.world > 1:
            data = replace(data, world_size=self.world, rank=self.rank)
        try:
            return make_loader(data)
        except (FileNotFoundError, DataFormatError) as exc:  # a missing or unreadable data.source: the user's
            raise ConfigError(f"data.source={data.source}: {exc}") from None

    def train_step(self, method: Method, head: nn.Module, opt: torch.optim.Optimizer, stage: str,
                   images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:  # fmt: skip
        """One optimisation step; returns the (detached) loss. Raises TrainingDiverged on a NaN/Inf loss."""
        # Every random draw of a step is a function of (seed, stage, epoch, step, rank): the method's own draws
        # through `generator`, dropout through the global RNG (re-seeded here, because the data loader's iterator
        # also draws from it, at a point that differs after a resume).
        torch.manual_seed(seed)
        amp = self.cfg.amp
        if self.distiller is not None:
            self.distiller.begin_step()
        with torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                            enabled=amp != "none"):  # fmt: skip
            out = method.training_step(stage, images, labels, head, generator=torch.Generator().manual_seed(seed))
        loss = out["loss"].float()
        self._distill_last = None
        if self.distiller is not None:  # pulls the server embedding toward the teacher's embedding of the clean face
            d = self.distiller.loss(images)
            if d is not None:  # a per-rank mean: / world, so the all-reduced (summed) gradients are the global mean's
                loss = loss + self.distiller.weight * d / self.world
                self._distill_last = d.detach()
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss.item()} in stage {stage!r}; lower optim.lr, set optim.grad_clip, "
                                   "or check the data")  # fmt: skip
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # fp16 loss scaling (a no-op scaler otherwise)
        all_reduce_grads(p for p in method.parameters() if p.requires_grad)
        if self.distiller is not None and self.distiller.projection is not None:  # one projection on every rank
            all_reduce_grads(self.distiller.projection.parameters())
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.optim.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()
        return loss.detach()

    # -- main loop ---------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train every stage; ``resume``: continue from the newest intact checkpoint (CheckpointError, before
        anything is written, if the run has checkpoints but none is intact). Resuming a finished run (its model.pt
        exists) changes nothing and returns ``{"stages": [], "finished": True}``."""
        cfg = self.cfg
        if resume and (self.run_dir / "model.pt").is_file():
            self.log(f"{self.run_dir} is already finished ({self.run_dir / 'model.pt'} exists): nothing to resume, "
                     "nothing changed (ppfr train --overwrite trains it again; or train another name=)")  # fmt: skip
            return {"stages": [], "finished": True}
        found = load_latest(self.run_dir) if resume else None  # first: a refusal must precede every write
        torch.manual_seed(cfg.seed)
        method = build_method(cfg.method, **cfg.method_options).to(self.device)
        self.setup_transfer(method)
        prepare_batchnorm(method, cfg.batchnorm, self.world)
        loader = self.make_loader()
        if self.distiller is not None and cfg.distill.precompute:
            # the teacher once per (image, flip) of the set before the first step, shared with later runs on it
            from ppfr.train.teacher_store import precompute

            precompute(self.distiller, cfg.data, self.log, write=self.is_main)
        num_classes = loader.num_classes
        stages = self.stage_plan(method)
        state = {"stage_idx": 0, "epoch": 0, "step_in_epoch": 0, "global_step": 0}
        ckpt = None
        if resume:
            if found is None:
                self.log(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from scratch")
            else:
                ckpt, path = found
                state = {k: int(ckpt[k]) for k in state}
                method.load_state_dict(ckpt["model"])
                self.log(f"resuming from {path} (stage {state['stage_idx']}, epoch {state['epoch']}, step {state['step_in_epoch']})")
        if ckpt is None and cfg.init_from:
            try:
                self.init_weights(method, cfg.init_from)
            except CheckpointError as exc:  # a missing or unfitting init_from is the config's error
                msg = str(exc) if "init_from" in str(exc) else f"init_from={cfg.init_from}: {exc}"
                raise ConfigError(msg) from None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        summary: dict = {"stages": []}
        if cfg.eval.pairs and cfg.eval.before and ckpt is None and self.is_main:
            summary["before"] = self.evaluate(method)
            self.log(f"verification before training: {summary['before']}")
        for stage_idx, stage_cfg in enumerate(stages):
            if stage_idx < state["stage_idx"]:
                continue
            summary["stages"].append(self._fit_stage(method, loader, num_classes, stage_idx, stage_cfg, state, ckpt))
            ckpt = None
            state.update(stage_idx=stage_idx + 1, epoch=0, step_in_epoch=0)
        if self.is_main:
            final = {"model": method.state_dict(), "method": cfg.method, "method_options": dict(cfg.method_options),
                     "config": yaml.safe_dump(cfg.to_dict())}  # fmt: skip
            if self.transfer is not None:  # how load_method rebuilds the transferred server (weights are in "model")
                final["transfer"] = self.transfer.record
            save_atomic(final, self.run_dir / "model.pt")
            self.log(f"wrote {self.run_dir / 'model.pt'}")
            if cfg.eval.pairs and cfg.eval.after:
                summary["after"] = self.evaluate(method)
                self.log(f"verification after training: {summary['after']}")
        summary["skipped_samples"] = getattr(loader, "skipped", 0)
        self.method = method
        return summary

    def _fit_stage(self, method, loader, num_classes, stage_idx, stage_cfg, state, ckpt) -> dict:
        cfg = self.cfg
        stage = method.set_stage(stage_cfg.name)
        method.train()
        torch.manual_seed(cfg.seed + 7919 * stage_idx)  # fresh head init per stage, reproducible
        head = build_head(cfg, num_classes, method.options.embedding_size).to(self.device)
        proj = None
        if self.distiller is not None:  # a fresh student -> teacher projection per stage, like the head
            proj = self.distiller.new_projection(method.options.embedding_size, cfg.data.image_size,
                                                 self.distill_start())
        pretrained = self.transfer.pretrained_ids() if self.transfer is not None else frozenset()
        opt = build_optimizer(method, head, cfg, pretrained, proj)
        if ckpt is not None:
            head.load_state_dict(ckpt["head"])
            if self.distiller is not None and "distill" in ckpt:
                self.distiller.load_state_dict(ckpt["distill"])
            opt.load_state_dict(ckpt["optim"])
            if "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        # An epoch is `repeat` passes over the data (TFace's NUM_AUG replication); the lr schedule counts epochs.
        # state["epoch"] counts passes.
        rep = stage_cfg.repeat
        passes = stage_cfg.epochs * rep
        per = f" x {rep} passes" if rep > 1 else ""

        def pass_label(p: int) -> str | None:  # progress lines name the epoch and its pass when r > 1
            return f"epoch {p // rep} pass {p % rep + 1}/{rep}" if rep > 1 else None

        self.log(f"stage {stage_idx} '{stage.name}' ({stage.description}): {stage_cfg.epochs} epoch(s){per} x {steps} "
                 f"steps, {sum(p.numel() for p in method.trainable_parameters()) / 1e6:.2f} M trainable parameters")  # fmt: skip
        first = last = None
        step_ends: list[float] = []
        t_start = time.perf_counter()
        seen = 0
        remaining = (passes - state["epoch"]) * steps - state["step_in_epoch"]
        done_here = 0
        with TrainLog(self.run_dir, enabled=self.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress,
                      quiet=self.quiet) as tlog:  # fmt: skip
            self.tlog = tlog
            for epoch in range(state["epoch"], passes):
                loader.set_epoch(epoch)  # the data order is a pure function of (seed, epoch)
                if self.transfer is not None:  # the pretrained recogniser: frozen for the first freeze_epochs epochs
                    was = self.transfer.frozen
                    now = self.transfer.apply_epoch(method, stage.trainable, epoch // rep)
                    if now is not None and now != was:
                        tlog.message(f"[{stage.name}] epoch {epoch // rep}: pretrained recogniser "
                                     f"{'frozen (adapter and projection train)' if now else 'unfrozen'}")
                skip = state["step_in_epoch"] if epoch == state["epoch"] else 0
                t0 = time.perf_counter()
                for step, (images, labels) in enumerate(loader):
                    if step >= steps:
                        break
                    if step < skip:
                        continue
                    if images.shape[0] < 2:  # a last partial batch of one sample: BatchNorm cannot train on it
                        tlog.message(f"[{stage.name}] step {step}: skipped a batch of {images.shape[0]} sample "
                                     "(BatchNorm needs two; the reference would fail here)")  # fmt: skip
                        continue
                    lr = lr_at(cfg, epoch // rep, state["global_step"])
                    for g in opt.param_groups:
                        g["lr"] = lr * g["lr_mult"]
                    images, labels = images.to(self.device), labels.to(self.device)
                    try:
                        loss = self.train_step(method, head, opt, stage.name, images, labels,
                                               self.step_seed(stage_idx, epoch, step))  # fmt: skip
                    except TrainingDiverged as exc:
                        raise TrainingDiverged(f"{exc} (epoch {epoch}, step {step})") from None
                    state["global_step"] += 1
                    state["step_in_epoch"] = step + 1
                    seen += images.shape[0] * self.world
                    done_here += 1
                    v = loss.item()
                    step_ends.append(time.perf_counter())
                    first = v if first is None else first
                    last = v
                    if state["global_step"] % cfg.log_every == 0 or step == steps - 1:
                        elapsed = time.perf_counter() - t_start
                        extra = None
                        if self._distill_last is not None:
                            extra = {"distill": self._distill_last.item()}
                            self.log_distill(stage.name, epoch, step, state["global_step"], extra["distill"], v)
                        tlog.step(stage=stage.name, epoch=epoch, step=step, steps=steps,
                                  global_step=state["global_step"], lr=lr, loss=v, images_per_s=seen / elapsed,
                                  eta_s=elapsed / done_here * (remaining - done_here), extra=extra,
                                  label=pass_label(epoch))  # fmt: skip
                    if state["global_step"] % cfg.checkpoint_every == 0:
                        self.checkpoint(method, head, opt, state, stage_idx, epoch)
                state["step_in_epoch"] = 0
                state["epoch"] = epoch + 1
                tlog.message(f"[{stage.name}] {pass_label(epoch) or f'epoch {epoch}'} done in "
                             f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
            self.checkpoint(method, head, opt, state, stage_idx, state["epoch"])
        ips = seen / max(time.perf_counter() - t_start, 1e-9)
        self.head = head
        # the steady step: wall time between consecutive step ends (loader, step, bookkeeping), the stage's first
        # step (allocation, lazy loads, the loader's start) left out; what the study's budget planner extrapolates
        steady = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1) if len(step_ends) > 1 else None
        return {"stage": stage.name, "epochs": stage_cfg.epochs, "loss_first": first, "loss_last": last,
                "images_per_s": ips, "steady_step_s": steady}  # fmt: skip

    def setup_transfer(self, method: Method) -> None:
        """``transfer:`` and ``distill:`` right after the method is built (a ConfigError naming the key when the
        source or teacher cannot be used). The transferred modules are moved to the training device."""
        from ppfr.models.transfer import TransferError
        from ppfr.train.transfer import Distiller, apply_transfer, watched_module

        try:
            self.transfer = apply_transfer(method, self.cfg.transfer)
            method.to(self.device)
            d = self.cfg.distill
            if d.teacher is not None:
                self.distiller = Distiller(d.teacher, d.weight, d.cache, d.teacher_dir, device=self.device)
                self.distiller.watch(watched_module(method))
        except TransferError as exc:
            raise ConfigError(str(exc)) from None
        if self.transfer is not None:
            r = self.transfer.record
            if r["adapter"] == "none":
                what = f"{r['source']} IR weights into {r['attr']} ({r['loaded']} of {r['of']} tensors fit)"
            else:
                what = f"adapter -> {r['server']['source']} -> projection as {r['server']['attr']}"
            self.log(f"transfer: {what}")

    def distill_start(self) -> nn.Module | None:
        """The transfer's projection when the teacher is the transfer source (see ``Distiller.new_projection``)."""
        t = self.transfer
        if t is None or t.server is None or self.cfg.distill.teacher != self.cfg.transfer.source:
            return None
        return t.server.projection

    def log_distill(self, stage: str, epoch: int, step: int, global_step: int, distill: float, loss: float) -> None:
        """One row of <run>/distill.csv (metrics.csv's columns are fixed by ppfr.train.logs)."""
        if not self.is_main:
            return
        path = self.run_dir / "distill.csv"
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write("stage,epoch,step,global_step,loss,distill,cache_hits,cache_misses\n")
            f.write(f"{stage},{epoch},{step},{global_step},{loss:.6f},{distill:.6f},{self.distiller.hits},"
                    f"{self.distiller.misses}\n")

    def init_weights(self, method: Method, path: str) -> None:
        """Start from another run's method weights (``init_from``): a model.pt or a trainer checkpoint."""
        ck = safe_load(path)
        if "model" not in ck:
            raise CheckpointError(f"init_from={path}: not a ppfr model.pt or checkpoint (no 'model' entry)")
        if ck.get("method", self.cfg.method) != self.cfg.method:
            raise CheckpointError(f"init_from={path} holds a {ck['method']!r} model, this run trains {self.cfg.method!r}")
        result = method.load_state_dict(ck["model"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"init_from={path}: weights do not fit {self.cfg.method} (missing "
                                  f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")  # fmt: skip
        self.log(f"initialised {self.cfg.method} from {path}")

    def checkpoint(self, method, head, opt, state, stage_idx, epoch) -> None:
        if not self.is_main:
            return
        ck = {"model": method.state_dict(), "head": head.state_dict(), "optim": opt.state_dict(),
              **({"distill": self.distiller.state_dict()} if self.distiller is not None else {}),
              "scaler": self.scaler.state_dict(),
              "stage_idx": stage_idx, "epoch": epoch,
              "step_in_epoch": state["step_in_epoch"], "global_step": state["global_step"]}  # fmt: skip
        path = self.run_dir / "checkpoints" / f"step_{state['global_step']:08d}.pt"
        save_checkpoint(ck, path)  # with its SHA-256 sidecar, checked by load_latest
        for old in list_checkpoints(self.run_dir)[: -self.cfg.keep_last]:
            remove_checkpoint(old)  # and its sidecar

    def evaluate(self, method: Method):
        from ppfr.eval.verification import evaluate_pairs

        e = self.cfg.eval
        was = method.training
        method.eval()
        try:
            return evaluate_pairs(lambda x: method.embed(x.to(self.device), generator=torch.Generator().manual_seed(0)),
                                  e.pairs, batch_size=e.batch_size, image_root=e.image_root, max_pairs=e.max_pairs)  # fmt: skip
        finally:
            method.train(was)


# ------------------------------------------------------------------------------------------------ run folders
#: What a run writes into its folder; ``--overwrite`` deletes exactly these (nothing else a user put there).
RUN_FILES: tuple[str, ...] = ("config.yaml", "model.pt", "metrics.csv", "distill.csv", "summary.json", "checkpoints",
                               "tb")  # fmt: skip


def run_files(run_dir: Path) -> list[str]:
    """The run files already in ``run_dir`` (empty: not a run folder, or not there)."""
    return [n for n in RUN_FILES if (run_dir / n).exists()]


def clear_run(run_dir: Path) -> None:
    import shutil

    for n in run_files(run_dir):
        path = run_dir / n
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _fmt_loss(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ppfr.train.config import RESUME_SAFE_KEYS, config_help, load_config, load_run_config

    ap = argparse.ArgumentParser(
        prog="ppfr train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="train a method from a YAML config.\n\nA run folder (<out_dir>/<name>) owns its config: --resume "
                    "continues it with its\nsaved config.yaml; training into a folder that already holds a run needs "
                    "--resume\nor --overwrite.",
        epilog="config keys (key=value overrides, dotted; YAML values) and their defaults; * = may be changed on "
               f"--resume ({', '.join(RESUME_SAFE_KEYS)}):\n" + config_help())  # fmt: skip
    ap.add_argument("config", nargs="?", help="YAML config (configs/*.yaml), or with --resume a run folder; omitted: "
                                              "the defaults")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. optim.lr=0.01")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run from its newest checkpoint, with the run folder's saved config.yaml (the "
                         "overrides may change only the * keys below); a finished run is left as it is")  # fmt: skip
    ap.add_argument("--overwrite", action="store_true",
                    help="the run folder already holds a run: delete its files (config.yaml, model.pt, metrics.csv, "
                         "checkpoints/, tb/) and train from scratch")  # fmt: skip
    args = ap.parse_intermixed_args(argv)  # options may come between or after the overrides
    if args.resume and args.overwrite:
        print("ppfr train: --resume and --overwrite exclude each other", file=sys.stderr)
        return 2
    try:
        cfg = _resolve_config(args, load_config, load_run_config)
        if cfg is None:
            return 2
        trainer = Trainer(cfg)  # the device (ConfigError: e.g. cuda asked for, none there)
    except (ConfigError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"ppfr train: {exc}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit(resume=args.resume)
    except ConfigError as exc:  # found once building: an unknown stage, a missing data.source or init_from
        print(f"ppfr train: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # e.g. --resume with no intact checkpoint: one line, exit 2 as every refused file
        print(f"ppfr train: {exc}", file=sys.stderr)
        return 2
    if summary.get("finished"):  # fit said so
        return 0
    for s in summary["stages"]:
        print(f"stage {s['stage']}: loss {_fmt_loss(s['loss_first'])} -> {_fmt_loss(s['loss_last'])}, "
              f"{s['images_per_s']:.1f} img/s")  # fmt: skip
    if "before" in summary or "after" in summary:
        print(f"verification: before {summary.get('before')}, after {summary.get('after')}")
    return 0


def _resolve_config(args, load_config, load_run_config) -> TrainConfig | None:
    """The config this command trains with, after the run-folder rules; None when it refused (message printed)."""
    path = Path(args.config) if args.config else None
    if path is not None and path.is_dir():  # a run folder
        if not args.resume:
            raise ConfigError(f"{path} is a folder: pass a YAML config, or --resume to continue the run in it")
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path} is not a run folder (no config.yaml) to resume")
        return load_run_config(path, args.overrides)
    cfg = load_config(path, args.overrides)  # also validates the method options (ConfigError)
    if args.resume:
        if (cfg.run_dir / "config.yaml").is_file():
            return load_run_config(cfg.run_dir, args.overrides)  # the run's own config, not the command line's
        return cfg  # nothing saved yet: starts from scratch (fit says so)
    found = run_files(cfg.run_dir)
    if found and not args.overwrite:
        print(f"ppfr train: {cfg.run_dir} already holds a run ({', '.join(found)}); --resume to continue it, "
              "--overwrite to delete it and start again, or choose another name=", file=sys.stderr)  # fmt: skip
        return None
    # Decided before Trainer() (so before torchrun's rendezvous): no rank can see another's fresh files.
    if found and int(os.environ.get("RANK", "0")) == 0:
        clear_run(cfg.run_dir)
    return cfg
