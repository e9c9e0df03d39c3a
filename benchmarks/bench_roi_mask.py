"""Benchmarks of the DuetFace ROI mask (METHODS §3.4 / §3.7): B = 64 face-like 98-point sets, 112 x 112.

Providers:

* ``scipy_ref``: DuetFace's own procedure (``train.py: calculate_landmarks``): per image, scipy
  ``ConvexHull`` -> ``Delaunay`` of the hull vertices -> ``find_simplex`` over the 12 544 grid points, then stack
  into a (B, 1, 112, 112) float32 tensor. This is the baseline the acceptance ratio is measured against.
* ``ref``: the literal torch reference (all-pairs O(P^3) supporting-line test + per-pixel test, exact).
* ``torch`` / ``cpp``: the fast backends; ``triton`` only where a GPU exists (the interpreter measures
  Python, not the kernel).

Every provider's output is checked against the cpp / torch backend once, outside the timing, so each
figure belongs to a correct mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.conftest import backend_of, device_for, measure, require_ratio, skip_unavailable, with_gpu_baselines
from ppfr.ops.roi_mask import face_like_landmarks, roi_mask, roi_mask_ref

B, P, H, W = 64, 98, 112, 112
PROVIDERS = with_gpu_baselines(["scipy_ref", "ref", "torch", "cpp", "triton"])

# Acceptance: the C++ kernel at least 20x the per-image scipy loop it replaces.
require_ratio("cpp roi_mask vs per-image scipy", "roi98", "cpp", "roi98", "scipy_ref", 20.0)


def _landmarks(dev: torch.device) -> torch.Tensor:
    return face_like_landmarks(B, H, generator=torch.Generator().manual_seed(0)).to(dev)  # float32, like PFLD x 112


def _scipy_loop(lm: torch.Tensor) -> torch.Tensor:
    from scipy.spatial import ConvexHull, Delaunay

    gy, gx = np.mgrid[0:H, 0:W]
    grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64)  # (x = column, y = row)
    masks = []
    for pts in lm.detach().cpu().double().numpy():
        hull = ConvexHull(pts)
        masks.append((Delaunay(pts[hull.vertices]).find_simplex(grid) >= 0).reshape(1, H, W))
    return torch.from_numpy(np.stack(masks)).float().to(lm.device)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_roi_mask(benchmark, provider):
    skip_unavailable(provider)
    if provider == "scipy_ref":
        pytest.importorskip("scipy")
    dev, be = device_for(provider), backend_of(provider)
    lm = _landmarks(dev)
    if provider == "scipy_ref":
        fn = lambda: _scipy_loop(lm)  # noqa: E731
    elif be == "ref":
        fn = lambda: roi_mask_ref(lm, (H, W)).float()  # noqa: E731
    else:
        fn = lambda: roi_mask(lm, (H, W), backend=be)  # noqa: E731
    check = roi_mask(lm.cpu(), (H, W), backend="cpp" if provider != "cpp" else "torch")
    assert torch.equal(fn().cpu(), check), f"{provider} output differs from the reference mask"
    measure(benchmark, fn, case="roi98", provider=provider, images=B, bytes_written=B * H * W * 4,
            bytes_read=lm.numel() * lm.element_size(), dev=dev, rounds=2 if provider == "ref" else 5)  # fmt: skip
