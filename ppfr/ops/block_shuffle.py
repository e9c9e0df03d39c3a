"""PRO-Face C client-feature protection (METHODS.md §6.3): block channel shuffle, pruning, quantization.

* :func:`block_channel_shuffle` -- within each spatial block i of a (B, C, H, W) map, permute the C channels with
  the block's fixed permutation: ``out[:, j, block i] = x[:, perm[i, j], block i]`` (gather semantics). Blocks
  are ``bh x bw`` pixels in raster order over a ceil(H/bh) x ceil(W/bw) grid (edge blocks may be partial), so any
  block size works. ``inverse=True`` applies the exact inverse. Permutation tables come from a key via
  :func:`block_perm_table` (the client secret). Differentiable (its adjoint is the inverse shuffle).
* :func:`prune` -- magnitude pruning per sample: keep the values whose |v| is at least the k-th largest
  (k = ceil(keep_ratio * C*H*W); ties at the threshold are all kept), zero the rest.
* :func:`quantize` / :func:`dequantize` -- uniform symmetric per-(sample, channel) quantization to int8 or int4:
  scale = amax / qmax (qmax 127 or 7; scale 1 for an all-zero channel), code = round-half-even(v * (1/scale)).
  The wire is (B, C, nbytes) uint8: int8 two's complement, or int4 nibbles packed low-nibble-first.
* :func:`shuffle_quantize` / :func:`dequantize_unshuffle` -- the fused client and server paths:
  quantize(shuffle(prune(x))) into a :class:`WirePayload`, and its inverse.

What the public PRO-Face C code does: only the shuffle, on a 2x2 grid of 28x28 blocks (an argument mix-up; the
names suggest 2x2-pixel blocks on a 28x28 grid), no quantization or pruning (paper text unavailable). The bit
width, keep ratio and block size are therefore options; this project's defaults are ``DEFAULT_BITS = 8``,
``DEFAULT_KEEP_RATIO = 1.0`` (no pruning unless asked) and ``DEFAULT_BLOCK = 2`` (the intended 2x2-pixel blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppfr import _backend, _ext
from ppfr.ops._validate import check_planes, compiling, require, to_device

DEFAULT_BITS = 8
DEFAULT_KEEP_RATIO = 1.0
DEFAULT_BLOCK = 2
_QMAX = {8: 127.0, 4: 7.0}

SHUFFLE_BACKENDS = ("ref", "torch", "cpp", "triton")
PRUNE_BACKENDS = ("ref", "torch", "cpp")
QUANT_BACKENDS = ("ref", "torch", "cpp", "triton")


def _pair(block: int | tuple[int, int]) -> tuple[int, int]:
    bh, bw = (block, block) if isinstance(block, int) else tuple(block)
    if bh < 1 or bw < 1:
        raise ValueError(f"block size must be positive, got {block}")
    return int(bh), int(bw)


def block_grid(h: int, w: int, block: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the block grid for an H x W map."""
    bh, bw = _pair(block)
    return math.ceil(h / bh), math.ceil(w / bw)


def block_perm_table(key: int, channels: int, n_blocks: int) -> torch.Tensor:
    """(n_blocks, channels) int64 per-block permutations derived from an integer key (CPU, deterministic)."""
    g = torch.Generator().manual_seed(int(key))
    return torch.argsort(torch.rand(n_blocks, channels, generator=g), dim=1)


def _check_perm(perm: torch.Tensor, c: int, n_blocks: int, device: torch.device) -> torch.Tensor:
    if not isinstance(perm, torch.Tensor) or perm.dim() != 2 or perm.shape != (n_blocks, c):
        shape = tuple(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"perm must be (n_blocks={n_blocks}, C={c}), got {shape}")
    perm = perm.to(dtype=torch.int64)
    if not compiling():  # a CPU perm: a ValueError now; a device perm: a device-side assert (no host sync)
        ok = (perm.sort(dim=1).values == torch.arange(c, device=perm.device)).all()
        require(ok, "every row of perm must be a permutation of range(C)")
    return to_device(perm, device).contiguous()


def _block_ids(h: int, w: int, bh: int, bw: int, device: torch.device) -> torch.Tensor:
    nbw = math.ceil(w / bw)
    rows = torch.arange(h, device=device) // bh
    cols = torch.arange(w, device=device) // bw
    return rows[:, None] * nbw + cols[None, :]  # (H, W)


