"""Every Triton kernel under the interpreter with the GPU's tiling forced (several tiles and chunks per plane).

The interpreter normally runs one tile per plane (kernels/_common.py), which leaves the GPU's code paths --
partial edge tiles, several chunks per plane, cross-program partial reductions, groups of channels/samples --
untested on a CPU. Here ``PPFR_TRITON_TILE`` / ``PPFR_TRITON_CHUNK`` force small tiles on small, awkward shapes
(sizes that are not multiples of the tile). Each result is compared with the reference (bit-exact for the index
and permutation ops) and, for per-element arithmetic, bit-exact with the kernel's own one-tile result.
"""

from __future__ import annotations

import math

import pytest
import torch

import ppfr
from ppfr.ops.block_shuffle import (
    block_channel_shuffle, block_channel_shuffle_ref, block_grid, block_perm_table, dequantize, dequantize_ref,
    quantize, quantize_ref,
)  # fmt: skip
from ppfr.ops.blur import median_blur, median_blur_ref
from ppfr.ops.feature_mask_fuse import (
    feature_mask_fuse, feature_mask_fuse_ref, feature_mask_fuse_residual, feature_mask_fuse_residual_ref, resize_roi,
)  # fmt: skip
from ppfr.ops.freq import freq_decode_ref, freq_encode_ref
from ppfr.ops.roi_mask import face_like_landmarks, roi_mask, roi_mask_ref
from tests._tolerance import assert_close_to_ref
from tests.conftest import triton_device

pytest.importorskip("triton")
pytestmark = pytest.mark.interpret


@pytest.fixture
def tiled(monkeypatch):
    """Call fn() with the small GPU-style tiling forced: (forced result, default-tiling result)."""

    def run(fn, tile: str = "4x8", chunk: str = "4"):
        monkeypatch.delenv("PPFR_TRITON_TILE", raising=False)
        monkeypatch.delenv("PPFR_TRITON_CHUNK", raising=False)
        default = fn()
        monkeypatch.setenv("PPFR_TRITON_TILE", tile)
        monkeypatch.setenv("PPFR_TRITON_CHUNK", chunk)
        try:
            return fn(), default
        finally:
            monkeypatch.delenv("PPFR_TRITON_TILE")
            monkeypatch.delenv("PPFR_TRITON_CHUNK")

    return run


def _cpu(t):
    return tuple(x.cpu() for x in t) if isinstance(t, tuple) else t.cpu()


def test_overrides_are_validated(monkeypatch):
    from ppfr.kernels import _common

    monkeypatch.setenv("PPFR_TRITON_TILE", "4x6")
    with pytest.raises(ValueError, match="PPFR_TRITON_TILE='4x6': expected a power of two"):
        _common.tile(10, 10)
    monkeypatch.setenv("PPFR_TRITON_TILE", "4x8")
    assert _common.tile(100, 100) == (4, 8)
    monkeypatch.setenv("PPFR_TRITON_CHUNK", "1")
    with pytest.raises(ValueError, match="PPFR_TRITON_CHUNK='1'"):
        _common.chunk(100)
    monkeypatch.setenv("PPFR_TRITON_CHUNK", "16")
    assert _common.chunk(1000) == 16 and _common.group(50, gpu=32) == 16


def test_freq_encode_several_tiles_and_channel_groups(tiled):
    dev = triton_device()
    x = torch.rand(1, 3, 6, 11, dtype=torch.float64) * 2 - 1  # 2 x 2 tiles of 4 x 8, partial at both edges
    ch = torch.stack([torch.randperm(192)[:6] for _ in range(1)])  # 6 channels: groups of 4 and 2
    got, one_tile = tiled(lambda: ppfr.freq_encode(x.float().to(dev), ch.to(dev), backend="triton").cpu())
    assert torch.equal(got, one_tile)
    assert_close_to_ref(got, freq_encode_ref(x, ch), freq_encode_ref(x.float(), ch))


def test_freq_decode_and_hflip_several_tiles(tiled):
    dev = triton_device()
    full = freq_encode_ref(torch.rand(1, 3, 6, 11, dtype=torch.float64) * 2 - 1)
    sel = torch.stack([torch.randperm(192)[:40] for _ in range(1)])
    part = torch.stack([full[i, sel[i]] for i in range(1)])
    perm = torch.stack([torch.randperm(192) for _ in range(1)])
    def decode():
        return ppfr.freq_decode(part.float().to(dev), sel.to(dev), perm.to(dev), backend="triton").cpu()

    got, one_tile = tiled(decode)
    assert torch.equal(got, one_tile)
    assert_close_to_ref(got, freq_decode_ref(part, sel, perm), freq_decode_ref(part.float(), sel, perm))
    f = torch.randn(2, 3, 7, 11)
    ch = torch.tensor([[5, 64, 191], [8, 9, 130]])
    got, _ = tiled(lambda: ppfr.freq_hflip(f.to(dev), ch.to(dev), backend="triton").cpu())
    assert torch.equal(got, ppfr.freq_hflip(f, ch, backend="torch"))


