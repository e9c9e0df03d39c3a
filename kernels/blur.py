"""Triton kernels of the PRO-Face C blurs (METHODS.md §6.2; semantics in ppfr/ops/blur.py).

* ``_median_blur_fwd_kernel``: exact k x k median with zero padding, without storing the k^2 neighbours.
  Floats are mapped to an order-preserving integer key (sign-magnitude -> two's complement:
  ``bits >= 0 ? bits : bits ^ 0x7FFFFFFF``), and the median's key is built bit by bit from the top (radix
  select): for each of the 32 bits, set it in the candidate if fewer than ``mid + 1`` window keys lie below
  the candidate. Each step is one pass over the window (k^2 cached loads and compares), so the kernel does
  32 k^2 compare-adds per pixel in registers and writes the exact input element that is the median.
  The keys of the zero-padded planes are prepared once by ``median_keys`` (one elementwise torch pass), so the
  window loop is load / compare / add with no bounds masks and no per-load key conversion.

Layout: grid axis 0 = plane (B*C, limit 2^31-1), axis 1 = output tile (limit 65535).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ppfr.kernels import _common

# On a GPU an 8 x 32 tile (2 pixels per thread at 4 warps) keeps registers low: the loop state is one candidate
# and one count per pixel (launch policy: kernels/_common.py).
_GPU_TILE = (8, 32)
_tile = functools.partial(_common.tile, gpu=_GPU_TILE)


@triton.jit
def _median_blur_fwd_kernel(key_ptr, out_ptr, H, W, K, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # key_ptr: (P, H + K - 1, W + K - 1) int32 order keys of the zero-padded planes (see median_keys), so the
    # window loop needs no bounds masks; out_ptr: (P, H, W) float32.
    plane = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    n_tw = tl.cdiv(W, BLOCK_W)
    offs_i = (pid_t // n_tw) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = (pid_t % n_tw) * BLOCK_W + tl.arange(0, BLOCK_W)
    hp = H + K - 1
    wp = W + K - 1
    # Tail rows/columns of a partial tile read a valid (clamped) window; their results are not stored.
    ic = tl.minimum(offs_i, H - 1)
    jc = tl.minimum(offs_j, W - 1)
    tile = key_ptr + plane * hp * wp + ic[:, None] * wp + jc[None, :]
    mid = (K * K - 1) // 2

    # ans: the unsigned pattern (key ^ INT_MIN) of the answer, built from the top bit in an int32;
    # candidate c is compared in the signed key domain as c ^ INT_MIN, so all arithmetic stays int32.
    ans = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.int32)
    for it in range(32):
        trial = ans | (tl.full((BLOCK_H, BLOCK_W), 1, tl.int32) << (31 - it))
        thresh = trial ^ -2147483648
        cnt = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.int32)
        for dy in range(0, K):
            row = tile + dy * wp
            for dx in range(0, K):
                cnt += (tl.load(row + dx) < thresh).to(tl.int32)
        ans = tl.where(cnt <= mid, trial, ans)  # fewer than mid + 1 keys below the candidate: keep the bit
    key = ans ^ -2147483648
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    om = (offs_i < H)[:, None] & (offs_j < W)[None, :]
    tl.store(out_ptr + plane * H * W + offs_i[:, None] * W + offs_j[None, :], bits.to(tl.float32, bitcast=True),
             mask=om)


def median_keys(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) float32 -> (B*C, H + k - 1, W + k - 1) int32 order keys of the zero-padded planes.

    key = bits if bits >= 0 else bits ^ 0x7FFFFFFF (bits = the float's int32 pattern): a < b iff key(a) < key(b)
    for non-NaN floats (-0.0 sorts just below +0.0). One cheap elementwise pass, ~(1 + k/H)^2 x the input.
    """
    b, c, h, w = x.shape
    p = k // 2
    bits = torch.nn.functional.pad(x.reshape(b * c, h, w), [p, p, p, p]).view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).contiguous()


def median_blur_triton(x: torch.Tensor, out: torch.Tensor, k: int) -> None:
    """x (B, C, H, W) contiguous float32 -> out (same shape) = k x k zero-padded median (k odd)."""
    b, c, h, w = x.shape
    with _common.launch_device("median_blur", x, out):
        keys = median_keys(x, k)
        bh, bw = _tile(h, w)
        grid = (b * c, triton.cdiv(h, bh) * triton.cdiv(w, bw))
        _median_blur_fwd_kernel[grid](keys, out, h, w, k, BLOCK_H=bh, BLOCK_W=bw)


# Ahead-of-time compile specs (python -m ppfr.kernels.aot): the GPU tile configuration of every kernel.
AOT_SPECS = {
    "_median_blur_fwd_kernel": (
        _median_blur_fwd_kernel,
        {"key_ptr": "*i32", "out_ptr": "*fp32", "H": "i32", "W": "i32", "K": "i32",
         "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"},
        {"BLOCK_H": _GPU_TILE[0], "BLOCK_W": _GPU_TILE[1]},
    ),
}  # fmt: skip
