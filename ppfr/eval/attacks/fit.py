"""The training loop every learned attack kind shares (recovery U-Net, linkage adapters): :func:`fit_attacker`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ppfr.eval.attacks.common import AttackConfig
from ppfr.eval.attacks.data import Draw, FaceSet


def fit_attacker(module: torch.nn.Module, loss_fn: Callable[[torch.Tensor, int, Draw], torch.Tensor],
                 train: FaceSet, cfg: AttackConfig, *, steps: int, lr: float, batch_size: int, seed: int, name: str,
                 device: torch.device | str = "cpu", log: Callable[[str], None] | None = print,
                 stop_below: float | None = None, groups: list[dict[str, Any]] | None = None,
                 on_step: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """The training loop every learned kind shares: ``steps`` batches of ``batch_size`` public faces (random
    horizontal flips when ``cfg.flip``, drawn from a generator seeded with ``seed``), ``loss_fn(faces (B, 3, S, S)
    in [-1, 1], step, (indices, flipped)) -> scalar`` (the draw lets a caller look up per-face targets it cached),
    Adam on ``module``'s trainable parameters at ``lr`` cosine-decayed to 0, early stop at ``cfg.time_limit``
    seconds, or once the mean loss of the last 10 steps is below ``stop_below`` (the attacker has nothing left to
    learn: e.g. linkage through an exact inversion). ``groups``: Adam parameter groups instead (each may carry
    ``lr`` and ``warmup``, steps of a linear ramp before the cosine decay). ``on_step(step)`` runs after each step
    (e.g. a model selection). Runs under ``enable_grad`` (a caller's ``no_grad`` must not make training a silent
    no-op). Returns steps, seconds, images/s, first/last loss (means over ``cfg.log_every``-step windows) and the
    loss curve."""
    if groups is None:
        groups = [{"params": [p for p in module.parameters() if p.requires_grad]}]
    opt = torch.optim.Adam([{k: v for k, v in g.items() if k != "warmup"} for g in groups], lr=lr)

    def factor(warmup: int) -> Callable[[int], float]:
        return lambda s: min(1.0, (s + 1) / warmup if warmup else 1.0) * 0.5 * (
            1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor(int(g.get("warmup", 0))) for g in groups])
    g = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(train))
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    recent: list[float] = []
    module.train()
    t0 = time.perf_counter()
    step = 0
    with torch.enable_grad():
        for step in range(1, steps + 1):
            idx = torch.randint(len(train), (bs,), generator=g)
            x = train.batch(idx)
            flip = torch.zeros(bs, dtype=torch.bool)
            if cfg.flip:  # flip the clean face before protection: payload and target see the same face
                flip = torch.rand(bs, generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(x.to(device), step, (idx, flip))
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name} loss became {loss.item()} at step {step}; lower its learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step)
            window.append(loss.item())
            recent.append(window[-1])
            converged = stop_below is not None and len(recent) >= 10 and float(np.mean(recent[-10:])) < stop_below
            timed_out = cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit
            if step % cfg.log_every == 0 or step == steps or timed_out or converged:
                curve.append((step, float(np.mean(window))))
                window = []
                if log:
                    el = time.perf_counter() - t0
                    log(f"  {name} step {step}/{steps}  loss {curve[-1][1]:.4f}  {step * bs / el:.1f} img/s  "
                        f"{el:.0f}s")  # fmt: skip
            if timed_out or converged:
                if log:
                    why = f"time limit {cfg.time_limit:.0f}s reached" if timed_out else f"converged (loss < {stop_below})"
                    log(f"  {name}: {why} after {step} steps")
                break
    secs = time.perf_counter() - t0
    module.eval()
    return {"steps": step, "batch_size": bs, "seconds": round(secs, 2),
            "images_per_s": round(step * bs / max(secs, 1e-9), 2), "loss_first": curve[0][1] if curve else None,
            "loss_last": curve[-1][1] if curve else None, "loss_curve": curve}  # fmt: skip

