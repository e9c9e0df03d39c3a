"""Triton kernel of the DuetFace ROI mask (METHODS.md §3.4; semantics in ppfr/ops/roi_mask.py).

The hull is prepared in torch (``ppfr.ops.roi_mask._hull_edges``: exact CCW edges, padded per batch with
zero-length edges that constrain nothing). ``_roi_mask_fwd_kernel`` runs one program per (image, tile):
every pixel centre q of the tile is tested against the bounding box and against every hull edge a -> b with
the float64 orientation filter

    t1 = (b.x - a.x)(q.y - a.y),  t2 = (b.y - a.y)(q.x - a.x),  det = t1 - t2,  bound = 1e-15 (|t1| + |t2|)

``det < -bound`` is a certain "outside". ``|det| <= bound`` (with bound > 0) is undecided: the pixel is
written 0 and its row is flagged, so the launcher's caller recomputes flagged rows exactly in torch. The
filter is sound under FMA contraction, which only makes det more accurate, so the kernel needs no
error-free arithmetic and compiles with Triton's default fp fusion. float64 throughout: sm_80/sm_90 have
full-rate FP64.

Grid: axis 0 = image x tiles, flattened (limit 2^31 - 1). Row offsets fit in int32 because H, W <= 32768.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

# On a GPU a 16 x 64 tile keeps the float64 temporaries in registers (kernels/_common.py: the launch policy).
from ppfr.kernels._common import launch_device
from ppfr.kernels._common import tile as _tile


@triton.jit
def _roi_mask_fwd_kernel(
    edge_ptr, bbox_ptr, out_ptr, flag_ptr,
    E, H, W,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    n_tw = tl.cdiv(W, BLOCK_W)
    n_t = tl.cdiv(H, BLOCK_H) * n_tw
    b = pid // n_t
    t = pid % n_t
    offs_i = (t // n_tw) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = (t % n_tw) * BLOCK_W + tl.arange(0, BLOCK_W)
    mi = offs_i < H
    m = mi[:, None] & (offs_j < W)[None, :]
    qy = offs_i.to(tl.float64)[:, None]  # (BLOCK_H, 1) row = y
    qx = offs_j.to(tl.float64)[None, :]  # (1, BLOCK_W) column = x

    xmin = tl.load(bbox_ptr + b * 4)
    xmax = tl.load(bbox_ptr + b * 4 + 1)
    ymin = tl.load(bbox_ptr + b * 4 + 2)
    ymax = tl.load(bbox_ptr + b * 4 + 3)
    inside = (qx >= xmin) & (qx <= xmax) & (qy >= ymin) & (qy <= ymax)  # exact comparisons
    unsure = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.int32)

    eb = edge_ptr + b * E * 4
    for e in range(E):
        ax = tl.load(eb + e * 4)
        ay = tl.load(eb + e * 4 + 1)
        dx = tl.load(eb + e * 4 + 2) - ax
        dy = tl.load(eb + e * 4 + 3) - ay
        t1 = dx * (qy - ay)  # (BLOCK_H, 1)
        t2 = dy * (qx - ax)  # (1, BLOCK_W)
        det = t1 - t2
        bound = (tl.abs(t1) + tl.abs(t2)) * 1e-15
        inside = inside & (det >= -bound)
        unsure = unsure | ((tl.abs(det) <= bound) & (bound > 0)).to(tl.int32)

    amb = inside.to(tl.int32) & unsure  # inside so far, but some edge undecided
    val = (inside.to(tl.int32) - amb).to(tl.float32)
    tl.store(out_ptr + b * H * W + offs_i[:, None] * W + offs_j[None, :], val, mask=m)
    row_amb = tl.max(tl.where(m, amb, 0), axis=1)
    # Programs sharing a row may both store 1 here: identical values, so the race is benign.
    tl.store(flag_ptr + b * H + offs_i, row_amb, mask=mi & (row_amb > 0))


def roi_mask_triton(edges: torch.Tensor, bbox: torch.Tensor, out: torch.Tensor, flags: torch.Tensor) -> None:
    """Filtered per-pixel hull test.

    Args:
        edges: (B, E, 4) float64 contiguous hull edges (ax, ay, bx, by), CCW, zero-length padding allowed.
        bbox: (B, 4) float64 contiguous (xmin, xmax, ymin, ymax) of each sample's points.
        out: (B, 1, H, W) float32 contiguous, written: 1 = certainly inside, 0 = outside or undecided.
        flags: (B, H) int32, zero-initialised; set to 1 on rows holding an undecided pixel.
    """
    b, e = edges.shape[:2]
    h, w = out.shape[-2:]
    if b == 0:
        return
    bh, bw = _tile(h, w)
    grid = (b * triton.cdiv(h, bh) * triton.cdiv(w, bw),)
    with launch_device("roi_mask", edges, bbox, out, flags):
        _roi_mask_fwd_kernel[grid](edges, bbox, out, flags, e, h, w, BLOCK_H=bh, BLOCK_W=bw)


# Ahead-of-time compile specs (python -m ppfr.kernels.aot): the GPU tile configuration.
AOT_SPECS = {
    "_roi_mask_fwd_kernel": (
        _roi_mask_fwd_kernel,
        {"edge_ptr": "*fp64", "bbox_ptr": "*fp64", "out_ptr": "*fp32", "flag_ptr": "*i32",
         "E": "i32", "H": "i32", "W": "i32", "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"},
        {"BLOCK_H": 16, "BLOCK_W": 64},
    ),
}  # fmt: skip
