"""The payload contract every side of ppfr shares: what a payload must be, the JSON codec, and what an embedding
must be. Numpy only (no torch, no msgpack at import), so the method boundary, the runners, the server and the
client SDK all check with the same code and say the same thing.

* ``validate(spec, arrays, where)``: one payload's tensors against a method's spec (``{name: TensorSpec}``):
  exactly the spec's names; each tensor (B, *spec.shape) of spec's dtype; one batch size B >= 1 for all (and at
  most ``max_batch``); floating values finite; values inside [low, high] where the spec sets them (1e-6 of
  slack: the spec's bounds are the float32 results of protect). Split in two steps so that a caller can check
  what is declared before it pays for the values: ``check_structure`` reads only ``.shape`` / ``.dtype``
  (numpy arrays, torch tensors, or the ``DeclaredTensor`` of a codec whose bytes are not decoded yet) and
  ``check_values`` reads the values (numpy arrays or torch tensors). ``check_origin`` checks the method name
  and schema version a payload carries. Every refusal is a ValueError naming ``where``, the tensor and the
  problem. Used by ``Payload.validate`` (``ppfr.methods.base``), ``Runner.run`` (``ppfr.deploy.runtime``) and
  the server (``ppfr.deploy.server.service``).
* The JSON codec (``encode_payload`` / ``read_payload`` / ...): the older request format next to the binary one of
  ``ppfr.deploy.wire``, whose peer-declared name / dtype / shape check (``wire.check_declared``) it shares::

      {"method": "partialface", "schema_version": 1,
       "tensors": {"dct": {"dtype": "float32", "shape": [1, 27, 112, 112], "data": "<base64 of the raw bytes>"}}}

  ``data`` is the tensor's C-order bytes, little-endian, standard base64 (RFC 4648 with padding); its length is
  checked against dtype and shape before a byte is decoded.
* ``l2_normalize(x)``: the one normalisation rule of embeddings, for runner outputs, galleries and the server.
  Rows are divided by their norm taken in float64; a row that is not finite, whose norm is at most ``MIN_NORM``
  (no direction) or at least ``MAX_NORM`` (its squared norm overflows float32: an input far outside what protect
  produces) cannot be compared by cosine: ``strict`` (the default) refuses it with ``DegenerateEmbeddingError`` naming the first such row;
  ``strict=False`` (a runner's batch, whose requests are judged one by one later) returns it as NaN, which no
  cosine mistakes for a match and the strict check refuses downstream.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from ppfr.deploy import wire
from ppfr.deploy.wire import MAX_RANK, MAX_TENSORS, WIRE_DTYPES, DeclaredTensor, WireError

__all__ = ["DegenerateEmbeddingError", "MAX_NORM", "MIN_NORM", "VALUE_SLACK", "WireError", "DeclaredTensor", "WIRE_DTYPES",
           "MAX_RANK", "check_origin", "check_structure", "check_values", "decode_payload", "decode_tensor",
           "dtype_name", "encode_payload", "encode_tensor", "l2_normalize", "read_payload", "read_tensor",
           "validate"]  # fmt: skip

MIN_NORM = 1e-6  # an embedding row of norm at most this has no usable direction (all-zero payloads embed to ~0)
# ... and one of norm at least this came from inputs far outside what protect produces (e.g. a payload of 1e30s):
# its squared norm overflows float32, the dtype embeddings are stored and compared in
MAX_NORM = 1e18
VALUE_SLACK = 1e-6  # a value may pass a spec bound by this much (the bounds are float32 results of protect)


# ---------------------------------------------------------------------------------------------- the contract
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


# ---------------------------------------------------------------------------------------------- embeddings
class DegenerateEmbeddingError(ValueError):
    """Embedding rows with no usable direction (not finite, or of a norm outside (MIN_NORM, MAX_NORM)). ``row``: the first such row;
    ``what``: why ("not finite" / "of norm 0"); ``count``: how many of ``total`` rows are degenerate."""

    def __init__(self, row: int, what: str, count: int, total: int) -> None:
        super().__init__(f"embeddings must be finite and non-zero: row {row} is {what} ({count} of {total} rows)")
        self.row, self.what, self.count, self.total = row, what, count, total


def l2_normalize(x: Any, *, strict: bool = True) -> np.ndarray:
    """(N, D) -> (N, D) float32 unit rows (see the module docstring for the degenerate rows and ``strict``)."""
    wide = np.asarray(x, dtype=np.float64)
    if wide.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {wide.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(wide, axis=1)
        bad = ~np.isfinite(wide).all(axis=1) | ~((norms > MIN_NORM) & (norms < MAX_NORM))
        if bad.any():
            if strict:
                i = int(np.flatnonzero(bad)[0])
                what = "not finite" if not np.isfinite(wide[i]).all() else f"of norm {norms[i]:.3g}"
                raise DegenerateEmbeddingError(i, what, int(bad.sum()), len(wide))
            norms = np.where(bad, np.nan, norms)
        return (wide / norms[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- JSON codec
def encode_tensor(a: Any) -> dict:
    """A numpy array or torch tensor -> {"dtype", "shape", "data"} with little-endian base64 bytes."""
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        a = a.detach().cpu().contiguous().numpy()
    a = np.asarray(a)
    if a.dtype.name not in WIRE_DTYPES:
        raise WireError(f"dtype {a.dtype} cannot be sent; wire dtypes: {sorted(WIRE_DTYPES)}")
    le = np.ascontiguousarray(a, dtype=WIRE_DTYPES[a.dtype.name])
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": base64.b64encode(le.tobytes()).decode("ascii")}


def decode_tensor(obj: Any, where: str = "tensor") -> np.ndarray:
    """The inverse of encode_tensor, refusing anything malformed with a WireError naming ``where``."""
    return read_tensor(obj, "tensor", where).decode()


def read_tensor(obj: Any, name: str, where: str) -> DeclaredTensor:
    """A JSON tensor object -> its checked dtype and shape, decoded on demand (``DeclaredTensor``). The declared
    name, dtype and shape go through the binary codec's check (``wire.check_declared``), and the base64 text's
    length must be exactly what they need, all before a byte is decoded."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise WireError(f"{where} must be an object with exactly dtype, shape, data; got {got}")
    dt, shape, count = wire.check_declared(name, obj["dtype"], obj["shape"], where)
    data = obj["data"]
    if not isinstance(data, str):
        raise WireError(f"{where}: data must be a base64 string")
    expected = count * dt.itemsize
    # base64 length is fixed by the byte count: check it before decoding (no allocation for a lying shape)
    if len(data) != 4 * ((expected + 2) // 3):
        raise WireError(f"{where}: {dt.name} {list(shape)} needs {expected} bytes, the base64 data has a "
                        f"different length")  # fmt: skip

    def decode() -> np.ndarray:
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:  # binascii.Error, or non-ASCII text
            raise WireError(f"{where}: data is not valid base64 ({str(exc)[:80]})") from None
        if len(raw) != expected:
            raise WireError(f"{where}: {dt.name} {list(shape)} needs {expected} bytes, got {len(raw)}")
        return wire.array_from_bytes(raw, dt, shape, where)

    return DeclaredTensor(name, dt.newbyteorder("="), shape, decode)


def encode_payload(payload: Any) -> dict:
    """A ``ppfr.methods.Payload`` -> its JSON wire object."""
    return {"method": payload.method, "schema_version": int(payload.schema_version),
            "tensors": {k: encode_tensor(v) for k, v in payload.tensors.items()}}  # fmt: skip


def decode_payload(obj: Any) -> tuple[str, int, dict[str, np.ndarray]]:
    """A JSON wire object -> (method, schema_version, {name: array}); WireError if malformed (the spec is the
    caller's to check: ``validate``)."""
    method, version, tensors = read_payload(obj)
    return method, version, {k: t.decode() for k, t in tensors.items()}


def read_payload(obj: Any) -> tuple[str, int, dict[str, DeclaredTensor]]:
    """``decode_payload`` without the decoding: {name: DeclaredTensor}, whose dtype and shape a server compares
    with its spec (``check_structure``) before ``decode()`` allocates."""
    if not isinstance(obj, dict) or set(obj) != {"method", "schema_version", "tensors"}:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise WireError(f"payload must be an object with exactly method, schema_version, tensors; got {got}")
    method, version, tensors = obj["method"], obj["schema_version"], obj["tensors"]
    if not isinstance(method, str):
        raise WireError("payload method must be a string")
    if not isinstance(version, int) or isinstance(version, bool):
        raise WireError("payload schema_version must be an integer")
    if not isinstance(tensors, dict) or not 1 <= len(tensors) <= MAX_TENSORS:
        raise WireError(f"payload tensors must be an object of 1..{MAX_TENSORS} tensors")
    return method, version, {k: read_tensor(v, k, f"payload tensor {k[:64]!r}") for k, v in tensors.items()}
