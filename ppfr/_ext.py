"""Graceful loading of the compiled extensions.

``ppfr._C`` is the C++/OpenMP CPU kernel module and ``ppfr._C_cuda`` the CUDA kernel module. Both are
torch-free pybind11 modules (they take raw pointers), so they cannot hit a torch ABI mismatch and build
in seconds. Neither is required for ``import ppfr``: a failed import is recorded, and asking for that
backend raises an error that quotes the recorded reason and says how to build it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_BUILD_HINT = (
    "build it with `python setup.py develop` or `pip install -e . --no-build-isolation` "
    "(see README, 'Building')"
)

_cache: dict[str, tuple[ModuleType | None, str | None]] = {}


def load(name: str) -> tuple[ModuleType | None, str | None]:
    """Import ``ppfr.<name>`` once; return ``(module or None, reason it failed or None)``."""
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"ppfr.{name}"), None)
        except ImportError as exc:  # missing .so, or a .so whose dependencies are missing
            _cache[name] = (None, f"ppfr.{name} is not importable ({exc}); {_BUILD_HINT}")
    return _cache[name]


def cpu_module() -> ModuleType | None:
    return load("_C")[0]


def cuda_module() -> ModuleType | None:
    return load("_C_cuda")[0]


def cuda_stream_and_device(op: str, *tensors) -> tuple[int, int]:
    """``(stream, device)`` to pass as the last two arguments of a ``ppfr._C_cuda`` launch.

    ``device`` is the index of the CUDA device holding ``tensors`` and ``stream`` the raw handle of torch's current
    stream on that device, so the kernel runs where the data is and is ordered with the torch work around it (the
    module makes that device current for the launch and restores the previous one).

    Raises:
        ValueError: a tensor is not a CUDA tensor, or the tensors are on different devices (names ``op``).
    """
    import torch

    devs = {t.device for t in tensors if t is not None}
    if not devs or any(d.type != "cuda" for d in devs):
        raise ValueError(f"{op}: the cuda backend needs CUDA tensors, got {sorted(str(d) for d in devs)}")
    if len(devs) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {', '.join(sorted(str(d) for d in devs))}")
    dev = devs.pop()
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.current_stream(index).cuda_stream, index
