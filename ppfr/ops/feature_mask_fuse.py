"""Feature-mask fusion: DuetFace's interactive block (METHODS.md §3.3) and PRO-Face C's compensation (§6.4).

* :func:`feature_mask_fuse` (DuetFace): the client's interface output z (B, Cz, H, W) becomes a one-channel
  mask: the channel mean, min-max normalised per sample, times the landmark ROI resized to H x W (bilinear,
  align_corners=True), min-max normalised again; the server feature h (B, C, H, W) becomes
  ``sigmoid(h) * (1 + w * mask)`` with w a learnable scalar. As coded in the reference this *replaces* h by
  sigmoid(h) (it is not a residual). The reference computes the min and max with ``.item()``, so they are
  constants for autograd; ppfr matches those gradients and needs no host sync.
* :func:`feature_mask_fuse_residual` (PRO-Face C): ``h + sigmoid(h) * a * key`` with the client's compensation
  map a (B, C, H, W) and the learnable key (C, H, W).

Deliberate difference: where a sample's mask is constant (max == min, e.g. an all-zero ROI), the reference
divides by zero (NaN); ppfr divides by ``max(max - min, eps)`` (eps = 1e-12 by default), giving a zero mask.

Backends: ``ref`` and ``torch`` (the literal formula under autograd: a handful of PyTorch ops, already its fastest
PyTorch form; the registered op also has a torch body with the explicit backward, checked by opcheck), ``cpp``
(fused forward and backward) and ``triton`` (fused forward and backward kernels).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ppfr import _backend, _ext
from ppfr.ops._validate import check_planes

MASK_FUSE_BACKENDS = ("ref", "torch", "cpp", "triton")
DEFAULT_EPS = 1e-12


def _minmax(v: torch.Tensor, eps: float) -> torch.Tensor:
    lo = v.amin(dim=(1, 2, 3), keepdim=True).detach()  # constants, as the reference's .item() makes them
    hi = v.amax(dim=(1, 2, 3), keepdim=True).detach()
    return (v - lo) / (hi - lo).clamp_min(eps)


def resize_roi(roi: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, Hr, Wr) ROI -> (B, 1, H, W), bilinear with align_corners=True (the reference's interpolation)."""
    if tuple(roi.shape[2:]) == tuple(size):
        return roi
    return F.interpolate(roi, size=size, mode="bilinear", align_corners=True)


