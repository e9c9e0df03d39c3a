"""DuetFace facial region-of-interest mask from landmarks (METHODS.md §3.4, §3.7): ``ppfr::roi_mask``.

The DuetFace code takes the 98 PFLD landmarks of each image (pixels, x = column, y = row), builds a scipy
``ConvexHull``, triangulates its vertices with ``Delaunay`` and marks every pixel centre whose
``find_simplex >= 0``. It does this in a per-image Python loop on the CPU, once per training step. Here the
same mask is one batched op with exact semantics.

Semantics (exact; every backend returns bit-identical masks)
------------------------------------------------------------
Let S = {p_0 .. p_{P-1}} be one sample's landmarks, taken as float64 values (float16/bfloat16/float32
inputs convert exactly) after one canonicalisation step: coordinates with ``|v| < 2**-100`` are replaced by
0. This moves a point by less than 1e-30 px. It keeps every product in the predicates below far from
underflow, so each predicate is evaluated exactly. The output at grid point q = (x, y) (x = column
index j, y = row index i, both integers) is 1 iff q lies in the **closed** convex hull conv(S) in exact real
arithmetic on those float64 values, else 0. Equivalently, and this is how the reference computes it:

    q in conv(S)  <=>  q in bbox(S)  and  orient(p_i, p_j, q) >= 0 for every supporting pair (i, j),

where ``orient(a, b, c) = (b.x - a.x)(c.y - a.y) - (b.y - a.y)(c.x - a.x)`` (exact sign) and (i, j) is a
supporting pair iff p_i != p_j and orient(p_i, p_j, p_k) >= 0 for all k. The axis-aligned bounding box
makes the degenerate cases fall out without special-casing:

* all points collinear: the pair constraints give the line through them, the bbox cuts it to the segment;
  grid points exactly on the segment are inside;
* one distinct point (P = 1 or all duplicates): no supporting pairs, the bbox is the point itself; the mask
  has a single 1 iff that point has integer coordinates inside the image;
* duplicates never matter; points outside the image are fine (the hull is clipped by the grid);
* boundary: grid points exactly on a hull edge or at a vertex are inside (closed hull).

Every orientation sign is exact: a float64 filter with a rigorous error bound decides almost all cases, and
the rest (grid points within ~1e-15 relative of an edge line, for instance exactly on it) are decided by an
error-free expansion (Dekker products + grow-expansion sums). This holds for any finite coordinates with
``|v| <= 2**100``; larger ones are rejected at the API boundary. scipy's Delaunay.find_simplex uses a
tolerance of 100 eps instead, so it also counts points within ~1e-14 *outside* an edge as inside. Both agree
everywhere else.

Backends
--------
``ref``    literal semantics: all supporting pairs by the O(P^3) all-pairs half-plane test, then a per-pixel
           half-plane test against every supporting pair plus the bbox (memory-bounded chunks).
``torch``  hull by a parallel Jarvis step: the CCW successor of every point is found with an exact knockout
           tournament (log2 P rounds), and the hull cycle is followed from the lexicographic minimum by pointer
           doubling. Then, per row, the exact integer interval between the two hull edges that cross the row.
           Any device.
``cpp``    per image: monotone-chain hull + per-row interval fill, OpenMP over the batch (csrc/roi_mask_cpu.cpp).
``triton`` hull edges from the torch path; the kernel tests every pixel of a tile against every hull edge with the
           float filter and flags rows that hold an undecided pixel; flagged rows are redone exactly in torch.

The mask is piecewise constant in the landmarks (gradient zero almost everywhere), so the op has no
autograd formula: :func:`roi_mask` detaches its input and the result never requires grad.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Optional, Union

import torch

from ppfr import _backend, _ext
from ppfr.ops._validate import FLOAT_TYPES, compiling, require

ROI_MASK_BACKENDS = ("ref", "torch", "cpp", "triton")
SizeLike = Union[int, Sequence[int]]

FLUSH_BELOW = 2.0**-100  # |v| < FLUSH_BELOW is replaced by 0 (canonicalisation, see the module docstring)
MAX_ABS = 2.0**100  # larger |v| is rejected: keeps every product of the exact predicates finite
MAX_SIDE = 32768  # H, W limit (keeps in-kernel pixel offsets in int32)
# Relative error bound of the float64 orientation filter. The textbook bound for
# (b-a)x(c-a) = t1 - t2 is (3 + 16 eps) eps (|t1| + |t2|) ~ 3.3e-16; 1e-15 leaves a 3x margin, which also
# covers a compiler or GPU fusing t1 - t2 into an FMA (that only makes the value more accurate).
_ORIENT_ERR = 1e-15
_SPLITTER = 134217729.0  # 2**27 + 1: Veltkamp split of a float64 into two 26-bit halves
_OUT_KINDS = {torch.uint8: 0, torch.bool: 0, torch.float32: 1, torch.float64: 2}  # dtypes the C++ kernel writes
_REF_CHUNK = 1 << 20  # element budget of one reference chunk (8 MB per float64 temporary)


# ----------------------------------------------------------------------------------------------------------
# Input validation (the API boundary).
# ----------------------------------------------------------------------------------------------------------
def _as_int(v) -> Optional[int]:
    """v as an int if it is an integer (int, numpy/torch integer scalar), not a bool; else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def normalize_size(size: SizeLike) -> tuple[int, int]:
    """``size`` as (H, W): an int (square) or a pair of ints, each in [1, MAX_SIDE]."""
    msg = f"size must be an int or a pair (H, W) of ints, got {size!r}"
    if _as_int(size) is not None:
        hw = (_as_int(size), _as_int(size))
    else:
        if isinstance(size, (bool, str, bytes)):
            raise TypeError(msg)
        try:
            parts = tuple(size)
        except TypeError:
            raise TypeError(msg) from None
        hw = tuple(_as_int(v) for v in parts)
        if len(hw) != 2 or None in hw:
            raise TypeError(msg)
    if not all(1 <= v <= MAX_SIDE for v in hw):
        raise ValueError(f"size must be positive (and at most {MAX_SIDE} per side), got {hw}")
    return hw


