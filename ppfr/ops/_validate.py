"""Input validation shared by the ops: wrong shapes and dtypes are rejected at the API boundary with messages
that name the argument and say what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_TYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
IndexLike = Union[torch.Tensor, Sequence[int]]


def compiling() -> bool:
    """True while torch.compile/export traces (data-dependent checks are skipped then)."""
    return torch.compiler.is_compiling()


def check_planes(name: str, t: torch.Tensor, channels: int | None = None, min_size: int = 2) -> None:
    """``t`` must be a 4-D (B, C, H, W) floating tensor (C == ``channels`` if given, H, W >= ``min_size``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_TYPES:
        raise TypeError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.shape[2] < min_size or t.shape[3] < min_size:
        raise ValueError(f"{name} spatial size must be at least {min_size}x{min_size}, got {tuple(t.shape[2:])}")


def as_index(name: str, idx: IndexLike, device: torch.device) -> torch.Tensor:
    """An int64 tensor on ``device`` from an integer tensor or a sequence of ints."""
    if isinstance(idx, torch.Tensor):
        if idx.dtype not in INT_TYPES:
            raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
        return idx.to(device=device, dtype=torch.int64)
    try:
        t = torch.as_tensor(list(idx))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be None, a sequence of ints or an integer tensor ({exc})") from None
    # as_tensor(..., dtype=int64) would truncate 0.5 to 0 and accept True as 1: an index must be an integer
    if t.numel() and t.dtype not in INT_TYPES:
        raise TypeError(f"{name} must hold integers, got {t.dtype} values (e.g. {t.reshape(-1)[0].item()!r})")
    return t.to(device=device, dtype=torch.int64)
