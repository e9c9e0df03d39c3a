"""Tests of the PRO-Face C blurs (ppfr/ops/blur.py, csrc/blur*.cpp|cu, kernels/blur.py).

The references are first checked against independent numpy/scipy re-derivations of the library semantics
(kornia median_blur, torchvision gaussian_blur and tensor resize), then every backend is compared with the
reference over awkward shapes. Medians are bit-exact (``torch.equal``): a median is an element of its window.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from ppfr import BackendUnavailableError, _ext
from ppfr.ops import blur
from ppfr.ops.blur import (
    HybridBlurParams,
    _gaussian_blur_op,
    _grid_geometry,
    _hybrid_blur_op,
    _median_blur_op,
    _pixelate_op,
    gaussian_blur,
    gaussian_blur_ref,
    hybrid_blur,
    hybrid_blur_ref,
    median_blur,
    median_blur_ref,
    pixelate,
    pixelate_ref,
    sample_hybrid_params,
)
from tests._tolerance import assert_close_to_ref as _assert_close_to_ref
from tests.conftest import triton_device

MEDIAN_CPU = ["torch", "cpp"]
SHAPES = [(1, 1, 1, 9), (3, 3, 23, 17), (1, 3, 112, 112), (3, 1, 6, 40)]
KS = [1, 3, 5, 7, 13, 19]

def _images(shape, dtype=torch.float32, lo=-1.0, hi=1.0) -> torch.Tensor:
    return (torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


# --------------------------------------------------------------------------------------- reference semantics
def _numpy_median(x: np.ndarray, k: int) -> np.ndarray:
    """kornia median_blur re-derived: zero padding of k//2, the middle of the sorted k*k window."""
    h = k // 2
    xp = np.pad(x, [(0, 0), (0, 0), (h, h), (h, h)])
    out = np.empty_like(x)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            win = np.sort(xp[:, :, i : i + k, j : j + k].reshape(x.shape[0], x.shape[1], -1), axis=-1)
            out[:, :, i, j] = win[..., (k * k - 1) // 2]
    return out


@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_median_reference_matches_independent_numpy(k):
    x = _images((2, 3, 7, 6), torch.float64)
    np.testing.assert_array_equal(median_blur_ref(x, k).numpy(), _numpy_median(x.numpy(), k))


def test_median_zero_padding_pulls_borders_to_zero():
    x = torch.ones(1, 1, 5, 5)
    out = median_blur_ref(x, 3)
    # corner windows hold 4 ones and 5 padding zeros -> 0; edge windows 6 ones, 3 zeros -> 1
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 2] == 1 and out[0, 0, 2, 2] == 1


def test_gaussian_kernel_is_torchvisions():
    k, sigma = 31, 5.0
    xs = np.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    pdf = np.exp(-0.5 * (xs / sigma) ** 2)
    np.testing.assert_allclose(blur.gaussian_kernel1d(k, sigma, torch.float64).numpy(), pdf / pdf.sum(), rtol=1e-14)


def test_gaussian_reference_matches_scipy_mirror_correlation():
    # torch "reflect" (no edge repeat) is scipy's "mirror"; the 2-D kernel is separable.
    x = _images((2, 3, 20, 17), torch.float64)
    k, sigma = 31, 3.0
    w = blur.gaussian_kernel1d(k, sigma, torch.float64).numpy()
    want = scipy.ndimage.correlate1d(x.numpy(), w, axis=2, mode="mirror")
    want = scipy.ndimage.correlate1d(want, w, axis=3, mode="mirror")
    np.testing.assert_allclose(gaussian_blur_ref(x, k, sigma).numpy(), want, atol=1e-13)


def _aa_bilinear_matrix(n: int, m: int) -> np.ndarray:
    """Antialiased bilinear resampling n -> m (PIL / torch antialias=True): a triangle filter stretched by the
    scale n/m when down-sampling, centred at (i + 0.5) * scale, taps normalised to sum 1."""
    scale = n / m
    support = scale if scale > 1 else 1.0
    d = np.zeros((m, n))
    for i in range(m):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n)
        js = np.arange(lo, hi)
        wts = np.maximum(0.0, 1.0 - np.abs((js - center + 0.5) / support))
        d[i, lo:hi] = wts / wts.sum()
    return d


