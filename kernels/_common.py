"""Shared launch policy, device guard and index helpers of the Triton kernels.

The interpreter costs ~5-9 ms per program instance whatever the tile (PLATFORM.md §1), so under
``TRITON_INTERPRET=1`` a kernel gets one big tile per plane; on a GPU, small tiles keep registers low (a 128x128
fp32 tile made ptxas run for minutes) and give enough programs to fill the device.

Overrides (read at every launch, so tests can set them with ``monkeypatch.setenv``):

* ``PPFR_TRITON_TILE="BHxBW"`` forces every 2-D tile to BH x BW (powers of two), e.g. ``4x8``;
* ``PPFR_TRITON_CHUNK="N"`` forces every 1-D block (and every "chunk of channels/samples" a kernel loops over)
  to N (a power of two >= 2).

With them the interpreter runs the GPU's multi-tile, multi-chunk code paths (edge tiles, partial chunks,
cross-program reductions) on small inputs.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TILE_ENV = "PPFR_TRITON_TILE"
CHUNK_ENV = "PPFR_TRITON_CHUNK"


def _pow2(name: str, text: str, part: str, lo: int = 1) -> int:
    try:
        v = int(part)
    except ValueError:
        v = 0
    if v < lo or v & (v - 1):
        raise ValueError(f"{name}={text!r}: expected a power of two >= {lo}, got {part!r}")
    return v


def tile_override() -> tuple[int, int] | None:
    """The forced (BLOCK_H, BLOCK_W) from ``PPFR_TRITON_TILE`` or None."""
    text = os.environ.get(TILE_ENV, "").strip()
    if not text:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"{TILE_ENV}={text!r}: expected 'BHxBW', e.g. '4x8'")
    return _pow2(TILE_ENV, text, parts[0]), _pow2(TILE_ENV, text, parts[1])


def chunk_override() -> int | None:
    """The forced 1-D block from ``PPFR_TRITON_CHUNK`` or None."""
    text = os.environ.get(CHUNK_ENV, "").strip()
    return _pow2(CHUNK_ENV, text, text, lo=2) if text else None


def tile(h: int, w: int, gpu: tuple[int, int] = (16, 64)) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) for an H x W plane."""
    forced = tile_override()
    if forced is not None:
        return forced
    if INTERPRET:
        return triton.next_power_of_2(h), triton.next_power_of_2(w)
    return gpu


def chunk(n: int, gpu: int = 1024, cap: int = 1 << 16) -> int:
    """BLOCK for a 1-D loop over n elements."""
    forced = chunk_override()
    if forced is not None:
        return forced
    return min(triton.next_power_of_2(max(n, 16)), cap) if INTERPRET else gpu


def group(n: int, gpu: int) -> int:
    """How many channels/samples one program handles in a loop over n of them (``gpu`` on a GPU).

    The interpreter takes all n (fewest programs); ``PPFR_TRITON_CHUNK`` forces it (smaller than n makes
    several groups, the GPU's structure).
    """
    forced = chunk_override()
    if forced is not None:
        return forced
    return max(n, 1) if INTERPRET else gpu


def grid2d(planes: int, h: int, w: int, bh: int, bw: int) -> tuple[int, int]:
    """Planes on grid axis 0 (limit 2^31 - 1), tiles on axis 1 (limit 65535)."""
    return (planes, triton.cdiv(h, bh) * triton.cdiv(w, bw))


def launch_device(op: str, *tensors: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """Context in which ``op``'s kernels launch: the tensors' CUDA device made current.

    Triton launches on ``torch.cuda.current_device()`` and that device's current torch stream, so without this a
    tensor on ``cuda:1`` would be launched on ``cuda:0`` (``with torch.device(...)`` only sets the default device
    for new tensors, not the current CUDA device). CPU tensors (the interpreter) need no guard.

    Raises:
        ValueError: the tensors are not all on one device (the message names ``op``).
    """
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        names = ", ".join(sorted(str(d) for d in devs))
        raise ValueError(f"{op}: all tensors must be on one device, got {names}")
    if not devs:
        return contextlib.nullcontext()
    dev = devs.pop()
    if dev.type == "cuda":
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


@triton.jit
def tile_offsets(pid_t, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row and column offsets of tile ``pid_t`` (row-major over the tile grid) and their in-bounds masks."""
    n_tw = tl.cdiv(W, BLOCK_W)
    offs_i = (pid_t // n_tw) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = (pid_t % n_tw) * BLOCK_W + tl.arange(0, BLOCK_W)
    return offs_i, offs_j, offs_i < H, offs_j < W
