"""The binary wire format of ``ppfr serve`` requests (``Content-Type: application/x-ppfr``): raw tensor bytes behind
a small msgpack header. No base64, no JSON parsing of megabytes, no pickle.

Layout of one message::

    b"PPFR"                    4 bytes, magic
    header_len                 uint32 little-endian, at most MAX_HEADER_BYTES
    header                     msgpack map (below), exactly header_len bytes
    data                       the tensors' bytes, back to back in header order, nothing before, between or after

Header (every key required unless marked; any other key is refused)::

    {"wire": 1,                                  this format's version (WIRE_VERSION)
     "method": "partialface", "schema_version": 1,  the Payload's method and schema version
     "fields": {"name": "alice", "top_k": 5},    the endpoint's other fields (optional; strings / ints only)
     "tensors": [{"name": "dct",
                  "dtype": "float32",             the tensor's dtype once decoded (what the runner receives)
                  "shape": [1, 27, 112, 112],
                  "encoding": "raw",              raw | float16 | int8 (below)
                  "offset": 0, "nbytes": 1354752, its bytes within data
                  "scale": [...], "zero": [...], "axes": [0, 1]}]}   int8 only: the affine map (axes optional)

Encodings of a tensor of a floating dtype (a non-float tensor is always ``raw``):

* ``raw``      the C-order bytes of ``dtype``, little-endian. Lossless.
* ``float16``  IEEE half precision, little-endian, decoded to ``dtype``: half the bytes of float32, ~3 significant
               digits (relative error <= 2^-11); refused by the encoder when a value does not fit (|x| > 65504).
* ``int8``     x = q * scale + zero with q in [-127, 127]: per tensor (one scale and zero, no ``axes``) or per
               slice (``axes``: increasing axis indices; one scale and zero per index combination of those axes,
               C-order, e.g. [0, 1] = per sample and channel of a (B, C, H, W) tensor, the client's default, so
               the faces of one message never share a scale). The encoder maps [min, max] of each slice, clipped
               to the spec's [low, high] when it has one, onto [-127, 127], so decoded values stay inside the
               spec's range. A quarter of the bytes of float32; error <= scale / 2 per element.

``decode_message`` checks everything a peer controls before allocating anything proportional to it: the magic, the
header size against the limit, the header's types, keys, dtype names, ranks and dimensions, that each tensor's
``nbytes`` is what its dtype and shape need and that the tensors tile the data exactly; only then are the bytes
viewed (one copy per tensor, into the decoded dtype). ``read_message`` stops one step earlier: it returns each
tensor's checked name, dtype and shape (``DeclaredTensor``) with its bytes still undecoded, so that a server compares
them with its method's spec before it allocates anything (a tensor declared float64 and sent as int8 would otherwise
decode to 8x its bytes before being refused). ``check_declared`` is the one check of a peer-declared name, dtype and
shape, shared with the JSON codec of ``ppfr.deploy.protocol``; every malformed input raises ``WireError``, nothing else.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

MAGIC = b"PPFR"
WIRE_VERSION = 1
CONTENT_TYPE = "application/x-ppfr"
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: room for per-sample, per-channel int8 scales of a 16-face enrolment
MAX_RANK = 8
MAX_TENSORS = 64
# Elements of one tensor, its zero dimensions counted as 1 (see check_declared): 2 Gi, far above any payload a
# request can carry (the server's body limit refuses those first), far below what makes numpy's size arithmetic fail.
MAX_ELEMENTS = 1 << 31
MAX_NAME = 64
ENCODINGS = ("raw", "float16", "int8")
_PREFIX = struct.Struct("<4sI")

# dtype names accepted on the wire -> little-endian numpy dtypes. Plain numeric types only: no object arrays.
WIRE_DTYPES: dict[str, np.dtype] = {n: np.dtype(n).newbyteorder("<") for n in (
    "float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")}  # fmt: skip
_FIELD_TYPES = (str, int)
_HEADER_KEYS = {"wire", "method", "schema_version", "tensors"}
_HEADER_OPTIONAL = {"fields"}
_TENSOR_KEYS = {"name", "dtype", "shape", "encoding", "offset", "nbytes"}
_INT8_KEYS = {"scale", "zero"}
_INT8_OPTIONAL = {"axes"}
MAX_SCALES = 1 << 15  # int8 scale / zero entries per tensor (msgpack lists are capped at this length)


class WireError(ValueError):
    """A message that does not follow the wire format (the message says what is wrong)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any, n: int = 80) -> str:
    """repr(v), cut: an error message quotes what the peer sent without echoing a megabyte of it."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def check_declared(name: Any, dtype: Any, shape: Any, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """The one check of a tensor's peer-declared name, dtype and shape, for both codecs (binary and JSON) -> (its
    little-endian wire dtype, its shape, its element count); WireError naming ``where`` otherwise.

    Every size is checked before any arithmetic and the arithmetic is in Python ints: each dimension, then the
    product of the dimensions with zeros counted as 1, is at most MAX_ELEMENTS. Counting zeros as 1 is what makes
    the check sufficient: [0, 2**31-1, 2**31-1, 2**31-1] holds no element, yet numpy refuses to reshape to it
    ("array is too big": it multiplies the other dimensions), so a bound on the element count alone lets it through.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise WireError(f"{where}: name must be a non-empty string of at most {MAX_NAME} characters")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise WireError(f"{where}: dtype must be one of {sorted(WIRE_DTYPES)}, got {_short(dtype)}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK
            or not all(_is_int(d) and 0 <= d <= MAX_ELEMENTS for d in shape)):  # fmt: skip
        raise WireError(f"{where}: shape must be a list of 1..{MAX_RANK} integers in 0..{MAX_ELEMENTS}, "
                        f"got {_short(shape)}")  # fmt: skip
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise WireError(f"{where}: shape {shape} declares more than {MAX_ELEMENTS} elements (zero dimensions "
                        f"counted as 1)")  # fmt: skip
    return WIRE_DTYPES[dtype], tuple(shape), math.prod(shape)


