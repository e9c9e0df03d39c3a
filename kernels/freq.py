"""Triton kernels of the block-DCT frequency transform (METHODS.md §2; semantics in ppfr/ops/freq.py).

All math comes from the banded tables of ``ppfr/ops/_freq_tables.py`` (passed in as tensors):
``idx (T, N) int32`` and ``w (8, T, N) float32`` per axis, plus a packed (3, 4) colour affine.

* ``_freq_encode_fwd_kernel``: one program per (image, group of KC output channels) x output tile. Each output
  is a 3x3-tap combination of the colour-converted input: out[i, j] = sum w_r[u,t1,i] w_c[v,t2,j]
  Z_c[idx_r[t1,i], idx_c[t2,j]]. The taps' source positions depend on the pixel only, so a program loads the 9
  taps x 3 input channels and converts them to Z_0..Z_2 once, then produces each of its channels with 9 FMAs
  from registers (a per-channel program re-read and re-converted them for every channel). No ``tl.dot``: the
  operator has 3 non-zeros per row, so a dense 16x16 MMA tile would waste >80% of its work, and the op is bound
  by writing its output anyway.
* ``_freq_decode_fwd_kernel``: one program per image x output tile, looping over the 192 coefficient
  planes with 2x2 taps; missing channels (source index -1) are masked loads (no memory traffic). Three colour
  accumulators, then the colour affine.
* ``_freq_hflip_fwd_kernel``: mirrored copy with a per-plane sign.

The (B*K) plane index runs on grid axis 0 (limit 2^31-1), tiles on axis 1 (limit 65535).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppfr.kernels._common import grid2d as _grid
from ppfr.kernels._common import group as _group
from ppfr.kernels._common import launch_device
from ppfr.kernels._common import tile as _tile
from ppfr.kernels._common import tile_offsets

# GPU tiles (launch policy: kernels/_common.py). Encode keeps 27 colour-converted taps per pixel in registers, so
# it takes an 8 x 32 tile (2 pixels per thread at 4 warps) and loops over _ENC_KC output channels per program;
# decode takes 8 x 32 as well: its 16 x 64 tile needed ~236 registers per thread (8 pixels x 4 tap offsets and
# colour accumulators), 8 x 64 still 105-128; 8 x 32 needs ~48-64, so more warps stay resident to hide gathers.
_ENC_TILE = (8, 32)
_ENC_KC = 16
_DEC_TILE = (8, 32)


@triton.jit
def _ycc_tap(xb, hw, p, m, aff_ptr):
    """The three colour-converted planes Z_0..Z_2 at flat offsets ``p``: one load per input channel."""
    x0 = tl.load(xb + p, mask=m, other=0.0)
    x1 = tl.load(xb + hw + p, mask=m, other=0.0)
    x2 = tl.load(xb + 2 * hw + p, mask=m, other=0.0)
    z0 = tl.load(aff_ptr) * x0 + tl.load(aff_ptr + 1) * x1 + tl.load(aff_ptr + 2) * x2 + tl.load(aff_ptr + 3)
    z1 = tl.load(aff_ptr + 4) * x0 + tl.load(aff_ptr + 5) * x1 + tl.load(aff_ptr + 6) * x2 + tl.load(aff_ptr + 7)
    z2 = tl.load(aff_ptr + 8) * x0 + tl.load(aff_ptr + 9) * x1 + tl.load(aff_ptr + 10) * x2 + tl.load(aff_ptr + 11)
    return z0, z1, z2


@triton.jit
def _pick(c, z0, z1, z2):
    return tl.where(c == 0, z0, tl.where(c == 1, z1, z2))


@triton.jit
def _freq_encode_fwd_kernel(
    x_ptr, out_ptr, chan_ptr, ridx_ptr, rw_ptr, cidx_ptr, cw_ptr, aff_ptr,
    H, W, K, KC,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # Grid axis 0: b * n_kc + (group of KC output channels); axis 1: output tile.
    pid0 = tl.program_id(0).to(tl.int64)
    n_kc = tl.cdiv(K, KC)
    b = pid0 // n_kc
    k0 = (pid0 % n_kc) * KC
    k1 = tl.minimum(k0 + KC, K)
    pid_t = tl.program_id(1)
    offs_i, offs_j, mi, mj = tile_offsets(pid_t, H, W, BLOCK_H, BLOCK_W)
    m = mi[:, None] & mj[None, :]
    hw = H * W
    xb = x_ptr + b * 3 * hw

    # The 3x3 source taps and their colour conversion depend on the pixel only, not on the frequency: load and
    # convert them once per tile (27 values per pixel), then every output channel is 9 FMAs on registers.
    r0 = tl.load(ridx_ptr + offs_i, mask=mi, other=0)[:, None] * W
    r1 = tl.load(ridx_ptr + H + offs_i, mask=mi, other=0)[:, None] * W
    r2 = tl.load(ridx_ptr + 2 * H + offs_i, mask=mi, other=0)[:, None] * W
    c0 = tl.load(cidx_ptr + offs_j, mask=mj, other=0)[None, :]
    c1 = tl.load(cidx_ptr + W + offs_j, mask=mj, other=0)[None, :]
    c2 = tl.load(cidx_ptr + 2 * W + offs_j, mask=mj, other=0)[None, :]
    y00, b00, q00 = _ycc_tap(xb, hw, r0 + c0, m, aff_ptr)
    y01, b01, q01 = _ycc_tap(xb, hw, r0 + c1, m, aff_ptr)
    y02, b02, q02 = _ycc_tap(xb, hw, r0 + c2, m, aff_ptr)
    y10, b10, q10 = _ycc_tap(xb, hw, r1 + c0, m, aff_ptr)
    y11, b11, q11 = _ycc_tap(xb, hw, r1 + c1, m, aff_ptr)
    y12, b12, q12 = _ycc_tap(xb, hw, r1 + c2, m, aff_ptr)
    y20, b20, q20 = _ycc_tap(xb, hw, r2 + c0, m, aff_ptr)
    y21, b21, q21 = _ycc_tap(xb, hw, r2 + c1, m, aff_ptr)
    y22, b22, q22 = _ycc_tap(xb, hw, r2 + c2, m, aff_ptr)

    o = out_ptr + offs_i[:, None] * W + offs_j[None, :]
    for kk in range(k0, k1):
        ch = tl.load(chan_ptr + b * K + kk)
        c = ch // 64
        u = (ch // 8) % 8
        v = ch % 8
        wr0 = tl.load(rw_ptr + (u * 3) * H + offs_i, mask=mi, other=0.0)[:, None]
        wr1 = tl.load(rw_ptr + (u * 3 + 1) * H + offs_i, mask=mi, other=0.0)[:, None]
        wr2 = tl.load(rw_ptr + (u * 3 + 2) * H + offs_i, mask=mi, other=0.0)[:, None]
        wc0 = tl.load(cw_ptr + (v * 3) * W + offs_j, mask=mj, other=0.0)[None, :]
        wc1 = tl.load(cw_ptr + (v * 3 + 1) * W + offs_j, mask=mj, other=0.0)[None, :]
        wc2 = tl.load(cw_ptr + (v * 3 + 2) * W + offs_j, mask=mj, other=0.0)[None, :]
        # Same terms in the same order (t1 outer, t2 inner) as a per-channel loop over the taps.
        acc = (wr0 * wc0) * _pick(c, y00, b00, q00)
        acc += (wr0 * wc1) * _pick(c, y01, b01, q01)
        acc += (wr0 * wc2) * _pick(c, y02, b02, q02)
        acc += (wr1 * wc0) * _pick(c, y10, b10, q10)
        acc += (wr1 * wc1) * _pick(c, y11, b11, q11)
        acc += (wr1 * wc2) * _pick(c, y12, b12, q12)
        acc += (wr2 * wc0) * _pick(c, y20, b20, q20)
        acc += (wr2 * wc1) * _pick(c, y21, b21, q21)
        acc += (wr2 * wc2) * _pick(c, y22, b22, q22)
        tl.store(o + (b * K + kk) * hw, acc, mask=m)


@triton.jit
def _dec_colour(f_ptr, src_ptr, rw_ptr, cw_ptr, b, c, K, H, W, hw, offs_i, offs_j, mi, mj, m, p00, p01, p10, p11,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    """d_c: the inverse DCT of colour c's 64 coefficient planes, 2x2 taps per pixel (missing planes masked)."""
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
    return d


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

    # Three colour accumulators live at once (d0, d1 kept while d2 is summed), then the colour affine.
    d0 = _dec_colour(f_ptr, src_ptr, rw_ptr, cw_ptr, b, 0, K, H, W, hw, offs_i, offs_j, mi, mj, m, p00, p01, p10,
                     p11, BLOCK_H, BLOCK_W)  # fmt: skip
    d1 = _dec_colour(f_ptr, src_ptr, rw_ptr, cw_ptr, b, 1, K, H, W, hw, offs_i, offs_j, mi, mj, m, p00, p01, p10,
                     p11, BLOCK_H, BLOCK_W)  # fmt: skip
    d2 = _dec_colour(f_ptr, src_ptr, rw_ptr, cw_ptr, b, 2, K, H, W, hw, offs_i, offs_j, mi, mj, m, p00, p01, p10,
                     p11, BLOCK_H, BLOCK_W)  # fmt: skip
    o = out_ptr + b * 3 * hw + offs_i[:, None] * W + offs_j[None, :]
    for c in tl.static_range(3):
        a = aff_ptr + 4 * c
        rgb = tl.load(a) * d0 + tl.load(a + 1) * d1 + tl.load(a + 2) * d2 + tl.load(a + 3)
        tl.store(o + c * hw, rgb, mask=m)


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
    _check_f32("freq_encode", x, out, rw, cw, aff)
    b, _, h, w = x.shape
    k = chan.shape[1]
    bh, bw = _tile(h, w, _ENC_TILE)
    kc = min(_group(k, _ENC_KC), max(k, 1))
    with launch_device("freq_encode", x, out, chan, ridx, rw, cidx, cw, aff):
        _freq_encode_fwd_kernel[_grid(b * triton.cdiv(k, kc), h, w, bh, bw)](
            x, out, chan, ridx, rw, cidx, cw, aff, h, w, k, kc, BLOCK_H=bh, BLOCK_W=bw
        )


