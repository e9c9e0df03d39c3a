"""Property / fuzz tests of the two payload codecs (issue 29): the binary wire format (``ppfr.deploy.wire``) and the
JSON one (``ppfr.deploy.client``). Seeded with valid messages, mutated at the byte and the header level; whatever
comes in, a decoder returns arrays of exactly the declared dtype and shape or raises its own WireError, never
anything else (a ValueError of numpy's, an OverflowError, a MemoryError).

The budget is fixed (a fixed number of examples per property, derandomized: the same inputs on every run, a few
seconds in all on 2 cores), so CI stays bounded and a failure reproduces.
"""

from __future__ import annotations

import base64
import struct

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppfr.deploy import wire
from ppfr.deploy.client import decode_payload, decode_tensor, encode_tensor
from ppfr.deploy.wire import WireError, decode_message, encode_message

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip

# Dimensions a peer may declare: small real ones, zero, and the sizes at and around every bound that matters.
DIMS = st.one_of(st.integers(0, 4), st.sampled_from([0, 1, 2**15, 2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1]),
                 st.integers(-(2**63), 2**64 - 1))  # fmt: skip
SHAPES = st.lists(DIMS, min_size=0, max_size=10)
DTYPES = st.sampled_from(sorted(wire.WIRE_DTYPES) + ["object", "float128", "", "<f4"])


def _array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


VALID = st.builds(lambda dtype, shape, seed: _array(dtype, tuple(shape), seed), st.sampled_from(sorted(wire.WIRE_DTYPES)),
                  st.lists(st.integers(0, 3), min_size=1, max_size=4), st.integers(0, 2**16))  # fmt: skip


def _encode(a: np.ndarray, encoding: str) -> bytes:
    """A valid message holding ``a`` (raw where int8 cannot encode it: an empty tensor)."""
    return encode_message("m", 1, {"t": a}, {"name": "n"}, encoding=encoding if a.size else "raw", int8_axes=(0,))


def _decodes_or_refuses(fn, *args):
    """fn(*args) either succeeds or raises WireError: any other exception fails the property."""
    try:
        return fn(*args)
    except WireError:
        return None


def _split(msg: bytes) -> tuple[dict, bytes]:
    head_len = struct.unpack_from("<I", msg, 4)[0]
    return msgpack.unpackb(msg[8:8 + head_len]), msg[8 + head_len:]


def _join(header: dict, data: bytes) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<4sI", wire.MAGIC, len(head)) + head + data


@FUZZ
@given(VALID, st.sampled_from(wire.ENCODINGS))
def test_binary_round_trip(a, encoding):
    _, _, out, _ = decode_message(_encode(a, encoding))
    assert out["t"].dtype == a.dtype and out["t"].shape == a.shape
    if encoding == "raw" or a.dtype.kind != "f":
        np.testing.assert_array_equal(out["t"], a)


@FUZZ
@given(VALID, st.sampled_from(wire.ENCODINGS), st.data())
def test_binary_mutated_bytes_decode_or_refuse(a, encoding, data):
    """Byte-level mutations of a valid message: flips, truncation, insertion, a rewritten header length."""
    msg = bytearray(_encode(a, encoding))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "head_len"]))
        if op == "flip" and msg:
            msg[data.draw(st.integers(0, len(msg) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del msg[data.draw(st.integers(0, len(msg))):]
        elif op == "insert":
            i = data.draw(st.integers(0, len(msg)))
            msg[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "head_len" and len(msg) >= 8:
            msg[4:8] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
    out = _decodes_or_refuses(decode_message, bytes(msg))
    if out is not None:
        for arr in out[2].values():
            assert isinstance(arr, np.ndarray)


@FUZZ
@given(VALID, st.sampled_from(wire.ENCODINGS), SHAPES, DTYPES, st.data())
def test_binary_lying_headers_decode_or_refuse(a, encoding, shape, dtype, data):
    """Header-level mutations of a valid message: a declared shape / dtype / nbytes / wire version the bytes do not
    back, including zero dimensions next to huge ones (the issue's reproducer) and non-integer types."""
    header, body = _split(_encode(a, encoding))
    t = header["tensors"][0]
    what = data.draw(st.sampled_from(["shape", "dtype", "nbytes", "wire", "shape+nbytes", "axes"]))
    if "shape" in what:
        t["shape"] = shape
    if what == "dtype":
        t["dtype"] = dtype
    if "nbytes" in what:
        t["nbytes"] = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.just(0)))
        body = body[:t["nbytes"]] if t["nbytes"] < len(body) else body
    if what == "wire":
        header["wire"] = data.draw(st.one_of(st.booleans(), st.floats(allow_nan=False), st.integers(-2, 3),
                                             st.text(max_size=3)))  # fmt: skip
    if what == "axes" and t["encoding"] == "int8":
        t["axes"] = data.draw(st.lists(st.integers(-2, 10), max_size=4))
    out = _decodes_or_refuses(decode_message, _join(header, body))
    if out is not None:
        arr = out[2]["t"]
        assert list(arr.shape) == t["shape"] and arr.dtype == wire.WIRE_DTYPES[t["dtype"]].newbyteorder("=")


@FUZZ
@given(VALID)
def test_json_round_trip(a):
    out = decode_tensor(encode_tensor(a))
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)  # fmt: skip


@FUZZ
@given(VALID, SHAPES, DTYPES, st.data())
def test_json_lying_tensors_decode_or_refuse(a, shape, dtype, data):
    """A valid JSON tensor with its shape, dtype or data replaced by anything JSON can hold, the issue's
    ``[0, 2**70]`` among them."""
    obj = encode_tensor(a)
    what = data.draw(st.sampled_from(["shape", "dtype", "data", "any", "zero+huge"]))
    if what == "shape":
        obj["shape"] = shape
    elif what == "dtype":
        obj["dtype"] = dtype
    elif what == "data":
        raw = base64.b64decode(obj["data"])
        obj["data"] = data.draw(st.one_of(st.text(max_size=16), st.just(base64.b64encode(raw[:-1]).decode()),
                                          st.just(obj["data"][:-1] + "!")))  # fmt: skip
    elif what == "any":
        obj[data.draw(st.sampled_from(["shape", "dtype", "data"]))] = data.draw(JSON_VALUES)
    else:
        obj["shape"] = [0] + data.draw(st.lists(st.integers(2**31 - 1, 2**80), min_size=1, max_size=7))
        obj["data"] = ""
    out = _decodes_or_refuses(decode_tensor, obj)
    if out is not None:
        assert list(out.shape) == obj["shape"] and out.dtype == wire.WIRE_DTYPES[obj["dtype"]].newbyteorder("=")


@FUZZ
@given(JSON_VALUES)
def test_json_payload_of_anything_decodes_or_refuses(obj):
    _decodes_or_refuses(decode_payload, {"method": "m", "schema_version": 1, "tensors": obj})
    _decodes_or_refuses(decode_payload, obj)
