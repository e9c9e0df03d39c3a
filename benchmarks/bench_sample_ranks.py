"""PartialFace batch formation: rank sampling + encode of only the drawn channels, vs the reference path.

The reference path (METHODS §4.6): literal encode of all 192 channels, all 6 subsets built for the whole
batch, one kept per sample, per-sample Python permutation loop. ppfr: ``sample_ranks`` (vectorised draws)
+ ``freq_encode(x, ranks.channels)`` computing only the 27 channels each sample needs.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import backend_of, device_for, measure, require_ratio, skip_unavailable, with_gpu_baselines
from ppfr.ops.freq import freq_encode
from ppfr.ops.sample_ranks import partialface_batch_ref, sample_ranks

B, H, W = 64, 112, 112

# Acceptance (issue: kernels): sample_ranks + freq_encode >= 50x the build-all-6-subsets-then-pick path.
require_ratio("sample_ranks+cpp encode vs reference batch path", "partialface_batch", "cpp",
              "partialface_batch", "ref", 50.0)  # fmt: skip


@pytest.mark.parametrize("provider", with_gpu_baselines(["ref", "torch", "cpp", "triton", "cuda"]))
def test_partialface_batch(benchmark, provider):
    skip_unavailable(provider)
    dev, be = device_for(provider), backend_of(provider)
    x = (torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)
    labels = torch.randint(0, 10_000, (B,), generator=torch.Generator().manual_seed(1)).to(dev)
    if be == "ref":
        fn = lambda: partialface_batch_ref(x, labels, torch.Generator().manual_seed(2))  # noqa: E731
    else:

        def fn():  # the ranks are drawn from a CPU generator and copied over non-blocking (no host sync)
            ranks = sample_ranks(labels, generator=torch.Generator().manual_seed(2))
            return freq_encode(x, ranks.channels, backend=be)

    measure(benchmark, fn, case="partialface_batch", provider=provider, images=B, bytes_written=B * 27 * H * W * 4,
            bytes_read=x.numel() * 4, dev=dev, rounds=2 if provider == "ref" else 5)  # fmt: skip
