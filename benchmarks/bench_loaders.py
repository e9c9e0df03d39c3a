"""Input pipeline throughput on real faces (../shared/data/celeba112/train, 4099 aligned 112x112 JPEGs), batch 64.

Providers: the PyTorch DataLoader path (OpenCV decode in 1 or 2 worker processes) and DALI's CPU mode
(``device_id=None``, 1 or 2 threads). Each round pulls 16 training batches (shuffle + random flip, ``drop``) from a
persistent iterator that crosses epoch boundaries, so worker start-up and pipeline build are excluded and the
figure is steady-state images/s. ``AUTO_CPU_BACKEND`` (what ``backend="auto"`` picks without a GPU) must be the
faster CPU path: the ratio check below fails the run if the other backend beats it by more than noise (15%).

    pytest benchmarks/bench_loaders.py --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.conftest import measure, require_ratio
from ppfr.data import DataConfig, make_loader
from ppfr.data.loader import AUTO_CPU_BACKEND
from ppfr.pipelines import dali_unavailable_reason

CELEBA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba112" / "train"
B, BATCHES = 64, 16
CASE = "loader_celeba112_b64"
PROVIDERS = {"torch-1w": ("torch", 1), "torch-2w": ("torch", 2), "dali-1t": ("dali", 1), "dali-2t": ("dali", 2)}

_other = "dali-2t" if AUTO_CPU_BACKEND == "torch" else "torch-2w"
_auto = "torch-2w" if AUTO_CPU_BACKEND == "torch" else "dali-2t"
require_ratio(
    f"auto CPU default ({_auto}) vs {_other} (>= 0.85: not slower beyond noise)", CASE, _auto, CASE, _other, 0.85
)


class _Stream:
    """Batches from a loader without epoch boundaries showing: a new epoch starts when one ends."""

    def __init__(self, loader) -> None:
        self.loader, self.it = loader, iter(loader)

    def take(self, k: int) -> int:
        n = 0
        while k:
            try:
                x, _ = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                continue
            n += x.shape[0]
            k -= 1
        return n


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_loader_throughput(benchmark, provider):
    if not CELEBA.is_dir():
        pytest.skip(f"real faces not found at {CELEBA}")
    backend, workers = PROVIDERS[provider]
    if backend == "dali" and dali_unavailable_reason() is not None:
        pytest.skip(dali_unavailable_reason())
    cfg = DataConfig(source=str(CELEBA), backend=backend, batch_size=B, num_workers=workers, device="cpu", train=True)
    loader = make_loader(cfg)
    stream = _Stream(loader)
    jpeg_bytes = sum(f.stat().st_size for f in CELEBA.glob("*/*.jpg")) / loader.num_samples * B * BATCHES
    info = measure(benchmark, lambda: stream.take(BATCHES), case=CASE, provider=provider, images=B * BATCHES,
                   bytes_written=B * BATCHES * 3 * 112 * 112 * 4, bytes_read=int(jpeg_bytes),
                   dev=torch.device("cpu"), rounds=5)  # fmt: skip
    benchmark.extra_info.update(backend=backend, workers_or_threads=workers, auto_cpu_backend=AUTO_CPU_BACKEND)
    assert info["images"] == B * BATCHES
