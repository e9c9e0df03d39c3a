"""Shared launch policy and index helpers of the Triton kernels.

The interpreter costs ~5-9 ms per program instance whatever the tile (PLATFORM.md §1), so under
``TRITON_INTERPRET=1`` a kernel gets one big tile per plane; on a GPU, small tiles keep registers low (a 128x128
fp32 tile made ptxas run for minutes) and give enough programs to fill the device.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tile(h: int, w: int, gpu: tuple[int, int] = (16, 64)) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) for an H x W plane."""
    if INTERPRET:
        return triton.next_power_of_2(h), triton.next_power_of_2(w)
    return gpu


def chunk(n: int, gpu: int = 1024, cap: int = 1 << 16) -> int:
    """BLOCK for a 1-D loop over n elements."""
    return min(triton.next_power_of_2(max(n, 16)), cap) if INTERPRET else gpu


def grid2d(planes: int, h: int, w: int, bh: int, bw: int) -> tuple[int, int]:
    """Planes on grid axis 0 (limit 2^31 - 1), tiles on axis 1 (limit 65535)."""
    return (planes, triton.cdiv(h, bh) * triton.cdiv(w, bw))


@triton.jit
def tile_offsets(pid_t, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row and column offsets of tile ``pid_t`` (row-major over the tile grid) and their in-bounds masks."""
    n_tw = tl.cdiv(W, BLOCK_W)
    offs_i = (pid_t // n_tw) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = (pid_t % n_tw) * BLOCK_W + tl.arange(0, BLOCK_W)
    return offs_i, offs_j, offs_i < H, offs_j < W
