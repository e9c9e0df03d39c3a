"""Backend selection: one ``backend=`` argument on every op, one table, one env override.

Backends:

``ref``     the literal reference (for tests and benchmarks; slow, follows the paper's code step by step)
``torch``   a fast pure-PyTorch form of the same math (any device)
``cpp``     C++/OpenMP CPU kernels (``ppfr._C``)
``triton``  Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``)
``cuda``    CUDA kernels (``ppfr._C_cuda``; CUDA tensors)

``auto`` picks ``cuda > triton > torch`` for CUDA tensors and ``cpp > torch`` for CPU tensors, among the
backends an op implements and that can run here: a GPU backend only when a CUDA device is actually present
(``torch.cuda.is_available()``) and the tensor is on it (never the Triton interpreter). The environment variable
``PPFR_BACKEND`` overrides ``auto`` (never an explicit choice), so a whole program can be switched to e.g. the
torch path for numerics debugging.

float64: the cuda and triton kernels of most ops compute in float32. An op passes ``dtype=`` (the dtype it
would compute in) to :func:`resolve`; then ``auto`` never picks a float32-only GPU backend for float64 (it takes
``torch``, which computes float64 on any device), and an explicit ``backend="cuda"``/``"triton"`` raises
:class:`DtypeUnsupportedError` instead of silently computing in float32. Ops whose GPU kernels are
dtype-generic (index/permutation kernels) or compute float64 natively do not pass ``dtype``.
`python -m ppfr.info` says why each GPU backend is or is not chosen here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ppfr import _ext

BACKENDS = ("auto", "ref", "torch", "cpp", "triton", "cuda")
GPU_BACKENDS = ("cuda", "triton")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run here; the message says what is missing."""


class DtypeUnsupportedError(BackendUnavailableError, TypeError):
    """Raised when an explicitly requested GPU backend would compute a float64 input in float32."""


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


def _no_cuda_device_reason() -> str | None:
    """Why no CUDA device is usable (torch.cuda.is_available() is False), or None."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"no CUDA device: this torch ({torch.__version__}) is built without CUDA"
    return f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"


def dtype_reason(backend: str, dtype: torch.dtype | None) -> str | None:
    """Why ``backend``'s kernels cannot compute ``dtype`` faithfully (float64 on a float32 GPU kernel), or None."""
    if backend in GPU_BACKENDS and dtype == torch.float64:
        return (
            f"the {backend} kernels compute in float32 and would downgrade a float64 input; "
            "use backend='torch' (float64 on any device) or cast the input to float32"
        )
    return None


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why ``backend`` cannot run tensors on ``device`` (of floating ``dtype``, if given) here, or None if it can."""
    if backend in ("ref", "torch"):
        return None
    if backend in GPU_BACKENDS:
        reason = dtype_reason(backend, dtype)
        if reason is not None:
            return reason
        if device.type == "cuda":
            reason = _no_cuda_device_reason()
            if reason is not None:
                return reason
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


def auto_candidates(device: torch.device) -> tuple[str, ...]:
    """The backends ``auto`` tries, in order, for tensors on ``device``."""
    return _AUTO_ORDER.get(device.type, ("torch",))


def resolve(
    op: str, backend: str, device: torch.device, implemented: Iterable[str], dtype: torch.dtype | None = None
) -> str:
    """Return the concrete backend that runs ``op`` for tensors on ``device``.

    Args:
        dtype: the floating dtype the op computes in; pass it when the op's GPU kernels are float32-only, so
            float64 is never silently downgraded (see the module docstring).

    Raises:
        ValueError: ``backend`` is not a known name, or ``op`` does not implement it.
        DtypeUnsupportedError: an explicit GPU backend was asked to compute float64 in its float32 kernels.
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
            if env in implemented and unavailable_reason(env, device, dtype) is None:
                return env
            # An override that cannot run this op/device falls back to auto: PPFR_BACKEND=cpp must not
            # break ops on CUDA tensors, nor ops that have no cpp kernel.
        for cand in auto_candidates(device):
            if cand in implemented and unavailable_reason(cand, device, dtype) is None:
                return cand
        return "torch"
    if backend not in implemented:
        raise ValueError(f"{op}: no {backend!r} implementation; {op} implements {implemented}")
    reason = dtype_reason(backend, dtype)
    if reason is not None:
        raise DtypeUnsupportedError(f"{op}: backend {backend!r} refuses {dtype}: {reason}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend


def gpu_unavailable_reason(backend: str) -> str | None:
    """Why ``auto`` would not choose GPU ``backend`` for CUDA tensors on this machine, or None if it would."""
    return _no_cuda_device_reason() or unavailable_reason(backend, torch.device("cuda"))


def gpu_status() -> dict[str, str]:
    """For each GPU backend: whether ``auto`` would choose it for CUDA tensors on this machine, and if not, why."""
    out = {}
    for be in GPU_BACKENDS:
        reason = gpu_unavailable_reason(be)
        out[be] = "chosen by auto for CUDA tensors" if reason is None else f"not chosen by auto: {reason}"
    if triton_interpret():
        out["triton"] += " (TRITON_INTERPRET is set: explicit backend='triton' runs CPU tensors in the interpreter)"
    return out
