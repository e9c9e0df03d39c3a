"""Tests of feature-mask fusion (ppfr/ops/feature_mask_fuse.py): DuetFace interactive block, PRO-Face C residual."""

from __future__ import annotations

import pytest
import torch

from ppfr.ops.feature_mask_fuse import (
    _mask_fuse_op, _residual_op, duet_mask_ref, feature_mask_fuse, feature_mask_fuse_ref, feature_mask_fuse_residual,
    feature_mask_fuse_residual_ref, resize_roi,
)  # fmt: skip
from tests.conftest import triton_device

CPU = ["torch", "cpp"]
SHAPES = [(2, 64, 56, 56, 64), (3, 128, 28, 28, 128), (1, 5, 7, 3, 9), (4, 512, 7, 7, 512)]


def _reference_as_coded(h, z, w, roi):
    """DuetFace's block as the reference code writes it: per-sample loop with .item() min/max."""
    m = z.mean(dim=1, keepdim=True)
    r = torch.nn.functional.interpolate(roi, scale_factor=h.shape[2] / roi.shape[2], mode="bilinear", align_corners=True)
    outs = []
    for i in range(h.shape[0]):
        mi = m[i]
        mi = (mi - mi.min().item()) / (mi.max().item() - mi.min().item())
        mi = mi * r[i]
        mi = (mi - mi.min().item()) / (mi.max().item() - mi.min().item())
        outs.append(torch.sigmoid(h[i]) * (1 + w * mi))
    return torch.stack(outs)


def test_literal_reference_matches_reference_code_structure():
    h, z = torch.randn(3, 8, 28, 28, dtype=torch.float64), torch.randn(3, 6, 28, 28, dtype=torch.float64)
    roi = (torch.rand(3, 1, 112, 112) > 0.4).double()
    w = torch.tensor(0.5, dtype=torch.float64)
    torch.testing.assert_close(feature_mask_fuse_ref(h, z, w, resize_roi(roi, (28, 28))), _reference_as_coded(h, z, w, roi))
    mask = duet_mask_ref(z, roi)
    assert mask.amin().item() == 0.0 and abs(mask.amax(dim=(1, 2, 3)) - 1).max() < 1e-12


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_roi", [True, False])
def test_duet_forward_and_gradients_match_reference(backend, shape, with_roi):
    b, c, hh, ww, cz = shape
    h = torch.randn(b, c, hh, ww, dtype=torch.float64, requires_grad=True)
    z = torch.randn(b, cz, hh, ww, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    roi = (torch.rand(b, 1, 112, 112) > 0.3).double() if with_roi else None
    out, mask = feature_mask_fuse(h, z, w, roi, backend=backend, return_mask=True)
    ref = feature_mask_fuse_ref(h, z, w, resize_roi(roi, (hh, ww)) if with_roi else None)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mask, duet_mask_ref(z, roi).detach(), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, z, w), g)
    want = torch.autograd.grad(ref, (h, z, w), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU)
def test_float32_within_tolerance(backend):
    h, z = torch.randn(4, 64, 56, 56), torch.randn(4, 64, 56, 56)
    w = torch.tensor(0.2)
    roi = (torch.rand(4, 1, 112, 112) > 0.5).float()
    torch.testing.assert_close(feature_mask_fuse(h, z, w, roi, backend=backend),
                               feature_mask_fuse_ref(h, z, w, resize_roi(roi, (56, 56))), rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("backend", CPU)
def test_gradcheck(backend):
    h = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    roi = (torch.rand(2, 1, 8, 10) > 0.3).double()
    # z is not gradchecked numerically: the reference treats min/max as constants (.item()), which finite
    # differences cannot; its gradient is compared with the reference's autograd in the tests above.
    assert torch.autograd.gradcheck(lambda a, c: feature_mask_fuse(a, z, c, roi, backend=backend), (h, w))
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, q: feature_mask_fuse_residual(x, y, q, backend=backend), (h, a, k))


