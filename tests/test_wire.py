"""The binary wire format (``ppfr.deploy.wire``): round trips, the lossy encodings' error bounds, the byte budget
against the JSON format, and the refusal of every malformed message before anything is allocated."""

from __future__ import annotations

import json
import struct

import msgpack
import numpy as np
import pytest
import torch

import ppfr
from ppfr.deploy import wire
from ppfr.deploy.client import encode_payload, protect_images
from ppfr.deploy.wire import WireError, decode_message, encode_message


def _rng_tensor(shape, seed=0, scale=10.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def test_raw_round_trip_every_dtype_is_exact_and_little_endian():
    tensors = {"f32": _rng_tensor((2, 3, 4)), "f64": np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
               "i8": np.array([[-127, 5], [0, 127]], np.int8), "u8": np.array([[0, 255]], np.uint8),
               "i64": np.array([[-(2**40), 3]]), "b": np.array([[True, False, True]]),
               "t": torch.arange(4, dtype=torch.float16).reshape(1, 4)}  # fmt: skip
    msg = encode_message("m", 1, tensors, {"name": "alice", "top_k": 3})
    method, version, out, fields = decode_message(msg)
    assert (method, version, fields) == ("m", 1, {"name": "alice", "top_k": 3})
    for k, v in tensors.items():
        v = v.numpy() if isinstance(v, torch.Tensor) else v
        assert out[k].dtype == v.dtype and out[k].flags.writeable
        np.testing.assert_array_equal(out[k], v)
    # the data section is the tensors' little-endian bytes, back to back, after the 8-byte prefix and the header
    magic, head_len = struct.unpack_from("<4sI", msg)
    assert magic == b"PPFR"
    header = msgpack.unpackb(msg[8:8 + head_len])
    first = header["tensors"][0]
    assert first["encoding"] == "raw" and msg[8 + head_len:8 + head_len + first["nbytes"]] == \
        tensors["f32"].astype("<f4").tobytes()  # fmt: skip


def test_float16_and_int8_error_bounds_and_spec_range():
    x = _rng_tensor((2, 5, 8, 8), seed=1)
    x[:, 3] *= 0.01  # a channel of small values: per-channel scales keep it precise
    _, _, out, _ = decode_message(encode_message("m", 1, {"x": x}, encoding="float16"))
    assert out["x"].dtype == np.float32  # decoded to the tensor's own dtype (what the runner takes)
    assert np.all(np.abs(out["x"] - x) <= np.abs(x) * 2**-11 + 6e-8)
    x[1] *= 30  # a second face of much larger values: per-sample scales keep the first one precise
    for axes, bshape in (((), ()), ((1,), (1, -1, 1, 1)), ((0, 1), (2, -1, 1, 1))):
        msg = encode_message("m", 1, {"x": x}, encoding="int8", int8_axes=axes)
        _, _, out, _ = decode_message(msg)
        entry = msgpack.unpackb(msg[8:8 + struct.unpack_from("<I", msg, 4)[0]])["tensors"][0]
        assert entry["nbytes"] == x.size and entry.get("axes", []) == list(axes)
        scale = np.asarray(entry["scale"], np.float32).reshape(bshape)
        assert out["x"].dtype == np.float32
        assert np.all(np.abs(out["x"] - x) <= scale / 2 * (1 + 1e-4) + 1e-6)

    def err(axes):  # worst error on the small channel of the small face
        return np.abs(decode_message(encode_message("m", 1, {"x": x}, encoding="int8", int8_axes=axes))[2]["x"]
                      - x)[0, 3].max()  # fmt: skip

    assert err((0, 1)) < err((1,)) / 10 and err((1,)) < err(()) / 10
    # int8 with a spec range: decoded values never leave it, even for inputs slightly outside (clipped)
    img = np.clip(_rng_tensor((1, 3, 16, 16), seed=2, scale=0.6), -1.2, 1.2)
    _, _, out, _ = decode_message(encode_message("arcface", 1, {"image": img}, encoding="int8",
                                                 ranges={"image": (-1.0, 1.0)}))  # fmt: skip
    assert out["image"].min() >= -1 - 1e-6 and out["image"].max() <= 1 + 1e-6
    # non-float tensors always travel raw, whatever the encoding
    _, _, out, _ = decode_message(encode_message("m", 1, {"i": np.array([[1, 2]], np.int64)}, encoding="int8"))
    assert out["i"].dtype == np.int64
    with pytest.raises(WireError, match="float16's range"):
        encode_message("m", 1, {"x": np.full((1, 2), 1e6, np.float32)}, encoding="float16")


def test_partialface_payload_bytes_against_json():
    """The acceptance figure: a PartialFace payload (one face) in float16 binary takes <= 0.40 of the JSON bytes."""
    m = ppfr.build_method("partialface", depth=18, width=8).eval()
    p = protect_images(m, torch.rand(1, 3, 112, 112) * 2 - 1, seed=0)
    json_bytes = len(json.dumps({"payload": encode_payload(p), "top_k": 5}, separators=(",", ":")).encode())
    sizes = {e: len(wire.encode_payload_message(p, {"top_k": 5}, e, spec=m.payload_spec)) for e in wire.ENCODINGS}
    print(f"\nPartialFace payload, one face: JSON {json_bytes} B; " + ", ".join(
        f"{e} {n} B ({n / json_bytes:.3f})" for e, n in sizes.items()))  # fmt: skip
    assert sizes["raw"] / json_bytes <= 0.76 and sizes["float16"] / json_bytes <= 0.40
    assert sizes["int8"] / json_bytes <= 0.20


def _message(header: dict, data: bytes) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<4sI", b"PPFR", len(head)) + head + data


def _good_header(**tensor):
    t = {"name": "x", "dtype": "float32", "shape": [1, 4], "encoding": "raw", "offset": 0, "nbytes": 16, **tensor}
    return {"wire": 1, "method": "m", "schema_version": 1, "tensors": [t]}


@pytest.mark.parametrize("case, message, fragment", [
    ("short", b"PPF", "shorter than"),
    ("magic", b"JSON" + bytes(20), "magic"),
    ("header too large", struct.pack("<4sI", b"PPFR", 10**9) + bytes(16), "exceeds the limit"),
    ("header past end", struct.pack("<4sI", b"PPFR", 100) + bytes(16), "runs past the end"),
    ("not msgpack", struct.pack("<4sI", b"PPFR", 2) + b"\xc1\xc1", "not valid msgpack"),
    ("ext type", _message({"wire": 1, "method": msgpack.ExtType(5, b"x"), "schema_version": 1, "tensors": []}, b""),
     "not valid msgpack"),
    ("pickle-ish bin", _message({"wire": 1, "method": b"\x80\x04", "schema_version": 1, "tensors": []}, b""),
     "not valid msgpack"),
    ("unknown header key", _message({**_good_header(), "pickle": 1}, bytes(16)), "unknown keys ['pickle']"),
    ("missing key", _message({k: v for k, v in _good_header().items() if k != "method"}, bytes(16)), "missing"),
    ("version", _message({**_good_header(), "wire": 2}, bytes(16)), "version 2"),
    ("unknown tensor key", _message(_good_header(code="os.system"), bytes(16)), "unknown keys ['code']"),
    ("dtype", _message(_good_header(dtype="object"), bytes(16)), "dtype must be one of"),
    ("rank", _message(_good_header(shape=[]), bytes(16)), "shape must be"),
    ("negative dim", _message(_good_header(shape=[-1, 4]), bytes(16)), "shape must be"),
    ("lying nbytes", _message(_good_header(shape=[1000, 1000]), bytes(16)), "needs nbytes"),
    ("offset gap", _message(_good_header(offset=4), bytes(20)), "back to back"),
    ("short data", _message(_good_header(), bytes(12)), "describes 16 data bytes, the message has 12"),
    ("trailing data", _message(_good_header(), bytes(17)), "the message has 17"),
    ("encoding", _message(_good_header(encoding="zstd"), bytes(16)), "encoding must be one of"),
    ("int8 of ints", _message(_good_header(dtype="int32", encoding="int8", nbytes=4, scale=[1.0], zero=[0.0]),
                              bytes(4)), "floating tensors only"),  # fmt: skip
    ("int8 without scale", _message(_good_header(encoding="int8", nbytes=4), bytes(4)), "missing keys ['scale'"),
    ("int8 scale length", _message(_good_header(encoding="int8", nbytes=4, scale=[1.0, 2.0], zero=[0.0], axes=[1]),
                                   bytes(4)), "list of 4 numbers"),  # fmt: skip
    ("int8 axes order", _message(_good_header(encoding="int8", nbytes=4, scale=[1.0] * 4, zero=[0.0] * 4,
                                              axes=[1, 0]), bytes(4)), "increasing distinct"),  # fmt: skip
    ("int8 axis key", _message(_good_header(encoding="int8", nbytes=4, scale=[1.0], zero=[0.0], axis=1), bytes(4)),
     "unknown keys ['axis']"),
    ("int8 NaN scale", _message(_good_header(encoding="int8", nbytes=4, scale=[float("nan")], zero=[0.0]), bytes(4)),
     "finite"),
    ("int8 -128", _message(_good_header(encoding="int8", nbytes=4, scale=[1.0], zero=[0.0]), b"\x80\x00\x00\x00"),
     "[-127, 127]"),
    ("scale on raw", _message(_good_header(scale=[1.0]), bytes(16)), "unknown keys ['scale']"),
    ("bool bytes", _message(_good_header(dtype="bool", nbytes=4), b"\x00\x01\x02\x00"), "0 or 1"),
    ("fields", _message({**_good_header(), "fields": {"name": [1]}}, bytes(16)), "fields must be"),
    ("repeated names", _message({**_good_header(), "tensors": [_good_header()["tensors"][0],
                                {**_good_header()["tensors"][0], "offset": 16}]}, bytes(32)), "repeated tensor"),
])  # fmt: skip
def test_malformed_messages_are_refused(case, message, fragment):
    with pytest.raises(WireError) as e:
        decode_message(message)
    assert fragment in str(e.value), (case, str(e.value))


def test_good_hand_built_message_decodes():
    """The hand-built messages of the refusal cases are well-formed apart from the one fault each injects."""
    x = np.arange(4, dtype="<f4").reshape(1, 4)
    assert np.array_equal(decode_message(_message(_good_header(), x.tobytes()))[2]["x"], x)
