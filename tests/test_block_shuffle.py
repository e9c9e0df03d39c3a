"""Tests of PRO-Face C feature protection ops (ppfr/ops/block_shuffle.py): shuffle, prune, quantize, fused paths."""

from __future__ import annotations

import math

import pytest
import torch

from ppfr.ops.block_shuffle import (
    _block_shuffle_op, _dequantize_op, _quantize_op, block_channel_shuffle, block_channel_shuffle_ref, block_grid,
    block_perm_table, dequantize, dequantize_ref, dequantize_unshuffle, pack_codes, prune, prune_ref, quantize,
    quantize_ref, shuffle_quantize, unpack_codes,
)  # fmt: skip
from tests.conftest import triton_device

CPU = ["torch", "cpp"]
SHAPES = [((2, 64, 56, 56), 2), ((3, 5, 11, 9), (3, 2)), ((1, 3, 7, 7), 1), ((2, 4, 5, 6), 28), ((7, 8, 56, 56), 28)]


def _perm(c, h, w, block, key=7):
    return block_perm_table(key, c, math.prod(block_grid(h, w, block)))


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shuffle_bit_exact_and_invertible(backend, shape, block, dtype):
    x = torch.randn(shape, dtype=dtype)
    perm = _perm(shape[1], shape[2], shape[3], block)
    y = block_channel_shuffle(x, perm, block, backend=backend)
    assert torch.equal(y, block_channel_shuffle_ref(x, perm, block))
    assert torch.equal(block_channel_shuffle(y, perm, block, inverse=True, backend=backend), x)


def test_shuffle_semantics_by_hand():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    perm = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]])  # 2x2 grid of 2x2 blocks
    y = block_channel_shuffle(x, perm, 2, backend="cpp")
    assert torch.equal(y[0, 0, :2, :2], x[0, 1, :2, :2]) and torch.equal(y[0, 1, :2, :2], x[0, 0, :2, :2])
    assert torch.equal(y[0, :, :2, 2:], x[0, :, :2, 2:]) and torch.equal(y[0, 0, 2:, 2:], x[0, 1, 2:, 2:])


def test_profacec_reference_grid_uses_four_permutations():
    # The public code passes 28 as the block size for the 64@56x56 map: a 2x2 grid, 4 permutations (METHODS §6.3).
    assert block_grid(56, 56, 28) == (2, 2)
    assert block_grid(56, 56, 2) == (28, 28)  # the intended layout: 784 blocks of 2x2 pixels


def test_half_and_noncontiguous():
    x = torch.randn(2, 6, 8, 10).transpose(2, 3)
    perm = _perm(6, 10, 8, 3)
    for be in CPU:
        assert torch.equal(block_channel_shuffle(x, perm, 3, backend=be), block_channel_shuffle_ref(x, perm, 3))
        xh = x.half()
        assert torch.equal(block_channel_shuffle(xh, perm, 3, backend=be), block_channel_shuffle_ref(xh, perm, 3))


@pytest.mark.parametrize("backend", CPU)
def test_shuffle_gradcheck(backend):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    perm = _perm(3, 5, 4, 2)
    assert torch.autograd.gradcheck(lambda t: block_channel_shuffle(t, perm, 2, backend=backend), (x,))


def test_opcheck():
    x = torch.randn(2, 4, 6, 6)
    perm = _perm(4, 6, 6, 2)
    for be in CPU:
        torch.library.opcheck(_block_shuffle_op, (x, perm, 2, 2, be))
        torch.library.opcheck(_quantize_op, (x, 4, be), test_utils=("test_schema", "test_faketensor"))
        wire, scales = quantize_ref(x, 8)
        torch.library.opcheck(_dequantize_op, (wire, scales, 8, 6, 6, be), test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(3, 5, 11, 9), (1, 64, 56, 56), (2, 1, 1, 3)])
def test_quantize_bit_exact_and_error_bound(backend, bits, shape):
    x = torch.randn(shape) * torch.rand(shape[0], shape[1], 1, 1) * 10
    wire, scales = quantize(x, bits, backend=backend)
    w0, s0 = quantize_ref(x, bits)
    assert torch.equal(wire, w0) and torch.equal(scales, s0)
    n = shape[2] * shape[3]
    assert wire.shape == (shape[0], shape[1], n if bits == 8 else (n + 1) // 2) and wire.dtype == torch.uint8
    back = dequantize(wire, scales, bits, shape[2:], backend=backend)
    assert torch.equal(back, dequantize_ref(w0, s0, bits, shape[2:]))
    assert ((back - x).abs() <= scales[..., None, None] / 2 * (1 + 1e-5)).all()


def test_rounding_is_half_even_and_zero_channels_are_safe():
    x = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.49, 0.5, 1.5]).reshape(1, 1, 1, 8)
    for be in CPU:
        wire, scales = quantize(x, 8, backend=be)
        assert scales.item() == 1.0
        assert unpack_codes(wire, 8, 8).flatten().tolist() == [127, 2, 4, -2, -4, 0, 0, 2]
        z = torch.zeros(2, 3, 4, 4)
        w, s = quantize(z, 4, backend=be)
        assert torch.equal(s, torch.ones(2, 3)) and torch.equal(dequantize(w, s, 4, (4, 4), backend=be), z)