def check_landmarks(landmarks: torch.Tensor) -> None:
    """``landmarks`` must be a (B, P, 2) floating tensor, P >= 1, finite, with |coordinate| <= 2**100."""
    if not isinstance(landmarks, torch.Tensor):
        raise TypeError(f"landmarks must be a torch.Tensor, got {type(landmarks).__name__}")
    if landmarks.dim() != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks must have shape (B, P, 2) (x = column, y = row), got {tuple(landmarks.shape)}")
    if landmarks.dtype not in FLOAT_TYPES:
        raise TypeError(f"landmarks must be floating point (float16/bfloat16/float32/float64), got {landmarks.dtype}")
    if landmarks.shape[1] < 1:
        raise ValueError("landmarks must hold at least one point per sample (P >= 1)")
    if compiling() or landmarks.numel() == 0:
        return
    # CPU landmarks: a ValueError now; device landmarks: a device-side assert (no host sync here)
    lm = landmarks.detach()
    require(torch.isfinite(lm).all(), "landmarks must be finite (found NaN or inf)")
    require(lm.abs().amax() <= MAX_ABS, f"landmark coordinates must satisfy |v| <= 2**100 (~{MAX_ABS:.3g}) pixels")


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or dtype.is_complex:
        raise TypeError(f"dtype must be a real torch.dtype (floating, integer or bool), got {dtype!r}")


