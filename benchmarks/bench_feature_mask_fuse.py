"""Feature-mask fusion forward + backward at the four stage shapes of a server IR net (B=64).

Reference: the literal formula under autograd (DuetFace's per-sample .item() loop removed, which only makes
the reference faster). Reports images/s for one forward + backward of all four stage blocks.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import backend_of, device_for, measure, skip_unavailable, with_gpu_baselines
from ppfr.ops.feature_mask_fuse import (
    feature_mask_fuse, feature_mask_fuse_ref, feature_mask_fuse_residual, feature_mask_fuse_residual_ref, resize_roi,
)  # fmt: skip

B = 64
STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def _inputs(dev):
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(B, c, s, s, generator=g).to(dev).requires_grad_(True) for c, s in STAGES]
    zs = [torch.randn(B, c, s, s, generator=g).to(dev).requires_grad_(True) for c, s in STAGES]
    return hs, zs


@pytest.mark.parametrize("provider", with_gpu_baselines(["ref", "torch", "cpp", "triton"]))
def test_duet_mask_fuse_fwd_bwd(benchmark, provider):
    skip_unavailable(provider)
    dev, be = device_for(provider), backend_of(provider)
    hs, zs = _inputs(dev)
    w = torch.tensor(0.5, device=dev, requires_grad=True)
    roi = (torch.rand(B, 1, 112, 112, generator=torch.Generator().manual_seed(1)) > 0.4).float().to(dev)

    def fn():
        total = 0
        for h, z in zip(hs, zs):
            if be == "ref":
                out = feature_mask_fuse_ref(h, z, w, resize_roi(roi, tuple(h.shape[2:])))
            else:
                out = feature_mask_fuse(h, z, w, roi, backend=be)
            total = total + out.sum()
        total.backward()

    nbytes = sum(h.numel() * 4 * 3 for h in hs)
    measure(benchmark, fn, case="duet_mask_fuse_fwd_bwd", provider=provider, images=B, bytes_written=nbytes,
            bytes_read=nbytes, dev=dev)  # fmt: skip


@pytest.mark.parametrize("provider", with_gpu_baselines(["ref", "cpp", "triton"]))
def test_residual_fuse_fwd_bwd(benchmark, provider):
    skip_unavailable(provider)
    dev, be = device_for(provider), backend_of(provider)
    hs, as_ = _inputs(dev)
    keys = [torch.ones(h.shape[1:], device=dev, requires_grad=True) for h in hs]

    def fn():
        total = 0
        for h, a, k in zip(hs, as_, keys):
            f = feature_mask_fuse_residual_ref if be == "ref" else (
                lambda x, y, q: feature_mask_fuse_residual(x, y, q, backend=be))
            total = total + f(h, a, k).sum()
        total.backward()

    nbytes = sum(h.numel() * 4 * 3 for h in hs)
    measure(benchmark, fn, case="residual_fuse_fwd_bwd", provider=provider, images=B, bytes_written=nbytes,
            bytes_read=nbytes, dev=dev)  # fmt: skip
