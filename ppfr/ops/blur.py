"""The PRO-Face C obfuscation blurs (METHODS.md §6.2, cost notes §6.7).

Ops (registered as ``ppfr::median_blur`` / ``ppfr::gaussian_blur`` / ``ppfr::pixelate`` / ``ppfr::hybrid_blur``):

* :func:`median_blur` -- kornia ``median_blur`` semantics: zero padding of k//2, the middle of the k*k window
  values (k odd, so the middle is unique). Bit-exact on every backend (a median is an element of the input).
* :func:`gaussian_blur` -- torchvision ``gaussian_blur`` semantics: 1-D kernel ``exp(-x^2 / (2 sigma^2))`` on
  ``linspace(-(k-1)/2, (k-1)/2, k)`` normalised to sum 1, outer product as the 2-D kernel, reflect padding of
  k//2 (torch ``reflect``: no edge repeat). Computed separably on the fast backends (float tolerance).
* :func:`pixelate` -- ``resize(resize(x, side // b), side, NEAREST)`` with torchvision's tensor ``resize``:
  the down-sampling is bilinear with ``align_corners=False`` and **antialias=True** (the torchvision >= 0.17
  default; 0.13-0.16 defaulted to no antialias for tensors, METHODS §6.7), the up-sampling is torch ``nearest``
  (floor(dst * in / out)).
* :func:`hybrid_blur` -- ``MyBlurWay``: a sqrt(n) x sqrt(n) patch grid, each patch taken from one of the three
  whole-image blurs; training draws n, k, sigma, b and one patch permutation per batch, test uses n=16, k=13,
  sigma=5, b=7 and a permutation per image. See :func:`sample_hybrid_params` for the exact draws.

Backends: ``ref`` (the literal library formulation: the unfold median needs k^2 x the input's memory, ~3.5 GB
for B=64, k=19), ``torch`` (same math, bounded memory / separable / factored), ``cpp`` (rank-transform sliding
bitset median, separable Gaussian), ``triton`` and ``cuda`` (median by a 32-step radix select on the
order-preserving integer image of the float bits; nothing of size k^2 per pixel is stored).

Differentiability: :func:`gaussian_blur` and :func:`pixelate` are linear and registered with
``register_autograd`` (their backward is the explicit adjoint, itself differentiable). :func:`median_blur` and
:func:`hybrid_blur` have no gradient (backward raises): PRO-Face C blurs data, never a trainable tensor.

Layout: this module holds the math, the ``torch.library`` registrations, the dispatch and the self-checks;
the method's parameter sets, :class:`HybridBlurParams` / :func:`sample_hybrid_params` and the argument checks
are in ``ppfr/ops/_blur_params.py`` (host-side, no image math) and re-exported here.

Numerics: float32 and float64 run natively; float16/bfloat16 are computed in float32 and rounded once at the
end (for the median that is still exact). Inputs must be free of NaN and +-inf (the reference itself turns
0 * inf into NaN in kornia's convolution-based unfold).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F

from ppfr import _backend, _ext
from ppfr.ops._blur_params import (
    GAUSSIAN_K, HYBRID_NS, KIND_GAUSSIAN, KIND_MEDIAN, KIND_PIXELATE, MEDIAN_KS, PIXEL_BS, SIGMA_RANGE, TEST_MEDIAN_K,
    TEST_N, TEST_PIXEL_B, TEST_SIGMA, HybridBlurOutput, HybridBlurParams, _as_int, _check_odd_k, _check_sigma,
    _grid_geometry, _kinds_from_layout, sample_hybrid_params, slot_kinds,
)  # fmt: skip
from ppfr.ops._validate import check_planes, to_device

# The parameters and argument checks live in ppfr.ops._blur_params; they are re-exported here so that
# ``from ppfr.ops.blur import sample_hybrid_params, HYBRID_NS, ...`` stays the one import of the blurs.
__all__ = [
    "GAUSSIAN_BACKENDS", "GAUSSIAN_K", "HYBRID_BACKENDS", "HYBRID_NS", "HybridBlurOutput", "HybridBlurParams",
    "KIND_GAUSSIAN", "KIND_MEDIAN", "KIND_PIXELATE", "MEDIAN_BACKENDS", "MEDIAN_KS", "PIXELATE_BACKENDS", "PIXEL_BS",
    "SELF_CHECKS", "SIGMA_RANGE", "TEST_MEDIAN_K", "TEST_N", "TEST_PIXEL_B", "TEST_SIGMA", "gaussian_blur",
    "gaussian_blur_ref", "gaussian_kernel1d", "hybrid_blur", "hybrid_blur_ref", "median_blur", "median_blur_ref",
    "pixelate", "pixelate_ref", "sample_hybrid_params", "slot_kinds",
]  # fmt: skip

MEDIAN_BACKENDS = ("ref", "torch", "cpp", "triton", "cuda")
GAUSSIAN_BACKENDS = ("ref", "torch", "cpp")
PIXELATE_BACKENDS = ("ref", "torch")
HYBRID_BACKENDS = ("ref", "torch", "cpp", "triton", "cuda")

# The cuda median keeps a (32 + k - 1) x (8 + k - 1) key tile in shared memory; above this k it exceeds 48 KB.
_CUDA_MAX_K = 91
# The torch median unfolds at most this many elements at once (256 MB of float32).
_TORCH_CHUNK_ELEMS = 1 << 26


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype a blur computes in: float32 / float64 natively, half types in float32 (rounded once at the end)."""
    return dt if dt in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------------------------
