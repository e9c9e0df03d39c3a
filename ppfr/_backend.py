"""Backend selection: one ``backend=`` argument on every op, one table, one env override.

Backends:

``ref``     the literal reference (for tests and benchmarks; slow, follows the paper's code step by step)
``torch``   a fast pure-PyTorch form of the same math (any device)
``cpp``     C++/OpenMP CPU kernels (``ppfr._C``)
``triton``  Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``)
``cuda``    CUDA kernels (``ppfr._C_cuda``; CUDA tensors)

``auto`` picks ``cuda > triton > torch`` for CUDA tensors and ``cpp > torch`` for CPU tensors, among the
backends an op implements. The environment variable ``PPFR_BACKEND`` overrides ``auto`` (never an explicit
choice), so a whole program can be switched to e.g. the torch path for numerics debugging.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ppfr import _ext

BACKENDS = ("auto", "ref", "torch", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run here; the message says what is missing."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton==3.7.1`"
    if device.type == "cuda" or triton_interpret():
        return None
    return (
        f"triton kernels need CUDA tensors (got {device.type}); on a CPU set TRITON_INTERPRET=1 "
        "before ppfr.kernels is imported to run them in Triton's interpreter"
    )


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run tensors on ``device`` here, or None if it can."""
    if backend in ("ref", "torch"):
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs CPU tensors only (got {device.type})"
        return _ext.load("_C")[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only (got {device.type})"
        return _ext.load("_C_cuda")[1]
    if backend == "triton":
        return _triton_reason(device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def resolve(op: str, backend: str, device: torch.device, implemented: Iterable[str]) -> str:
    """Return the concrete backend that runs ``op`` for tensors on ``device``.

    Raises:
        ValueError: ``backend`` is not a known name, or ``op`` does not implement it.
        BackendUnavailableError: the backend exists but cannot run here (the message says why).
    """
    implemented = tuple(implemented)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        env = os.environ.get("PPFR_BACKEND", "auto").strip() or "auto"
        if env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"PPFR_BACKEND={env!r} is not a backend; choose one of {BACKENDS}")
            if env in implemented and unavailable_reason(env, device) is None:
                return env
            # An override that cannot run this op/device falls back to auto: PPFR_BACKEND=cpp must not
            # break ops on CUDA tensors, nor ops that have no cpp kernel.
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            if cand in implemented and unavailable_reason(cand, device) is None:
                return cand
        return "torch"
    if backend not in implemented:
        raise ValueError(f"{op}: no {backend!r} implementation; {op} implements {implemented}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend
