"""Shared benchmark machinery: the case registry, the timing helper and the recorded ratios.

Every benchmark records images/s and GB/s in ``benchmark.extra_info`` and into ``RESULTS`` so that fast
backends can assert their speed-up over the reference measured in the same run (the acceptance ratios
live in the benchmark files, never in unit tests). Run with:

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json

Providers: ``ref`` / ``torch`` / ``cpp`` run on the CPU; ``triton`` / ``cuda`` and the GPU PyTorch baselines
``ref_cuda`` / ``torch_cuda`` (the same ``ref`` / ``torch`` code on CUDA tensors, see :func:`with_gpu_baselines`)
run only where a GPU exists (the Triton interpreter measures Python, not the kernel), and then report GB/s
against the device's peak bandwidth. ``-k cuda`` selects every GPU provider but triton (``-k "triton or cuda"``).

Timing (:func:`measure`): warm-up calls until two consecutive warm-up medians agree within 5 % (or a cap), then
the timed rounds, each preceded (untimed) by an L2 flush on CUDA (a write of a buffer several times the L2
size, at least 256 MiB) so every round reads its inputs from DRAM. On a GPU every round is timed with CUDA
events on the current stream (kernel time, no host launch gaps counted twice) and there are at least 20 rounds;
on a CPU ``time.perf_counter`` and the file's (small) round count keep the run short.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "triton"))

RESULTS: dict[tuple[str, str], dict] = {}

GPU_PROVIDERS = ("triton", "cuda")
GPU_BASELINES = ("ref", "torch")  # PyTorch code that runs on any device: benchmarked on the GPU as well
MIN_GPU_ROUNDS = 20
SETTLE_TOLERANCE = 0.05  # warm-up ends when two consecutive warm-up medians differ by less than this
WARMUP_BATCH = {"cuda": 5, "cpu": 1}  # calls per warm-up median
WARMUP_MAX_CALLS = {"cuda": 200, "cpu": 4}
WARMUP_BUDGET_S = {"cuda": float(os.environ.get("PPFR_BENCH_GPU_WARMUP_S", "5")),
                   "cpu": float(os.environ.get("PPFR_BENCH_CPU_WARMUP_S", "3"))}  # per case, after the first batch
L2_FLUSH_MIN_BYTES = 256 * 2**20


def with_gpu_baselines(providers: list[str]) -> list[str]:
    """``providers`` plus a ``<p>_cuda`` GPU run of each PyTorch baseline among them (``ref``, ``torch``)."""
    return [*providers, *(f"{p}_cuda" for p in providers if p in GPU_BASELINES)]


def backend_of(provider: str) -> str:
    """The ppfr backend a provider runs: ``torch_cuda`` -> ``torch``; everything else is its own name."""
    base = provider.removesuffix("_cuda")
    return base if base in GPU_BASELINES else provider


def device_for(provider: str) -> torch.device:
    gpu = provider in GPU_PROVIDERS or backend_of(provider) != provider
    return torch.device("cuda") if gpu else torch.device("cpu")


def skip_unavailable(provider: str) -> None:
    if device_for(provider).type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{provider}: needs a GPU to benchmark (the interpreter measures Python, not the kernel)")
    if provider == "cpp":
        from ppfr import _ext

        if _ext.load("_C")[0] is None:
            pytest.skip(_ext.load("_C")[1])


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@functools.lru_cache(maxsize=4)
def _flush_buffer(dev: torch.device) -> torch.Tensor:
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 0
    return torch.empty(max(L2_FLUSH_MIN_BYTES, 4 * l2) // 4, dtype=torch.float32, device=dev)


def flush_l2(dev: torch.device) -> None:
    """Evict the GPU's L2 cache: write a buffer several times its size (no-op on a CPU)."""
    if dev.type == "cuda":
        _flush_buffer(dev).fill_(1.0)


