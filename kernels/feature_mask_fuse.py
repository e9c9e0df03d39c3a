"""Triton kernels for feature-mask fusion (semantics in ppfr/ops/feature_mask_fuse.py).

DuetFace mask, gridded over (sample, chunk of pixels) so a batch fills the GPU whatever the map size:
``_duet_mean_kernel`` writes the channel mean over Cz and each chunk's (min, max); ``_duet_norm_kernel`` reduces
those partials (min/max are exact in any order, so the result equals a serial pass) and applies the first min-max
normalisation (times the ROI, with that product's partials, when a ROI is given); ``_duet_renorm_kernel`` applies
the ROI path's second normalisation. ``_mask_fuse_fwd_kernel`` is the elementwise sigmoid(h) * (1 + w * mask);
``_mask_fuse_bwd_kernel`` writes dL/dh, per-(sample, chunk) partial sums of dL/dw, and dL/dz.
PRO-Face C: elementwise forward; the backward is gridded over (group of samples, chunk of elements), each program
writing its group's partial key gradient (no atomics: deterministic), which the launcher sums over the groups.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ppfr.kernels import _common

_chunk = functools.partial(_common.chunk, gpu=256, cap=4096)
# Partials (one (min, max) per chunk) are reduced PBLOCK at a time; 56 x 56 maps have 13 chunks of 256.
_PBLOCK = 32
# The residual backward sums the key gradient over the batch: a program adds up to this many samples, and the
# per-group partials are added by one torch sum (a (B / 32) x N pass, small next to the B x N gradients).
_GPU_SAMPLES_PER_PROGRAM = 32


@triton.jit
def _duet_mean_kernel(z_ptr, mask_ptr, part_ptr, CZ, HW, N_CHUNKS, BLOCK: tl.constexpr):
    # Grid (B, N_CHUNKS): the channel mean of one chunk of a sample's pixels, and the chunk's (min, max).
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    zb = z_ptr + b * CZ * HW
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(CZ):
        acc += tl.load(zb + c * HW + offs, mask=m, other=0.0)
    acc = acc / CZ
    tl.store(mask_ptr + b * HW + offs, acc, mask=m)
    pb = part_ptr + (b * N_CHUNKS + chunk) * 2
    tl.store(pb, tl.min(tl.where(m, acc, float("inf")), axis=0))
    tl.store(pb + 1, tl.max(tl.where(m, acc, float("-inf")), axis=0))


@triton.jit
def _minmax_scale(part_ptr, b, N_CHUNKS, EPS, PBLOCK: tl.constexpr):
    """(lo, 1 / max(hi - lo, EPS)) of sample b from its per-chunk (min, max) partials (min/max: exact in any order)."""
    lo = float("inf")
    hi = float("-inf")
    pb = part_ptr + b * N_CHUNKS * 2
    for p0 in range(0, N_CHUNKS, PBLOCK):
        offs = p0 + tl.arange(0, PBLOCK)
        mp = offs < N_CHUNKS
        lo = tl.minimum(lo, tl.min(tl.load(pb + offs * 2, mask=mp, other=float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.load(pb + offs * 2 + 1, mask=mp, other=float("-inf")), axis=0))
    return lo, 1.0 / tl.maximum(hi - lo, EPS)


@triton.jit
def _duet_norm_kernel(
    mask_ptr, roi_ptr, part_ptr, part2_ptr, k_ptr, HW, N_CHUNKS, EPS,
    HAS_ROI: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
):  # fmt: skip
    # Grid (B, N_CHUNKS): first min-max normalisation. With a ROI: times the ROI, and the chunk's (min, max) of
    # that product for the second normalisation; without: the final mask and k.
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    lo, k = _minmax_scale(part_ptr, b, N_CHUNKS, EPS, PBLOCK)
    mb = mask_ptr + b * HW
    if HAS_ROI:
        v = (tl.load(mb + offs, mask=m, other=0.0) - lo) * k * tl.load(roi_ptr + b * HW + offs, mask=m, other=0.0)
        tl.store(mb + offs, v, mask=m)
        pb = part2_ptr + (b * N_CHUNKS + chunk) * 2
        tl.store(pb, tl.min(tl.where(m, v, float("inf")), axis=0))
        tl.store(pb + 1, tl.max(tl.where(m, v, float("-inf")), axis=0))
    else:
        tl.store(mb + offs, (tl.load(mb + offs, mask=m, other=0.0) - lo) * k, mask=m)
        if chunk == 0:
            tl.store(k_ptr + b, k)


@triton.jit
def _duet_renorm_kernel(mask_ptr, part_ptr, part2_ptr, k_ptr, HW, N_CHUNKS, EPS, BLOCK: tl.constexpr,
                        PBLOCK: tl.constexpr):  # fmt: skip
    # Grid (B, N_CHUNKS): the ROI path's second min-max normalisation; k = k1 * k2.
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    lo2, k2 = _minmax_scale(part2_ptr, b, N_CHUNKS, EPS, PBLOCK)
    mb = mask_ptr + b * HW
    tl.store(mb + offs, (tl.load(mb + offs, mask=m, other=0.0) - lo2) * k2, mask=m)
    if chunk == 0:
        _, k = _minmax_scale(part_ptr, b, N_CHUNKS, EPS, PBLOCK)
        tl.store(k_ptr + b, k * k2)


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
def _residual_fuse_bwd_kernel(
    g_ptr, h_ptr, a_ptr, key_ptr, gh_ptr, ga_ptr, gk_ptr, B, N, GB, BLOCK: tl.constexpr,
):  # fmt: skip
    # Grid (cdiv(B, GB), cdiv(N, BLOCK)): samples [GB * pid0, GB * pid0 + GB) x one chunk of elements; writes gh,
    # ga and this group's partial key gradient gk_ptr[pid0, chunk] (the launcher sums the groups).
    grp = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    kv = tl.load(key_ptr + offs, mask=m, other=0.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    b0 = grp * GB
    o = offs.to(tl.int64) + b0.to(tl.int64) * N  # int64: B * N may exceed 2^31
    for _ in range(b0, tl.minimum(b0 + GB, B)):
        gv = tl.load(g_ptr + o, mask=m, other=0.0)
        sg = tl.sigmoid(tl.load(h_ptr + o, mask=m, other=0.0))
        av = tl.load(a_ptr + o, mask=m, other=0.0)
        tl.store(gh_ptr + o, gv * (1.0 + sg * (1.0 - sg) * av * kv), mask=m)
        tl.store(ga_ptr + o, gv * sg * kv, mask=m)
        acc += gv * sg * av
        o += N
    tl.store(gk_ptr + grp.to(tl.int64) * N + offs, acc, mask=m)


def _check_f32(op: str, *tensors: torch.Tensor | None) -> None:
    """The kernels compute in float32: refuse other dtypes instead of reinterpreting their bytes."""
    for t in tensors:
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{op}: the triton kernel computes in float32, got a {t.dtype} tensor; "
                            "use the torch or cpp backend for float64")  # fmt: skip


def mask_fuse_fwd_triton(h, z, roi, w, out, mask, k, eps: float) -> None:
    """h (B,C,H,W), z (B,Cz,H,W), roi (B,1,H,W) or None, w (1,) -> out (B,C,H,W), mask (B,1,H,W), k (B,); fp32."""
    _check_f32("feature_mask_fuse", h, z, roi, w, out, mask, k)
    b, c, hh, ww = h.shape
    hw, cz = hh * ww, z.shape[1]
    blk = _chunk(hw)
    n_chunks = triton.cdiv(hw, blk)
    with _common.launch_device("feature_mask_fuse", h, z, roi, w, out, mask, k):
        # (min, max) per (sample, chunk): of the channel mean, and (ROI path) of the ROI-weighted mask
        part = torch.empty(b, n_chunks, 2, dtype=torch.float32, device=h.device)
        part2 = torch.empty_like(part) if roi is not None else part
        grid = (b, n_chunks)
        _duet_mean_kernel[grid](z, mask, part, cz, hw, n_chunks, BLOCK=blk)
        _duet_norm_kernel[grid](mask, roi if roi is not None else mask, part, part2, k, hw, n_chunks, eps,
                                HAS_ROI=roi is not None, BLOCK=blk, PBLOCK=_PBLOCK)  # fmt: skip
        if roi is not None:
            _duet_renorm_kernel[grid](mask, part, part2, k, hw, n_chunks, eps, BLOCK=blk, PBLOCK=_PBLOCK)
        _mask_fuse_fwd_kernel[(b * c, n_chunks)](h, mask, w, out, c, hw, BLOCK=blk)


def mask_fuse_bwd_triton(g, h, mask, roi, k, w, gh, gz, cz: int) -> torch.Tensor:
    """Writes gh (and gz); returns the (B,) per-sample dL/dw."""
    _check_f32("feature_mask_fuse backward", g, h, mask, roi, k, w, gh, gz)
    b, c, hh, ww = h.shape
    hw = hh * ww
    blk = _chunk(hw)
    n_chunks = triton.cdiv(hw, blk)
    with _common.launch_device("feature_mask_fuse backward", g, h, mask, roi, k, w, gh, gz):
        gw = torch.empty(b, n_chunks, dtype=torch.float32, device=h.device)
        _mask_fuse_bwd_kernel[(b, n_chunks)](
            g, h, mask, roi if roi is not None else h, k, w, gh, gz if gz is not None else gh, gw, c, cz, hw,
            n_chunks, HAS_ROI=roi is not None, NEED_GZ=gz is not None, BLOCK=blk,
        )  # fmt: skip
        return gw.sum(dim=1)


def residual_fuse_fwd_triton(h, a, key, out) -> None:
    """h, a, out (B, ...) fp32; key (...) fp32 shared by the batch."""
    _check_f32("feature_mask_fuse_residual", h, a, key, out)
    b, n = h.shape[0], math.prod(h.shape[1:])
    blk = _chunk(n)
    with _common.launch_device("feature_mask_fuse_residual", h, a, key, out):
        _residual_fuse_fwd_kernel[(b, triton.cdiv(n, blk))](h, a, key, out, n, BLOCK=blk)


def residual_fuse_bwd_triton(g, h, a, key, gh, ga, gk) -> None:
    """Writes gh, ga (B, ...) and gk (...) = sum over the batch; all fp32."""
    _check_f32("feature_mask_fuse_residual backward", g, h, a, key, gh, ga, gk)
    b, n = h.shape[0], math.prod(h.shape[1:])
    blk = _chunk(n)
    gb = min(_common.group(b, _GPU_SAMPLES_PER_PROGRAM), max(b, 1))
    n_groups = triton.cdiv(b, gb)
    with _common.launch_device("feature_mask_fuse_residual backward", g, h, a, key, gh, ga, gk):
        # One group writes gk directly; several write per-group partial sums, added here in one torch pass.
        part = gk if n_groups == 1 else torch.empty(n_groups, n, dtype=torch.float32, device=h.device)
        _residual_fuse_bwd_kernel[(n_groups, triton.cdiv(n, blk))](g, h, a, key, gh, ga, part, b, n, gb, BLOCK=blk)
        if n_groups > 1:
            torch.sum(part, dim=0, out=gk.view(n))


_F = "*fp32"
AOT_SPECS = {
    "_duet_mean_kernel": (
        _duet_mean_kernel,
        {"z_ptr": _F, "mask_ptr": _F, "part_ptr": _F, "CZ": "i32", "HW": "i32", "N_CHUNKS": "i32",
         "BLOCK": "constexpr"},
        {"BLOCK": 256},
    ),
    **{
        f"_duet_norm_kernel[roi={r}]": (
            _duet_norm_kernel,
            {"mask_ptr": _F, "roi_ptr": _F, "part_ptr": _F, "part2_ptr": _F, "k_ptr": _F, "HW": "i32",
             "N_CHUNKS": "i32", "EPS": "fp32", "HAS_ROI": "constexpr", "BLOCK": "constexpr", "PBLOCK": "constexpr"},
            {"HAS_ROI": r, "BLOCK": 256, "PBLOCK": _PBLOCK},
        )
        for r in (True, False)
    },
    "_duet_renorm_kernel": (
        _duet_renorm_kernel,
        {"mask_ptr": _F, "part_ptr": _F, "part2_ptr": _F, "k_ptr": _F, "HW": "i32", "N_CHUNKS": "i32", "EPS": "fp32",
         "BLOCK": "constexpr", "PBLOCK": "constexpr"},
        {"BLOCK": 256, "PBLOCK": _PBLOCK},
    ),
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
         "B": "i32", "N": "i32", "GB": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 256},
    ),
}  # fmt: skip
