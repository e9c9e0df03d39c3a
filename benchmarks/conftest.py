"""Shared benchmark machinery: the case registry, the timing helper and the recorded ratios.

Every benchmark records images/s and GB/s in ``benchmark.extra_info`` and into ``RESULTS`` so that fast
backends can assert their speed-up over the reference measured in the same run (the acceptance ratios
live in the benchmark files, never in unit tests). Run with:

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json

On a CPU the Triton interpreter is not benchmarked (it measures Python, not the kernel): triton and cuda
providers run only where a GPU exists, and then report GB/s against the device's peak bandwidth.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "triton"))

RESULTS: dict[tuple[str, str], dict] = {}


def device_for(provider: str) -> torch.device:
    return torch.device("cuda") if provider in ("triton", "cuda") else torch.device("cpu")


def skip_unavailable(provider: str) -> None:
    if provider in ("triton", "cuda") and not torch.cuda.is_available():
        pytest.skip(f"{provider}: needs a GPU to benchmark (the interpreter measures Python, not the kernel)")
    if provider == "cpp":
        from ppfr import _ext

        if _ext.load("_C")[0] is None:
            pytest.skip(_ext.load("_C")[1])


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(benchmark, fn, *, case: str, provider: str, images: int, bytes_written: int, bytes_read: int,
            dev: torch.device, rounds: int = 5) -> dict:  # fmt: skip
    """Time ``fn`` with pytest-benchmark (pedantic: fixed rounds, one warm-up) and record the figures."""

    def call():
        out = fn()
        _sync(dev)
        return out

    benchmark.group = case
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    info = {"case": case, "provider": provider, "images": images}
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.median
        info.update(
            seconds=t,
            images_per_s=images / t,
            gb_per_s_written=bytes_written / t / 1e9,
            gb_per_s_total=(bytes_written + bytes_read) / t / 1e9,
        )
        if dev.type == "cuda":
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
            f"{case:<22} {provider:<8} {info['seconds'] * 1e3:10.1f} ms {info['images_per_s']:10.1f} img/s "
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
