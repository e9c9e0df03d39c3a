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
