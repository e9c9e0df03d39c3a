"""Triton kernels of the block-DCT frequency transform (METHODS.md §2; semantics in ppfr/ops/freq.py).

All math comes from the banded tables of ``ppfr/ops/_freq_tables.py`` (passed in as tensors):
``idx (T, N) int32`` and ``w (8, T, N) float32`` per axis, plus a packed (3, 4) colour affine.

* ``_freq_encode_fwd_kernel``: one program per (b, k) plane x output tile. Each output is a 3x3-tap
  combination of the colour-converted input: out[i, j] = sum w_r[u,t1,i] w_c[v,t2,j] Z_c[idx_r[t1,i], idx_c[t2,j]].
  No ``tl.dot``: the operator has 3 non-zeros per row, so a dense 16x16 MMA tile would waste >80% of its
  work, and the op is bound by writing its output anyway.
* ``_freq_decode_fwd_kernel``: one program per image x output tile, looping over the 192 coefficient
  planes with 2x2 taps; missing channels (source index -1) are masked loads (no memory traffic).
* ``_freq_hflip_fwd_kernel``: mirrored copy with a per-plane sign.

The (B*K) plane index runs on grid axis 0 (limit 2^31-1), tiles on axis 1 (limit 65535).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppfr.kernels._common import grid2d as _grid
from ppfr.kernels._common import tile as _tile
from ppfr.kernels._common import tile_offsets


@triton.jit
def _freq_encode_fwd_kernel(
    x_ptr, out_ptr, chan_ptr, ridx_ptr, rw_ptr, cidx_ptr, cw_ptr, aff_ptr,
    H, W, K,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    bk = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    offs_i, offs_j, mi, mj = tile_offsets(pid_t, H, W, BLOCK_H, BLOCK_W)
    m = mi[:, None] & mj[None, :]

    b = bk // K
    ch = tl.load(chan_ptr + bk)
    c = ch // 64
    u = (ch // 8) % 8
    v = ch % 8
    a0 = tl.load(aff_ptr + c * 4)
    a1 = tl.load(aff_ptr + c * 4 + 1)
    a2 = tl.load(aff_ptr + c * 4 + 2)
    a3 = tl.load(aff_ptr + c * 4 + 3)
    hw = H * W
    xb = x_ptr + b * 3 * hw

    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for t1 in tl.static_range(3):
        r = tl.load(ridx_ptr + t1 * H + offs_i, mask=mi, other=0)
        wr = tl.load(rw_ptr + (u * 3 + t1) * H + offs_i, mask=mi, other=0.0)
        for t2 in tl.static_range(3):
            cc = tl.load(cidx_ptr + t2 * W + offs_j, mask=mj, other=0)
            wc = tl.load(cw_ptr + (v * 3 + t2) * W + offs_j, mask=mj, other=0.0)
            p = r[:, None] * W + cc[None, :]
            z = (
                a0 * tl.load(xb + p, mask=m, other=0.0)
                + a1 * tl.load(xb + hw + p, mask=m, other=0.0)
                + a2 * tl.load(xb + 2 * hw + p, mask=m, other=0.0)
                + a3
            )
            acc += (wr[:, None] * wc[None, :]) * z
    tl.store(out_ptr + bk * hw + offs_i[:, None] * W + offs_j[None, :], acc, mask=m)


@triton.jit
def _freq_decode_fwd_kernel(
    f_ptr, out_ptr, src_ptr, ridx_ptr, rw_ptr, cidx_ptr, cw_ptr, aff_ptr,
    H, W, K,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    offs_i, offs_j, mi, mj = tile_offsets(pid_t, H, W, BLOCK_H, BLOCK_W)
    m = mi[:, None] & mj[None, :]
    hw = H * W

    r0 = tl.load(ridx_ptr + offs_i, mask=mi, other=0)
    r1 = tl.load(ridx_ptr + H + offs_i, mask=mi, other=0)
    c0 = tl.load(cidx_ptr + offs_j, mask=mj, other=0)
    c1 = tl.load(cidx_ptr + W + offs_j, mask=mj, other=0)
    p00 = r0[:, None] * W + c0[None, :]
    p01 = r0[:, None] * W + c1[None, :]
    p10 = r1[:, None] * W + c0[None, :]
    p11 = r1[:, None] * W + c1[None, :]

    red = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    green = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    blue = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for c in tl.static_range(3):
        d = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        for u in range(8):
            wr0 = tl.load(rw_ptr + (u * 2) * H + offs_i, mask=mi, other=0.0)
            wr1 = tl.load(rw_ptr + (u * 2 + 1) * H + offs_i, mask=mi, other=0.0)
            for v in range(8):
                k = tl.load(src_ptr + b * 192 + c * 64 + u * 8 + v)
                ok = k >= 0
                base = f_ptr + (b * K + tl.maximum(k, 0)) * hw
                wc0 = tl.load(cw_ptr + (v * 2) * W + offs_j, mask=mj, other=0.0)
                wc1 = tl.load(cw_ptr + (v * 2 + 1) * W + offs_j, mask=mj, other=0.0)
                mk = m & ok
                t0 = wc0[None, :] * tl.load(base + p00, mask=mk, other=0.0) + wc1[None, :] * tl.load(
                    base + p01, mask=mk, other=0.0
                )
                t1 = wc0[None, :] * tl.load(base + p10, mask=mk, other=0.0) + wc1[None, :] * tl.load(
                    base + p11, mask=mk, other=0.0
                )
                d += wr0[:, None] * t0 + wr1[:, None] * t1
        red += tl.load(aff_ptr + c) * d
        green += tl.load(aff_ptr + 4 + c) * d
        blue += tl.load(aff_ptr + 8 + c) * d
    o = out_ptr + b * 3 * hw + offs_i[:, None] * W + offs_j[None, :]
    tl.store(o, red + tl.load(aff_ptr + 3), mask=m)
    tl.store(o + hw, green + tl.load(aff_ptr + 7), mask=m)
    tl.store(o + 2 * hw, blue + tl.load(aff_ptr + 11), mask=m)


@triton.jit
def _freq_hflip_fwd_kernel(f_ptr, out_ptr, sign_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pk = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    offs_i, offs_j, mi, mj = tile_offsets(pid_t, H, W, BLOCK_H, BLOCK_W)
    m = mi[:, None] & mj[None, :]
    s = tl.load(sign_ptr + pk)
    base = pk * H * W + offs_i[:, None] * W
    val = tl.load(f_ptr + base + (W - 1 - offs_j)[None, :], mask=m, other=0.0)
    tl.store(out_ptr + base + offs_j[None, :], s * val, mask=m)


def freq_encode_triton(x, out, chan, ridx, rw, cidx, cw, aff) -> None:
    """x (B,3,H,W) fp32 -> out (B,K,H,W) fp32; chan (B,K) int64; tables as in ppfr.ops._freq_tables."""
    b, _, h, w = x.shape
    k = chan.shape[1]
    bh, bw = _tile(h, w)
    with torch.device(x.device):
        _freq_encode_fwd_kernel[_grid(b * k, h, w, bh, bw)](
            x, out, chan, ridx, rw, cidx, cw, aff, h, w, k, BLOCK_H=bh, BLOCK_W=bw
        )


def freq_decode_triton(f, out, src, ridx, rw, cidx, cw, aff) -> None:
    """f (B,K,H,W) fp32, src (B,192) int64 -> out (B,3,H,W) fp32 linear RGB on a [0,1] scale (unclamped)."""
    b, k, h, w = f.shape
    bh, bw = _tile(h, w)
    with torch.device(f.device):
        _freq_decode_fwd_kernel[_grid(b, h, w, bh, bw)](
            f, out, src, ridx, rw, cidx, cw, aff, h, w, k, BLOCK_H=bh, BLOCK_W=bw
        )


def freq_hflip_triton(f, out, sign) -> None:
    """f (B,K,H,W) fp32 -> out = sign[b,k] * f[..., ::-1]; sign (B,K) fp32."""
    b, k, h, w = f.shape
    bh, bw = _tile(h, w)
    with torch.device(f.device):
        _freq_hflip_fwd_kernel[_grid(b * k, h, w, bh, bw)](f, out, sign, h, w, BLOCK_H=bh, BLOCK_W=bw)


# Ahead-of-time compile specs (tools/triton_aot_check.py): the GPU tile configuration of every kernel.
_PTRS = ("x_ptr", "out_ptr", "chan_ptr", "ridx_ptr", "rw_ptr", "cidx_ptr", "cw_ptr", "aff_ptr")
_TYPES = ("*fp32", "*fp32", "*i64", "*i32", "*fp32", "*i32", "*fp32", "*fp32")
AOT_SPECS = {
    "_freq_encode_fwd_kernel": (
        _freq_encode_fwd_kernel,
        {**dict(zip(_PTRS, _TYPES)), "H": "i32", "W": "i32", "K": "i32", "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"},
        {"BLOCK_H": 16, "BLOCK_W": 64},
    ),
    "_freq_decode_fwd_kernel": (
        _freq_decode_fwd_kernel,
        {
            **dict(zip(("f_ptr", "out_ptr", "src_ptr", *_PTRS[3:]), _TYPES)),
            "H": "i32", "W": "i32", "K": "i32", "BLOCK_H": "constexpr", "BLOCK_W": "constexpr",
        },
        {"BLOCK_H": 16, "BLOCK_W": 64},
    ),
    "_freq_hflip_fwd_kernel": (
        _freq_hflip_fwd_kernel,
        {"f_ptr": "*fp32", "out_ptr": "*fp32", "sign_ptr": "*fp32", "H": "i32", "W": "i32",
         "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"},
        {"BLOCK_H": 16, "BLOCK_W": 64},
    ),
}  # fmt: skip
