"""Tests of the block-DCT frequency transform ops (ppfr/ops/freq.py, csrc/freq*.cpp|cu, kernels/freq.py).

Every backend is compared with the literal reference (which itself is checked against an independent
numpy/scipy implementation of METHODS.md §2.1), over awkward shapes and dtypes. Index semantics (channel
selection, permutation, flip) are checked bit-exact where the arithmetic is the same.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

import ppfr
from ppfr import BackendUnavailableError
from ppfr.nn import FreqDecode, FreqEncode
from ppfr.ops import _freq_tables as T
from ppfr.ops.freq import _freq_decode_op, _freq_encode_op, _freq_hflip_op, freq_decode_ref, freq_encode_ref
from tests._tolerance import assert_close_to_ref as _assert_close_to_ref
from tests.conftest import triton_device

CPU_BACKENDS = ["torch", "cpp"]
SIZES = [(112, 112), (13, 9)]
BATCHES = [1, 3, 7]

def _images(b: int, h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    return (torch.rand(b, 3, h, w, dtype=torch.float64) * 2 - 1).to(dtype)


# ------------------------------------------------------------------------------------------------ the math
def test_dct_matrix_matches_scipy_on_single_blocks():
    rng = np.random.default_rng(0)
    c = T.dct_matrix()
    for _ in range(5):
        block = rng.uniform(-128, 127, size=(8, 8))
        np.testing.assert_allclose(c @ block @ c.T, scipy.fft.dctn(block, norm="ortho"), atol=1e-10)


def _numpy_encode(x: np.ndarray) -> np.ndarray:
    """Independent re-derivation of §2.1 with numpy + scipy (explicit align_corners up-sampling)."""
    b, _, h, w = x.shape

    def up_axis(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        pos = np.arange(8 * n) * (n - 1) / (8 * n - 1)
        i0 = np.minimum(np.floor(pos).astype(int), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        frac = (pos - i0).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
        return np.take(a, i0, axis=axis) * (1 - frac) + np.take(a, i1, axis=axis) * frac

    up = up_axis(up_axis(x * 0.5 + 0.5, 2), 3) * 255
    r, g, bl = up[:, 0], up[:, 1], up[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl - 128
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
    out = np.zeros((b, 192, h, w))
    for ci, plane in enumerate((y, cb, cr)):
        for i in range(h):
            for j in range(w):
                d = scipy.fft.dctn(plane[:, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8], axes=(1, 2), norm="ortho")
                out[:, 64 * ci : 64 * ci + 64, i, j] = d.reshape(b, 64)  # raster k = 8u + v
    return out


def test_literal_reference_matches_independent_numpy_scipy():
    x = _images(2, 4, 3)
    np.testing.assert_allclose(freq_encode_ref(x).numpy(), _numpy_encode(x.numpy()), atol=1e-9)


@pytest.mark.parametrize("n", [2, 3, 9, 112, 113])
def test_banded_tables_are_exact_and_narrow(n):
    m, p = T.dense_operators(n)
    tab = T.banded_operators(n)  # raises if the band does not reproduce the dense operator
    assert tab["enc_w"].shape == (8, 3, n) and tab["dec_w"].shape == (8, 2, n)
    assert ((np.abs(m).max(0) > 0).sum(1) <= 3).all() and ((np.abs(p).max(0) > 0).sum(1) <= 2).all()
    assert tab["enc_idx"].min() >= 0 and tab["enc_idx"].max() < n


def test_channel_layout_colour_major_raster():
    # A constant image only has DC energy: channel 64c + 0. Y-DC = 8 * (255 * 0.5 * (x+1) - 128).
    x = torch.full((1, 3, 4, 4), 0.2, dtype=torch.float64)
    f = freq_encode_ref(x)
    assert torch.allclose(f[0, 0], torch.full((4, 4), 8 * (127.5 * 1.2 - 128), dtype=torch.float64))
    assert f[0, 1:].abs().max() < 1e-9
    # A horizontal ramp puts energy in v (k = 8u + v with v horizontal): channel 1 (u=0, v=1), not 8.
    ramp = torch.linspace(-1, 1, 16, dtype=torch.float64).expand(1, 3, 16, 16).contiguous()
    g = freq_encode_ref(ramp).abs().mean(dim=(0, 2, 3))
    assert g[1] > 100 * g[8]


# ------------------------------------------------------------------------------------- encode, backends
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("b", BATCHES)
def test_encode_matches_reference(backend, size, b):
    x = _images(b, *size)
    ref64 = freq_encode_ref(x)
    ref32 = freq_encode_ref(x.float())
    _assert_close_to_ref(ppfr.freq_encode(x.float(), backend=backend), ref64, ref32)
    out64 = ppfr.freq_encode(x, backend=backend)
    assert out64.dtype == torch.float64
    _assert_close_to_ref(out64, ref64, ref64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encode_half_types(backend, dtype):
    x = _images(2, 16, 12)
    out = ppfr.freq_encode(x.to(dtype), backend=backend)
    assert out.dtype == dtype
    ref64 = freq_encode_ref(x.to(dtype).double())  # same (rounded) input
    _assert_close_to_ref(out, ref64, ref64.to(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encode_non_contiguous_input(backend):
    x = _images(3, 20, 24).permute(0, 1, 3, 2)  # (3,3,24,20) non-contiguous
    assert not x.is_contiguous()
    _assert_close_to_ref(ppfr.freq_encode(x, backend=backend), freq_encode_ref(x), freq_encode_ref(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channel_selection_equals_gathering_full_encode(backend):
    x = _images(5, 17, 11).float()
    full = ppfr.freq_encode(x, backend=backend)
    ch1 = torch.tensor([191, 0, 64, 9, 9, 130])  # any order, repeats allowed
    ch2 = torch.stack([torch.randperm(192)[:27] for _ in range(5)])  # per-sample (PartialFace ranks)
    sel1 = ppfr.freq_encode(x, ch1, backend=backend)
    sel2 = ppfr.freq_encode(x, ch2, backend=backend)
    want1 = full[:, ch1]
    want2 = torch.stack([full[i, ch2[i]] for i in range(5)])
    if backend == "torch":  # different matmul groupings: equal up to float rounding
        torch.testing.assert_close(sel1, want1, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(sel2, want2, rtol=1e-5, atol=1e-3)
    else:  # the kernel computes a channel the same way whatever else is asked for: bit-exact
        assert torch.equal(sel1, want1) and torch.equal(sel2, want2)
    assert torch.equal(ppfr.freq_encode(x, ch1.tolist(), backend=backend), sel1)  # list == tensor


# ------------------------------------------------------------------------------------- decode, backends
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("b", BATCHES)
def test_decode_matches_reference(backend, size, b):
    f = freq_encode_ref(_images(b, *size))
    ref64 = freq_decode_ref(f)
    ref32 = freq_decode_ref(f.float())
    _assert_close_to_ref(ppfr.freq_decode(f.float(), backend=backend), ref64, ref32)
    _assert_close_to_ref(ppfr.freq_decode(f, backend=backend), ref64, ref64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_partial_channels_and_fused_permutation(backend):
    b, h, w = 3, 12, 10
    full = freq_encode_ref(_images(b, h, w)).float()
    sel = torch.stack([torch.randperm(192)[:54] for _ in range(b)])
    part = torch.stack([full[i, sel[i]] for i in range(b)])
    perm = torch.stack([torch.randperm(192) for _ in range(b)])
    # explicit semantics: scatter into zeros, gather by perm, decode
    zero_filled = torch.zeros_like(full)
    for i in range(b):
        zero_filled[i, sel[i]] = part[i]
    shuffled = torch.stack([zero_filled[i, perm[i]] for i in range(b)])
    want = ppfr.freq_decode(shuffled, backend=backend)
    got = ppfr.freq_decode(part, sel, perm, backend=backend)
    if backend == "torch":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, want)  # the fused shuffle is pure indexing: bit-exact
    _assert_close_to_ref(got.double(), freq_decode_ref(part.double(), sel, perm), freq_decode_ref(part, sel, perm))
    # a shared (192,) permutation and 1-D channels broadcast over the batch
    got1 = ppfr.freq_decode(full[:, :100], torch.arange(100), perm[0], backend=backend)
    torch.testing.assert_close(got1, freq_decode_ref(full[:, :100], torch.arange(100), perm[0]), rtol=0, atol=1e-5)


def test_references_keep_float32_under_autocast():
    """Inside bf16 autocast the references stay literal in their input dtype (as the fused backends do): a
    PartialFace payload built by the `ref` backend must still be the float32 its spec declares."""
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    want_e = freq_encode_ref(x, [0, 5, 191])
    want_d = freq_decode_ref(want_e, [0, 5, 191])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = freq_encode_ref(x, [0, 5, 191])
        d = freq_decode_ref(e, [0, 5, 191])
    assert e.dtype == d.dtype == torch.float32
    assert torch.equal(e, want_e) and torch.equal(d, want_d)


def test_roundtrip_error_matches_spec():
    # METHODS §2.3: d(e(X)) is not the identity; RMSE ~1e-4 on smooth images, ~0.027 on white noise ([0,1]).
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 112), torch.linspace(0, 1, 112), indexing="ij")
    smooth = torch.stack([torch.sin(2 * math.pi * xx) * 0.5, torch.cos(3 * yy) * 0.5, xx * yy - 0.5])[None]
    noise = torch.rand(4, 3, 112, 112) * 2 - 1
    for img, lo, hi in ((smooth.double(), 0.0, 5e-4), (noise.double(), 0.015, 0.04)):
        rec = ppfr.freq_decode(ppfr.freq_encode(img, backend="cpp"), backend="cpp")
        rmse = (rec - (img * 0.5 + 0.5)).pow(2).mean().sqrt().item()
        assert lo <= rmse <= hi, rmse


# ---------------------------------------------------------------------------------------------- hflip
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_hflip_identity(backend):
    x = _images(3, 14, 10)
    f = freq_encode_ref(x)
    torch.testing.assert_close(ppfr.freq_hflip(f, backend=backend), freq_encode_ref(x.flip(-1)), rtol=0, atol=1e-9)
    ch = torch.stack([torch.randperm(192)[:27] for _ in range(3)])
    sub = torch.stack([f[i, ch[i]] for i in range(3)])
    flipped = ppfr.freq_hflip(sub, ch, backend=backend)
    assert torch.equal(flipped, torch.stack([ppfr.freq_hflip(f, backend=backend)[i, ch[i]] for i in range(3)]))
    assert torch.equal(ppfr.freq_hflip(flipped, ch, backend=backend), sub)  # involution, bit-exact


# -------------------------------------------------------------------------- registration, autograd, compile
def test_opcheck():
    x = _images(2, 6, 5).float()
    ch = torch.tensor([[0, 5, 100], [191, 64, 3]])
    for be in ("torch", "cpp"):
        torch.library.opcheck(_freq_encode_op, (x, ch, be))
        torch.library.opcheck(_freq_encode_op, (x, None, be))
        f = freq_encode_ref(x)
        src = torch.arange(192).expand(2, 192).contiguous()
        torch.library.opcheck(_freq_decode_op, (f, src, be))
        torch.library.opcheck(_freq_hflip_op, (f, None, be))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    x = _images(2, 5, 4).requires_grad_(True)
    ch = torch.tensor([[0, 9, 70, 150], [1, 64, 128, 191]])
    assert torch.autograd.gradcheck(lambda t: ppfr.freq_encode(t, ch, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: ppfr.freq_encode(t, backend=backend), (x,))
    # decode: inputs away from the clamp (coefficients of images in [-0.5, 0.5] decode inside (0, 1))
    sel = torch.stack([torch.randperm(192)[:60] for _ in range(2)])
    f = freq_encode_ref(_images(2, 5, 4) * 0.5)
    part = torch.stack([f[i, sel[i]] for i in range(2)]).requires_grad_(True)
    perm = torch.stack([torch.randperm(192) for _ in range(2)])
    assert torch.autograd.gradcheck(lambda t: ppfr.freq_decode(t, sel, perm, backend=backend), (part,))
    g = f.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ppfr.freq_hflip(t, backend=backend), (g,))


def test_gradients_agree_with_reference_autograd():
    x = _images(2, 9, 7)
    ch = torch.tensor([3, 77, 140])
    w = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    x1 = x.clone().requires_grad_(True)
    (freq_encode_ref(x1, ch) * w).sum().backward()
    x2 = x.clone().requires_grad_(True)
    (ppfr.freq_encode(x2, ch, backend="cpp") * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-9, atol=1e-9)


def test_compiled_equals_eager():
    x = _images(2, 16, 16).float()
    ch = torch.tensor([0, 1, 8, 64, 130])

    def fn(t):
        f = ppfr.freq_encode(t, ch, backend="cpp")
        return ppfr.freq_decode(f, ch, backend="cpp") + f.mean()

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x), rtol=1e-6, atol=1e-6)


def test_module_equals_functional():
    x = _images(2, 10, 10).float()
    enc = FreqEncode(channels=[0, 5, 70], backend="cpp")
    assert torch.equal(enc(x), ppfr.freq_encode(x, [0, 5, 70], backend="cpp"))
    f = ppfr.freq_encode(x)
    assert torch.equal(FreqDecode(backend="cpp")(f), ppfr.freq_decode(f, backend="cpp"))


# ------------------------------------------------------------------------------------ errors at the boundary
def test_bad_inputs_are_rejected_with_clear_errors():
    x = _images(2, 8, 8).float()
    with pytest.raises(ValueError, match="4-D"):
        ppfr.freq_encode(x[0])
    with pytest.raises(ValueError, match="3 channels"):
        ppfr.freq_encode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(TypeError, match="floating point"):
        ppfr.freq_encode(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 192\)"):
        ppfr.freq_encode(x, [0, 192])
    with pytest.raises(ValueError, match="B=2"):
        ppfr.freq_encode(x, torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        ppfr.freq_encode(x, torch.zeros(4))
    f = ppfr.freq_encode(x)
    with pytest.raises(ValueError, match="pass `channels`"):
        ppfr.freq_decode(f[:, :10])
    with pytest.raises(ValueError, match="repeat"):
        ppfr.freq_decode(f[:, :2], [3, 3])
    with pytest.raises(ValueError, match="permutation"):
        ppfr.freq_decode(f, perm=torch.zeros(192, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown backend"):
        ppfr.freq_encode(x, backend="metal")
    with pytest.raises(ValueError, match="no 'ref' implementation"):
        ppfr.freq_hflip(f, backend="ref")


def test_unavailable_backend_says_what_is_missing():
    x = _images(1, 8, 8).float()
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
            ppfr.freq_encode(x, backend="cuda")


def test_env_override(monkeypatch):
    from ppfr import _backend

    monkeypatch.setenv("PPFR_BACKEND", "torch")
    assert _backend.resolve("freq_encode", "auto", torch.device("cpu"), ppfr.ops.freq.ENCODE_BACKENDS) == "torch"
    # an explicit choice wins over the environment
    assert _backend.resolve("freq_encode", "cpp", torch.device("cpu"), ppfr.ops.freq.ENCODE_BACKENDS) == "cpp"
    monkeypatch.setenv("PPFR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PPFR_BACKEND"):
        ppfr.freq_encode(torch.zeros(1, 3, 4, 4))


def test_auto_prefers_cpp_on_cpu(monkeypatch):
    from ppfr import _backend

    monkeypatch.delenv("PPFR_BACKEND", raising=False)
    assert _backend.resolve("freq_encode", "auto", torch.device("cpu"), ppfr.ops.freq.ENCODE_BACKENDS) == "cpp"


# ------------------------------------------------------------------------ Triton (interpreter on CPU) tier
@pytest.mark.interpret
@pytest.mark.parametrize("size,b", [((112, 112), 1), ((13, 9), 3)])
def test_triton_encode(size, b):
    dev = triton_device()
    x = _images(b, *size)
    ch = torch.stack([torch.randperm(192)[:6] for _ in range(b)])
    out = ppfr.freq_encode(x.float().to(dev), ch.to(dev), backend="triton").cpu()
    _assert_close_to_ref(out, freq_encode_ref(x, ch), freq_encode_ref(x.float(), ch))
    # bit-exact index semantics against the kernel's own full encode on the small size
    if size == (13, 9):
        full = ppfr.freq_encode(x.float().to(dev), backend="triton").cpu()
        assert torch.equal(out, torch.stack([full[i, ch[i]] for i in range(b)]))


@pytest.mark.interpret
@pytest.mark.parametrize("size,b", [((112, 112), 1), ((13, 9), 2)])
def test_triton_decode_with_partial_channels_and_perm(size, b):
    dev = triton_device()
    full = freq_encode_ref(_images(b, *size))
    sel = torch.stack([torch.randperm(192)[:60] for _ in range(b)])
    part = torch.stack([full[i, sel[i]] for i in range(b)])
    perm = torch.stack([torch.randperm(192) for _ in range(b)])
    out = ppfr.freq_decode(part.float().to(dev), sel.to(dev), perm.to(dev), backend="triton").cpu()
    _assert_close_to_ref(out, freq_decode_ref(part, sel, perm), freq_decode_ref(part.float(), sel, perm))


@pytest.mark.interpret
def test_triton_hflip():
    dev = triton_device()
    f = torch.randn(2, 192, 7, 5)
    assert torch.equal(ppfr.freq_hflip(f.to(dev), backend="triton").cpu(), ppfr.freq_hflip(f, backend="torch"))


# ------------------------------------------------------------------------------------------------ GPU tier
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_gpu_backends(backend):
    x = _images(7, 112, 112)
    ch = torch.stack([torch.randperm(192)[:27] for _ in range(7)])
    out = ppfr.freq_encode(x.float().cuda(), ch.cuda(), backend=backend).cpu()
    _assert_close_to_ref(out, freq_encode_ref(x, ch), freq_encode_ref(x.float(), ch))
    f = freq_encode_ref(x)
    d = ppfr.freq_decode(f.float().cuda(), backend=backend).cpu()
    _assert_close_to_ref(d, freq_decode_ref(f), freq_decode_ref(f.float()))