def _canonical(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, P, 2) float64 contiguous, tiny magnitudes flushed to 0 (and -0.0 to +0.0)."""
    lm = landmarks.detach().to(torch.float64)
    return torch.where(lm.abs() < FLUSH_BELOW, torch.zeros((), dtype=lm.dtype, device=lm.device), lm).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Exact orientation predicate (vectorised): float filter, error-free expansion on the undecided subset.
# Eager torch evaluates each op separately and rounds it to float64 (no contraction), which Dekker's
# algorithms need; the op body runs eagerly even under torch.compile (custom ops are opaque).
# ----------------------------------------------------------------------------------------------------------
def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)  # s + err == a + b exactly (Knuth)


def _split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl  # p + err == a * b exactly (Dekker)


def _orient_sign_exact(ax, ay, bx, by, cx, cy) -> torch.Tensor:
    """Exact sign (int8) of orient(a, b, c) for 1-D float64 tensors (no overflow/underflow in our domain).

    orient = bx cy - bx ay - ax cy - by cx + by ax + ay cx (the ax ay terms cancel): six exact products
    (12 doubles) summed exactly by Shewchuk-style grow-expansion; the components come out non-overlapping
    in increasing magnitude (zeros anywhere), so the sign is the sign of the last non-zero one.
    """
    terms: list[torch.Tensor] = []
    for u, v, neg in ((bx, cy, False), (bx, ay, True), (ax, cy, True), (by, cx, True), (by, ax, False), (ay, cx, False)):
        p, e = _two_prod(u, v)
        terms += [-e, -p] if neg else [e, p]
    expansion = [terms[0]]
    for t in terms[1:]:
        q = t
        grown = []
        for comp in expansion:
            q, h = _two_sum(q, comp)
            grown.append(h)
        grown.append(q)
        expansion = grown
    sign = torch.zeros(ax.shape, dtype=torch.int8, device=ax.device)
    for comp in expansion:  # increasing magnitude: the last non-zero component decides
        sign = torch.where(comp != 0, torch.sign(comp).to(torch.int8), sign)
    return sign


def _orient_sign(ax, ay, bx, by, cx, cy, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact sign of orient(a, b, c) as int8 in {-1, 0, 1}; float64 tensor arguments, broadcast together.

    ``zero`` (optional, broadcastable bool) marks entries where c equals a or b, whose sign is 0 by
    construction: there the filter computes exactly 0 anyway, so they skip the exact fallback.
    """
    dx, dy = bx - ax, by - ay
    t1 = dx * (cy - ay)
    t2 = dy * (cx - ax)
    det = t1 - t2
    bound = (t1.abs() + t2.abs()) * _ORIENT_ERR
    sign = torch.sign(det).to(torch.int8)
    # bound == 0 means both products are exactly 0 (a rounded difference is 0 only if it is exactly 0, and no
    # product underflows in our domain), so det == 0 is exact there.
    unsure = (det.abs() <= bound) & (bound > 0)
    if zero is not None:
        unsure &= ~zero
    if bool(unsure.any()):
        nz = unsure.nonzero(as_tuple=True)  # tuple indexing reads the broadcast views without copying them
        args = [t.expand(sign.shape)[nz] for t in (ax, ay, bx, by, cx, cy)]
        sign[nz] = _orient_sign_exact(*args)
    return sign