@dataclass(frozen=True)
class DeclaredTensor:
    """A tensor whose header a codec has checked (name, dtype, shape, and that its bytes are exactly what those
    need) but whose bytes are not decoded yet: a server compares ``dtype`` and ``shape`` with its spec first, then
    calls ``decode()`` (WireError if the bytes themselves are malformed, e.g. a bool byte of 2)."""

    name: str
    dtype: np.dtype  # the decoded array's dtype (native byte order)
    shape: tuple[int, ...]
    _decode: Callable[[], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def decode(self) -> np.ndarray:
        return self._decode()


def array_from_bytes(raw: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Raw little-endian bytes of a checked ``dtype`` / ``shape`` (``len(raw)`` already matched) -> a writable array
    in native byte order; the byte-level check both codecs share (a bool byte must be 0 or 1)."""
    if dtype.kind == "b" and bytes(raw).strip(b"\x00\x01"):
        raise WireError(f"{where}: bool bytes must be 0 or 1")
    # copy=True: a writable array that does not pin the request body (torch.from_numpy refuses read-only ones)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


# ------------------------------------------------------------------------------------------------ encode
def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        a = a.detach().cpu().contiguous().numpy()
    return np.asarray(a)


def _broadcast_shape(shape: list[int] | tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d if i in axes else 1 for i, d in enumerate(shape))


def _int8_affine(x: np.ndarray, axes: tuple[int, ...], low: float | None, high: float | None
                 ) -> tuple[np.ndarray, list[float], list[float]]:  # fmt: skip
    """x (float) -> (q int8 in [-127, 127], scale, zero) with x ~= q * scale + zero, per tensor (``axes`` empty) or
    per slice of ``axes`` (scale / zero in C order over those axes)."""
    other = tuple(i for i in range(x.ndim) if i not in axes)
    bshape = _broadcast_shape(x.shape, axes)
    lo = x.min(axis=other, keepdims=True).astype(np.float64).reshape(-1)
    hi = x.max(axis=other, keepdims=True).astype(np.float64).reshape(-1)
    if low is not None:
        lo, hi = np.maximum(lo, low), np.maximum(hi, low)
    if high is not None:
        lo, hi = np.minimum(lo, high), np.minimum(hi, high)
    scale = (hi - lo) / 254.0
    zero = lo + 127.0 * scale  # q = -127 decodes to lo, q = 127 to hi
    safe = np.where(scale > 0, scale, 1.0)
    q = np.rint((x.astype(np.float64) - zero.reshape(bshape)) / safe.reshape(bshape))  # (bshape broadcasts)
    q = np.clip(q, -127, 127).astype(np.int8)
    return q, [float(v) for v in scale], [float(v) for v in zero]


def encode_message(method: str, schema_version: int, tensors: dict[str, Any], fields: dict[str, Any] | None = None,
                   encoding: str = "raw", int8_axes: tuple[int, ...] = (0, 1),
                   ranges: dict[str, tuple[float | None, float | None]] | None = None) -> bytes:  # fmt: skip
    """Tensors (numpy or torch, a leading batch axis) -> one wire message.

    encoding: ``raw`` | ``float16`` | ``int8`` for the floating tensors (others always go raw). int8_axes: the axes
    with their own int8 scales (default per sample and channel; () one scale per tensor; axes beyond a tensor's
    rank are dropped for it). ranges: {name: (low, high)} of the method's payload spec, so int8 never decodes
    outside it.
    """
    if encoding not in ENCODINGS:
        raise WireError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    entries, blobs, offset = [], [], 0
    for name, value in tensors.items():
        a = _numpy(value)
        if a.dtype.name not in WIRE_DTYPES:
            raise WireError(f"tensor {name!r}: dtype {a.dtype} cannot be sent; wire dtypes: {sorted(WIRE_DTYPES)}")
        enc = encoding if a.dtype.kind == "f" else "raw"
        entry: dict[str, Any] = {"name": str(name), "dtype": a.dtype.name, "shape": [int(d) for d in a.shape],
                                 "encoding": enc}  # fmt: skip
        if enc == "raw":
            blob = np.ascontiguousarray(a, dtype=WIRE_DTYPES[a.dtype.name]).tobytes()
        elif enc == "float16":
            with np.errstate(over="ignore"):
                h = np.ascontiguousarray(a, dtype="<f2")
            if not np.isfinite(h).all() and np.isfinite(a).all():
                raise WireError(f"tensor {name!r} has values beyond float16's range (65504): send it raw")
            blob = h.tobytes()
        else:
            if a.size == 0 or not np.isfinite(a).all():
                raise WireError(f"tensor {name!r}: int8 needs a non-empty tensor of finite values")
            low, high = (ranges or {}).get(name, (None, None))
            axes = tuple(sorted({int(i) for i in int8_axes if 0 <= int(i) < a.ndim}))
            if math.prod(a.shape[i] for i in axes) > MAX_SCALES:
                raise WireError(f"tensor {name!r}: int8 axes {axes} need more than {MAX_SCALES} scales")
            q, scale, zero = _int8_affine(a, axes, low, high)
            entry.update(scale=scale, zero=zero)
            if axes:
                entry["axes"] = list(axes)
            blob = q.tobytes()
        entry.update(offset=offset, nbytes=len(blob))
        offset += len(blob)
        entries.append(entry)
        blobs.append(blob)
    header: dict[str, Any] = {"wire": WIRE_VERSION, "method": str(method), "schema_version": int(schema_version),
                              "tensors": entries}  # fmt: skip
    if fields:
        header["fields"] = dict(fields)
    import msgpack  # here, not at import: the payload contract (ppfr.deploy.protocol) imports this module in a
    # core install, where msgpack (ppfr[serve]) may be missing

    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES} (int8 scales of too many samples "
                        f"and channels: send fewer faces per request, or float16)")  # fmt: skip
    return b"".join([_PREFIX.pack(MAGIC, len(head)), head, *blobs])


def encode_payload_message(payload: Any, fields: dict[str, Any] | None = None, encoding: str = "raw",
                           int8_axes: tuple[int, ...] = (0, 1),
                           spec: dict[str, Any] | None = None) -> bytes:  # fmt: skip
    """A ``ppfr.methods.Payload`` (+ the endpoint's fields) -> one wire message; spec: the method's payload_spec
    (``TensorSpec`` with ``low`` / ``high``), used by int8 to stay inside the value range."""
    ranges = {k: (s.low, s.high) for k, s in spec.items()} if spec else None
    return encode_message(payload.method, int(payload.schema_version), payload.tensors, fields, encoding, int8_axes,
                          ranges)  # fmt: skip


# ------------------------------------------------------------------------------------------------ decode
def _keys(obj: Any, required: set[str], optional: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise WireError(f"{where} must be a map, got {type(obj).__name__}")
    missing, unknown = required - set(obj), set(obj) - required - optional
    if missing or unknown:
        raise WireError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(map(str, unknown))}")
    return obj


def _float_list(v: Any, n: int, where: str, positive: bool = False) -> np.ndarray:
    if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in v):  # fmt: skip
        raise WireError(f"{where} must be a list of {n} numbers")
    arr = np.asarray(v, np.float64)
    if not np.isfinite(arr).all() or (positive and (arr < 0).any()):
        raise WireError(f"{where} must be finite" + (" and >= 0" if positive else ""))
    return arr


def _check_entry(t: Any, i: int) -> tuple[dict, int]:
    """Validate one tensor entry's structure; returns it and the byte count its encoding, dtype and shape need."""
    where = f"tensor {i}"
    if not isinstance(t, dict):
        raise WireError(f"{where} must be a map")
    enc = t.get("encoding")
    if enc not in ENCODINGS:
        raise WireError(f"{where}: encoding must be one of {ENCODINGS}, got {enc!r}")
    _keys(t, _TENSOR_KEYS | (_INT8_KEYS if enc == "int8" else set()), _INT8_OPTIONAL if enc == "int8" else set(),
          where)  # fmt: skip
    if isinstance(t["name"], str) and 0 < len(t["name"]) <= MAX_NAME:
        where = f"tensor {t['name']!r}"
    dt, shape, count = check_declared(t["name"], t["dtype"], t["shape"], where)
    dtype = t["dtype"]
    if enc != "raw" and dt.kind != "f":
        raise WireError(f"{where}: encoding {enc} applies to floating tensors only, not {dtype}")
    need = count * {"raw": dt.itemsize, "float16": 2, "int8": 1}[enc]  # Python ints, bounded by check_declared
    if not _is_int(t["offset"]) or not _is_int(t["nbytes"]) or t["nbytes"] != need:
        raise WireError(f"{where}: {enc} {dtype} {list(shape)} needs nbytes {need}, the header says "
                        f"{_short(t['nbytes'])}")  # fmt: skip
    if enc == "int8":
        axes = t.get("axes", [])
        if (not isinstance(axes, list) or not all(_is_int(i) and 0 <= i < len(shape) for i in axes)
                or axes != sorted(set(axes))):  # fmt: skip
            raise WireError(f"{where}: int8 axes must be increasing distinct integers in 0..{len(shape) - 1}, "
                            f"got {_short(axes)}")  # fmt: skip
        n = math.prod(shape[i] for i in axes)
        if n > MAX_SCALES:
            raise WireError(f"{where}: int8 axes {axes} need {n} scales, more than {MAX_SCALES}")
        _float_list(t["scale"], n, f"{where}: int8 scale", positive=True)
        _float_list(t["zero"], n, f"{where}: int8 zero")
    return t, need


def decode_message(data: bytes | bytearray | memoryview, max_header_bytes: int = MAX_HEADER_BYTES
                   ) -> tuple[str, int, dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """One wire message -> (method, schema_version, {name: array in its decoded dtype}, fields). WireError if it
    is malformed in any way; the method's spec (names, shapes, range) is the caller's to check."""
    method, version, tensors, fields = read_message(data, max_header_bytes)
    return method, version, {k: t.decode() for k, t in tensors.items()}, fields


def read_message(data: bytes | bytearray | memoryview, max_header_bytes: int = MAX_HEADER_BYTES
                 ) -> tuple[str, int, dict[str, DeclaredTensor], dict[str, Any]]:  # fmt: skip
    """``decode_message`` without the decoding: every check of the message's structure and sizes, and
    {name: DeclaredTensor} whose ``decode()`` allocates (compare its dtype and shape with the spec first)."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise WireError(f"message of {len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise WireError(f"not a ppfr wire message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if head_len > max_header_bytes:
        raise WireError(f"header of {head_len} bytes exceeds the limit of {max_header_bytes}")
    if _PREFIX.size + head_len > len(view):
        raise WireError(f"header of {head_len} bytes runs past the end of the {len(view)}-byte message")
    import msgpack  # (see encode_message)

    try:
        # Bounded containers and no extension types: a header is a few small maps and lists.
        header = msgpack.unpackb(view[_PREFIX.size:_PREFIX.size + head_len], raw=False, use_list=True,
                                 strict_map_key=True, max_str_len=4096, max_bin_len=0, max_ext_len=0,
                                 max_array_len=MAX_SCALES, max_map_len=64)  # fmt: skip
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError, limits
        raise WireError(f"header is not valid msgpack ({type(exc).__name__}: {str(exc)[:120]})") from None
    _keys(header, _HEADER_KEYS, _HEADER_OPTIONAL, "header")
    if not _is_int(header["wire"]) or header["wire"] != WIRE_VERSION:  # `true == 1` in Python: not a version
        raise WireError(f"wire format version {_short(header['wire'])} is not supported (this server reads "
                        f"{WIRE_VERSION})")  # fmt: skip
    method, version, fields = header["method"], header["schema_version"], header.get("fields", {})
    if not isinstance(method, str):
        raise WireError("method must be a string")
    if not _is_int(version):
        raise WireError("schema_version must be an integer")
    if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, _FIELD_TYPES)
                                               and not isinstance(v, bool) for k, v in fields.items()):  # fmt: skip
        raise WireError("fields must be a map of strings to strings or integers")
    entries = header["tensors"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TENSORS:
        raise WireError(f"tensors must be a list of 1..{MAX_TENSORS} entries")
    body = view[_PREFIX.size + head_len:]
    checked, offset = [], 0
    for i, t in enumerate(entries):
        t, need = _check_entry(t, i)
        if t["offset"] != offset:
            raise WireError(f"tensor {t['name']!r}: offset {t['offset']} != {offset} (tensors are back to back, "
                            f"in header order)")  # fmt: skip
        offset += need
        checked.append(t)
    if offset != len(body):  # before any allocation: the header's sizes must be the bytes that came
        raise WireError(f"the header describes {offset} data bytes, the message has {len(body)}")
    names = [t["name"] for t in checked]
    if len(set(names)) != len(names):
        raise WireError(f"repeated tensor names {names}")
    out = {}
    for t in checked:
        dt = WIRE_DTYPES[t["dtype"]]
        raw = body[t["offset"]:t["offset"] + t["nbytes"]]
        out[t["name"]] = DeclaredTensor(t["name"], dt.newbyteorder("="), tuple(t["shape"]),
                                        lambda t=t, raw=raw: _decode_tensor(t, raw))  # fmt: skip
    return method, version, out, dict(fields)


def _decode_tensor(t: dict, raw: memoryview) -> np.ndarray:
    """The bytes of one validated entry -> a writable array of its dtype (native byte order)."""
    dt, shape, enc = WIRE_DTYPES[t["dtype"]], t["shape"], t["encoding"]
    native = dt.newbyteorder("=")
    if enc == "raw":
        return array_from_bytes(raw, dt, tuple(shape), f"tensor {t['name']!r}")
    if enc == "float16":
        return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(native)
    q = np.frombuffer(raw, dtype=np.int8).reshape(shape)
    if np.any(q == -128):
        raise WireError(f"tensor {t['name']!r}: int8 values must lie in [-127, 127]")
    bshape = _broadcast_shape(shape, tuple(t.get("axes", [])))
    scale = np.asarray(t["scale"], np.float64).reshape(bshape)
    zero = np.asarray(t["zero"], np.float64).reshape(bshape)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge scale overflows: the server's finite check says so
        return (q.astype(native) * scale.astype(native) + zero.astype(native)).astype(native)


def is_message(data: bytes | bytearray | memoryview) -> bool:
    return bytes(memoryview(data)[:4]) == MAGIC
