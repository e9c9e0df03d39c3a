"""Test configuration.

Tiers (markers in pyproject.toml): plain CPU tests; ``interpret`` -- Triton kernels on CPU tensors in Triton's
interpreter (enabled here, before any kernel module is imported, when no GPU is present); ``cuda`` -- needs a
GPU and skips with that reason otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "triton"))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Runs' on-disk caches (the teacher store, runners' exports) go to a session folder, not the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PPFR_CACHE_DIR", str(tmp_path_factory.mktemp("ppfr-cache")))
        yield


def triton_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU if present, else CPU tensors in the interpreter."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