# ----------------------------------------------------------------------------------------------------------
# Reference: all supporting pairs (O(P^3) half-plane test), then a per-pixel test against every pair.
# ----------------------------------------------------------------------------------------------------------
def _bbox(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.amin(1), x.amax(1), y.amin(1), y.amax(1)


def roi_mask_ref(landmarks: torch.Tensor, size: SizeLike = (112, 112)) -> torch.Tensor:
    """Literal reference of the ROI mask semantics (see the module docstring); slow, any device.

    Args:
        landmarks: (B, P, 2) float landmarks in pixels (x = column, y = row), P >= 1, finite.
        size: (H, W) of the mask, or an int for a square mask.
    Returns:
        (B, 1, H, W) bool: True where the grid point (x=j, y=i) lies in the closed convex hull.
    """
    check_landmarks(landmarks)
    h, w = normalize_size(size)
    lm = _canonical(landmarks)
    b, p = lm.shape[:2]
    dev = lm.device
    x, y = lm[..., 0], lm[..., 1]

    # Supporting pairs: p_i != p_j and every p_k on the left of, or on, the line p_i -> p_j.
    support = torch.empty(b, p, p, dtype=torch.bool, device=dev)
    step = max(1, _REF_CHUNK // max(1, p**3))  # images per chunk: bounds memory, not a per-image loop
    for s in range(0, b, step):
        xs, ys = x[s : s + step], y[s : s + step]
        xi, yi = xs[:, :, None, None], ys[:, :, None, None]
        xj, yj = xs[:, None, :, None], ys[:, None, :, None]
        xk, yk = xs[:, None, None, :], ys[:, None, None, :]
        trivial = ((xk == xi) & (yk == yi)) | ((xk == xj) & (yk == yj))  # orient(i, j, k) is 0: k is i or j
        o = _orient_sign(xi, yi, xj, yj, xk, yk, zero=trivial)
        support[s : s + step] = (o >= 0).all(-1)
    distinct = (x[:, :, None] != x[:, None, :]) | (y[:, :, None] != y[:, None, :])
    bi, ii, jj = (support & distinct).nonzero(as_tuple=True)

    gy, gx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=dev), torch.arange(w, dtype=torch.float64, device=dev), indexing="ij"
    )
    gx, gy = gx.reshape(-1), gy.reshape(-1)
    xmin, xmax, ymin, ymax = _bbox(x, y)
    inside = (gx >= xmin[:, None]) & (gx <= xmax[:, None]) & (gy >= ymin[:, None]) & (gy <= ymax[:, None])
    violated = torch.zeros(b, h * w, dtype=torch.int32, device=dev)
    estep = max(1, _REF_CHUNK // (h * w))
    for s in range(0, bi.numel(), estep):
        eb, ei, ej = bi[s : s + estep], ii[s : s + estep], jj[s : s + estep]
        o = _orient_sign(x[eb, ei][:, None], y[eb, ei][:, None], x[eb, ej][:, None], y[eb, ej][:, None],
                         gx[None, :], gy[None, :])  # fmt: skip
        violated.index_add_(0, eb, (o < 0).to(torch.int32))
    return (inside & (violated == 0)).reshape(b, 1, h, w)


# ----------------------------------------------------------------------------------------------------------
# Fast torch form: exact parallel hull (successor tournament + pointer doubling), exact per-row intervals.
# ----------------------------------------------------------------------------------------------------------
def _successors(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, P) int64: for every point i, the candidate j with every point left of / on i -> j (farthest on ties).

    Correct for the points that are hull vertices (strictly extreme): all other distinct points then lie in
    an open half-plane through p_i, where "k is left of or on i -> j" is a total preorder of directions, so
    a knockout tournament finds its maximum. For other points the result is unspecified (and never used).
    A point with no distinct other point gets itself.
    """
    b, p = x.shape
    dev = x.device
    n = 1 << max(0, (p - 1).bit_length())  # candidates padded to a power of two
    idx = torch.arange(p, device=dev)
    cand = idx.expand(b, p, p)
    cx, cy = x[:, None, :].expand(b, p, p), y[:, None, :].expand(b, p, p)
    xi, yi = x[:, :, None], y[:, :, None]
    valid = (idx[None, :, None] != idx[None, None, :]) & ((cx != xi) | (cy != yi))
    if n > p:
        pad = n - p
        cand = torch.cat([cand, cand.new_zeros(b, p, pad)], -1)
        cx = torch.cat([cx, cx.new_zeros(b, p, pad)], -1)
        cy = torch.cat([cy, cy.new_zeros(b, p, pad)], -1)
        valid = torch.cat([valid, valid.new_zeros(b, p, pad)], -1)
    while cand.shape[-1] > 1:
        half = cand.shape[-1] // 2  # first half vs second half: unit-stride inner runs (interleaved is ~5x slower)
        jx, kx, jy, ky = cx[..., :half], cx[..., half:], cy[..., :half], cy[..., half:]
        vj, vk = valid[..., :half], valid[..., half:]
        same_jk = (jx == kx) & (jy == ky)
        trivial = same_jk | ((jx == xi) & (jy == yi)) | ((kx == xi) & (ky == yi))
        o = _orient_sign(xi, yi, jx, jy, kx, ky, zero=trivial)
        # k farther than j along the same ray from i (exact comparisons, no subtraction)
        k_farther = torch.where(kx != jx, (kx > jx) == (kx > xi), (ky > jy) == (ky > yi))
        keep_j = vj & (~vk | (o > 0) | ((o == 0) & ~k_farther))
        cand = torch.where(keep_j, cand[..., :half], cand[..., half:])
        cx, cy = torch.where(keep_j, jx, kx), torch.where(keep_j, jy, ky)
        valid = vj | vk
    return torch.where(valid[..., 0], cand[..., 0], idx.expand(b, p))


def _prune_interior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop points strictly inside the quadrilateral of four extreme points (exact Akl-Toussaint step).

    The lexicographic extremes L = min (x, y), D = min (y, -x), R = max (x, y), U = max (y, -x) are hull
    vertices in CCW order, so a point strictly inside conv(L, D, R, U) is no hull vertex and removing it
    leaves conv(S) unchanged. Zero-length quad edges (coinciding corners) constrain nothing; the corners
    themselves are always kept. Returns (B, S) coordinates, S = the most kept points in the batch, padded
    with copies of L (harmless duplicates).
    """
    b, p = x.shape
    if p <= 4 or b == 0:
        return x, y
    inf = torch.full_like(x, math.inf)

    def lex_arg(major: torch.Tensor, minor: torch.Tensor) -> torch.Tensor:  # argmin of (major, minor)
        return torch.where(major == major.amin(1, keepdim=True), minor, inf).argmin(1, keepdim=True)

    corners = [lex_arg(x, y), lex_arg(y, -x), lex_arg(-x, -y), lex_arg(-y, x)]  # L, D, R, U
    cx = [x.gather(1, c) for c in corners]
    cy = [y.gather(1, c) for c in corners]
    strictly_inside = torch.ones_like(x, dtype=torch.bool)
    for k in range(4):
        ax, ay, bx, by = cx[k], cy[k], cx[(k + 1) % 4], cy[(k + 1) % 4]
        zero_len = (ax == bx) & (ay == by)
        at_end = ((x == ax) & (y == ay)) | ((x == bx) & (y == by))
        strictly_inside &= (_orient_sign(ax, ay, bx, by, x, y, zero=at_end) > 0) | zero_len
    is_corner = torch.zeros_like(strictly_inside)
    for c in corners:
        is_corner.scatter_(1, c, True)
    keep = ~strictly_inside | is_corner
    s = int(keep.sum(1).max())
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :s]
    kept = keep.gather(1, order)
    return torch.where(kept, x.gather(1, order), cx[0]), torch.where(kept, y.gather(1, order), cy[0])