def test_int4_packing_layout():
    codes = torch.tensor([[[1, -1, 7, -7, 3]]], dtype=torch.int8)
    wire = pack_codes(codes, 4)
    assert wire.tolist() == [[[0xF1, 0x97, 0x03]]]  # low nibble = even index; odd length padded
    assert torch.equal(unpack_codes(wire, 5, 4), codes)


# -------------------------------------------------------------------------------------------------- prune
@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.999, 1.0])
def test_prune_bit_exact(backend, keep):
    x = torch.randn(4, 8, 7, 5)
    y = prune(x, keep, backend=backend)
    assert torch.equal(y, prune_ref(x, keep))
    k = math.ceil(keep * x[0].numel())
    assert ((y != 0).reshape(4, -1).sum(1) == k).all()  # continuous values: no ties, exactly k kept


def test_prune_keeps_ties_and_masks_gradient():
    x = torch.tensor([[3.0, -3.0, 1.0, 0.5]])
    for be in CPU:
        assert prune(x, 0.25, backend=be).tolist() == [[3.0, -3.0, 0.0, 0.0]]  # tie at threshold kept
    t = x.clone().requires_grad_(True)
    prune(t, 0.5, backend="cpp").sum().backward()
    assert t.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]


# -------------------------------------------------------------------------------------------- fused paths
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_fused_paths_equal_composition(bits, keep):
    x = torch.randn(3, 64, 56, 56)
    perm = _perm(64, 56, 56, 2)
    want_wire, want_scales = quantize_ref(block_channel_shuffle_ref(prune_ref(x, keep), perm, 2), bits)
    for be in CPU:
        p = shuffle_quantize(x, perm, 2, bits, keep, backend=be)
        assert torch.equal(p.wire, want_wire) and torch.equal(p.scales, want_scales)
        back = dequantize_unshuffle(p, perm, backend=be)
        want_back = block_channel_shuffle_ref(dequantize_ref(want_wire, want_scales, bits, (56, 56)), torch.argsort(perm, 1), 2)
        assert torch.equal(back, want_back)
    assert p.nbytes() == 3 * 64 * (56 * 56 * bits // 8) + 3 * 64 * 4  # vs 3*64*56*56*4 bytes of float32


def test_errors():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="n_blocks=9"):
        block_channel_shuffle(x, torch.zeros(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="permutation"):
        block_channel_shuffle(x, torch.zeros(9, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="8 or 4"):
        quantize(x, 3)
    with pytest.raises(ValueError, match="keep_ratio"):
        prune(x, 1.5)
    w, s = quantize(x, 4)
    with pytest.raises(ValueError, match="needs 36"):
        dequantize(w, s, 8, (6, 6))
    with pytest.raises(ValueError, match="positive"):
        block_channel_shuffle(x, _perm(4, 6, 6, 2), 0)


# ------------------------------------------------------------------------------------ Triton (interpreter)
@pytest.mark.interpret
def test_triton_shuffle_and_quantize():
    dev = triton_device()
    x = torch.randn(2, 5, 11, 9)
    perm = _perm(5, 11, 9, (3, 2))
    y = block_channel_shuffle(x.to(dev), perm.to(dev), (3, 2), backend="triton").cpu()
    assert torch.equal(y, block_channel_shuffle_ref(x, perm, (3, 2)))
    for bits in (8, 4):
        wire, scales = quantize(x.to(dev), bits, backend="triton")
        w0, s0 = quantize_ref(x, bits)
        assert torch.equal(wire.cpu(), w0) and torch.equal(scales.cpu(), s0)
        assert torch.equal(dequantize(wire, scales, bits, (11, 9), backend="triton").cpu(), dequantize_ref(w0, s0, bits, (11, 9)))
    ties = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5]).reshape(1, 1, 1, 8)
    w, _ = quantize(ties.to(dev), 8, backend="triton")
    assert unpack_codes(w.cpu(), 8, 8).flatten().tolist() == [127, 2, 4, -2, -4, 0, 2, 0]
