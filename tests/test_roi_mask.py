"""Tests of the DuetFace ROI mask op (ppfr/ops/roi_mask.py, csrc/roi_mask*.cpp, kernels/roi_mask.py).

Two independent oracles, both written here:

* ``_scipy_mask``: the DuetFace procedure of METHODS.md §3.4, per image: ``ConvexHull`` -> ``Delaunay`` of the
  hull vertices -> ``find_simplex(grid) >= 0`` over all H x W grid points (x = column, y = row). Qhull
  refuses degenerate sets (fewer than 3 distinct points, or all collinear: ``QhullError``). For those the
  hull is a point or a segment, and the documented fallback marks the grid points in the bounding box that
  lie exactly on the segment's line (exact rational arithmetic).
* ``_exact_mask``: brute force in exact rationals (``fractions.Fraction``). Monotone-chain hull, then every
  grid point against every hull edge and the bounding box. Used on small grids.

Where the two differ: ``find_simplex`` has a tolerance (100 eps on barycentric coordinates), so it also
counts grid points within ~1e-12 *outside* an edge as inside (checked below). The op is exact. Random float
point sets hit that band with probability ~1e-10 per image. The grid-aligned sets use integer or
half-integer coordinates, where every grid point is exactly on an edge or at least ~1e-2 away from it. On
all of those inputs the scipy comparison is therefore exact and meaningful, and the near-degenerate cases
are compared with the exact oracle instead. All comparisons are bit-exact (``torch.equal``).
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull, Delaunay, QhullError

from ppfr import BackendUnavailableError
from ppfr.ops import roi_mask as R
from ppfr.ops.roi_mask import _roi_mask_op, face_like_landmarks, roi_mask, roi_mask_ref
from tests.conftest import triton_device

CPU_BACKENDS = ["ref", "torch", "cpp"]


# ------------------------------------------------------------------------------------------------ oracles
def _grid(h: int, w: int) -> np.ndarray:
    gy, gx = np.mgrid[0:h, 0:w]
    return np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64)  # (x = column, y = row)


def _frac_points(pts: np.ndarray) -> list[tuple[Fraction, Fraction]]:
    return sorted({(Fraction(float(x)), Fraction(float(y))) for x, y in pts})


def _cross(o, a, b) -> Fraction:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _segment_or_point_mask(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    """Degenerate fallback (Qhull fails): distinct points are one point or collinear; exact test."""
    fp = _frac_points(pts)
    lo, hi = fp[0], fp[-1]  # lexicographic extremes = the segment's endpoints
    assert all(_cross(lo, hi, p) == 0 for p in fp), "fallback used on a non-degenerate set"
    xmin, xmax = min(p[0] for p in fp), max(p[0] for p in fp)
    ymin, ymax = min(p[1] for p in fp), max(p[1] for p in fp)
    m = np.zeros((h, w), dtype=bool)
    for i in range(max(0, math.ceil(ymin)), min(h - 1, math.floor(ymax)) + 1):
        for j in range(max(0, math.ceil(xmin)), min(w - 1, math.floor(xmax)) + 1):
            m[i, j] = _cross(lo, hi, (j, i)) == 0
    return m


def _scipy_mask(lm: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W) bool, the METHODS §3.4 procedure per image (float64), with the degenerate fallback."""
    grid = _grid(h, w)
    out = []
    for pts in lm.double().numpy():
        try:
            hull = ConvexHull(pts)
            m = (Delaunay(pts[hull.vertices]).find_simplex(grid) >= 0).reshape(h, w)
        except QhullError:
            m = _segment_or_point_mask(pts, h, w)
        out.append(m)
    return torch.from_numpy(np.stack(out))[:, None]