@pytest.mark.parametrize("size,b", [((112, 112), 7), ((23, 17), 3), ((115, 115), 11)])
def test_pixelate_reference_matches_independent_numpy(size, b):
    x = _images((2, 3, *size), torch.float64)
    h, w = size
    small = np.einsum("ph,bchw,qw->bcpq", _aa_bilinear_matrix(h, h // b), x.numpy(), _aa_bilinear_matrix(w, w // b))
    ih = np.minimum(np.floor(np.arange(h) * ((h // b) / h)).astype(int), h // b - 1)  # torch "nearest"
    iw = np.minimum(np.floor(np.arange(w) * ((w // b) / w)).astype(int), w // b - 1)
    want = small[:, :, ih][:, :, :, iw]
    np.testing.assert_allclose(pixelate_ref(x, b).numpy(), want, atol=1e-12)


def test_pixelate_makes_blocks():
    x = _images((1, 3, 112, 112))
    out = pixelate(x, 7)
    blocks = out.reshape(1, 3, 16, 7, 16, 7)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))  # 112 // 7 = 16 constant 7x7 blocks


# ------------------------------------------------------------------------------------------ median backends
@pytest.mark.parametrize("backend", MEDIAN_CPU)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", KS)
def test_median_matches_reference_bit_exact(backend, shape, k):
    x = _images(shape)
    assert torch.equal(median_blur(x, k, backend=backend), median_blur_ref(x, k))
    x64 = _images(shape, torch.float64)
    out64 = median_blur(x64, k, backend=backend)
    assert out64.dtype == torch.float64 and torch.equal(out64, median_blur_ref(x64, k))


@pytest.mark.parametrize("backend", MEDIAN_CPU)
@pytest.mark.parametrize("k", [3, 7, 19])
def test_median_ties_constants_and_zeros(backend, k):
    shape = (3, 3, 23, 17)
    cases = [
        torch.randint(-2, 3, shape).float(),  # heavy ties, many exact zeros (ties with the padding)
        torch.full(shape, 0.7),
        torch.full(shape, -0.3),
        torch.zeros(shape),
        torch.where(torch.rand(shape) < 0.5, -0.0, 0.25),  # negative zeros next to padding zeros
        _images(shape, lo=-1e-30, hi=1e-30),  # denormals and tiny magnitudes around zero
        _images(shape, lo=-3e38, hi=3e38),  # huge magnitudes (finite)
    ]
    for x in cases:
        assert torch.equal(median_blur(x, k, backend=backend), median_blur_ref(x, k))


@pytest.mark.parametrize("backend", MEDIAN_CPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_median_half_types_are_exact(backend, dtype):
    x = _images((2, 3, 15, 11), dtype)
    out = median_blur(x, 5, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, median_blur_ref(x.float(), 5).to(dtype))


@pytest.mark.parametrize("backend", MEDIAN_CPU)
def test_median_non_contiguous_input(backend):
    x = _images((3, 3, 20, 24)).permute(0, 1, 3, 2)
    assert not x.is_contiguous()
    assert torch.equal(median_blur(x, 7, backend=backend), median_blur_ref(x, 7))


@pytest.mark.parametrize("nthreads", [1, 2, 3, 5])
@pytest.mark.parametrize("planes", [(1, 1), (2, 3)])
def test_median_cpp_thread_splits(nthreads, planes):
    # P < nthreads runs the row-parallel path (shared ranks, rows split), else the plane-parallel path.
    mod = _ext.cpu_module()
    if mod is None:
        pytest.skip(_ext.load("_C")[1])
    x = _images((*planes, 31, 29))
    out = torch.empty_like(x)
    mod.median_blur(x.data_ptr(), out.data_ptr(), *planes, 31, 29, 9, 0, False, nthreads)
    assert torch.equal(out, median_blur_ref(x, 9))


@pytest.mark.parametrize("backend", ["ref", "torch", "cpp"])
def test_median_mask_computes_only_selected_pixels(backend):
    # The hybrid blur asks for the median only on its median patches; elsewhere the op returns the input.
    x = _images((3, 3, 23, 17))
    mask = (torch.rand(3, 23, 17) < 0.4).to(torch.uint8)
    mask[1] = 0  # a whole image without median pixels
    want = torch.where(mask[:, None].bool(), median_blur_ref(x, 7), x)
    assert torch.equal(_median_blur_op(x, 7, mask, backend), want)


def test_median_is_not_differentiable():
    x = _images((1, 1, 6, 6)).requires_grad_(True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        median_blur(x, 3, backend="cpp").sum().backward()


# ---------------------------------------------------------------------------------------- Gaussian backends
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("shape,k,sigma", [((1, 1, 16, 16), 31, 5.0), ((3, 3, 23, 17), 15, 2.0),
                                           ((2, 3, 112, 112), 31, 7.3), ((3, 1, 9, 40), 3, 0.8),
                                           ((1, 3, 5, 5), 1, 1.0)])  # fmt: skip
def test_gaussian_matches_reference(backend, shape, k, sigma):
    x = _images(shape, torch.float64)
    ref64 = gaussian_blur_ref(x, k, sigma)
    _assert_close_to_ref(gaussian_blur(x, k, sigma, backend=backend), ref64, ref64)
    _assert_close_to_ref(
        gaussian_blur(x.float(), k, sigma, backend=backend), ref64, gaussian_blur_ref(x.float(), k, sigma)
    )


@pytest.mark.parametrize("backend", ["ref", "torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gaussian_half_types(backend, dtype):
    x = _images((2, 3, 20, 18), dtype)
    out = gaussian_blur(x, 31, 5.0, backend=backend)
    assert out.dtype == dtype
    ref64 = gaussian_blur_ref(x.double(), 31, 5.0)
    _assert_close_to_ref(out, ref64, ref64.to(dtype))


@pytest.mark.parametrize("backend", ["ref", "torch", "cpp"])
def test_gaussian_gradcheck_float64(backend):
    x = _images((2, 2, 9, 8), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 7, 1.5, backend=backend), (x,))
    if backend == "torch":  # the registered adjoint is itself differentiable
        small = _images((1, 1, 6, 5), torch.float64).requires_grad_(True)
        assert torch.autograd.gradgradcheck(lambda t: gaussian_blur(t, 5, 1.5, backend=backend), (small,))


# ----------------------------------------------------------------------------------------- pixelate backends
@pytest.mark.parametrize("shape,b", [((2, 3, 112, 112), 7), ((3, 1, 23, 17), 3), ((1, 3, 114, 114), 11),
                                     ((1, 1, 5, 9), 5), ((2, 3, 10, 10), 1)])  # fmt: skip
def test_pixelate_matches_reference(shape, b):
    x = _images(shape, torch.float64)
    ref64 = pixelate_ref(x, b)
    _assert_close_to_ref(pixelate(x, b, backend="torch"), ref64, ref64)
    _assert_close_to_ref(pixelate(x.float(), b), ref64, pixelate_ref(x.float(), b))
    assert torch.equal(pixelate(x, b, backend="ref"), ref64)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_pixelate_gradcheck_float64(backend):
    x = _images((2, 2, 11, 9), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: pixelate(t, 3, backend=backend), (x,))
    assert torch.autograd.gradgradcheck(lambda t: pixelate(t, 3, backend=backend), (x,))


# ---------------------------------------------------------------------------------------------- hybrid blur
def test_grid_geometry_matches_myblurway():
    assert _grid_geometry(112, 4) == (2, 56, 112)
    assert _grid_geometry(112, 9) == (3, 38, 114)  # pre-resize to 114
    assert _grid_geometry(112, 16) == (4, 28, 112)
    assert _grid_geometry(112, 25) == (5, 23, 115)  # pre-resize to 115


@pytest.mark.parametrize("n,split", [(4, (1, 1, 2)), (9, (3, 3, 3)), (16, (5, 5, 6)), (25, (8, 8, 9))])
@pytest.mark.parametrize("train", [True, False])
def test_patch_count_split_on_the_layout(n, split, train):
    g = torch.Generator().manual_seed(n)
    p = sample_hybrid_params(6, n, train=train, generator=g)
    kinds = p.kinds()
    assert kinds.shape == ((1, n) if train else (6, n))
    for row in kinds:
        assert tuple(torch.bincount(row, minlength=3).tolist()) == split
    # slot semantics: the first n//3 permutation entries are the median patches, etc.
    lay = p.layout if p.layout.dim() == 2 else p.layout[None]
    t = n // 3
    assert (kinds.gather(1, lay[:, :t]) == 0).all() and (kinds.gather(1, lay[:, t : 2 * t]) == 1).all()
    assert (kinds.gather(1, lay[:, 2 * t :]) == 2).all()


def test_test_mode_defaults_and_per_image_layouts():
    g = torch.Generator().manual_seed(5)
    p = sample_hybrid_params(8, train=False, generator=g)
    assert (p.n, p.median_k, p.sigma, p.pixel_b) == (16, 13, 5.0, 7)
    # the only draw at test time is one uniform permutation per image: argsort of a (B, n) uniform draw
    want = torch.rand((8, 16), generator=torch.Generator().manual_seed(5)).argsort(dim=1)
    assert torch.equal(p.layout, want)
    assert len({tuple(r.tolist()) for r in p.layout}) > 1


def test_training_draw_ranges_and_order():
    g = torch.Generator().manual_seed(0)
    draws = [sample_hybrid_params(4, generator=g) for _ in range(400)]
    assert {d.n for d in draws} == set(blur.HYBRID_NS)
    assert {d.median_k for d in draws} == set(blur.MEDIAN_KS)
    assert {d.pixel_b for d in draws} == set(range(3, 12))
    sig = torch.tensor([d.sigma for d in draws])
    assert sig.min() >= 2.0 and sig.max() < 8.0 and sig.std() > 1.2  # U(2, 8): std 1.73
    assert all(d.layout.shape == (d.n,) for d in draws)
    # documented draw order: n, k, sigma, b, layout from one CPU generator
    g1 = torch.Generator().manual_seed(3)
    d = sample_hybrid_params(2, generator=g1)
    g2 = torch.Generator().manual_seed(3)
    n = blur.HYBRID_NS[int(torch.randint(4, (1,), generator=g2))]
    k = blur.MEDIAN_KS[int(torch.randint(7, (1,), generator=g2))]
    sigma = 2.0 + 6.0 * float(torch.rand((1,), generator=g2, dtype=torch.float64))
    b = blur.PIXEL_BS[int(torch.randint(9, (1,), generator=g2))]
    assert (d.n, d.median_k, d.sigma, d.pixel_b) == (n, k, sigma, b)
    assert torch.equal(d.layout, torch.randperm(n, generator=g2))


def test_hybrid_reproducible_and_explicit_params_reproduce():
    x = _images((3, 3, 112, 112))
    out1, p1 = hybrid_blur(x, generator=torch.Generator().manual_seed(11))
    out2, p2 = hybrid_blur(x, generator=torch.Generator().manual_seed(11))
    assert p1.n == p2.n and torch.equal(out1, out2) and torch.equal(p1.layout, p2.layout)
    again, p3 = hybrid_blur(x, p1.n, median_k=p1.median_k, sigma=p1.sigma, pixel_b=p1.pixel_b, layout=p1.layout)
    assert torch.equal(again, out1)
    assert (p3.n, p3.median_k, p3.sigma, p3.pixel_b) == (p1.n, p1.median_k, p1.sigma, p1.pixel_b)
    outs = {hybrid_blur(x, generator=torch.Generator().manual_seed(s))[0].sum().item() for s in range(4)}
    assert len(outs) > 1  # different seeds, different blurs


def test_hybrid_never_touches_the_global_rng():
    x = _images((2, 3, 32, 32))
    state = torch.get_rng_state()
    hybrid_blur(x, generator=torch.Generator().manual_seed(0))
    hybrid_blur(x, train=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("n", [4, 9, 16, 25])
@pytest.mark.parametrize("train", [True, False])
def test_hybrid_matches_reference(backend, n, train):
    x = _images((2, 3, 112, 112))
    g = torch.Generator().manual_seed(100 + n)
    out, p = hybrid_blur(x, n, median_k=7, train=train, generator=g, backend=backend)
    ref = hybrid_blur_ref(x.double(), p)
    ref32 = hybrid_blur_ref(x, p)
    _assert_close_to_ref(out, ref, ref32)
    assert p.n == n and p.median_k == 7


@pytest.mark.parametrize("train", [True, False])
def test_hybrid_ref_backend_is_the_reference(train):
    x = _images((3, 3, 40, 40))
    out, p = hybrid_blur(x, 9, median_k=5, train=train, generator=torch.Generator().manual_seed(4), backend="ref")
    assert torch.equal(out, hybrid_blur_ref(x, p))


def test_hybrid_patches_are_exactly_the_three_blurs():
    # n = 16 on 112 x 112 needs no resize: every median patch is bit-identical to the whole-image median, etc.
    x = _images((4, 3, 112, 112))
    out, p = hybrid_blur(x, train=False, generator=torch.Generator().manual_seed(1), backend="cpp")
    med = median_blur(x, 13, backend="cpp")
    gau = gaussian_blur(x, 31, 5.0, backend="cpp")
    pix = pixelate(x, 7, backend="torch")
    kinds = p.kinds()
    for img in range(4):
        for pos in range(16):
            gi, gj = divmod(pos, 4)
            sl = (img, slice(None), slice(28 * gi, 28 * gi + 28), slice(28 * gj, 28 * gj + 28))
            assert torch.equal(out[sl], (med, gau, pix)[int(kinds[img, pos])][sl])


def test_hybrid_half_and_double_dtypes():
    x = _images((2, 3, 48, 48), torch.float64)
    out, p = hybrid_blur(x, 9, generator=torch.Generator().manual_seed(0), backend="cpp")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, hybrid_blur_ref(x, p), rtol=0, atol=1e-12)
    out16, _ = hybrid_blur(x.half(), 9, median_k=p.median_k, sigma=p.sigma, pixel_b=p.pixel_b, layout=p.layout)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.double(), hybrid_blur_ref(x.half().double(), p), rtol=0, atol=2e-3)


# -------------------------------------------------------------------------- registration, autograd, compile
def test_opcheck():
    x = _images((2, 3, 9, 8))
    mask = (torch.rand(2, 9, 8) < 0.5).to(torch.uint8)
    for be in ("torch", "cpp"):
        torch.library.opcheck(_median_blur_op, (x, 5, None, be))
        torch.library.opcheck(_median_blur_op, (x, 3, mask, be))
    for be in ("ref", "torch", "cpp"):
        torch.library.opcheck(_gaussian_blur_op, (x, 7, 1.3, be))
    for be in ("ref", "torch"):
        torch.library.opcheck(_pixelate_op, (x, 3, be))
    xs = _images((2, 3, 32, 32))
    lay = torch.stack([torch.randperm(9) for _ in range(2)])
    for be in ("torch", "cpp"):
        torch.library.opcheck(_hybrid_blur_op, (xs, lay, 9, 5, 2.5, 4, be))


def test_compiled_equals_eager():
    x = _images((2, 3, 24, 24))

    def fn(t):
        return median_blur(t, 5, backend="cpp") + gaussian_blur(t, 7, 2.0, backend="cpp") + pixelate(t, 3)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x), rtol=1e-6, atol=1e-6)


def test_auto_backends_on_cpu(monkeypatch):
    from ppfr import _backend

    monkeypatch.delenv("PPFR_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert _backend.resolve("median_blur", "auto", cpu, blur.MEDIAN_BACKENDS) == "cpp"
    assert _backend.resolve("gaussian_blur", "auto", cpu, blur.GAUSSIAN_BACKENDS) == "cpp"
    assert _backend.resolve("pixelate", "auto", cpu, blur.PIXELATE_BACKENDS) == "torch"


# ------------------------------------------------------------------------------------ errors at the boundary
def test_bad_inputs_are_rejected_with_clear_errors():
    x = _images((2, 3, 16, 16))
    with pytest.raises(ValueError, match="4-D"):
        median_blur(x[0], 3)
    with pytest.raises(TypeError, match="floating point"):
        median_blur(torch.zeros(1, 1, 4, 4, dtype=torch.int32), 3)
    for bad in (0, 4, -3):
        with pytest.raises(ValueError, match="odd int"):
            median_blur(x, bad)
    with pytest.raises(TypeError, match="int"):
        median_blur(x, 3.0)
    with pytest.raises(TypeError, match="bool"):
        median_blur(x, True)
    with pytest.raises(ValueError, match="reflect padding"):
        gaussian_blur(x, 33, 2.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, 5, 0.0)
    with pytest.raises(ValueError, match="block size"):
        pixelate(x, 17)
    with pytest.raises(ValueError, match="square"):
        hybrid_blur(_images((1, 3, 16, 20)))
    with pytest.raises(ValueError, match="perfect square"):
        hybrid_blur(x, 8)
    with pytest.raises(ValueError, match="permutation"):
        hybrid_blur(x, 4, layout=torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="layout must be"):
        hybrid_blur(x, 4, layout=torch.arange(9))
    with pytest.raises(TypeError, match="integer"):
        hybrid_blur(x, 4, layout=torch.arange(4.0))
    with pytest.raises(ValueError, match="larger than 15"):
        hybrid_blur(_images((1, 3, 12, 12)), 4)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        hybrid_blur(x, generator=42)
    with pytest.raises(ValueError, match="no 'cpp' implementation"):
        pixelate(x, 3, backend="cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        median_blur(x, 3, backend="metal")


def test_unavailable_backend_says_what_is_missing():
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
            median_blur(_images((1, 1, 8, 8)), 3, backend="cuda")


# ------------------------------------------------------------------------ Triton (interpreter on CPU) tier
@pytest.mark.interpret
@pytest.mark.parametrize("shape,k", [((1, 1, 5, 7), 9), ((2, 3, 9, 6), 3), ((3, 1, 7, 10), 5), ((1, 2, 6, 6), 1)])
def test_triton_median_bit_exact(shape, k):
    dev = triton_device()
    x = _images(shape)
    assert torch.equal(median_blur(x.to(dev), k, backend="triton").cpu(), median_blur_ref(x, k))
    ties = torch.randint(-2, 3, shape).float()
    ties[..., 0, :] = -0.0
    assert torch.equal(median_blur(ties.to(dev), k, backend="triton").cpu(), median_blur_ref(ties, k))


@pytest.mark.interpret
def test_triton_median_extremes_and_mask():
    dev = triton_device()
    x = torch.tensor([3e38, -3e38, 1e-40, -1e-40, 0.0, -0.0, 1.0, -1.0, 7.5, -7.5, 2.0, 0.5]).view(1, 1, 3, 4)
    assert torch.equal(median_blur(x.to(dev), 3, backend="triton").cpu(), median_blur_ref(x, 3))
    mask = torch.tensor([[[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]]], dtype=torch.uint8)
    want = torch.where(mask[:, None].bool(), median_blur_ref(x, 3), x)
    assert torch.equal(_median_blur_op(x.to(dev), 3, mask.to(dev), "triton").cpu(), want)


@pytest.mark.interpret
def test_triton_hybrid():
    # the smallest legal hybrid (16 x 16: the 31-tap Gaussian's reflect padding needs > 15 pixels)
    dev = triton_device()
    x = _images((1, 3, 16, 16))
    out, p = hybrid_blur(x.to(dev), 4, median_k=3, generator=torch.Generator().manual_seed(2), backend="triton")
    _assert_close_to_ref(out.cpu(), hybrid_blur_ref(x.double(), p), hybrid_blur_ref(x, p))
    med = p.kinds()[0].view(2, 2).repeat_interleave(8, 0).repeat_interleave(8, 1) == 0
    assert torch.equal(out.cpu()[..., med], median_blur_ref(x, 3)[..., med])  # median patches bit-exact


# ------------------------------------------------------------------------------------------------ GPU tier
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("k", [1, 3, 13, 19])
def test_gpu_median_bit_exact(backend, k):
    x = _images((3, 3, 112, 112))
    assert torch.equal(median_blur(x.cuda(), k, backend=backend).cpu(), median_blur_ref(x, k))
    mask = (torch.rand(3, 112, 112) < 0.3).to(torch.uint8)
    want = torch.where(mask[:, None].bool(), median_blur_ref(x, k), x)
    assert torch.equal(_median_blur_op(x.cuda(), k, mask.cuda(), backend).cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_gpu_hybrid(backend):
    x = _images((4, 3, 112, 112))
    for n in (9, 16):
        out, p = hybrid_blur(x.cuda(), n, generator=torch.Generator().manual_seed(n), backend=backend)
        _assert_close_to_ref(out.cpu(), hybrid_blur_ref(x.double(), p), hybrid_blur_ref(x, p))