def _hull_edges(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CCW hull edges of every sample, exact.

    Returns:
        edges: (B, E, 4) float64 rows (ax, ay, bx, by), E = the largest hull size in the batch. Samples with
            fewer edges are padded with zero-length edges at their first vertex, which constrain nothing.
        real: (B, E) bool, False on the padding.
    """
    x, y = _prune_interior(x, y)
    b, p = x.shape
    succ = _successors(x, y)
    # start at the lexicographic minimum (min x, then min y): always a strict hull vertex
    xm = x.amin(1, keepdim=True)
    v0 = torch.where(x == xm, y, torch.full_like(y, math.inf)).argmin(1)
    orbit, f = v0[:, None], succ
    while orbit.shape[1] < p:  # pointer doubling: orbit[t] = succ^t(v0)
        orbit = torch.cat([orbit, f.gather(1, orbit)], 1)
        f = f.gather(1, f)
    orbit = orbit[:, :p]
    ox, oy = x.gather(1, orbit), y.gather(1, orbit)
    # cycle length: first return to v0's coordinates (a duplicate of v0 may stand in for it)
    back = (ox[:, 1:] == ox[:, :1]) & (oy[:, 1:] == oy[:, :1])
    if p > 1:
        hsize = torch.where(back.any(1), back.int().argmax(1) + 1, torch.full_like(v0, p))
    else:  # one point: a single zero-length edge
        hsize = torch.ones_like(v0)
    e = int(hsize.max()) if b else 1
    real = torch.arange(e, device=x.device)[None, :] < hsize[:, None]
    nxt = succ.gather(1, orbit[:, :e])
    ax, ay = torch.where(real, ox[:, :e], ox[:, :1]), torch.where(real, oy[:, :e], oy[:, :1])
    bx, by = torch.where(real, x.gather(1, nxt), ox[:, :1]), torch.where(real, y.gather(1, nxt), oy[:, :1])
    return torch.stack([ax, ay, bx, by], -1).contiguous(), real


def _last_true(ax, ay, bx, by, yr, up, w: int) -> torch.Tensor:
    """Per item, the last x in [-1, W-1] where pred holds, pred(-1) taken as true (1-D float64 items, dy != 0).

    pred(x) = orient(a, b, (x, yr)) >= 0 if ``up`` (dy > 0: true up to floor(X*)), else orient < 0 (dy < 0:
    true up to ceil(X*) - 1), where X* is the line's exact crossing of row yr. A float estimate of X*
    chooses a 3-wide window; the exact predicate on the window decides. Items whose window does not bracket
    the change fall back to binary search (this happens only with huge coordinates).
    """
    dev = ax.device

    def pred(xi: torch.Tensor, sel: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = (ax, ay, bx, by, yr, up) if sel is None else (ax[sel], ay[sel], bx[sel], by[sel], yr[sel], up[sel])
        s = _orient_sign(a[0], a[1], a[2], a[3], xi.to(torch.float64), a[4])
        res = torch.where(a[5], s >= 0, s < 0)
        return torch.where(xi < 0, True, torch.where(xi >= w, False, res))

    est = ax + (bx - ax) * (yr - ay) / (by - ay)
    k = est.clamp(0, w - 1).floor().to(torch.int64)
    p0, p1, p2 = pred(k - 1), pred(k), pred(k + 1)
    out = k - 1 + p1.to(torch.int64)
    bad = ~(p0 & ~p2)
    if bool(bad.any()):
        sel = bad.nonzero().squeeze(1)
        lo = torch.full((sel.numel(),), -1, dtype=torch.int64, device=dev)  # pred(lo) true
        hi = torch.full_like(lo, w)  # pred(hi) false
        for _ in range(max(1, (w + 1).bit_length())):
            mid = (lo + hi) // 2
            pm = pred(mid, sel)
            lo, hi = torch.where(pm, mid, lo), torch.where(pm, hi, mid)
        out[sel] = lo
    return out


def _row_intervals(
    x: torch.Tensor, y: torch.Tensor, edges: torch.Tensor, bidx: torch.Tensor, rows: torch.Tensor, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact [lo, hi] column interval of conv(S) on the given (sample, row) items (empty when lo > hi).

    For a row inside the bbox, the slice of the hull is bounded by one edge going up (dy > 0: x <= X*) and
    one going down (dy < 0: x >= X*) among the edges whose closed y-span contains the row; every other edge's
    half-plane contains the whole slice. Horizontal and zero-length edges never cut a row inside the bbox.
    Sets with no non-horizontal edge (a point, a horizontal segment) are exactly their bbox.
    """
    dev = x.device
    xmin, xmax, ymin, ymax = (t[bidx] for t in _bbox(x, y))
    yr = rows.to(torch.float64)
    lo = xmin.clamp(-1, w).ceil().to(torch.int64).clamp_min(0)
    hi = xmax.clamp(-1, w).floor().to(torch.int64).clamp_max(w - 1)
    in_rows = (yr >= ymin) & (yr <= ymax)
    e = edges[bidx]  # (N, E, 4)
    ax, ay, bx, by = e.unbind(-1)
    yc = yr[:, None]
    for up in (True, False):
        crossing = (by > ay) & (ay <= yc) & (yc <= by) if up else (by < ay) & (by <= yc) & (yc <= ay)
        has = crossing.any(1) & in_rows
        if not bool(has.any()):
            continue
        sel = has.nonzero().squeeze(1)
        pick = crossing[sel].int().argmax(1, keepdim=True)
        g = [t[sel].gather(1, pick).squeeze(1) for t in (ax, ay, bx, by)]
        flag = torch.full((sel.numel(),), up, dtype=torch.bool, device=dev)
        t = _last_true(g[0], g[1], g[2], g[3], yr[sel], flag, w)
        if up:
            hi[sel] = torch.minimum(hi[sel], t)
        else:
            lo[sel] = torch.maximum(lo[sel], t + 1)
    hi = torch.where(in_rows, hi, -1)
    return lo, hi


def _roi_mask_torch(lm: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W) bool mask from canonical (B, P, 2) float64 landmarks (any device)."""
    b = lm.shape[0]
    dev = lm.device
    x, y = lm[..., 0], lm[..., 1]
    edges, _ = _hull_edges(x, y)
    bidx = torch.arange(b, device=dev).repeat_interleave(h)
    rows = torch.arange(h, device=dev).repeat(b)
    lo, hi = _row_intervals(x, y, edges, bidx, rows, w)
    cols = torch.arange(w, device=dev)
    return ((cols >= lo[:, None]) & (cols <= hi[:, None])).reshape(b, 1, h, w)


# ----------------------------------------------------------------------------------------------------------
# Compiled backends.
# ----------------------------------------------------------------------------------------------------------
def _launch_cpp(lm: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    b, p = lm.shape[:2]
    out_dt = dtype if dtype in _OUT_KINDS else torch.float32
    out = torch.empty(b, 1, h, w, dtype=out_dt)
    _ext.cpu_module().roi_mask(lm.data_ptr(), out.data_ptr(), b, p, h, w, _OUT_KINDS[out_dt], torch.get_num_threads())
    return out.to(dtype)


def _launch_triton(lm: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    from ppfr.kernels.roi_mask import roi_mask_triton

    b = lm.shape[0]
    x, y = lm[..., 0], lm[..., 1]
    edges, _ = _hull_edges(x, y)
    bbox = torch.stack(_bbox(x, y), -1).contiguous()  # (B, 4): xmin, xmax, ymin, ymax
    out = torch.empty(b, 1, h, w, dtype=torch.float32, device=lm.device)
    flags = torch.zeros(b, h, dtype=torch.int32, device=lm.device)
    roi_mask_triton(edges, bbox, out, flags)
    # Rows where the kernel's float filter could not decide some pixel (a grid point within ~1e-15 of an
    # edge line, e.g. exactly on it) are recomputed exactly.
    fb, fr = flags.nonzero(as_tuple=True)
    if fb.numel():
        lo, hi = _row_intervals(x, y, edges, fb, fr, w)
        cols = torch.arange(w, device=lm.device)
        out[fb, 0, fr] = ((cols >= lo[:, None]) & (cols <= hi[:, None])).to(out.dtype)
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration (no autograd: the mask is piecewise constant in the landmarks).
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("ppfr::roi_mask", mutates_args=())
def _roi_mask_op(landmarks: torch.Tensor, height: int, width: int, dtype: torch.dtype, backend: str) -> torch.Tensor:
    lm = _canonical(landmarks)
    if backend == "ref":
        return roi_mask_ref(lm, (height, width)).to(dtype)
    if backend == "torch":
        return _roi_mask_torch(lm, height, width).to(dtype)
    if backend == "cpp":
        return _launch_cpp(lm, height, width, dtype)
    if backend == "triton":
        return _launch_triton(lm, height, width, dtype)
    raise ValueError(f"roi_mask: unknown backend {backend!r}")


@_roi_mask_op.register_fake
def _(landmarks, height, width, dtype, backend):
    return landmarks.new_empty(landmarks.shape[0], 1, height, width, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Public functional API.
# ----------------------------------------------------------------------------------------------------------
def roi_mask(
    landmarks: torch.Tensor, size: SizeLike = (112, 112), *, dtype: torch.dtype = torch.float32, backend: str = "auto"
) -> torch.Tensor:
    """DuetFace ROI mask (METHODS.md §3.4): 1 on grid points inside or on the convex hull of the landmarks.

    Exact semantics in the module docstring: the closed convex hull of each sample's points (as float64; values
    with |v| < 2**-100 count as 0), tested at the integer grid points (x = column j, y = row i), including
    collinear, duplicate, single-point and out-of-image sets. All backends return bit-identical masks.

    Args:
        landmarks: (B, P, 2) floating (float16/bfloat16/float32/float64) landmarks in pixels, x = column,
            y = row (PFLD outputs x 112 for DuetFace, P = 98). Any P >= 1; finite; |v| <= 2**100; points may
            lie outside the image. Not differentiated through (the input is detached).
        size: (H, W) of the mask, or an int for a square mask; 1 <= H, W <= 32768. DuetFace uses 112.
        dtype: output dtype (floating, integer or bool); values are exactly 0 and 1.
        backend: ``auto`` | ``ref`` | ``torch`` | ``cpp`` | ``triton`` (``PPFR_BACKEND`` overrides auto).

    Returns:
        (B, 1, H, W) mask of ``dtype`` on the landmarks' device; never requires grad.

    Raises:
        TypeError / ValueError: bad shape, dtype, non-finite or out-of-range coordinates, bad size.
        BackendUnavailableError: the requested backend cannot run here.

    Example:
        >>> lm = torch.tensor([[[10.0, 10.0], [100.0, 12.0], [55.0, 100.0]]])
        >>> roi_mask(lm).shape
        torch.Size([1, 1, 112, 112])
    """
    check_landmarks(landmarks)
    h, w = normalize_size(size)
    _check_dtype(dtype)
    be = _backend.resolve("roi_mask", backend, landmarks.device, ROI_MASK_BACKENDS)
    return _roi_mask_op(landmarks.detach(), h, w, dtype, be)


# ----------------------------------------------------------------------------------------------------------
# Synthetic 98-point (WFLW layout) face landmarks: for tests, benchmarks and self-checks (no detector needed).
# ----------------------------------------------------------------------------------------------------------
def _wflw_template() -> torch.Tensor:
    """(98, 2) float64 mean-face-like layout on [0, 1]^2 (x right, y down): contour 0-32, brows 33-50,
    nose 51-59, eyes 60-75, mouth 76-95, pupils 96-97 (positions approximate, for shape only)."""
    pts: list[tuple[float, float]] = []
    for k in range(33):  # jaw contour: left temple -> chin -> right temple
        phi = -0.15 + (math.pi + 0.3) * k / 32
        pts.append((0.5 - 0.42 * math.cos(phi), 0.40 + 0.52 * math.sin(phi)))
    for x0 in (0.18, 0.56):  # eyebrows: 5 upper arc points + 4 lower
        pts += [(x0 + 0.26 * t / 4, 0.30 - 0.05 * math.sin(math.pi * t / 4)) for t in range(5)]
        pts += [(x0 + 0.26 * (4 - t) / 4, 0.32 - 0.03 * math.sin(math.pi * (4 - t) / 4)) for t in range(1, 5)]
    pts += [(0.5, 0.38 + 0.2 * t / 3) for t in range(4)]  # nose bridge
    pts += [(0.42 + 0.04 * t, 0.63 + 0.015 * (1 - abs(t - 2) / 2)) for t in range(5)]  # nose bottom
    for cx in (0.33, 0.67):  # eyes
        pts += [(cx - 0.07 * math.cos(math.pi * t / 4), 0.42 - 0.025 * math.sin(math.pi * t / 4)) for t in range(8)]
    pts += [(0.5 - 0.14 * math.cos(math.pi * t / 6), 0.78 - 0.06 * math.sin(math.pi * t / 6)) for t in range(12)]
    pts += [(0.5 - 0.09 * math.cos(math.pi * t / 4), 0.78 - 0.025 * math.sin(math.pi * t / 4)) for t in range(8)]
    pts += [(0.33, 0.42), (0.67, 0.42)]  # pupils
    return torch.tensor(pts, dtype=torch.float64)


def wflw_mean_face() -> torch.Tensor:
    """(98, 2) float64 WFLW-layout mean-face landmarks on [0, 1]^2 (x right, y down): contour 0-32, brows 33-50,
    nose 51-59 (54 = nose tip), eyes 60-75, mouth 76-95 (76 / 82 = mouth corners), pupils 96-97. Approximate
    positions: the shape of a mean face, not a measured one (see ``ppfr.methods.duetface.template_landmarks``)."""
    return _wflw_template()


def face_like_landmarks(
    batch: int, size: int = 112, *, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(batch, 98, 2) random face-like landmarks in pixels of a ``size`` x ``size`` crop (WFLW layout).

    A mean layout under a random similarity (scale 0.85-1.1, rotation +-15 deg, shift +-5 % of size) plus
    0.7 % of size per-point jitter, so the chin and temples sometimes leave the image. Draws only from
    ``generator``.
    """
    g = generator
    t = _wflw_template() - 0.5
    scale = 0.85 + 0.25 * torch.rand(batch, 1, 1, generator=g, dtype=torch.float64)
    ang = (torch.rand(batch, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(15)
    rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2)
    shift = (torch.rand(batch, 1, 2, generator=g, dtype=torch.float64) * 2 - 1) * 0.05
    jitter = torch.randn(batch, 98, 2, generator=g, dtype=torch.float64) * 0.007
    pts = (scale * t @ rot.transpose(-1, -2) + 0.5 + shift + jitter) * size
    return pts.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Self-checks for `python -m ppfr.info`: each backend once on a tiny batch against the reference.
# ----------------------------------------------------------------------------------------------------------
def _check_roi_mask(backend: str, dev: torch.device) -> float:
    g = torch.Generator().manual_seed(0)
    lm = face_like_landmarks(2, 24, generator=g)
    lm = torch.cat([lm, torch.tensor([[[3.0, 3.0]] * 98])], 0).to(dev)  # plus a single-point sample
    ref = roi_mask_ref(lm, 24).float()
    return (roi_mask(lm, 24, backend=backend) - ref).abs().max().item()


SELF_CHECKS = {"roi_mask": (ROI_MASK_BACKENDS, _check_roi_mask)}
