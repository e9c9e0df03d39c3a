"""The payload contract every side of ppfr shares: what a payload must be, the JSON codec, and what an embedding
must be. Numpy only (no torch, no msgpack at import), so the method boundary, the runners, the server and the
client SDK all check with the same code and say the same thing.

* ``validate(spec, arrays, where)`` / ``check_structure`` / ``check_values`` / ``check_origin``: one payload's
  tensors against a method's spec. Defined in ``ppfr.methods.contract`` (the method boundary needs them, and methods
  sit below deploy) and re-exported here: one definition for ``Payload.validate`` (``ppfr.methods.base``),
  ``Runner.run`` (``ppfr.deploy.runtime``) and the server (``ppfr.deploy.server.service``).
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
from ppfr.methods.contract import (  # the payload contract: one definition, in the methods' floor
    VALUE_SLACK, check_origin, check_structure, check_values, dtype_name, validate,
)  # fmt: skip

__all__ = ["DegenerateEmbeddingError", "MAX_NORM", "MIN_NORM", "VALUE_SLACK", "WireError", "DeclaredTensor", "WIRE_DTYPES",
           "MAX_RANK", "check_origin", "check_structure", "check_values", "decode_payload", "decode_tensor",
           "dtype_name", "encode_payload", "encode_tensor", "l2_normalize", "read_payload", "read_tensor",
           "validate"]  # fmt: skip

MIN_NORM = 1e-6  # an embedding row of norm at most this has no usable direction (all-zero payloads embed to ~0)
# ... and one of norm at least this came from inputs far outside what protect produces (e.g. a payload of 1e30s):
# its squared norm overflows float32, the dtype embeddings are stored and compared in
MAX_NORM = 1e18


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
