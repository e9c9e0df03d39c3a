"""Benchmarks of the PRO-Face C blurs (B=64, 3x112x112, METHODS §6.2 / §6.7).

Cases:
* ``median19`` -- median k=19 (the worst training draw): the kornia-style unfold reference (k^2 = 361 floats
  per pixel, ~3.5 GB) vs the bounded-memory torch form, the C++ rank/bitset kernel, and the GPU kernels.
  Besides time, each provider's PEAK ADDITIONAL MEMORY is measured: on CPU in a fresh subprocess as the
  growth of the RSS high-water mark (VmHWM, reset just before the call) over one call, after a warm-up on a
  tiny input so library loading is excluded; on a GPU as the growth of ``torch.cuda.max_memory_allocated``.
* ``gaussian31`` -- Gaussian k=31, sigma=5: torchvision's 31x31 depthwise conv2d vs separable forms.
* ``hybrid_test`` -- the test-time hybrid blur (n=16, k=13, sigma=5, b=7, a layout per image).

Run with ``pytest benchmarks/bench_blur.py --benchmark-only`` (figures in the summary and ``extra_info``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import backend_of, device_for, measure, require_ratio, skip_unavailable, with_gpu_baselines
from ppfr.ops import blur

B, C, S = 64, 3, 112
INPUT_BYTES = B * C * S * S * 4
PROVIDERS = with_gpu_baselines(["ref", "torch", "cpp", "triton", "cuda"])
ROOT = Path(__file__).resolve().parents[1]

# Acceptance: the C++ median must beat the unfold reference by >= 2x at k=19 (and use at most 4x the input's
# bytes of extra memory, asserted in test_median_k19); the separable Gaussian and the masked hybrid should
# beat their literal references comfortably.
require_ratio("cpp median k=19 vs unfold", "median19", "cpp", "median19", "ref", 2.0)
require_ratio("cpp gaussian k=31 vs 2-D conv", "gaussian31", "cpp", "gaussian31", "ref", 5.0)
require_ratio("cpp hybrid (test) vs reference", "hybrid_test", "cpp", "hybrid_test", "ref", 5.0)


def _images(dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(B, C, S, S, generator=g) * 2 - 1).to(dev)


def _median_fn(provider: str, x: torch.Tensor):
    be = backend_of(provider)
    if be == "ref":
        return lambda: blur.median_blur_ref(x, 19)
    return lambda: blur.median_blur(x, 19, backend=be)


# The child builds the input in place (no temporaries larger than it), warms the op up on a tiny input (so code
# loading and thread pools are not counted), returns freed heap pages to the OS (malloc_trim), resets the kernel's
# RSS high-water mark (/proc/self/clear_refs = 5, Linux >= 4.0) and reports VmHWM - VmRSS over one real call.
# Not ru_maxrss: Linux carries a parent's max RSS into a forked child across execve, so a child spawned by a
# pytest process that has just run the 3.5 GB reference would report no growth at all.
_MEM_CHILD = r"""
import ctypes, json, sys, torch
from ppfr.ops import blur
provider, b, c, s, k = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(int(sys.argv[6]))
fn = blur.median_blur_ref if provider == "ref" else (lambda t, kk: blur.median_blur(t, kk, backend=provider))
fn(torch.rand(1, 1, 8, 8), 3)
x = torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1)

def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kb("VmRSS")
out = fn(x, k)
after = status_kb("VmHWM")
print(json.dumps({"peak_additional_bytes": (after - before) * 1024, "out_bytes": out.numel() * out.element_size()}))
"""


def _cpu_peak_additional_bytes(provider: str, k: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-c", _MEM_CHILD, provider, str(B), str(C), str(S), str(k), str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=1200, env=env, cwd=str(ROOT),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_additional_bytes"]


def _gpu_peak_additional_bytes(fn, dev: torch.device) -> int:
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base


@pytest.mark.parametrize("provider", PROVIDERS)
def test_median_k19(benchmark, provider):
    skip_unavailable(provider)
    dev = device_for(provider)
    x = _images(dev)
    fn = _median_fn(provider, x)
    info = measure(benchmark, fn, case="median19", provider=provider, images=B, bytes_written=INPUT_BYTES,
                   bytes_read=INPUT_BYTES, dev=dev, rounds=2 if provider in ("ref", "torch") else 5)  # fmt: skip
    peak = _cpu_peak_additional_bytes(provider, 19) if dev.type == "cpu" else _gpu_peak_additional_bytes(fn, dev)
    benchmark.extra_info.update(peak_additional_bytes=peak, peak_additional_x_input=peak / INPUT_BYTES)
    info.update(peak_additional_bytes=peak)
    print(f"\nmedian19 {provider}: peak additional memory {peak / 2**20:.1f} MiB ({peak / INPUT_BYTES:.2f}x input)")
    if provider == "cpp":
        # the output itself is 1x the input; the kernel's scratch is O(H*W) per thread
        assert peak <= 4 * INPUT_BYTES, f"cpp median used {peak / 2**20:.1f} MiB extra (> 4x the input)"


@pytest.mark.parametrize("provider", with_gpu_baselines(["ref", "torch", "cpp"]))
def test_gaussian_k31(benchmark, provider):
    skip_unavailable(provider)
    dev, be = device_for(provider), backend_of(provider)
    x = _images(dev)
    if be == "ref":
        fn = lambda: blur.gaussian_blur_ref(x, 31, 5.0)  # noqa: E731
    else:
        fn = lambda: blur.gaussian_blur(x, 31, 5.0, backend=be)  # noqa: E731
    measure(benchmark, fn, case="gaussian31", provider=provider, images=B, bytes_written=INPUT_BYTES,
            bytes_read=INPUT_BYTES, dev=dev, rounds=3 if provider == "ref" else 5)  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hybrid_test_mode(benchmark, provider):
    skip_unavailable(provider)
    dev = device_for(provider)
    x = _images(dev)
    params = blur.sample_hybrid_params(B, train=False, generator=torch.Generator().manual_seed(56))
    be = backend_of(provider)
    if be == "ref":
        fn = lambda: blur.hybrid_blur_ref(x, params)  # noqa: E731
    else:
        fn = lambda: blur.hybrid_blur(x, params.n, median_k=params.median_k, sigma=params.sigma,  # noqa: E731
                                      pixel_b=params.pixel_b, layout=params.layout, backend=be).image
    measure(benchmark, fn, case="hybrid_test", provider=provider, images=B, bytes_written=INPUT_BYTES,
            bytes_read=INPUT_BYTES, dev=dev, rounds=2 if provider in ("ref", "torch") else 5)  # fmt: skip