def _exact_hull(fp):
    if len(fp) == 1:
        return fp
    lower, upper = [], []
    for p in fp:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(fp):
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _exact_mask(lm: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W) bool: exact rational brute force (closed hull, bbox, every grid point, every edge)."""
    out = []
    for pts in lm.double().numpy():
        fp = _frac_points(pts)
        hull = _exact_hull(fp)
        edges = [(hull[k], hull[(k + 1) % len(hull)]) for k in range(len(hull))] if len(hull) > 1 else []
        xmin, xmax = min(p[0] for p in fp), max(p[0] for p in fp)
        ymin, ymax = min(p[1] for p in fp), max(p[1] for p in fp)
        m = np.zeros((h, w), dtype=bool)
        for i in range(h):
            for j in range(w):
                q = (j, i)
                m[i, j] = xmin <= j <= xmax and ymin <= i <= ymax and all(_cross(a, b, q) >= 0 for a, b in edges)
        out.append(m)
    return torch.from_numpy(np.stack(out))[:, None]


def _all_backends(lm: torch.Tensor, size, backends=CPU_BACKENDS) -> dict[str, torch.Tensor]:
    return {be: roi_mask(lm, size, dtype=torch.bool, backend=be) for be in backends}


def _assert_all_equal(got: dict[str, torch.Tensor], want: torch.Tensor, what: str) -> None:
    for be, m in got.items():
        bad = (m != want).nonzero().tolist()
        assert torch.equal(m, want), f"{what}: backend {be} differs at (b, 0, row, col) {bad[:8]} ({len(bad)} total)"


# ------------------------------------------------------------------------------------ the oracles themselves
def test_scipy_tolerance_band_is_real_and_op_is_exact():
    # Triangle (0,0), (10,0), (0, 10 - 2**-46): grid points with x + y = 10, 0 <= x < 10 lie ~1e-14 *outside*
    # the hypotenuse (x = 0: just above the top vertex). find_simplex's tolerance counts them inside; the
    # exact semantics (and the op) do not.
    lm = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0 - 2.0**-46]]], dtype=torch.float64)
    sc = _scipy_mask(lm, 12, 12)
    ex = _exact_mask(lm, 12, 12)
    band = [(10 - x, x) for x in range(0, 10)]  # (row, col)
    assert all(sc[0, 0, i, j] for i, j in band) and not any(ex[0, 0, i, j] for i, j in band)
    _assert_all_equal(_all_backends(lm, 12), ex, "tolerance band")
    # the two oracles agree everywhere else
    sc2, ex2 = sc.clone(), ex.clone()
    for i, j in band:
        sc2[0, 0, i, j] = ex2[0, 0, i, j] = False
    assert torch.equal(sc2, ex2)


def test_exact_oracle_agrees_with_scipy_on_integer_sets():
    g = torch.Generator().manual_seed(3)
    lm = torch.randint(-2, 12, (40, 6, 2), generator=g).double()
    assert torch.equal(_exact_mask(lm, 10, 10), _scipy_mask(lm, 10, 10))


# ------------------------------------------------------------------------------- hand-computed boundaries
def test_hand_computed_masks():
    # Triangle with vertices on grid points: inside or on <=> x >= 0, y >= 0, x + y <= 4.
    tri = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]])
    want = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    for i in range(6):
        for j in range(6):
            want[0, 0, i, j] = i + j <= 4
    _assert_all_equal(_all_backends(tri, 6), want, "triangle")
    # Segment (1,1)-(5,3) (collinear set with a middle point): grid points on it are (1,1), (3,2), (5,3).
    seg = torch.tensor([[[5.0, 3.0], [1.0, 1.0], [3.0, 2.0]]])
    want = torch.zeros(1, 1, 6, 7, dtype=torch.bool)
    want[0, 0, 1, 1] = want[0, 0, 2, 3] = want[0, 0, 3, 5] = True  # [row, col] = [y, x]
    _assert_all_equal(_all_backends(seg, (6, 7)), want, "segment")
    # A single point (x=5, y=1) marks row 1, column 5; a non-integer point marks nothing.
    one = torch.tensor([[[5.0, 1.0]], [[2.5, 3.0]]])
    want = torch.zeros(2, 1, 4, 8, dtype=torch.bool)
    want[0, 0, 1, 5] = True
    _assert_all_equal(_all_backends(one, (4, 8)), want, "single point")
    # Square with half-integer corners: exactly the 2 x 2 block of grid points inside.
    sq = torch.tensor([[[0.5, 0.5], [2.5, 0.5], [2.5, 2.5], [0.5, 2.5]]])
    want = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    want[0, 0, 1:3, 1:3] = True
    _assert_all_equal(_all_backends(sq, 4), want, "square")
    # Grid points at the vertices and on all four edges of an axis-aligned rectangle are inside.
    rect = torch.tensor([[[1.0, 1.0], [3.0, 1.0], [3.0, 2.0], [1.0, 2.0], [2.0, 1.5]]])
    want = torch.zeros(1, 1, 4, 5, dtype=torch.bool)
    want[0, 0, 1:3, 1:4] = True
    _assert_all_equal(_all_backends(rect, (4, 5)), want, "rectangle")


def test_output_layout_x_is_column_y_is_row():
    lm = torch.tensor([[[6.0, 1.0], [7.0, 1.0], [6.0, 2.0]]])  # near the top-right of a 4 x 8 image
    m = roi_mask(lm, (4, 8))
    assert m.shape == (1, 1, 4, 8) and m.dtype == torch.float32
    assert m[0, 0, 1, 6] == 1 and m[0, 0, 1, 7] == 1 and m[0, 0, 2, 6] == 1 and m.sum() == 3


# --------------------------------------------------------------------- every backend vs scipy (bit-exact)
@pytest.mark.parametrize("p", [3, 4, 7, 20, 98])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_point_sets_match_scipy(p, dtype):
    g = torch.Generator().manual_seed(p)
    b = 3 if p == 98 else 6
    lm = (torch.rand(b, p, 2, generator=g, dtype=torch.float64) * 140 - 14).to(dtype)  # some outside the image
    _assert_all_equal(_all_backends(lm, (112, 112)), _scipy_mask(lm, 112, 112), f"random P={p}")


def test_face_like_landmarks_match_scipy():
    lm = face_like_landmarks(6, generator=torch.Generator().manual_seed(1))
    want = _scipy_mask(lm, 112, 112)
    assert 0.3 < want.float().mean() < 0.9  # a face-sized region, not empty or full
    _assert_all_equal(_all_backends(lm, (112, 112)), want, "face-like")
    big = face_like_landmarks(48, generator=torch.Generator().manual_seed(2))  # fast backends, larger batch
    _assert_all_equal(_all_backends(big, 112, ["torch", "cpp"]), _scipy_mask(big, 112, 112), "face-like B=48")


def test_non_square_sizes_and_scaled_landmarks():
    lm = face_like_landmarks(3, 64, generator=torch.Generator().manual_seed(4))
    lm[..., 0] *= 1.5  # 96 wide, 64 high
    _assert_all_equal(_all_backends(lm, (64, 96)), _scipy_mask(lm, 64, 96), "64x96")
    _assert_all_equal(_all_backends(lm, (5, 130)), _scipy_mask(lm, 5, 130), "5x130")


# ------------------------------------------------------------------------------------------ degenerate sets
def _degenerate_sets() -> dict[str, torch.Tensor]:
    f = torch.tensor
    sets = {
        "collinear_diag": f([[[2.0, 2.0], [30.0, 30.0], [10.0, 10.0], [17.5, 17.5]]]),
        "collinear_slope_1_3": f([[[1.0, 2.0], [31.0, 12.0], [16.0, 7.0], [4.0, 3.0]]]),
        "collinear_horizontal": f([[[3.0, 7.0], [40.0, 7.0], [10.0, 7.0], [3.0, 7.0]]]),
        "collinear_vertical": f([[[5.0, 1.0], [5.0, 44.0], [5.0, 20.5], [5.0, 30.0]]]),
        "collinear_off_grid": f([[[0.5, 0.125], [20.5, 10.125], [10.5, 5.125], [4.5, 2.125]]]),  # y = x/2 - 1/8
        "collinear_through_image": f([[[-50.0, -25.0], [150.0, 75.0], [0.0, 0.0], [100.0, 50.0]]]),
        "single_point_repeated": f([[[7.0, 9.0]] * 4]),
        "two_distinct_repeated": f([[[7.0, 9.0], [7.0, 9.0], [19.0, 12.0], [19.0, 12.0]]]),
        "triangle_with_duplicates": f([[[2.0, 2.0], [2.0, 2.0], [40.0, 5.0], [40.0, 5.0], [12.0, 33.0], [12.0, 33.0]]]),
        "all_outside": f([[[-30.0, -30.0], [-5.0, -40.0], [-10.0, -2.0], [-20.0, -1.0]]]),
        "covers_image": f([[[-100.0, -100.0], [500.0, -100.0], [500.0, 500.0], [-100.0, 500.0]]]),
        "crosses_image_edge": f([[[-10.0, 20.0], [60.0, -15.0], [70.0, 60.0], [20.0, 52.0]]]),
        "grid_polygon": f([[[3.0, 3.0], [40.0, 3.0], [47.0, 20.0], [40.0, 40.0], [3.0, 47.0], [10.0, 25.0], [20.0, 20.0]]]),
        "half_grid_polygon": f([[[0.5, 10.0], [20.0, 0.5], [44.5, 22.0], [21.0, 44.5], [22.0, 22.0]]]),
        "collinear_hull_edge_points": f([[[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [20.0, 10.0], [20.0, 20.0], [0.0, 20.0]]]),
    }
    return sets


@pytest.mark.parametrize("name", list(_degenerate_sets()))
def test_degenerate_sets_match_scipy_and_exact(name):
    lm = _degenerate_sets()[name]
    h, w = 48, 48
    want = _scipy_mask(lm, h, w)
    got = _all_backends(lm, (h, w))
    _assert_all_equal(got, want, name)
    if name.startswith("collinear") and name != "collinear_off_grid" and name != "collinear_hull_edge_points":
        assert want.sum() >= 2  # the segment passes through grid points, and they are inside
    assert torch.equal(want[..., :16, :16], _exact_mask(lm, 16, 16))


@pytest.mark.parametrize("p", [1, 2, 3])
def test_tiny_point_counts(p):
    g = torch.Generator().manual_seed(10 + p)
    ints = torch.randint(0, 12, (60, p, 2), generator=g).double()  # many duplicates and collinear triples
    halves = torch.randint(0, 24, (60, p, 2), generator=g).double() / 2
    lm = torch.cat([ints, halves])
    _assert_all_equal(_all_backends(lm, 12), _exact_mask(lm, 12, 12), f"P={p}")


def test_random_integer_sets_heavy_degeneracy():
    # Small integer coordinates: duplicates, collinear triples and grid points on edges everywhere.
    g = torch.Generator().manual_seed(5)
    lm = torch.randint(-3, 14, (150, 7, 2), generator=g).double()
    lm[:50, :, 1] = lm[:50, :, 0] * 2 - 5  # 50 collinear sets (slope 2)
    lm[50:60] = lm[50:60, :1]  # 10 single-point sets
    _assert_all_equal(_all_backends(lm, 11), _exact_mask(lm, 11, 11), "integer sets")


# --------------------------------------------------------------------------- exactness beyond float filters
def test_near_degenerate_sets_are_exact():
    e = 2.0**-45
    f = torch.tensor
    cases = [
        f([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0 - e]]),  # grid points ~1e-14 outside the hypotenuse
        f([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0 + e]]),  # ... and ~1e-14 inside it
        f([[0.0, 0.0], [12.0, 12.0], [6.0, 6.0 + e]]),  # sliver triangle: only the diagonal's grid points
        f([[0.0, 0.0], [12.0, 12.0], [6.0 + e, 6.0]]),
        f([[1.0, 1.0], [13.0, 1.0 + e], [13.0, 1.0 - e]]),  # almost a horizontal segment through grid points
        f([[0.1, 0.1], [0.3, 0.3], [12.7, 12.7]]),  # collinear in reals? 0.1 etc. are not exact: decided exactly
        f([[1.0 / 3, 2.0 / 3], [7.0 + 1.0 / 3, 2.0 / 3 + 7.0], [14.0, 1.0]]),
    ]
    lm = torch.stack(cases).double()
    _assert_all_equal(_all_backends(lm, 14), _exact_mask(lm, 14, 14), "near-degenerate")


def _naive_sign(a, b, q) -> int:
    d = (b[0] - a[0]) * (q[1] - a[1]) - (b[1] - a[1]) * (q[0] - a[0])  # plain float64
    return (d > 0) - (d < 0)


def test_edges_where_plain_float64_gets_the_sign_wrong():
    # Edges a -> b through non-dyadic points passing within ~1e-16 px of a grid point q, kept only when the
    # plain float64 orientation of q has the wrong sign (or 0): a backend without exact arithmetic fails here.
    rng = random.Random(1)
    tris = []
    while len(tris) < 24:
        q = (rng.randint(2, 9), rng.randint(2, 9))
        dx, dy = rng.uniform(0.3, 1.7), rng.uniform(0.3, 1.7)
        t1, t2 = rng.uniform(1.3, 2.9), rng.uniform(1.3, 2.9)
        a, b = (q[0] - t1 * dx, q[1] - t1 * dy), (q[0] + t2 * dx, q[1] + t2 * dy)
        exact = _cross(*(tuple(map(Fraction, p)) for p in (a, b, q)))
        if _naive_sign(a, b, q) == (exact > 0) - (exact < 0):
            continue
        side = rng.choice((-1, 1))  # third vertex on either side, so q is sometimes in, sometimes out
        tris.append([a, b, (q[0] - side * 3 * dy, q[1] + side * 3 * dx)])
    lm = torch.tensor(tris, dtype=torch.float64)
    want = _exact_mask(lm, 12, 12)
    _assert_all_equal(_all_backends(lm, 12), want, "rounding-sensitive edges")


def test_huge_coordinates_take_the_exact_search_path():
    # Coordinates ~1e25-1e29: the float estimate of an edge's row crossing is useless (catastrophic
    # cancellation), so the kernels must fall back to an exact search; the answer stays exact.
    f = torch.tensor
    lm = torch.stack([
        f([[-1e25, -1e25], [1e25 + 3.0, -1e25], [5.0, 1e25]]),  # covers the grid except near... (exact oracle)
        f([[-1e29, 6.0], [1e29, 6.0 + 2.0**-40], [0.0, 1e29]]),  # lower edge nearly through row 6
        f([[-1e27, -1e27 + 7.0], [1e27, 1e27 + 7.0], [0.0, 0.0]]),  # edge y = x + 7 through far-away points
        f([[3.0, -1e28], [3.0, 1e28], [4.5, 0.0]]),  # vertical edge x = 3
    ]).double()  # fmt: skip
    _assert_all_equal(_all_backends(lm, 12), _exact_mask(lm, 12, 12), "huge coordinates")


def test_tiny_magnitudes_are_flushed_to_zero():
    # Documented canonicalisation: |v| < 2**-100 counts as 0 (a shift below 1e-30 px).
    lm = torch.tensor([[[1e-40, 3.0]], [[-1e-35, 2.0]], [[2.0**-99, 1.0]]], dtype=torch.float64)
    m = roi_mask(lm, 4, dtype=torch.bool)
    assert m[0, 0, 3, 0] and m[1, 0, 2, 0] and m.sum() == 2  # 2**-99 is kept: (2**-99, 1) is no grid point
    for be in CPU_BACKENDS:
        assert torch.equal(roi_mask(lm, 4, dtype=torch.bool, backend=be), m)


# ---------------------------------------------------------------------------------- dtypes, layout, batch
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_dtypes_convert_exactly(in_dtype):
    lm = face_like_landmarks(3, generator=torch.Generator().manual_seed(6)).to(in_dtype)
    want = _scipy_mask(lm, 112, 112)  # the same (rounded) points, in float64
    _assert_all_equal(_all_backends(lm, 112, ["torch", "cpp"]), want, str(in_dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.float16, torch.bool, torch.uint8, torch.int64])
def test_output_dtypes(backend, out_dtype):
    lm = face_like_landmarks(2, 24, generator=torch.Generator().manual_seed(7))
    m = roi_mask(lm, 24, dtype=out_dtype, backend=backend)
    assert m.dtype == out_dtype and m.shape == (2, 1, 24, 24)
    assert torch.equal(m, _scipy_mask(lm, 24, 24).to(out_dtype))


def test_non_contiguous_and_empty_batch():
    lm = face_like_landmarks(4, generator=torch.Generator().manual_seed(8))
    nc = lm.transpose(1, 2).contiguous().transpose(1, 2)[::2]  # (2, 98, 2), non-contiguous
    assert not nc.is_contiguous()
    _assert_all_equal(_all_backends(nc, 112, ["torch", "cpp"]), _scipy_mask(nc, 112, 112), "non-contiguous")
    empty = torch.zeros(0, 98, 2)
    for be in CPU_BACKENDS:
        assert roi_mask(empty, 112, backend=be).shape == (0, 1, 112, 112)


def test_landmarks_requiring_grad_give_a_constant_mask():
    lm = face_like_landmarks(2, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    for be in CPU_BACKENDS:
        m = roi_mask(lm, 112, backend=be)
        assert not m.requires_grad and m.grad_fn is None


def test_auto_prefers_cpp_on_cpu(monkeypatch):
    from ppfr import _backend

    monkeypatch.delenv("PPFR_BACKEND", raising=False)
    assert _backend.resolve("roi_mask", "auto", torch.device("cpu"), R.ROI_MASK_BACKENDS) == "cpp"


# --------------------------------------------------------------------------- registration and compile
def test_opcheck():
    lm = face_like_landmarks(2, 16, generator=torch.Generator().manual_seed(11))
    for be in CPU_BACKENDS:
        torch.library.opcheck(_roi_mask_op, (lm, 16, 20, torch.float32, be))
        torch.library.opcheck(_roi_mask_op, (lm.double(), 9, 7, torch.bool, be))


def test_compiled_equals_eager():
    lm = face_like_landmarks(3, 32, generator=torch.Generator().manual_seed(12))

    def fn(t):
        return roi_mask(t, 32, backend="cpp") * 2 + 1

    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(lm), fn(lm))


def test_self_check_reports_zero_error():
    for be in ("ref", "torch", "cpp"):
        assert R._check_roi_mask(be, torch.device("cpu")) == 0.0


# ------------------------------------------------------------------------------------ errors at the boundary
def test_bad_inputs_are_rejected_with_clear_errors():
    lm = face_like_landmarks(2, generator=torch.Generator().manual_seed(13))
    with pytest.raises(TypeError, match="torch.Tensor"):
        roi_mask(lm.numpy())
    with pytest.raises(ValueError, match=r"\(B, P, 2\)"):
        roi_mask(lm[0])
    with pytest.raises(ValueError, match=r"\(B, P, 2\)"):
        roi_mask(torch.zeros(2, 98, 3))
    with pytest.raises(TypeError, match="floating point"):
        roi_mask(lm.to(torch.int64))
    with pytest.raises(ValueError, match="P >= 1"):
        roi_mask(torch.zeros(2, 0, 2))
    bad = lm.clone()
    bad[1, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        roi_mask(bad)
    bad[1, 5, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        roi_mask(bad)
    bad[1, 5, 0] = 1e31
    with pytest.raises(ValueError, match=r"2\*\*100"):
        roi_mask(bad)
    for size in (0, (112, 0), (-1, 5), (40000, 8)):
        with pytest.raises(ValueError, match="positive"):
            roi_mask(lm, size)
    for size in ((112,), (112, 112, 3), 112.0, (112.0, 112), True, (True, 5), "112", None):
        with pytest.raises(TypeError, match="size"):
            roi_mask(lm, size)
    assert roi_mask(lm, (np.int64(16), torch.tensor(8))).shape == (2, 1, 16, 8)  # integer scalars are fine
    with pytest.raises(TypeError, match="dtype"):
        roi_mask(lm, dtype=torch.complex64)
    with pytest.raises(ValueError, match="unknown backend"):
        roi_mask(lm, backend="metal")
    with pytest.raises(ValueError, match="no 'cuda' implementation"):
        roi_mask(lm, backend="cuda")


def test_cpp_binding_rejects_bad_arguments():
    from ppfr import _ext

    mod = _ext.cpu_module()
    lm = torch.zeros(1, 3, 2, dtype=torch.float64)
    out = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="output kind"):
        mod.roi_mask(lm.data_ptr(), out.data_ptr(), 1, 3, 4, 4, 7, 1)
    with pytest.raises(ValueError, match="P >= 1"):
        mod.roi_mask(lm.data_ptr(), out.data_ptr(), 1, 0, 4, 4, 1, 1)


def test_triton_unavailable_on_cpu_without_interpreter(monkeypatch):
    from ppfr import _backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        _backend.resolve("roi_mask", "triton", torch.device("cpu"), R.ROI_MASK_BACKENDS)


# ------------------------------------------------------------------------------------- torch-path internals
def test_torch_hull_matches_qhull_vertex_count():
    # The parallel Jarvis hull (tournament + pointer doubling) finds exactly the strict hull vertices.
    lm = torch.cat([face_like_landmarks(5, generator=torch.Generator().manual_seed(14)).double(),
                    torch.rand(5, 98, 2, generator=torch.Generator().manual_seed(15), dtype=torch.float64) * 100])  # fmt: skip
    c = R._canonical(lm)
    _, real = R._hull_edges(c[..., 0], c[..., 1])
    for b in range(lm.shape[0]):
        assert int(real[b].sum()) == len(ConvexHull(lm[b].numpy()).vertices)


# ------------------------------------------------------------------------ Triton (interpreter on CPU) tier
@pytest.mark.interpret
def test_triton_face_like_matches_scipy():
    dev = triton_device()
    lm = face_like_landmarks(2, generator=torch.Generator().manual_seed(16))
    got = roi_mask(lm.to(dev), 112, dtype=torch.bool, backend="triton").cpu()
    assert torch.equal(got, _scipy_mask(lm, 112, 112))


@pytest.mark.interpret
def test_triton_flags_undecided_rows_and_they_are_recomputed_exactly():
    from ppfr.kernels.roi_mask import roi_mask_triton

    dev = triton_device()
    sets = _degenerate_sets()
    tol_band = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0 - 2.0**-46]]])

    def pad(t: torch.Tensor, p: int = 8) -> torch.Tensor:  # to a common P, repeating the first point
        return torch.cat([t, t[:, :1].expand(1, p - t.shape[1], 2)], 1)

    names = ["grid_polygon", "collinear_through_image", "single_point_repeated", "covers_image"]
    lm = torch.cat([pad(sets[n]) for n in names] + [pad(tol_band)]).double()
    h = w = 48
    # The kernel alone: grid points exactly on edges are undecided by the float filter -> rows flagged.
    c = R._canonical(lm.to(dev))
    edges, _ = R._hull_edges(c[..., 0], c[..., 1])
    bbox = torch.stack(R._bbox(c[..., 0], c[..., 1]), -1).contiguous()
    out = torch.empty(lm.shape[0], 1, h, w, device=dev)
    flags = torch.zeros(lm.shape[0], h, dtype=torch.int32, device=dev)
    roi_mask_triton(edges, bbox, out, flags)
    assert flags[0].sum() > 0 and flags[3].sum() == 0  # on-edge grid points vs a hull covering the image
    want = _exact_mask(lm, h, w)
    undecided_rows = flags.cpu().bool()[:, None, :, None].expand_as(want)
    kernel_only = out.cpu().bool()
    assert torch.equal(kernel_only[~undecided_rows], want[~undecided_rows])  # decided pixels are already exact
    assert torch.equal(roi_mask(lm.to(dev), (h, w), dtype=torch.bool, backend="triton").cpu(), want)


@pytest.mark.interpret
def test_triton_random_and_tiny_sets():
    dev = triton_device()
    g = torch.Generator().manual_seed(17)
    lm = torch.cat([torch.randint(0, 12, (4, 3, 2), generator=g).double(),
                    torch.rand(4, 3, 2, generator=g, dtype=torch.float64) * 14 - 1])  # fmt: skip
    got = roi_mask(lm.to(dev), (12, 13), dtype=torch.bool, backend="triton").cpu()
    assert torch.equal(got, _exact_mask(lm, 12, 13))


# ------------------------------------------------------------------------------------------------ GPU tier
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_backends(backend):
    lm = face_like_landmarks(16, generator=torch.Generator().manual_seed(18))
    lm = torch.cat([lm, _degenerate_sets()["grid_polygon"].repeat(1, 14, 1)])
    got = roi_mask(lm.cuda(), 112, dtype=torch.bool, backend=backend).cpu()
    assert torch.equal(got, roi_mask(lm, 112, dtype=torch.bool, backend="cpp"))