# ------------------------------------------------------------------------------------------------- shuffle
def block_channel_shuffle_ref(x: torch.Tensor, perm: torch.Tensor, block: int | tuple[int, int]) -> torch.Tensor:
    """Loop over blocks (the reference code's structure, without its per-channel inner loop)."""
    bh, bw = _pair(block)
    _, _, h, w = x.shape
    nbh, nbw = block_grid(h, w, (bh, bw))
    out = torch.empty_like(x)
    for i in range(nbh):
        for j in range(nbw):
            sl = (slice(None), slice(None), slice(i * bh, (i + 1) * bh), slice(j * bw, (j + 1) * bw))
            out[sl] = x[sl][:, perm[i * nbw + j]]
    return out


def _shuffle_torch(x: torch.Tensor, perm: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    b, c, h, w = x.shape
    idx = perm[_block_ids(h, w, bh, bw, x.device)].permute(2, 0, 1)  # (C, H, W): source channel per output
    return x.gather(1, idx.expand(b, c, h, w))


@torch.library.custom_op("ppfr::block_channel_shuffle", mutates_args=())
def _block_shuffle_op(x: torch.Tensor, perm: torch.Tensor, bh: int, bw: int, backend: str) -> torch.Tensor:
    if backend == "ref":
        return block_channel_shuffle_ref(x, perm, (bh, bw))
    if backend == "torch":
        return _shuffle_torch(x, perm, bh, bw)
    b, c, h, w = x.shape
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.to(dt).contiguous()
    out = torch.empty_like(xc)
    if backend == "cpp":
        _ext.cpu_module().block_shuffle(xc.data_ptr(), out.data_ptr(), b, c, h, w, perm.data_ptr(), bh, bw,
                                        dt == torch.float64, torch.get_num_threads())  # fmt: skip
    else:
        from ppfr.kernels.block_shuffle import block_shuffle_triton

        block_shuffle_triton(xc, out, perm, bh, bw)
    return out.to(x.dtype)


@_block_shuffle_op.register_fake
def _(x, perm, bh, bw, backend):
    return torch.empty_like(x)


def _shuffle_setup(ctx, inputs, output):
    _, perm, bh, bw, backend = inputs
    ctx.block = (bh, bw)
    ctx.backend = backend
    ctx.save_for_backward(perm)


def _shuffle_backward(ctx, grad):
    (perm,) = ctx.saved_tensors
    inv = torch.argsort(perm, dim=1)
    return _block_shuffle_op(grad.contiguous(), inv, ctx.block[0], ctx.block[1], ctx.backend), None, None, None, None


_block_shuffle_op.register_autograd(_shuffle_backward, setup_context=_shuffle_setup)


def block_channel_shuffle(
    x: torch.Tensor, perm: torch.Tensor, block: int | tuple[int, int] = DEFAULT_BLOCK, *, inverse: bool = False,
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """Permute channels within each spatial block.

    Args:
        x: (B, C, H, W) float feature map.
        perm: (n_blocks, C) int permutations, n_blocks = ceil(H/bh) * ceil(W/bw) (see :func:`block_perm_table`).
        block: block size in pixels, ``b`` or ``(bh, bw)``.
        inverse: apply the inverse shuffle (exactly undoes the forward one).
    Returns:
        (B, C, H, W): ``out[:, j, blk] = x[:, perm[blk, j], blk]`` (forward).
    """
    check_planes("x", x, min_size=1)
    bh, bw = _pair(block)
    nbh, nbw = block_grid(x.shape[2], x.shape[3], (bh, bw))
    perm = _check_perm(perm, x.shape[1], nbh * nbw, x.device)
    if inverse:
        perm = torch.argsort(perm, dim=1)
    be = _backend.resolve("block_channel_shuffle", backend, x.device, SHUFFLE_BACKENDS)
    return _block_shuffle_op(x, perm, bh, bw, be)


# --------------------------------------------------------------------------------------------------- prune
def _keep_count(n: int, keep_ratio: float) -> int:
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in [0, 1], got {keep_ratio}")
    return min(n, math.ceil(keep_ratio * n))


def prune_ref(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Per sample: keep |v| >= k-th largest |v| (ties kept), k = ceil(keep_ratio * numel per sample)."""
    return _prune_k(x, _keep_count(x[0].numel(), keep_ratio))


def _prune_k(x: torch.Tensor, k: int) -> torch.Tensor:
    b = x.shape[0]
    flat = x.reshape(b, -1)
    if k >= flat.shape[1]:
        return x.clone()
    if k == 0:
        return torch.zeros_like(x)
    # the k-th largest magnitude; topk rather than kthvalue because kthvalue has no ONNX counterpart (export)
    thr = flat.abs().topk(k, dim=1).values[:, -1:]
    return torch.where(flat.abs() >= thr, flat, torch.zeros_like(flat)).reshape(x.shape)


def prune(x: torch.Tensor, keep_ratio: float = DEFAULT_KEEP_RATIO, *, backend: str = "auto") -> torch.Tensor:
    """Magnitude pruning per sample. x: (B, ...) float; returns x with the smallest magnitudes zeroed.

    Differentiable as a mask: the gradient passes where a value was kept.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating tensor (B, ...) with at least 2 dims")
    k = _keep_count(x[0].numel(), keep_ratio)
    be = _backend.resolve("prune", backend, x.device, PRUNE_BACKENDS)
    return _prune_op(x, k, be)


@torch.library.custom_op("ppfr::prune", mutates_args=())
def _prune_op(x: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    b = x.shape[0]
    n = x[0].numel()
    if backend in ("ref", "torch"):
        return _prune_k(x, k)
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.to(dt).contiguous()
    out = torch.empty_like(xc)
    _ext.cpu_module().prune(xc.data_ptr(), out.data_ptr(), b, n, k, dt == torch.float64, torch.get_num_threads())
    return out.to(x.dtype)


@_prune_op.register_fake
def _(x, k, backend):
    return torch.empty_like(x)


def _prune_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _prune_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return grad * (out != 0), None, None


_prune_op.register_autograd(_prune_backward, setup_context=_prune_setup)


# ------------------------------------------------------------------------------------------------ quantize
def _nbytes(n: int, bits: int) -> int:
    return n if bits == 8 else (n + 1) // 2


def _check_bits(bits: int) -> None:
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits}")


def _scales_ref(x: torch.Tensor, bits: int) -> torch.Tensor:
    amax = x.abs().amax(dim=-1)
    return torch.where(amax > 0, amax / _QMAX[bits], torch.ones_like(amax))


def _codes_ref(x: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    q = _QMAX[bits]
    return torch.round(x * (1.0 / scales)[..., None]).clamp(-q, q).to(torch.int8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(B, C, N) int8 codes -> (B, C, nbytes) uint8 wire (int4: low nibble = even index)."""
    u = codes.to(torch.uint8)  # two's complement bit pattern
    if bits == 8:
        return u
    if codes.shape[-1] % 2:
        u = torch.cat([u, torch.zeros_like(u[..., :1])], dim=-1)
    u = u & 0xF
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_codes(wire: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """(B, C, nbytes) uint8 -> (B, C, n) int8 codes."""
    if bits == 8:
        return wire.to(torch.int8)
    lo = (wire & 0xF).to(torch.int16)
    hi = (wire >> 4).to(torch.int16)
    nib = torch.stack([lo, hi], dim=-1).reshape(*wire.shape[:-1], -1)[..., :n]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def quantize_ref(x: torch.Tensor, bits: int = DEFAULT_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) float -> (wire (B, C, nbytes) uint8, scales (B, C) float32)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1).float()
    scales = _scales_ref(flat, bits)
    return pack_codes(_codes_ref(flat, scales, bits), bits), scales


def dequantize_ref(wire: torch.Tensor, scales: torch.Tensor, bits: int, hw: tuple[int, int]) -> torch.Tensor:
    b, c = wire.shape[:2]
    codes = unpack_codes(wire, hw[0] * hw[1], bits)
    return (codes.float() * scales[..., None]).reshape(b, c, *hw)


@torch.library.custom_op("ppfr::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, bits: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend in ("ref", "torch"):
        return quantize_ref(x, bits)
    b, c, h, w = x.shape
    n = h * w
    xc = x.float().contiguous()
    wire = torch.empty(b, c, _nbytes(n, bits), dtype=torch.uint8, device=x.device)
    if backend == "cpp":
        scales = torch.empty(b, c, dtype=torch.float32)
        _ext.cpu_module().quantize(xc.data_ptr(), wire.data_ptr(), scales.data_ptr(), b, c, n, bits,
                                   torch.get_num_threads())  # fmt: skip
        return wire, scales
    from ppfr.kernels.block_shuffle import quantize_triton

    scales = _scales_ref(xc.reshape(b, c, n), bits)  # amax in torch: IEEE division on every device
    quantize_triton(xc, wire, (1.0 / scales).contiguous(), bits)
    return wire, scales


@_quantize_op.register_fake
def _(x, bits, backend):
    b, c, h, w = x.shape
    return x.new_empty(b, c, _nbytes(h * w, bits), dtype=torch.uint8), x.new_empty(b, c, dtype=torch.float32)


@torch.library.custom_op("ppfr::dequantize", mutates_args=())
def _dequantize_op(wire: torch.Tensor, scales: torch.Tensor, bits: int, h: int, w: int, backend: str) -> torch.Tensor:
    if backend in ("ref", "torch"):
        return dequantize_ref(wire, scales, bits, (h, w))
    b, c = wire.shape[:2]
    out = torch.empty(b, c, h, w, dtype=torch.float32, device=wire.device)
    wc, sc = wire.contiguous(), scales.float().contiguous()
    if backend == "cpp":
        _ext.cpu_module().dequantize(wc.data_ptr(), sc.data_ptr(), out.data_ptr(), b, c, h * w, bits,
                                     torch.get_num_threads())  # fmt: skip
    else:
        from ppfr.kernels.block_shuffle import dequantize_triton

        dequantize_triton(wc, sc, out, bits)
    return out


@_dequantize_op.register_fake
def _(wire, scales, bits, h, w, backend):
    return scales.new_empty(wire.shape[0], wire.shape[1], h, w, dtype=torch.float32)


def quantize(x: torch.Tensor, bits: int = DEFAULT_BITS, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform symmetric per-(sample, channel) quantization.

    Args:
        x: (B, C, H, W) float.
        bits: 8 (codes in [-127, 127]) or 4 (codes in [-7, 7], two per byte).
    Returns:
        wire (B, C, nbytes) uint8 and scales (B, C) float32; ``dequantize(wire, scales, bits, (H, W))`` inverts
        it up to half a quantization step (``scale / 2``) per value.
    """
    check_planes("x", x, min_size=1)
    _check_bits(bits)
    be = _backend.resolve("quantize", backend, x.device, QUANT_BACKENDS)
    return _quantize_op(x, bits, be)


def dequantize(
    wire: torch.Tensor, scales: torch.Tensor, bits: int, hw: tuple[int, int], *, backend: str = "auto"
) -> torch.Tensor:
    """Inverse of :func:`quantize`: (B, C, nbytes) uint8 + (B, C) scales -> (B, C, H, W) float32."""
    _check_bits(bits)
    h, w = int(hw[0]), int(hw[1])
    if not isinstance(wire, torch.Tensor) or wire.dtype != torch.uint8 or wire.dim() != 3:
        raise ValueError("wire must be a (B, C, nbytes) uint8 tensor")
    if wire.shape[2] != _nbytes(h * w, bits):
        raise ValueError(f"wire holds {wire.shape[2]} bytes per channel; {bits}-bit {h}x{w} needs {_nbytes(h * w, bits)}")
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != tuple(wire.shape[:2]):
        raise ValueError(f"scales must be (B, C) = {tuple(wire.shape[:2])}")
    be = _backend.resolve("dequantize", backend, wire.device, QUANT_BACKENDS)
    return _dequantize_op(wire, scales, bits, h, w, be)


# ------------------------------------------------------------------------------------------- fused paths
@dataclass(frozen=True)
class WirePayload:
    """What leaves the client for one protected map: packed codes, scales and the layout needed to decode."""

    wire: torch.Tensor  # (B, C, nbytes) uint8
    scales: torch.Tensor  # (B, C) float32
    bits: int
    shape: tuple[int, int, int]  # (C, H, W)
    block: tuple[int, int]

    def nbytes(self) -> int:
        return self.wire.numel() + self.scales.numel() * 4


def shuffle_quantize(
    x: torch.Tensor, perm: torch.Tensor, block: int | tuple[int, int] = DEFAULT_BLOCK, bits: int = DEFAULT_BITS,
    keep_ratio: float = DEFAULT_KEEP_RATIO, *, backend: str = "auto",
) -> WirePayload:  # fmt: skip
    """Client path: quantize(block_channel_shuffle(prune(x))) into a compact :class:`WirePayload`.

    x: (B, C, H, W) float. The cpp backend runs it fused, sample by sample, with no batch-sized intermediates.
    """
    check_planes("x", x, min_size=1)
    _check_bits(bits)
    bh, bw = _pair(block)
    b, c, h, w = x.shape
    perm = _check_perm(perm, c, math.prod(block_grid(h, w, (bh, bw))), x.device)
    keep = _keep_count(c * h * w, keep_ratio)
    be = _backend.resolve("shuffle_quantize", backend, x.device, QUANT_BACKENDS)
    if be == "cpp":
        xc = x.float().contiguous()
        wire = torch.empty(b, c, _nbytes(h * w, bits), dtype=torch.uint8)
        scales = torch.empty(b, c, dtype=torch.float32)
        _ext.cpu_module().shuffle_quantize(xc.data_ptr(), wire.data_ptr(), scales.data_ptr(), b, c, h, w,
                                           perm.data_ptr(), bh, bw, keep, bits, torch.get_num_threads())  # fmt: skip
    else:
        sub = "torch" if be == "ref" else be
        pruned = _prune_op(x, keep, "torch" if sub == "triton" else sub)
        wire, scales = _quantize_op(_block_shuffle_op(pruned, perm, bh, bw, sub), bits, sub)
    return WirePayload(wire, scales, bits, (c, h, w), (bh, bw))


def dequantize_unshuffle(payload: WirePayload, perm: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Server path: the inverse shuffle of the dequantized map, (B, C, H, W) float32."""
    c, h, w = payload.shape
    bh, bw = payload.block
    perm = _check_perm(perm, c, math.prod(block_grid(h, w, (bh, bw))), payload.wire.device)
    inv = torch.argsort(perm, dim=1).contiguous()
    be = _backend.resolve("dequantize_unshuffle", backend, payload.wire.device, QUANT_BACKENDS)
    if be == "cpp":
        b = payload.wire.shape[0]
        out = torch.empty(b, c, h, w, dtype=torch.float32)
        wc, sc = payload.wire.contiguous(), payload.scales.float().contiguous()
        _ext.cpu_module().dequantize_unshuffle(wc.data_ptr(), sc.data_ptr(), out.data_ptr(), b, c, h, w,
                                               inv.data_ptr(), bh, bw, payload.bits, torch.get_num_threads())  # fmt: skip
        return out
    sub = "torch" if be == "ref" else be
    deq = _dequantize_op(payload.wire, payload.scales, payload.bits, h, w, sub)
    return _block_shuffle_op(deq, inv, bh, bw, sub)


# ----------------------------------------------------------------------------------------------- self-checks
def _check_shuffle(backend: str, dev: torch.device) -> float:
    x = torch.randn(2, 8, 6, 5, device=dev)
    perm = block_perm_table(1, 8, 9).to(dev)
    a = block_channel_shuffle(x, perm, 2, backend=backend)
    return float((a != block_channel_shuffle_ref(x, perm, 2)).sum())


def _check_quant(backend: str, dev: torch.device) -> float:
    x = torch.randn(2, 8, 6, 5, device=dev)
    w1, s1 = quantize(x, 4, backend=backend)
    w2, s2 = quantize_ref(x, 4)
    return float((w1 != w2).sum() + (s1 != s2).sum())


def _check_prune(backend: str, dev: torch.device) -> float:
    x = torch.randn(2, 8, 6, 5, device=dev)
    return float((prune(x, 0.3, backend=backend) != prune_ref(x, 0.3)).sum())


SELF_CHECKS = {
    "block_channel_shuffle": (SHUFFLE_BACKENDS, _check_shuffle),
    "quantize": (QUANT_BACKENDS, _check_quant),
    "prune": (PRUNE_BACKENDS, _check_prune),
}
