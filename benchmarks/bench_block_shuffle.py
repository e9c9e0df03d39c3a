"""PRO-Face C client path: prune -> block shuffle -> quantize into the wire format, and the server inverse.

B=64 copies of the first compensation map (64 @ 56x56), block 2x2 px (the intended 28x28 grid), int8 and int4.
The reference is the block loop of the public code's structure + the torch quantizer.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.conftest import backend_of, device_for, measure, skip_unavailable, with_gpu_baselines
from ppfr.ops.block_shuffle import (
    block_channel_shuffle_ref, block_grid, block_perm_table, dequantize_unshuffle, prune_ref, quantize_ref,
    shuffle_quantize,
)  # fmt: skip

B, C, H, W = 64, 64, 56, 56


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("provider", with_gpu_baselines(["ref", "torch", "cpp", "triton"]))
def test_shuffle_quantize(benchmark, provider, bits):
    skip_unavailable(provider)
    dev, be = device_for(provider), backend_of(provider)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0)).to(dev)
    perm = block_perm_table(3, C, math.prod(block_grid(H, W, 2))).to(dev)
    if be == "ref":
        fn = lambda: quantize_ref(block_channel_shuffle_ref(prune_ref(x, 0.5), perm, 2), bits)  # noqa: E731
    else:
        fn = lambda: shuffle_quantize(x, perm, 2, bits, 0.5, backend=be)  # noqa: E731
    measure(benchmark, fn, case=f"shuffle_quantize_int{bits}", provider=provider, images=B,
            bytes_written=B * C * H * W * bits // 8, bytes_read=x.numel() * 4, dev=dev)  # fmt: skip


@pytest.mark.parametrize("provider", with_gpu_baselines(["torch", "cpp", "triton"]))
def test_dequantize_unshuffle(benchmark, provider):
    skip_unavailable(provider)
    dev, be = device_for(provider), backend_of(provider)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0)).to(dev)
    perm = block_perm_table(3, C, math.prod(block_grid(H, W, 2))).to(dev)
    payload = shuffle_quantize(x, perm, 2, 8, backend=be)
    measure(benchmark, lambda: dequantize_unshuffle(payload, perm, backend=be), case="dequantize_unshuffle_int8",
            provider=provider, images=B, bytes_written=x.numel() * 4, bytes_read=payload.nbytes(), dev=dev)  # fmt: skip