def duet_mask_ref(z: torch.Tensor, roi: Optional[torch.Tensor], eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The DuetFace mask (B, 1, H, W) in [0, 1] from the interface output z (B, Cz, H, W) and an optional ROI."""
    m = _minmax(z.mean(dim=1, keepdim=True), eps)
    if roi is not None:
        m = _minmax(m * resize_roi(roi.to(z.dtype), tuple(z.shape[2:])), eps)
    return m


def feature_mask_fuse_ref(
    h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, roi: Optional[torch.Tensor] = None, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Literal DuetFace interactive-block output: sigmoid(h) * (1 + w * mask(z, roi))."""
    return torch.sigmoid(h) * (1 + weight.reshape(()) * duet_mask_ref(z, roi, eps))


def feature_mask_fuse_residual_ref(h: torch.Tensor, a: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Literal PRO-Face C compensation: h + sigmoid(h) * a * key."""
    return h + torch.sigmoid(h) * a * key


# ------------------------------------------------------------------------------------------------- DuetFace op
def _native_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


@torch.library.custom_op("ppfr::feature_mask_fuse", mutates_args=())
def _mask_fuse_op(
    h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, roi: Optional[torch.Tensor], eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B,C,H,W), mask (B,1,H,W), kscale (B,)): kscale = d mask / d mean(z) / roi, for the backward."""
    b, c, hh, ww = h.shape
    cz = z.shape[1]
    if backend in ("ref", "torch"):
        with torch.no_grad():
            m = z.mean(dim=1, keepdim=True)
            lo, hi = m.amin(dim=(1, 2, 3)), m.amax(dim=(1, 2, 3))
            k = 1.0 / (hi - lo).clamp_min(eps)
            mask = (m - lo[:, None, None, None]) * k[:, None, None, None]
            if roi is not None:
                m2 = mask * roi
                lo2, hi2 = m2.amin(dim=(1, 2, 3)), m2.amax(dim=(1, 2, 3))
                k2 = 1.0 / (hi2 - lo2).clamp_min(eps)
                mask = (m2 - lo2[:, None, None, None]) * k2[:, None, None, None]
                k = k * k2
            out = torch.sigmoid(h) * (1 + weight.reshape(()) * mask)
        return out, mask, k
    dt = _native_dtype(h) if backend == "cpp" else torch.float32  # the Triton kernels are fp32
    hc, zc, wc = h.to(dt).contiguous(), z.to(dt).contiguous(), weight.to(dt).reshape(1).contiguous()
    rc = roi.to(dt).contiguous() if roi is not None else None
    out = torch.empty_like(hc)
    mask = torch.empty(b, 1, hh, ww, dtype=dt, device=h.device)
    k = torch.empty(b, dtype=dt, device=h.device)
    if backend == "cpp":
        _ext.cpu_module().mask_fuse_fwd(
            hc.data_ptr(), zc.data_ptr(), rc.data_ptr() if rc is not None else 0, wc.data_ptr(), out.data_ptr(),
            mask.data_ptr(), k.data_ptr(), b, c, cz, hh * ww, eps, dt == torch.float64, torch.get_num_threads(),
        )  # fmt: skip
    else:
        from ppfr.kernels.feature_mask_fuse import mask_fuse_fwd_triton

        mask_fuse_fwd_triton(hc, zc, rc, wc, out, mask, k, eps)
    return out.to(h.dtype), mask.to(h.dtype), k.to(h.dtype)


@_mask_fuse_op.register_fake
def _(h, z, weight, roi, eps, backend):
    b, _, hh, ww = h.shape
    return torch.empty_like(h), h.new_empty(b, 1, hh, ww), h.new_empty(b)


@torch.library.custom_op("ppfr::feature_mask_fuse_backward", mutates_args=())
def _mask_fuse_bwd_op(
    g: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, roi: Optional[torch.Tensor], k: torch.Tensor,
    weight: torch.Tensor, cz: int, need_gz: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(gh (B,C,H,W), gz (B,Cz,H,W) or empty, gw ()) for the DuetFace block."""
    b, c, hh, ww = h.shape
    if backend in ("ref", "torch"):
        sg = torch.sigmoid(h)
        w = weight.reshape(())
        gs = g * sg
        gh = gs * (1 - sg) * (1 + w * mask)
        s = gs.sum(dim=1, keepdim=True)
        gw = (s * mask).sum()
        if need_gz:
            gm = s * w * k[:, None, None, None] * (roi if roi is not None else 1.0) / cz
            gz = gm.expand(b, cz, hh, ww).contiguous()
        else:
            gz = h.new_empty(0)
        return gh, gz, gw.reshape(())
    dt = _native_dtype(h) if backend == "cpp" else torch.float32  # the Triton kernels are fp32
    gc, hc, mc, kc = (t.to(dt).contiguous() for t in (g, h, mask, k))
    wc = weight.to(dt).reshape(1).contiguous()
    rc = roi.to(dt).contiguous() if roi is not None else None
    gh = torch.empty_like(hc)
    gz = torch.empty(b, cz, hh, ww, dtype=dt, device=h.device) if need_gz else h.new_empty(0, dtype=dt)
    gw_b = torch.empty(b, dtype=dt, device=h.device)
    if backend == "cpp":
        _ext.cpu_module().mask_fuse_bwd(
            gc.data_ptr(), hc.data_ptr(), mc.data_ptr(), rc.data_ptr() if rc is not None else 0, kc.data_ptr(),
            wc.data_ptr(), gh.data_ptr(), gz.data_ptr() if need_gz else 0, gw_b.data_ptr(), b, c, cz, hh * ww,
            dt == torch.float64, torch.get_num_threads(),
        )  # fmt: skip
    else:
        from ppfr.kernels.feature_mask_fuse import mask_fuse_bwd_triton

        gw_b = mask_fuse_bwd_triton(gc, hc, mc, rc, kc, wc, gh, gz if need_gz else None, cz)
    return gh.to(h.dtype), gz.to(h.dtype), gw_b.sum().to(h.dtype)


@_mask_fuse_bwd_op.register_fake
def _(g, h, mask, roi, k, weight, cz, need_gz, backend):
    b, _, hh, ww = h.shape
    gz = h.new_empty(b, cz, hh, ww) if need_gz else h.new_empty(0)
    return torch.empty_like(h), gz, h.new_empty(())


def _mask_fuse_setup(ctx, inputs, output):
    h, z, weight, roi, eps, backend = inputs
    _, mask, k = output
    ctx.cz = z.shape[1]
    ctx.backend = backend
    ctx.w_shape = weight.shape
    ctx.save_for_backward(h, mask, roi, k, weight)


def _mask_fuse_backward(ctx, g_out, g_mask, g_k):
    h, mask, roi, k, weight = ctx.saved_tensors
    need_gz = ctx.needs_input_grad[1]
    gh, gz, gw = _mask_fuse_bwd_op(g_out.contiguous(), h, mask, roi, k, weight, ctx.cz, need_gz, ctx.backend)
    return gh, (gz if need_gz else None), gw.reshape(ctx.w_shape), None, None, None


_mask_fuse_op.register_autograd(_mask_fuse_backward, setup_context=_mask_fuse_setup)


def feature_mask_fuse(
    h: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, roi: Optional[torch.Tensor] = None, *,
    eps: float = DEFAULT_EPS, return_mask: bool = False, backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DuetFace interactive-block fusion, fused forward and backward.

    Args:
        h: (B, C, H, W) float server feature at the end of a stage.
        z: (B, Cz, H, W) float interface output (client feature up-sampled + 1x1 conv); gradients flow into z.
        weight: learnable scalar w (a 0-d or 1-element tensor, initialised to 0 in DuetFace).
        roi: optional (B, 1, Hr, Wr) ROI mask in [0, 1] (e.g. ``roi_mask`` at 112 x 112), resized to H x W.
        eps: floor of the min-max denominators (see the module docstring).
        return_mask: also return the (B, 1, H, W) mask in [0, 1].
    Returns:
        (B, C, H, W) ``sigmoid(h) * (1 + w * mask)`` (and the mask).
    """
    check_planes("h", h, min_size=1)
    check_planes("z", z, min_size=1)
    if z.shape[0] != h.shape[0] or z.shape[2:] != h.shape[2:]:
        raise ValueError(f"z must be (B, Cz, H, W) matching h {tuple(h.shape)}, got {tuple(z.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.numel() != 1:
        raise ValueError("weight must be a one-element tensor (the learnable scalar w)")
    if roi is not None:
        check_planes("roi", roi, channels=1, min_size=1)
        if roi.shape[0] != h.shape[0]:
            raise ValueError(f"roi batch {roi.shape[0]} != h batch {h.shape[0]}")
        roi = resize_roi(roi.to(h.dtype), tuple(h.shape[2:])).detach()
    be = _backend.resolve("feature_mask_fuse", backend, h.device, MASK_FUSE_BACKENDS, dtype=h.dtype)
    if be in ("ref", "torch"):  # plain autograd through the formula is PyTorch's fastest form of it
        out = feature_mask_fuse_ref(h, z, weight, roi, eps)
        return (out, duet_mask_ref(z, roi, eps).detach()) if return_mask else out
    out, mask, _ = _mask_fuse_op(h, z, weight.to(h.dtype), roi, eps, be)
    return (out, mask) if return_mask else out


# ----------------------------------------------------------------------------------------------- PRO-Face C op
@torch.library.custom_op("ppfr::feature_mask_fuse_residual", mutates_args=())
def _residual_op(h: torch.Tensor, a: torch.Tensor, key: torch.Tensor, backend: str) -> torch.Tensor:
    if backend in ("ref", "torch"):
        return feature_mask_fuse_residual_ref(h, a, key)
    dt = _native_dtype(h) if backend == "cpp" else torch.float32  # the Triton kernels are fp32
    hc, ac, kc = h.to(dt).contiguous(), a.to(dt).contiguous(), key.to(dt).contiguous()
    out = torch.empty_like(hc)
    b, n = h.shape[0], h[0].numel()
    if backend == "cpp":
        _ext.cpu_module().residual_fuse_fwd(hc.data_ptr(), ac.data_ptr(), kc.data_ptr(), out.data_ptr(), b, n,
                                            dt == torch.float64, torch.get_num_threads())  # fmt: skip
    else:
        from ppfr.kernels.feature_mask_fuse import residual_fuse_fwd_triton

        residual_fuse_fwd_triton(hc, ac, kc, out)
    return out.to(h.dtype)


@_residual_op.register_fake
def _(h, a, key, backend):
    return torch.empty_like(h)


@torch.library.custom_op("ppfr::feature_mask_fuse_residual_backward", mutates_args=())
def _residual_bwd_op(
    g: torch.Tensor, h: torch.Tensor, a: torch.Tensor, key: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend in ("ref", "torch"):
        sg = torch.sigmoid(h)
        return g * (1 + sg * (1 - sg) * a * key), g * sg * key, (g * sg * a).sum(0)
    dt = _native_dtype(h) if backend == "cpp" else torch.float32  # the Triton kernels are fp32
    gc, hc, ac, kc = (t.to(dt).contiguous() for t in (g, h, a, key))
    gh, ga, gk = torch.empty_like(hc), torch.empty_like(ac), torch.empty_like(kc)
    b, n = h.shape[0], h[0].numel()
    if backend == "cpp":
        _ext.cpu_module().residual_fuse_bwd(gc.data_ptr(), hc.data_ptr(), ac.data_ptr(), kc.data_ptr(), gh.data_ptr(),
                                            ga.data_ptr(), gk.data_ptr(), b, n, dt == torch.float64,
                                            torch.get_num_threads())  # fmt: skip
    else:
        from ppfr.kernels.feature_mask_fuse import residual_fuse_bwd_triton

        residual_fuse_bwd_triton(gc, hc, ac, kc, gh, ga, gk)
    return gh.to(h.dtype), ga.to(h.dtype), gk.to(h.dtype)


@_residual_bwd_op.register_fake
def _(g, h, a, key, backend):
    return torch.empty_like(h), torch.empty_like(a), torch.empty_like(key)


def _residual_setup(ctx, inputs, output):
    h, a, key, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(h, a, key)


def _residual_backward(ctx, g):
    h, a, key = ctx.saved_tensors
    gh, ga, gk = _residual_bwd_op(g.contiguous(), h, a, key, ctx.backend)
    return gh, ga, gk, None


_residual_op.register_autograd(_residual_backward, setup_context=_residual_setup)


def feature_mask_fuse_residual(h: torch.Tensor, a: torch.Tensor, key: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """PRO-Face C feature compensation ``h + sigmoid(h) * a * key``, fused forward and backward.

    Args:
        h: (B, C, H, W) float frozen-server feature at the end of a stage.
        a: (B, C, H, W) float client compensation map (after its interface).
        key: (C, H, W) float learnable key (initialised to 1).
    Returns:
        (B, C, H, W).
    """
    check_planes("h", h, min_size=1)
    check_planes("a", a, min_size=1)
    if a.shape != h.shape:
        raise ValueError(f"a must match h {tuple(h.shape)}, got {tuple(a.shape)}")
    if not isinstance(key, torch.Tensor) or tuple(key.shape) != tuple(h.shape[1:]):
        raise ValueError(f"key must be (C, H, W) = {tuple(h.shape[1:])}")
    be = _backend.resolve("feature_mask_fuse_residual", backend, h.device, MASK_FUSE_BACKENDS, dtype=h.dtype)
    if be in ("ref", "torch"):
        return feature_mask_fuse_residual_ref(h, a, key)
    return _residual_op(h, a, key, be)


# ------------------------------------------------------------------------------------------------ self-checks
def _check_mask_fuse(backend: str, dev: torch.device) -> float:
    h, z = torch.randn(2, 4, 7, 7, device=dev), torch.randn(2, 6, 7, 7, device=dev)
    roi = (torch.rand(2, 1, 14, 14, device=dev) > 0.3).float()
    w = torch.tensor(0.7, device=dev)
    out = feature_mask_fuse(h, z, w, roi, backend=backend)
    return (out - feature_mask_fuse_ref(h, z, w, resize_roi(roi, (7, 7)))).abs().max().item()


def _check_residual(backend: str, dev: torch.device) -> float:
    h, a, k = torch.randn(2, 4, 7, 7, device=dev), torch.randn(2, 4, 7, 7, device=dev), torch.randn(4, 7, 7, device=dev)
    return (feature_mask_fuse_residual(h, a, k, backend=backend) - feature_mask_fuse_residual_ref(h, a, k)).abs().max().item()


SELF_CHECKS = {
    "feature_mask_fuse": (MASK_FUSE_BACKENDS, _check_mask_fuse),
    "feature_mask_fuse_residual": (MASK_FUSE_BACKENDS, _check_residual),
}
