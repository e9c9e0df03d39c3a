"""The payload contract: what a payload must be, checked the same way by the method boundary (``Payload.validate``,
``ppfr.methods.base``), the runners (``ppfr.deploy.runtime``) and the server (``ppfr.deploy.server.service``).

It lives here, in the methods' floor, because the method boundary needs it and methods must not import deploy (the
floor above); ``ppfr.deploy.protocol`` re-exports every name, so the runners, the server and the client SDK import
it from there as before. Numpy only: nothing here imports torch (a torch tensor is read through ``.shape``,
``.dtype`` and ``.detach()``).

* ``validate(spec, arrays, where)``: one payload's tensors against a method's spec (``{name: TensorSpec}``):
  exactly the spec's names; each tensor (B, *spec.shape) of spec's dtype; one batch size B >= 1 for all (and at
  most ``max_batch``); floating values finite; values inside [low, high] where the spec sets them
  (``VALUE_SLACK`` = 1e-6 of slack: the spec's bounds are the float32 results of protect).
* Split in two steps so that a caller can check what is declared before it pays for the values:
  ``check_structure`` reads only ``.shape`` / ``.dtype`` (numpy arrays, torch tensors, or the ``DeclaredTensor`` of
  a codec whose bytes are not decoded yet) and ``check_values`` reads the values (numpy arrays or torch tensors).
* ``check_origin`` checks the method name and schema version a payload carries.

Every refusal is a ValueError naming ``where``, the tensor and the problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["VALUE_SLACK", "check_origin", "check_structure", "check_values", "dtype_name", "validate"]

VALUE_SLACK = 1e-6  # a value may pass a spec bound by this much (the bounds are float32 results of protect)


def dtype_name(dtype: Any) -> str:
    """A torch or numpy dtype -> its numpy name (``torch.float32`` and ``np.float32`` -> "float32"). A numpy dtype
    in non-native byte order is named with it (">float32"): it is not the dtype a runner computes in."""
    if isinstance(dtype, np.dtype):
        return dtype.name if dtype.isnative else f"{dtype.byteorder}{dtype.name}"
    return str(dtype).removeprefix("torch.")


def _rgb_hint(tensors: dict[str, Any], spec: dict[str, Any]) -> str:
    """A hint when what was sent looks like an image batch (B, 3, H, W) and the spec takes no such tensor."""
    if any(len(s.shape) == 3 and s.shape[0] == 3 for s in spec.values()):
        return ""
    if any(len(getattr(t, "shape", ())) == 4 and t.shape[1] == 3 for t in tensors.values()):
        return " (this looks like an RGB image: protect it on the client with the method's protect)"
    return ""


def check_origin(method: str, version: int, expected_method: str, expected_version: int) -> None:
    """The method name and schema version a payload carries must be the ones served; ValueError otherwise."""
    if method != expected_method:
        raise ValueError(f"payload is for method {method!r}, this server runs {expected_method!r}")
    if version != expected_version:
        raise ValueError(f"payload schema version {version} != {expected_version}")


def check_structure(spec: dict[str, Any], tensors: Any, where: str = "payload", *, max_batch: int | None = None,
                    array_type: type | None = None, allow_empty: bool = False) -> int:  # fmt: skip
    """Names, per-sample shapes, dtypes and the batch size of ``tensors`` (a dict name -> anything with ``.shape``
    and ``.dtype``) against ``spec``; the batch size B. Reads no value. ``array_type``: the type each tensor must
    be (a runner takes numpy arrays only). ``allow_empty``: B = 0 passes (a traced graph's symbolic batch)."""
    if not isinstance(tensors, dict):
        raise ValueError(f"{where}: inputs must be a dict name -> array, got {type(tensors).__name__}")
    missing, extra = [k for k in spec if k not in tensors], sorted(k for k in tensors if k not in spec)
    if missing or extra:
        raise ValueError(f"{where} must hold tensors {list(spec)}; missing {missing}, unexpected "
                         f"{extra}{_rgb_hint(tensors, spec)}")  # fmt: skip
    batch = None
    for name, s in spec.items():
        t = tensors[name]
        if array_type is not None and not isinstance(t, array_type):
            kind = "numpy array" if array_type is np.ndarray else array_type.__name__
            raise ValueError(f"{where} {name!r} must be a {kind}, got {type(t).__name__}")
        shape, want = tuple(getattr(t, "shape", ())), dtype_name(s.dtype)
        got = dtype_name(t.dtype) if hasattr(t, "dtype") else type(t).__name__
        if len(shape) != len(s.shape) + 1 or shape[1:] != tuple(s.shape) or got != want:
            hint = " (an RGB image is not a payload)" if _rgb_hint({name: t}, {name: s}) else ""
            raise ValueError(f"{where} {name!r} must be (B, {', '.join(map(str, s.shape))}) {want}, got "
                             f"{shape} {got}{hint}")  # fmt: skip
        if batch is not None and shape[0] != batch:
            raise ValueError(f"{where} tensors disagree on the batch size ({name!r} has {shape[0]}, others {batch})")
        batch = shape[0]
    if batch is None:
        raise ValueError(f"{where}: the spec names no tensor")
    if not allow_empty and batch == 0:
        raise ValueError(f"{where} has no samples (an empty batch)")
    if max_batch is not None and batch > max_batch:
        raise ValueError(f"{where}: batch {batch} exceeds this engine's maximum {max_batch}; split the batch")
    return batch


def _min_max(a: Any) -> tuple[float, float]:
    if hasattr(a, "detach"):  # torch.Tensor (without importing torch): one pass on its device
        lo, hi = a.detach().aminmax()
        return float(lo), float(hi)
    return float(a.min()), float(a.max())


def check_values(spec: dict[str, Any], arrays: dict[str, Any], where: str = "payload") -> None:
    """Values of ``arrays`` (numpy arrays or torch tensors whose structure passed ``check_structure``): floating
    ones finite, all inside the spec's [low, high] where it sets them. One min / max pass per tensor: min and max
    propagate NaN and an infinity is the min or the max, so both finite means every value is."""
    for name, s in spec.items():
        a = arrays[name]
        floating = dtype_name(a.dtype).startswith(("float", "bfloat"))
        if not a.shape or 0 in tuple(a.shape) or not (floating or s.low is not None or s.high is not None):
            continue
        lo, hi = _min_max(a)
        if floating and not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{where} {name!r} has non-finite values (NaN or infinite)")
        if s.low is not None and lo < s.low - VALUE_SLACK:
            raise ValueError(f"{where} {name!r} has values below {s.low} (min {lo:g})")
        if s.high is not None and hi > s.high + VALUE_SLACK:
            raise ValueError(f"{where} {name!r} has values above {s.high} (max {hi:g})")


def validate(spec: dict[str, Any], arrays: dict[str, Any], where: str = "payload", *, max_batch: int | None = None,
             array_type: type | None = None) -> int:  # fmt: skip
    """``check_structure`` then ``check_values``: the whole contract; returns the batch size."""
    batch = check_structure(spec, arrays, where, max_batch=max_batch, array_type=array_type)
    check_values(spec, arrays, where)
    return batch