# Median.
# ----------------------------------------------------------------------------------------------------------
def median_blur_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """Literal reference (kornia ``median_blur(x, (k, k))``): zero-padded k*k unfold, median over the window.

    Materialises (B*C, k*k, H*W): k^2 times the input's memory (B=64, 112x112, k=19: ~3.5 GB).

    Args:
        x: (B, C, H, W) float.
        k: odd window side >= 1.
    Returns:
        (B, C, H, W) in ``x.dtype``.
    """
    check_planes("x", x, min_size=1)
    k = _check_odd_k("k", k)
    b, c, h, w = x.shape
    cols = F.unfold(x.reshape(b * c, 1, h, w), kernel_size=k, padding=k // 2)  # (B*C, k*k, H*W)
    return cols.median(dim=1).values.reshape(b, c, h, w)


def _median_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """Same math as the reference, unfolded a chunk of planes at a time (bounded memory, any device)."""
    b, c, h, w = x.shape
    planes = x.reshape(b * c, 1, h, w)
    out = torch.empty_like(planes)
    per = max(1, _TORCH_CHUNK_ELEMS // (k * k * h * w))
    for s in range(0, b * c, per):  # loop over memory chunks, not samples
        cols = F.unfold(planes[s : s + per], kernel_size=k, padding=k // 2)
        out[s : s + per] = cols.median(dim=1).values.view(-1, 1, h, w)
    return out.view(b, c, h, w)


def _median_launch(backend: str, x: torch.Tensor, k: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """cpp / cuda / triton kernels; x is computed in float32 (float64 natively on cpp)."""
    b, c, h, w = x.shape
    dt = torch.float64 if (backend == "cpp" and x.dtype == torch.float64) else torch.float32
    xc = x.to(dt).contiguous()
    out = torch.empty_like(xc)
    if backend == "cpp":
        m = mask.contiguous() if mask is not None else None
        _ext.cpu_module().median_blur(
            xc.data_ptr(), out.data_ptr(), b, c, h, w, k, 0 if m is None else m.data_ptr(),
            dt == torch.float64, torch.get_num_threads(),
        )  # fmt: skip
        return out
    if backend == "cuda":
        m = mask.contiguous() if mask is not None else None
        _ext.cuda_module().median_blur(
            xc.data_ptr(), out.data_ptr(), b, c, h, w, k, 0 if m is None else m.data_ptr(),
            *_ext.cuda_stream_and_device("median_blur", xc, out, m),
        )  # fmt: skip
        return out
    from ppfr.kernels.blur import median_blur_triton

    median_blur_triton(xc, out, k)
    return out if mask is None else torch.where(mask[:, None].bool(), out, xc)


@torch.library.custom_op("ppfr::median_blur", mutates_args=())
def _median_blur_op(x: torch.Tensor, k: int, mask: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """(B,C,H,W) -> (B,C,H,W); where ``mask`` (B,H,W) uint8 is 0 the output is the input pixel."""
    if backend in ("cuda", "triton") and x.dtype == torch.float64:
        backend = "torch"  # the GPU kernels select on 32-bit keys; float64 takes the exact torch path
    if backend == "cuda" and k > _CUDA_MAX_K:
        backend = "triton" if _backend.unavailable_reason("triton", x.device) is None else "torch"
    if backend in ("ref", "torch"):
        out = median_blur_ref(x, k) if backend == "ref" else _median_torch(x, k)
        if mask is not None:
            out = torch.where(mask[:, None].bool(), out, x)
        return out.contiguous()
    return _median_launch(backend, x, k, mask).to(x.dtype)


@_median_blur_op.register_fake
def _(x, k, mask, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_median_args(x: torch.Tensor, k) -> int:
    check_planes("x", x, min_size=1)
    k = _check_odd_k("k", k)
    if x.shape[2] * x.shape[3] >= 2**31:
        raise ValueError(f"x planes must have fewer than 2^31 pixels, got {tuple(x.shape[2:])}")
    return k


def median_blur(x: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """Median filter with kornia's semantics (METHODS §6.2: k in {7, ..., 19} for PRO-Face C).

    Each output pixel is the middle element of the k*k window centred on it, positions outside the image
    counting as 0 (zero padding of k//2 on each side, so borders are pulled towards 0).

    Args:
        x: (B, C, H, W) float, NaN/inf-free (any H, W >= 1; the methods use [-1, 1] images of 112 x 112).
        k: odd window side >= 1 (k = 1 is the identity).
        backend: ``auto`` | ``ref`` | ``torch`` | ``cpp`` | ``triton`` | ``cuda`` (``PPFR_BACKEND`` overrides auto).

    Returns:
        (B, C, H, W) in ``x.dtype``, bit-identical across backends. Not differentiable (backward raises).

    Raises:
        TypeError / ValueError: bad shapes, dtypes or k.
        BackendUnavailableError: the requested backend cannot run here.

    Example:
        >>> x = torch.rand(2, 3, 112, 112) * 2 - 1
        >>> median_blur(x, 13).shape
        torch.Size([2, 3, 112, 112])
    """
    k = _check_median_args(x, k)
    be = _backend.resolve("median_blur", backend, x.device, MEDIAN_BACKENDS)
    return _median_blur_op(x, k, None, be)


# ----------------------------------------------------------------------------------------------------------
# Gaussian.
# ----------------------------------------------------------------------------------------------------------
def gaussian_kernel1d(k: int, sigma: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """torchvision's 1-D Gaussian: exp(-0.5 (x / sigma)^2) on linspace(-(k-1)/2, (k-1)/2, k), normalised.

    Returns:
        (k,) tensor in ``dtype`` (built in that dtype, as torchvision does for float images).
    """
    half = (k - 1) * 0.5
    xs = torch.linspace(-half, half, steps=k, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (xs / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur_ref(x: torch.Tensor, k: int = GAUSSIAN_K, sigma: float = TEST_SIGMA) -> torch.Tensor:
    """Literal reference (torchvision ``gaussian_blur(x, [k, k], [sigma, sigma])``): 2-D k x k kernel as the
    outer product of the 1-D kernel, reflect padding of k//2, depthwise conv2d, in ``x.dtype``.

    Args:
        x: (B, C, H, W) float32/float64 with k//2 < H, W.
    Returns:
        (B, C, H, W) in ``x.dtype``.
    """
    _check_gaussian_args(x, k, sigma)
    c = x.shape[1]
    k1 = gaussian_kernel1d(k, sigma, x.dtype, x.device)
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(c, 1, k, k)
    xp = F.pad(x, [k // 2] * 4, mode="reflect")
    return F.conv2d(xp, k2, groups=c)


def _gaussian_matrix(n: int, k: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """(n, n) operator of the 1-D reflect-padded Gaussian along an axis of length n: out = G @ x.

    G[i, j] = sum of the taps w[t] whose source reflect(i + t - k//2) is j (the padding folded in). Built per call
    (n * k scatter-adds) rather than cached, so torch.compile never captures a fake tensor in a cache.
    """
    p = k // 2
    w = gaussian_kernel1d(k, sigma, dtype, device)
    q = torch.arange(n, device=device)[:, None] + torch.arange(k, device=device)[None, :] - p
    src = torch.where(q < 0, -q, torch.where(q >= n, 2 * (n - 1) - q, q))  # torch "reflect" (no edge repeat)
    g = torch.zeros(n, n, dtype=dtype, device=device)
    return g.index_put_((torch.arange(n, device=device)[:, None].expand(n, k), src), w.expand(n, k), accumulate=True)


def _gaussian_torch(x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """Separable dense form G_h X G_w^T: two batched GEMMs (BLAS beats a 31-tap depthwise conv2d ~20x on CPU)."""
    h, w = x.shape[-2:]
    return _gaussian_matrix(h, k, sigma, x.dtype, x.device) @ x @ _gaussian_matrix(w, k, sigma, x.dtype, x.device).T


def _gaussian_adjoint(g: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """Adjoint of the Gaussian operator (its backward): G_h^T g G_w. Differentiable, so double backward works."""
    h, w = g.shape[-2:]
    return _gaussian_matrix(h, k, sigma, g.dtype, g.device).T @ g @ _gaussian_matrix(w, k, sigma, g.dtype, g.device)


@torch.library.custom_op("ppfr::gaussian_blur", mutates_args=())
def _gaussian_blur_op(x: torch.Tensor, k: int, sigma: float, backend: str) -> torch.Tensor:
    dt = _compute_dtype(x.dtype)
    if backend == "ref":
        return gaussian_blur_ref(x.to(dt), k, sigma).to(x.dtype).contiguous()
    if backend == "torch":
        return _gaussian_torch(x.to(dt), k, sigma).to(x.dtype).contiguous()
    b, c, h, w = x.shape
    xc = x.to(dt).contiguous()
    out = torch.empty_like(xc)
    k1 = gaussian_kernel1d(k, sigma, dt, x.device).contiguous()
    _ext.cpu_module().gaussian_blur(
        xc.data_ptr(), out.data_ptr(), b * c, h, w, k1.data_ptr(), k, dt == torch.float64, torch.get_num_threads()
    )
    return out.to(x.dtype)


@_gaussian_blur_op.register_fake
def _(x, k, sigma, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gaussian_setup(ctx, inputs, output):
    _, ctx.k, ctx.sigma, _ = inputs


def _gaussian_backward(ctx, grad):
    dt = _compute_dtype(grad.dtype)
    return _gaussian_adjoint(grad.to(dt), ctx.k, ctx.sigma).to(grad.dtype), None, None, None


_gaussian_blur_op.register_autograd(_gaussian_backward, setup_context=_gaussian_setup)


def _check_gaussian_args(x: torch.Tensor, k, sigma) -> tuple[int, float]:
    check_planes("x", x, min_size=1)
    k = _check_odd_k("k", k)
    sigma = _check_sigma(sigma)
    if k // 2 >= min(x.shape[2], x.shape[3]):
        raise ValueError(
            f"reflect padding of k//2 = {k // 2} needs H and W > {k // 2}, got {tuple(x.shape[2:])} "
            "(torchvision raises here too)"
        )
    return k, sigma


def gaussian_blur(
    x: torch.Tensor, k: int = GAUSSIAN_K, sigma: float = TEST_SIGMA, *, backend: str = "auto"
) -> torch.Tensor:
    """Gaussian blur with torchvision's semantics (METHODS §6.2: k = 31, sigma ~ U(2, 8) train / 5 test).

    Args:
        x: (B, C, H, W) float with H, W > k // 2 (reflect padding).
        k: odd kernel side (default 31).
        sigma: standard deviation in pixels, > 0 (default 5, the test value).
        backend: ``auto`` | ``ref`` | ``torch`` | ``cpp``.

    Returns:
        (B, C, H, W) in ``x.dtype``; equal to the reference within float rounding (the fast backends are
        separable: 2k instead of k^2 multiply-adds per pixel). Differentiable (registered adjoint).

    Example:
        >>> gaussian_blur(torch.rand(2, 3, 112, 112), 31, 5.0).shape
        torch.Size([2, 3, 112, 112])
    """
    k, sigma = _check_gaussian_args(x, k, sigma)
    be = _backend.resolve("gaussian_blur", backend, x.device, GAUSSIAN_BACKENDS)
    return _gaussian_blur_op(x, k, sigma, be)


# ----------------------------------------------------------------------------------------------------------
# Pixelate.
# ----------------------------------------------------------------------------------------------------------
def _resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision tensor ``resize(x, size)`` (>= 0.17): bilinear, align_corners=False, antialias=True; the same
    size returns ``x`` itself (torchvision's shortcut); float16/bfloat16 go through float32 as in torchvision."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    dt = _compute_dtype(x.dtype)
    y = F.interpolate(x.to(dt), size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.to(x.dtype)


def pixelate_ref(x: torch.Tensor, b: int) -> torch.Tensor:
    """Literal reference: ``resize(resize(x, (H//b, W//b)), (H, W), NEAREST)`` with torchvision's tensor resize.

    For the square images of the method this is exactly ``F.resize(F.resize(x, side // b), side, NEAREST)``.
    """
    h, w = _check_pixelate_args(x, b)
    small = _resize_bilinear(x, (h // b, w // b))
    if tuple(small.shape[-2:]) == (h, w):
        return small
    return F.interpolate(small, size=(h, w), mode="nearest")


def _pixelate_tables(n: int, b: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of length n: the antialiased bilinear down-sampling matrix D (n//b, n) and the nearest
    source index (n,) of the up-sampling, both read off torch's own kernels so they match them exactly.

    Rebuilt per call (two tiny interpolations, ~n^2 elements) rather than cached: a cache would capture fake
    tensors when the backward is traced by torch.compile."""
    m = n // b
    # Resample the rows of an identity image (columns keep their size, an exact identity): D[i', j] is the
    # weight of input row j in output row i'. (Not the (1, n, n, 1) "basis vectors as channels" shape: with
    # W = 1 that tensor also looks channels-last and torch's antialiased CPU kernel then gets it wrong.)
    eye = torch.eye(n, dtype=dtype, device=device).view(1, 1, n, n)
    d = F.interpolate(eye, size=(m, n), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    src = torch.arange(m, dtype=torch.float32, device=device).view(1, 1, m, 1)
    idx = F.interpolate(src, size=(n, 1), mode="nearest")[0, 0, :, 0].to(torch.int64)
    return d.contiguous(), idx


def _pixelate_torch(x: torch.Tensor, b: int) -> torch.Tensor:
    """Factored linear form U_h (D_h X D_w^T) U_w^T: the antialiased down-sampling as two small GEMMs (2x faster
    than torch's antialiased interpolate on CPU), the nearest up-sampling by torch's own kernel (exact)."""
    h, w = x.shape[-2:]
    dh, _ = _pixelate_tables(h, b, x.dtype, x.device)
    dw, _ = _pixelate_tables(w, b, x.dtype, x.device)
    return F.interpolate(dh @ x @ dw.T, size=(h, w), mode="nearest")


def _pixelate_adjoint(g: torch.Tensor, b: int) -> torch.Tensor:
    h, w = g.shape[-2:]
    dh, ih = _pixelate_tables(h, b, g.dtype, g.device)
    dw, iw = _pixelate_tables(w, b, g.dtype, g.device)
    gs = g.new_zeros(*g.shape[:-2], dh.shape[0], w).index_add(-2, ih, g)
    gs = g.new_zeros(*g.shape[:-2], dh.shape[0], dw.shape[0]).index_add(-1, iw, gs)
    return dh.T @ gs @ dw


@torch.library.custom_op("ppfr::pixelate", mutates_args=())
def _pixelate_op(x: torch.Tensor, b: int, backend: str) -> torch.Tensor:
    dt = _compute_dtype(x.dtype)
    if b == 1:  # both resizes are the identity (torchvision returns the input unchanged)
        return x.clone(memory_format=torch.contiguous_format)
    if backend == "ref":
        return pixelate_ref(x.to(dt), b).to(x.dtype).contiguous()
    return _pixelate_torch(x.to(dt), b).to(x.dtype).contiguous()


@_pixelate_op.register_fake
def _(x, b, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _pixelate_setup(ctx, inputs, output):
    ctx.b = inputs[1]


def _pixelate_backward(ctx, grad):
    if ctx.b == 1:
        return grad, None, None
    dt = _compute_dtype(grad.dtype)
    return _pixelate_adjoint(grad.to(dt), ctx.b).to(grad.dtype), None, None


_pixelate_op.register_autograd(_pixelate_backward, setup_context=_pixelate_setup)


def _check_pixelate_args(x: torch.Tensor, b) -> tuple[int, int]:
    check_planes("x", x, min_size=1)
    b = _as_int("b", b)
    h, w = x.shape[2], x.shape[3]
    if b < 1 or b > min(h, w):
        raise ValueError(f"block size b must be in [1, min(H, W) = {min(h, w)}], got {b}")
    return h, w


def pixelate(x: torch.Tensor, b: int, *, backend: str = "auto") -> torch.Tensor:
    """Pixelation as in PRO-Face C (METHODS §6.2: b ~ U{3..11} train / 7 test).

    Down-samples to (H // b, W // b) with torchvision's default tensor interpolation (bilinear,
    align_corners=False, **antialias=True**: the torchvision >= 0.17 behaviour), then up-samples back to
    (H, W) with torch ``nearest``. For square inputs this is exactly PRO-Face C's
    ``resize(resize(x, side // b), side, NEAREST)``.

    Args:
        x: (B, C, H, W) float.
        b: block size, 1 <= b <= min(H, W) (b = 1 is the identity).
        backend: ``auto`` | ``ref`` | ``torch`` (``auto`` picks ``torch``, a factored matmul + gather form).

    Returns:
        (B, C, H, W) in ``x.dtype`` (float tolerance vs the reference). Differentiable (registered adjoint).
    """
    _check_pixelate_args(x, b)
    be = _backend.resolve("pixelate", backend, x.device, PIXELATE_BACKENDS)
    return _pixelate_op(x, operator.index(b), be)


# ----------------------------------------------------------------------------------------------------------
# Hybrid blur (MyBlurWay); its parameters and their draws are in ppfr.ops._blur_params.
# ----------------------------------------------------------------------------------------------------------
def hybrid_blur_ref(x: torch.Tensor, params: HybridBlurParams) -> torch.Tensor:
    """Literal reference of ``MyBlurWay`` (METHODS §6.2) on the reference blurs, patch by patch."""
    b, c, side, _ = x.shape
    n = params.n
    r, p, side2 = _grid_geometry(side, n)
    dt = _compute_dtype(x.dtype)
    xs = _resize_bilinear(x.to(dt), (side2, side2))
    med = median_blur_ref(xs, params.median_k)
    gau = gaussian_blur_ref(xs, GAUSSIAN_K, params.sigma)
    pix = pixelate_ref(xs, params.pixel_b)
    blurred = (med, gau, pix)
    kinds = slot_kinds(n)
    layout = params.layout.reshape(-1, n).expand(b, n)  # (n,) or (1, n): one layout for the batch; (B, n)
    out = torch.empty_like(xs)
    for img in range(b):  # the reference may loop; the fast path below is one where() over a patch map
        for slot in range(n):
            pos = int(layout[img, slot])
            gi, gj = divmod(pos, r)
            src = blurred[int(kinds[slot])]
            rows, cols = slice(gi * p, (gi + 1) * p), slice(gj * p, (gj + 1) * p)
            out[img, :, rows, cols] = src[img, :, rows, cols]
    return _resize_bilinear(out, (side, side)).to(x.dtype)


def _hybrid_fast(x: torch.Tensor, layout: torch.Tensor, n: int, k: int, sigma: float, pb: int, be: str):
    b, c, side, _ = x.shape
    r, p, side2 = _grid_geometry(side, n)
    dt = _compute_dtype(x.dtype)
    xs = _resize_bilinear(x.to(dt), (side2, side2))
    kinds = to_device(_kinds_from_layout(layout, n), x.device)  # (L, n): host layout -> device, non-blocking
    # Per-pixel blur map (L, side2, side2): patch kind repeated over its p x p pixels.
    kind_map = kinds.view(-1, r, r).repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
    med_mask = (kind_map == KIND_MEDIAN).to(torch.uint8).expand(b, side2, side2).contiguous()
    # The median (the dominant cost, METHODS §6.7) is computed only on the median patches; elsewhere it is
    # a copy of the input, and the where() below never reads it there.
    med = _median_blur_op(xs, k, med_mask, be)
    gau = _gaussian_blur_op(xs, GAUSSIAN_K, sigma, be if be in GAUSSIAN_BACKENDS else "torch")
    pix = _pixelate_op(xs, pb, "torch")
    km = kind_map[:, None]
    out = torch.where(km == KIND_MEDIAN, med, torch.where(km == KIND_GAUSSIAN, gau, pix))
    return _resize_bilinear(out, (side, side)).to(x.dtype)


@torch.library.custom_op("ppfr::hybrid_blur", mutates_args=())
def _hybrid_blur_op(
    x: torch.Tensor, layout: torch.Tensor, n: int, median_k: int, sigma: float, pixel_b: int, backend: str
) -> torch.Tensor:
    """x (B,C,S,S), layout (L, n) int64 (CPU) -> (B,C,S,S)."""
    if backend == "ref":
        params = HybridBlurParams(n=n, median_k=median_k, sigma=sigma, pixel_b=pixel_b, layout=layout)
        return hybrid_blur_ref(x, params).contiguous()
    return _hybrid_fast(x, layout, n, median_k, sigma, pixel_b, backend).contiguous()


@_hybrid_blur_op.register_fake
def _(x, layout, n, median_k, sigma, pixel_b, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def hybrid_blur(
    x: torch.Tensor,
    n: Optional[int] = None,
    *,
    median_k: Optional[int] = None,
    sigma: Optional[float] = None,
    pixel_b: Optional[int] = None,
    layout: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    train: bool = True,
    backend: str = "auto",
) -> HybridBlurOutput:
    """PRO-Face C hybrid blur ``MyBlurWay`` (METHODS §6.2).

    The image is cut into a sqrt(n) x sqrt(n) grid of square patches of side p = int(S / sqrt(n)); when that
    does not tile S (n = 9, 25 for S = 112) the image is first resized (bilinear, antialias) to
    (p + 1) sqrt(n) and the result resized back to S at the end. Three whole-image blurs are computed --
    median (k), Gaussian (31, sigma), pixelate (b) -- and patch position ``layout[..., i]`` takes the median
    for slots i < n//3, the Gaussian for the next n//3 slots and the pixelation for the rest
    (n=4: 1/1/2, 9: 3/3/3, 16: 5/5/6, 25: 8/8/9 patches).

    Training (``train=True``): n, k, sigma, b and one layout are drawn per call (one batch); test
    (``train=False``): n=16, k=13, sigma=5, b=7 and one random layout per image. Any of them can be given
    explicitly; the rest are drawn by :func:`sample_hybrid_params` (documented draw order) from ``generator``.

    Args:
        x: (B, C, S, S) float, square, NaN/inf-free (S = 112 in the method; S >= 16 so the 31-tap Gaussian's
            reflect padding fits).
        n, median_k, sigma, pixel_b, layout: see :class:`HybridBlurParams`; None = draw / test default.
        generator: CPU ``torch.Generator`` for the draws (None: fresh non-deterministic seed).
        train: training (per-batch random parameters) or test (fixed parameters, per-image layouts).
        backend: backend of the median and Gaussian (``cpp`` on CPU by ``auto``); the pixelation uses ``torch``
            (``ref``: every blur and the assembly are the literal references).

    Returns:
        ``HybridBlurOutput(image, params)``: image (B, C, S, S) in ``x.dtype``; params reproduce the call:
        ``hybrid_blur(x, p.n, median_k=p.median_k, sigma=p.sigma, pixel_b=p.pixel_b, layout=p.layout)``.
        Not differentiable (it contains a median).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> out, params = hybrid_blur(torch.rand(4, 3, 112, 112) * 2 - 1, generator=g)
        >>> out.shape, params.kinds().shape[-1] == params.n
        (torch.Size([4, 3, 112, 112]), True)
    """
    check_planes("x", x, min_size=1)
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"hybrid_blur needs square images (the patch grid is square), got {tuple(x.shape[2:])}")
    params = sample_hybrid_params(
        x.shape[0], n, median_k=median_k, sigma=sigma, pixel_b=pixel_b, layout=layout, train=train,
        generator=generator,
    )  # fmt: skip
    side = x.shape[-1]
    r, _, side2 = _grid_geometry(side, params.n)
    if r > side:
        raise ValueError(f"a {r}x{r} grid does not fit a {side}x{side} image")
    if GAUSSIAN_K // 2 >= side2:
        raise ValueError(f"images must be larger than {GAUSSIAN_K // 2} pixels (31-tap reflect padding), got {side}")
    if params.pixel_b > side2:
        raise ValueError(f"pixel_b = {params.pixel_b} exceeds the working side {side2}")
    if side2 * side2 >= 2**31:
        raise ValueError(f"image too large: {side2}x{side2}")
    be = _backend.resolve("hybrid_blur", backend, x.device, HYBRID_BACKENDS)
    lay = params.layout if params.layout.dim() == 2 else params.layout[None]
    out = _hybrid_blur_op(x, lay, params.n, params.median_k, params.sigma, params.pixel_b, be)
    return HybridBlurOutput(out, params)


# ----------------------------------------------------------------------------------------------------------
# Self-checks for `python -m ppfr.info`: each backend once on a tiny input against the reference.
# ----------------------------------------------------------------------------------------------------------
def _check_median(backend: str, dev: torch.device) -> float:
    x = torch.rand(2, 3, 11, 9, device=dev) * 2 - 1
    return (median_blur(x, 5, backend=backend) - median_blur_ref(x, 5)).abs().max().item()


def _check_gaussian(backend: str, dev: torch.device) -> float:
    x = torch.rand(2, 3, 20, 17, device=dev)
    return (gaussian_blur(x, 31, 3.0, backend=backend) - gaussian_blur_ref(x, 31, 3.0)).abs().max().item()


def _check_pixelate(backend: str, dev: torch.device) -> float:
    x = torch.rand(2, 3, 20, 17, device=dev)
    return (pixelate(x, 3, backend=backend) - pixelate_ref(x, 3)).abs().max().item()


def _check_hybrid(backend: str, dev: torch.device) -> float:
    x = torch.rand(2, 3, 40, 40, device=dev) * 2 - 1
    g = torch.Generator().manual_seed(0)
    out, params = hybrid_blur(x, 9, generator=g, backend=backend)
    return (out - hybrid_blur_ref(x, params)).abs().max().item()


SELF_CHECKS = {
    "median_blur": (MEDIAN_BACKENDS, _check_median),
    "gaussian_blur": (GAUSSIAN_BACKENDS, _check_gaussian),
    "pixelate": (PIXELATE_BACKENDS, _check_pixelate),
    "hybrid_blur": (HYBRID_BACKENDS, _check_hybrid),
}