def test_no_gradient_into_z_when_not_required():
    h = torch.randn(2, 4, 7, 7, requires_grad=True)
    z = torch.randn(2, 6, 7, 7)  # detached client features
    out = feature_mask_fuse(h, z, torch.tensor(0.5), backend="cpp")
    out.sum().backward()
    assert h.grad is not None and z.grad is None


def test_constant_mask_gives_zero_not_nan():
    h, z = torch.randn(2, 4, 7, 7), torch.randn(2, 6, 7, 7)
    roi = torch.zeros(2, 1, 112, 112)  # empty ROI: the reference divides 0 by 0
    for be in CPU:
        out, mask = feature_mask_fuse(h, z, torch.tensor(1.0), roi, backend=be, return_mask=True)
        assert torch.isfinite(out).all() and (mask == 0).all()
        torch.testing.assert_close(out, torch.sigmoid(h))


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("shape", [(2, 64, 56, 56), (3, 512, 7, 7), (1, 3, 5, 2)])
def test_residual_matches_reference(backend, shape):
    h = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    k = torch.ones(shape[1:], dtype=torch.float64, requires_grad=True)  # PRO-Face C initialises keys to 1
    out = feature_mask_fuse_residual(h, a, k, backend=backend)
    ref = feature_mask_fuse_residual_ref(h, a, k)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, (h, a, k), g), torch.autograd.grad(ref, (h, a, k), g)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_opcheck():
    h, z = torch.randn(2, 4, 6, 6), torch.randn(2, 3, 6, 6)
    roi = (torch.rand(2, 1, 6, 6) > 0.5).float()
    for be in CPU:
        torch.library.opcheck(_mask_fuse_op, (h, z, torch.tensor(0.3), roi, 1e-12, be),
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip
        torch.library.opcheck(_residual_op, (h, torch.randn(2, 4, 6, 6), torch.randn(4, 6, 6), be))


def test_compiled_equals_eager():
    h, z = torch.randn(2, 8, 7, 7), torch.randn(2, 4, 7, 7)
    w = torch.tensor(0.4)

    def fn(a, b):
        return feature_mask_fuse(a, b, w, backend="cpp") * 2

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(h, z), fn(h, z))


def test_errors():
    h = torch.randn(2, 4, 7, 7)
    with pytest.raises(ValueError, match="matching h"):
        feature_mask_fuse(h, torch.randn(2, 4, 6, 7), torch.tensor(0.0))
    with pytest.raises(ValueError, match="one-element"):
        feature_mask_fuse(h, h, torch.zeros(2))
    with pytest.raises(ValueError, match="roi"):
        feature_mask_fuse(h, h, torch.tensor(0.0), torch.ones(2, 2, 7, 7))
    with pytest.raises(ValueError, match="key"):
        feature_mask_fuse_residual(h, h, torch.ones(4, 7))


@pytest.mark.interpret
def test_triton_forward_and_backward():
    dev = triton_device()
    h = torch.randn(2, 6, 7, 5, requires_grad=True)
    z = torch.randn(2, 3, 7, 5, requires_grad=True)
    w = torch.tensor(0.8, requires_grad=True)
    roi = (torch.rand(2, 1, 14, 10) > 0.3).float()
    ins = [t.detach().to(dev).requires_grad_(True) for t in (h, z, w)]
    out = feature_mask_fuse(ins[0], ins[1], ins[2], roi.to(dev), backend="triton")
    ref = feature_mask_fuse_ref(h, z, w, resize_roi(roi, (7, 5)))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(out, ins, g.to(dev)), torch.autograd.grad(ref, (h, z, w), g)):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5)
    a, k = torch.randn(2, 6, 7, 5, requires_grad=True), torch.randn(6, 7, 5, requires_grad=True)
    ins = [t.detach().to(dev).requires_grad_(True) for t in (h, a, k)]
    out = feature_mask_fuse_residual(*ins, backend="triton")
    ref = feature_mask_fuse_residual_ref(h, a, k)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(torch.autograd.grad(out, ins, g.to(dev)), torch.autograd.grad(ref, (h, a, k), g)):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-5)
