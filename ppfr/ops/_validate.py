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


# ----------------------------------------------------------------------------------------------------------
# Host-sync policy. Reading a device tensor's values on the host (``.item()``, ``bool(t)``, ``int(t.max())``,
# ``nonzero``, a blocking ``.to("cpu")`` or ``.to(device)``) makes the CPU wait for every queued kernel. The ops
# and methods therefore check *values* only where they already live on the host (Python lists, CPU tensors);
# on a device the same rule becomes a device-side assert (``torch._assert_async``: no wait, the error surfaces
# at the next synchronising call) or is checked once where the data is made (method construction).
# ----------------------------------------------------------------------------------------------------------
def on_host(t: torch.Tensor) -> bool:
    """True if ``t``'s values can be read without waiting for a device (a CPU tensor)."""
    return t.device.type == "cpu"


def require(ok: torch.Tensor, message: str, exc: type[Exception] = ValueError) -> None:
    """Refuse values for which the 0-d bool ``ok`` is False, without a host sync.

    CPU: raise ``exc(message)`` now. Other devices: ``torch._assert_async`` (the check runs on the device; a
    failure raises at the next synchronisation -- on CUDA as a device-side assert). Skipped while tracing.
    """
    if compiling():
        return
    if on_host(ok):
        if not bool(ok):
            raise exc(message)
    else:
        torch._assert_async(ok, message)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host-to-device copy is issued non-blocking (a blocking one waits for the stream).

    Safe for a pageable CPU source: CUDA stages it before returning, so the source may be freed at once.
    """
    if t.device == device:
        return t
    return t.to(device, non_blocking=on_host(t) and device.type != "cpu")


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where a random draw for tensors on ``device`` happens: on ``generator``'s device if one is given (a CPU
    generator gives the same draws on every device), else on ``device`` itself (its global RNG: no copy)."""
    return generator.device if generator is not None else device