def freq_decode_triton(f, out, src, ridx, rw, cidx, cw, aff) -> None:
    """f (B,K,H,W) fp32, src (B,192) int64 -> out (B,3,H,W) fp32 linear RGB on a [0,1] scale (unclamped)."""
    _check_f32("freq_decode", f, out, rw, cw, aff)
    b, k, h, w = f.shape
    bh, bw = _tile(h, w, _DEC_TILE)
    with launch_device("freq_decode", f, out, src, ridx, rw, cidx, cw, aff):
        _freq_decode_fwd_kernel[_grid(b, h, w, bh, bw)](
            f, out, src, ridx, rw, cidx, cw, aff, h, w, k, BLOCK_H=bh, BLOCK_W=bw
        )


def freq_hflip_triton(f, out, sign) -> None:
    """f (B,K,H,W) fp32 -> out = sign[b,k] * f[..., ::-1]; sign (B,K) fp32."""
    _check_f32("freq_hflip", f, out, sign)
    b, k, h, w = f.shape
    bh, bw = _tile(h, w)
    with launch_device("freq_hflip", f, out, sign):
        _freq_hflip_fwd_kernel[_grid(b * k, h, w, bh, bw)](f, out, sign, h, w, BLOCK_H=bh, BLOCK_W=bw)