def test_block_shuffle_and_quantize_several_tiles_and_chunks(tiled):
    dev = triton_device()
    x = torch.randn(1, 3, 5, 9)
    perm = block_perm_table(3, 3, math.prod(block_grid(5, 9, (3, 2))))
    got, _ = tiled(lambda: block_channel_shuffle(x.to(dev), perm.to(dev), (3, 2), backend="triton").cpu())
    assert torch.equal(got, block_channel_shuffle_ref(x, perm, (3, 2)))
    for bits in (8, 4):  # 45 values: 12 chunks of 4 values (8-bit) / 6 chunks of 4 bytes (4-bit), partial tails
        (wire, scales), _ = tiled(lambda: _cpu(quantize(x.to(dev), bits, backend="triton")))
        w0, s0 = quantize_ref(x, bits)
        assert torch.equal(wire, w0) and torch.equal(scales, s0)
        got, _ = tiled(lambda: dequantize(w0.to(dev), s0.to(dev), bits, (5, 9), backend="triton").cpu())
        assert torch.equal(got, dequantize_ref(w0, s0, bits, (5, 9)))


def test_median_blur_several_tiles(tiled):
    dev = triton_device()
    x = torch.randn(1, 1, 9, 11)  # 3 x 2 tiles of 4 x 8
    got, _ = tiled(lambda: median_blur(x.to(dev), 3, backend="triton").cpu())
    assert torch.equal(got, median_blur_ref(x, 3))


def test_roi_mask_several_tiles(tiled):
    dev = triton_device()
    lm = face_like_landmarks(2, 20, generator=torch.Generator().manual_seed(3)).double()
    got, _ = tiled(lambda: roi_mask(lm.to(dev), (20, 19), dtype=torch.bool, backend="triton").cpu(), tile="8x8")
    assert torch.equal(got, roi_mask_ref(lm, (20, 19)).bool())


@pytest.mark.parametrize("with_roi", [True, False], ids=["roi", "no-roi"])
def test_duet_mask_fuse_many_chunks(tiled, with_roi):
    # 13 x 11 = 143 pixels in chunks of 4: 36 chunks, so the partial (min, max) reduction takes two PBLOCK steps.
    dev = triton_device()
    h = torch.randn(1, 2, 13, 11)
    z = torch.randn(1, 3, 13, 11)
    w = torch.tensor(0.7)
    z[..., -1, -2:] = torch.tensor([-6.0, 6.0])  # the extremes lie in the last chunk: every partial counts
    roi = (torch.rand(1, 1, 26, 22) > 0.3).float() if with_roi else None
    if roi is not None:
        roi[..., -2:, -4:] = 1.0
    g = torch.randn(1, 2, 13, 11)

    def run():
        ins = [t.to(dev).requires_grad_(True) for t in (h, z, w)]
        out = feature_mask_fuse(*ins, roi.to(dev) if with_roi else None, backend="triton")
        return (out.detach().cpu(), *(t.cpu() for t in torch.autograd.grad(out, ins, g.to(dev))))

    (out, gh, gz, gw), (out1, gh1, gz1, _) = tiled(run)
    assert torch.equal(out, out1) and torch.equal(gh, gh1) and torch.equal(gz, gz1)  # per-element arithmetic
    ins = [t.clone().requires_grad_(True) for t in (h, z, w)]
    ref = feature_mask_fuse_ref(*ins, resize_roi(roi, (13, 11)) if with_roi else None)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    for a, e in zip((gh, gz, gw), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_residual_fuse_backward_sample_groups(tiled):
    # B = 6 samples in groups of 4 (a full and a partial group), 3*5*6 = 90 elements in chunks of 4.
    dev = triton_device()
    h, a = torch.randn(6, 3, 5, 6), torch.randn(6, 3, 5, 6)
    k = torch.randn(3, 5, 6)
    g = torch.randn(6, 3, 5, 6)

    def run():
        ins = [t.to(dev).requires_grad_(True) for t in (h, a, k)]
        out = feature_mask_fuse_residual(*ins, backend="triton")
        return (out.detach().cpu(), *(t.cpu() for t in torch.autograd.grad(out, ins, g.to(dev))))

    (out, gh, ga, gk), (out1, gh1, ga1, _) = tiled(run)
    assert torch.equal(out, out1) and torch.equal(gh, gh1) and torch.equal(ga, ga1)
    ins = [t.clone().requires_grad_(True) for t in (h, a, k)]
    ref = feature_mask_fuse_residual_ref(*ins)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    for x, e in zip((gh, ga, gk), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(x, e, rtol=1e-5, atol=1e-5)
