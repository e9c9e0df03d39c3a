"""Triton kernels for PRO-Face C feature protection (semantics in ppfr/ops/block_shuffle.py).

* ``_block_shuffle_fwd_kernel``: one program per (b, out channel) plane x tile; each pixel gathers from the
  channel its block's permutation names (gather semantics; the inverse is the same kernel with the inverse table).
* ``_quantize_fwd_kernel``: one program per (b, c) plane x chunk of output bytes; codes are
  round-half-even(v * inv_scale) computed with floor arithmetic (exact, no libdevice, no FMA hazard), packed two
  per byte for 4 bits. The scales come from a torch amax (one IEEE division, identical on every device).
* ``_dequantize_fwd_kernel``: unpack (sign-extend nibbles) and scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppfr.kernels._common import chunk as _chunk
from ppfr.kernels._common import launch_device
from ppfr.kernels._common import tile as _tile
from ppfr.kernels._common import tile_offsets


@triton.jit
def _block_shuffle_fwd_kernel(
    x_ptr, out_ptr, perm_ptr, C, H, W, BH, BW, NBW,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    plane = tl.program_id(0).to(tl.int64)  # b * C + j
    pid_t = tl.program_id(1)
    offs_h, offs_w, mh, mw = tile_offsets(pid_t, H, W, BLOCK_H, BLOCK_W)
    m = mh[:, None] & mw[None, :]
    b = plane // C
    j = plane % C
    bid = (offs_h // BH)[:, None] * NBW + (offs_w // BW)[None, :]
    src = tl.load(perm_ptr + bid * C + j, mask=m, other=0)
    hw = H * W
    pix = offs_h[:, None] * W + offs_w[None, :]
    val = tl.load(x_ptr + (b * C + src) * hw + pix, mask=m, other=0.0)
    tl.store(out_ptr + plane * hw + pix, val, mask=m)


@triton.jit
def _round_half_even(v):
    r = tl.floor(v)
    d = v - r  # exact for |v| < 2**23
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _quantize_fwd_kernel(x_ptr, wire_ptr, inv_ptr, N, NBYTES, QMAX, BITS: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # byte index
    mb = offs < NBYTES
    inv = tl.load(inv_ptr + plane)
    base = x_ptr + plane * N
    if BITS == 8:
        v = tl.load(base + offs, mask=mb, other=0.0)
        q = tl.minimum(tl.maximum(_round_half_even(v * inv), -QMAX), QMAX)
        byte = q.to(tl.int32) & 0xFF
    else:
        lo = tl.load(base + 2 * offs, mask=mb & (2 * offs < N), other=0.0)
        hi = tl.load(base + 2 * offs + 1, mask=mb & (2 * offs + 1 < N), other=0.0)
        qlo = tl.minimum(tl.maximum(_round_half_even(lo * inv), -QMAX), QMAX).to(tl.int32)
        qhi = tl.minimum(tl.maximum(_round_half_even(hi * inv), -QMAX), QMAX).to(tl.int32)
        byte = (qlo & 0xF) | ((qhi & 0xF) << 4)
    tl.store(wire_ptr + plane * NBYTES + offs, byte.to(tl.uint8), mask=mb)


@triton.jit
def _dequantize_fwd_kernel(wire_ptr, scale_ptr, out_ptr, N, NBYTES, BITS: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # value index
    m = offs < N
    s = tl.load(scale_ptr + plane)
    if BITS == 8:
        byte = tl.load(wire_ptr + plane * NBYTES + offs, mask=m, other=0).to(tl.int32)
        code = tl.where(byte >= 128, byte - 256, byte)
    else:
        byte = tl.load(wire_ptr + plane * NBYTES + offs // 2, mask=m, other=0).to(tl.int32)
        nib = tl.where((offs % 2) == 1, byte >> 4, byte & 0xF)
        code = tl.where(nib >= 8, nib - 16, nib)
    tl.store(out_ptr + plane * N + offs, code.to(tl.float32) * s, mask=m)


def block_shuffle_triton(x, out, perm, bh: int, bw: int) -> None:
    """x, out (B,C,H,W) fp32 contiguous; perm (n_blocks, C) int64 (gather table)."""
    b, c, h, w = x.shape
    th, tw = _tile(h, w)
    nbw = triton.cdiv(w, bw)
    grid = (b * c, triton.cdiv(h, th) * triton.cdiv(w, tw))
    with launch_device("block_channel_shuffle", x, out, perm):
        _block_shuffle_fwd_kernel[grid](x, out, perm, c, h, w, bh, bw, nbw, BLOCK_H=th, BLOCK_W=tw)


def quantize_triton(x, wire, inv_scales, bits: int) -> None:
    """x (B,C,H,W) fp32 contiguous, inv_scales (B,C) fp32 -> wire (B,C,nbytes) uint8."""
    b, c, h, w = x.shape
    n, nbytes = h * w, wire.shape[2]
    blk = _chunk(nbytes)
    with launch_device("quantize", x, wire, inv_scales):
        _quantize_fwd_kernel[(b * c, triton.cdiv(nbytes, blk))](
            x, wire, inv_scales, n, nbytes, 127.0 if bits == 8 else 7.0, BITS=bits, BLOCK=blk
        )


def dequantize_triton(wire, scales, out, bits: int) -> None:
    """wire (B,C,nbytes) uint8, scales (B,C) fp32 -> out (B,C,H,W) fp32."""
    b, c, h, w = out.shape
    n = h * w
    blk = _chunk(n)
    with launch_device("dequantize", wire, scales, out):
        _dequantize_fwd_kernel[(b * c, triton.cdiv(n, blk))](wire, scales, out, n, wire.shape[2], BITS=bits, BLOCK=blk)


_I32 = "i32"
AOT_SPECS = {
    "_block_shuffle_fwd_kernel": (
        _block_shuffle_fwd_kernel,
        {"x_ptr": "*fp32", "out_ptr": "*fp32", "perm_ptr": "*i64", "C": _I32, "H": _I32, "W": _I32, "BH": _I32,
         "BW": _I32, "NBW": _I32, "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"},
        {"BLOCK_H": 16, "BLOCK_W": 64},
    ),
    **{
        f"_quantize_fwd_kernel[bits={bits}]": (
            _quantize_fwd_kernel,
            {"x_ptr": "*fp32", "wire_ptr": "*u8", "inv_ptr": "*fp32", "N": _I32, "NBYTES": _I32, "QMAX": "fp32",
             "BITS": "constexpr", "BLOCK": "constexpr"},
            {"BITS": bits, "BLOCK": 1024},
        )
        for bits in (8, 4)
    },
    **{
        f"_dequantize_fwd_kernel[bits={bits}]": (
            _dequantize_fwd_kernel,
            {"wire_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*fp32", "N": _I32, "NBYTES": _I32,
             "BITS": "constexpr", "BLOCK": "constexpr"},
            {"BITS": bits, "BLOCK": 1024},
        )
        for bits in (8, 4)
    },
}  # fmt: skip