def _check_f32(op: str, *tensors: torch.Tensor) -> None:
    """The kernels compute in float32: refuse other dtypes instead of reinterpreting their bytes."""
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: the triton kernel computes in float32, got a {t.dtype} tensor; "
                            "use the torch or cpp backend for float64")  # fmt: skip


# Ahead-of-time compile specs (python -m ppfr.kernels.aot): the GPU tile configuration of every kernel.
_PTRS = ("x_ptr", "out_ptr", "chan_ptr", "ridx_ptr", "rw_ptr", "cidx_ptr", "cw_ptr", "aff_ptr")
_TYPES = ("*fp32", "*fp32", "*i64", "*i32", "*fp32", "*i32", "*fp32", "*fp32")
AOT_SPECS = {
    "_freq_encode_fwd_kernel": (
        _freq_encode_fwd_kernel,
        {**dict(zip(_PTRS, _TYPES)), "H": "i32", "W": "i32", "K": "i32", "KC": "i32",
         "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"},
        {"BLOCK_H": _ENC_TILE[0], "BLOCK_W": _ENC_TILE[1]},
    ),
    "_freq_decode_fwd_kernel": (
        _freq_decode_fwd_kernel,
        {
            **dict(zip(("f_ptr", "out_ptr", "src_ptr", *_PTRS[3:]), _TYPES)),
            "H": "i32", "W": "i32", "K": "i32", "BLOCK_H": "constexpr", "BLOCK_W": "constexpr",
        },
        {"BLOCK_H": _DEC_TILE[0], "BLOCK_W": _DEC_TILE[1]},
    ),
    "_freq_hflip_fwd_kernel": (
        _freq_hflip_fwd_kernel,
        {"f_ptr": "*fp32", "out_ptr": "*fp32", "sign_ptr": "*fp32", "H": "i32", "W": "i32",
         "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"},
        {"BLOCK_H": 16, "BLOCK_W": 64},
    ),
}  # fmt: skip