def time_call(fn: Callable[[], object], dev: torch.device) -> float:
    """Seconds one ``fn()`` takes: CUDA events around it on the current stream (GPU), else perf_counter."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def warm_up(fn: Callable[[], object], dev: torch.device) -> dict:
    """Call ``fn`` until its timing settles: the medians of two consecutive warm-up batches agree within
    SETTLE_TOLERANCE, or the call / time cap is reached. Returns {"warmup_calls", "warmup_settled"}."""
    kind = "cuda" if dev.type == "cuda" else "cpu"
    batch, cap, budget = WARMUP_BATCH[kind], WARMUP_MAX_CALLS[kind], WARMUP_BUDGET_S[kind]
    t0, calls, prev, settled = time.perf_counter(), 0, None, False
    while True:
        times = []
        for _ in range(batch):
            flush_l2(dev)
            times.append(time_call(fn, dev))
        calls += batch
        med = statistics.median(times)
        if prev is not None and abs(med - prev) <= SETTLE_TOLERANCE * max(prev, 1e-12):
            settled = True
            break
        prev = med
        if calls >= cap or time.perf_counter() - t0 >= budget:
            break
    return {"warmup_calls": calls, "warmup_settled": settled}


def measure(benchmark, fn, *, case: str, provider: str, images: int, bytes_written: int, bytes_read: int,
            dev: torch.device, rounds: int = 5) -> dict:  # fmt: skip
    """Warm ``fn`` up until it settles, then time ``rounds`` calls (>= 20 on a GPU, each after an L2 flush,
    CUDA-event timed) through pytest-benchmark, and record the figures (median) under (case, provider)."""
    if dev.type == "cuda":
        rounds = max(rounds, MIN_GPU_ROUNDS)
    warm = warm_up(fn, dev)
    times: list[float] = []

    def call():
        times.append(time_call(fn, dev))

    benchmark.group = case
    benchmark.pedantic(call, setup=lambda: flush_l2(dev), rounds=rounds, iterations=1, warmup_rounds=0)
    info = {"case": case, "provider": provider, "images": images, "rounds": len(times),
            "timer": "cuda_event" if dev.type == "cuda" else "perf_counter", **warm}  # fmt: skip
    if times and benchmark.stats is not None:  # stats are None under --benchmark-disable
        t = statistics.median(times)
        info.update(
            seconds=t,
            seconds_min=min(times),
            images_per_s=images / t,
            gb_per_s_written=bytes_written / t / 1e9,
            gb_per_s_total=(bytes_written + bytes_read) / t / 1e9,
        )
        if dev.type == "cuda":
            info["device"] = torch.cuda.get_device_name(dev)
            peak = peak_bandwidth_gbs(dev)
            if peak:
                info["fraction_of_peak_bw"] = info["gb_per_s_total"] / peak
        RESULTS[(case, provider)] = info
    benchmark.extra_info.update(info)
    return info


def peak_bandwidth_gbs(dev: torch.device) -> float | None:
    """Theoretical DRAM bandwidth from the device properties (bus width x memory clock x 2 for DDR)."""
    props = torch.cuda.get_device_properties(dev)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def speedup(case: str, provider: str, baseline_case: str, baseline: str) -> float | None:
    a, b = RESULTS.get((case, provider)), RESULTS.get((baseline_case, baseline))
    if a is None or b is None:
        return None
    return b["seconds"] / a["seconds"]


# ----------------------------------------------------------------------------------- recorded ratio checks
CHECKS: list[tuple[str, str, str, str, str, float]] = []


def require_ratio(name: str, case: str, provider: str, base_case: str, base_provider: str, min_ratio: float) -> None:
    """Declare an acceptance ratio: time(base) / time(case, provider) must be >= min_ratio in this run."""
    CHECKS.append((name, case, provider, base_case, base_provider, min_ratio))


def _evaluate() -> list[dict]:
    rows = []
    for name, case, provider, base_case, base_provider, min_ratio in CHECKS:
        r = speedup(case, provider, base_case, base_provider)
        if r is not None:
            rows.append({"check": name, "ratio": r, "required": min_ratio, "ok": r >= min_ratio})
    return rows


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("ppfr benchmark figures (median)")
    for (case, provider), info in sorted(RESULTS.items()):
        extra = f"  {info['fraction_of_peak_bw']:.0%} of peak BW" if "fraction_of_peak_bw" in info else ""
        tr.write_line(
            f"{case:<22} {provider:<11} {info['seconds'] * 1e3:10.1f} ms {info['images_per_s']:10.1f} img/s "
            f"{info['gb_per_s_written']:7.2f} GB/s written{extra}"
        )
    rows = _evaluate()
    if rows:
        tr.section("ppfr benchmark ratio checks")
        for row in rows:
            tr.write_line(f"{'PASS' if row['ok'] else 'FAIL'} {row['check']}: {row['ratio']:.1f}x (need >= {row['required']}x)")
    out = os.environ.get("PPFR_BENCH_RATIOS")
    if out:
        import json

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"results": [dict(v) for v in RESULTS.values()], "checks": rows}, indent=2))


def pytest_sessionfinish(session, exitstatus):
    if any(not row["ok"] for row in _evaluate()) and session.exitstatus == 0:
        session.exitstatus = 1  # a ratio below its acceptance bound fails the benchmark run
