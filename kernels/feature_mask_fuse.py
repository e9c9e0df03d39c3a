"""Triton kernels for feature-mask fusion (semantics in ppfr/ops/feature_mask_fuse.py).

DuetFace: ``_duet_mask_kernel`` builds one sample's mask in one program (channel mean over Cz, then up to two
min-max normalisations; the feature maps are at most 56 x 56, so a program loops over its pixels in chunks);
``_mask_fuse_fwd_kernel`` is the elementwise sigmoid(h) * (1 + w * mask); ``_mask_fuse_bwd_kernel`` writes
dL/dh, per-(sample, chunk) partial sums of dL/dw, and dL/dz. PRO-Face C: elementwise forward and a backward whose
key gradient reduces over the batch inside each program (no atomics).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ppfr.kernels import _common

_chunk = functools.partial(_common.chunk, gpu=256, cap=4096)


@triton.jit
def _duet_mask_kernel(z_ptr, roi_ptr, mask_ptr, k_ptr, CZ, HW, EPS, HAS_ROI: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    zb = z_ptr + b * CZ * HW
    mb = mask_ptr + b * HW
    lo = float("inf")
    hi = float("-inf")
    for p0 in range(0, HW, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        m = offs < HW
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(CZ):
            acc += tl.load(zb + c * HW + offs, mask=m, other=0.0)
        acc = acc / CZ
        lo = tl.minimum(lo, tl.min(tl.where(m, acc, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(m, acc, float("-inf")), axis=0))
        tl.store(mb + offs, acc, mask=m)
    k = 1.0 / tl.maximum(hi - lo, EPS)
    if HAS_ROI:
        lo2 = float("inf")
        hi2 = float("-inf")
        for p0 in range(0, HW, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            m = offs < HW
            v = (tl.load(mb + offs, mask=m, other=0.0) - lo) * k * tl.load(roi_ptr + b * HW + offs, mask=m, other=0.0)
            lo2 = tl.minimum(lo2, tl.min(tl.where(m, v, float("inf")), axis=0))
            hi2 = tl.maximum(hi2, tl.max(tl.where(m, v, float("-inf")), axis=0))
            tl.store(mb + offs, v, mask=m)
        k2 = 1.0 / tl.maximum(hi2 - lo2, EPS)
        for p0 in range(0, HW, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            m = offs < HW
            tl.store(mb + offs, (tl.load(mb + offs, mask=m, other=0.0) - lo2) * k2, mask=m)
        k = k * k2
    else:
        for p0 in range(0, HW, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            m = offs < HW
            tl.store(mb + offs, (tl.load(mb + offs, mask=m, other=0.0) - lo) * k, mask=m)
    tl.store(k_ptr + b, k)


@triton.jit
def _mask_fuse_fwd_kernel(h_ptr, mask_ptr, w_ptr, out_ptr, C, HW, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # b * C + c
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    b = plane // C
    w = tl.load(w_ptr)
    hv = tl.load(h_ptr + plane * HW + offs, mask=m, other=0.0)
    mk = tl.load(mask_ptr + b * HW + offs, mask=m, other=0.0)
    tl.store(out_ptr + plane * HW + offs, tl.sigmoid(hv) * (1.0 + w * mk), mask=m)


@triton.jit
def _mask_fuse_bwd_kernel(
    g_ptr, h_ptr, mask_ptr, roi_ptr, k_ptr, w_ptr, gh_ptr, gz_ptr, gw_ptr, C, CZ, HW, N_CHUNKS,
    HAS_ROI: tl.constexpr, NEED_GZ: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    w = tl.load(w_ptr)
    mk = tl.load(mask_ptr + b * HW + offs, mask=m, other=0.0)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(C):
        o = (b * C + c) * HW + offs
        sg = tl.sigmoid(tl.load(h_ptr + o, mask=m, other=0.0))
        gs = tl.load(g_ptr + o, mask=m, other=0.0) * sg
        s += gs
        tl.store(gh_ptr + o, gs * (1.0 - sg) * (1.0 + w * mk), mask=m)
    tl.store(gw_ptr + b * N_CHUNKS + chunk, tl.sum(tl.where(m, s * mk, 0.0), axis=0))
    if NEED_GZ:
        gm = s * w * tl.load(k_ptr + b) / CZ
        if HAS_ROI:
            gm = gm * tl.load(roi_ptr + b * HW + offs, mask=m, other=0.0)
        for c in range(CZ):
            tl.store(gz_ptr + (b * CZ + c) * HW + offs, gm, mask=m)


@triton.jit
def _residual_fuse_fwd_kernel(h_ptr, a_ptr, key_ptr, out_ptr, N, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    hv = tl.load(h_ptr + b * N + offs, mask=m, other=0.0)
    av = tl.load(a_ptr + b * N + offs, mask=m, other=0.0)
    kv = tl.load(key_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + b * N + offs, hv + tl.sigmoid(hv) * av * kv, mask=m)


@triton.jit
def _residual_fuse_bwd_kernel(g_ptr, h_ptr, a_ptr, key_ptr, gh_ptr, ga_ptr, gk_ptr, B, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    kv = tl.load(key_ptr + offs, mask=m, other=0.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(B):
        o = offs.to(tl.int64) + b * N
        gv = tl.load(g_ptr + o, mask=m, other=0.0)
        sg = tl.sigmoid(tl.load(h_ptr + o, mask=m, other=0.0))
        av = tl.load(a_ptr + o, mask=m, other=0.0)
        tl.store(gh_ptr + o, gv * (1.0 + sg * (1.0 - sg) * av * kv), mask=m)
        tl.store(ga_ptr + o, gv * sg * kv, mask=m)
        acc += gv * sg * av
    tl.store(gk_ptr + offs, acc, mask=m)


def mask_fuse_fwd_triton(h, z, roi, w, out, mask, k, eps: float) -> None:
    b, c, hh, ww = h.shape
    hw, cz = hh * ww, z.shape[1]
    blk = _chunk(hw)
    with torch.device(h.device):
        _duet_mask_kernel[(b,)](z, roi if roi is not None else z, mask, k, cz, hw, eps, HAS_ROI=roi is not None,
                                BLOCK=blk)  # fmt: skip
        _mask_fuse_fwd_kernel[(b * c, triton.cdiv(hw, blk))](h, mask, w, out, c, hw, BLOCK=blk)


def mask_fuse_bwd_triton(g, h, mask, roi, k, w, gh, gz, cz: int) -> torch.Tensor:
    """Writes gh (and gz); returns the (B,) per-sample dL/dw."""
    b, c, hh, ww = h.shape
    hw = hh * ww
    blk = _chunk(hw)
    n_chunks = triton.cdiv(hw, blk)
    gw = torch.empty(b, n_chunks, dtype=torch.float32, device=h.device)
    with torch.device(h.device):
        _mask_fuse_bwd_kernel[(b, n_chunks)](
            g, h, mask, roi if roi is not None else h, k, w, gh, gz if gz is not None else gh, gw, c, cz, hw,
            n_chunks, HAS_ROI=roi is not None, NEED_GZ=gz is not None, BLOCK=blk,
        )  # fmt: skip
    return gw.sum(dim=1)


def residual_fuse_fwd_triton(h, a, key, out) -> None:
    b, n = h.shape[0], h[0].numel()
    blk = _chunk(n)
    with torch.device(h.device):
        _residual_fuse_fwd_kernel[(b, triton.cdiv(n, blk))](h, a, key, out, n, BLOCK=blk)


def residual_fuse_bwd_triton(g, h, a, key, gh, ga, gk) -> None:
    b, n = h.shape[0], h[0].numel()
    blk = _chunk(n)
    with torch.device(h.device):
        _residual_fuse_bwd_kernel[(triton.cdiv(n, blk),)](g, h, a, key, gh, ga, gk, b, n, BLOCK=blk)


_F = "*fp32"
AOT_SPECS = {
    **{
        f"_duet_mask_kernel[roi={r}]": (
            _duet_mask_kernel,
            {"z_ptr": _F, "roi_ptr": _F, "mask_ptr": _F, "k_ptr": _F, "CZ": "i32", "HW": "i32", "EPS": "fp32",
             "HAS_ROI": "constexpr", "BLOCK": "constexpr"},
            {"HAS_ROI": r, "BLOCK": 256},
        )
        for r in (True, False)
    },
    "_mask_fuse_fwd_kernel": (
        _mask_fuse_fwd_kernel,
        {"h_ptr": _F, "mask_ptr": _F, "w_ptr": _F, "out_ptr": _F, "C": "i32", "HW": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 256},
    ),
    "_mask_fuse_bwd_kernel": (
        _mask_fuse_bwd_kernel,
        {"g_ptr": _F, "h_ptr": _F, "mask_ptr": _F, "roi_ptr": _F, "k_ptr": _F, "w_ptr": _F, "gh_ptr": _F,
         "gz_ptr": _F, "gw_ptr": _F, "C": "i32", "CZ": "i32", "HW": "i32", "N_CHUNKS": "i32",
         "HAS_ROI": "constexpr", "NEED_GZ": "constexpr", "BLOCK": "constexpr"},
        {"HAS_ROI": True, "NEED_GZ": True, "BLOCK": 256},
    ),
    "_residual_fuse_fwd_kernel": (
        _residual_fuse_fwd_kernel,
        {"h_ptr": _F, "a_ptr": _F, "key_ptr": _F, "out_ptr": _F, "N": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 256},
    ),
    "_residual_fuse_bwd_kernel": (
        _residual_fuse_bwd_kernel,
        {"g_ptr": _F, "h_ptr": _F, "a_ptr": _F, "key_ptr": _F, "gh_ptr": _F, "ga_ptr": _F, "gk_ptr": _F,
         "B": "i32", "N": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 256},
    ),
}  # fmt: skip
