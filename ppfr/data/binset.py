"""insightface verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...), read safely.

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` a list of 2P encoded JPEGs (pair i = images 2i, 2i+1)
and ``issame`` a list of P bools (METHODS.md §7.1). A pickle can run arbitrary code while loading (a ``REDUCE`` of
``os.system``, say), and these files are downloaded from mirrors, so ``pickle.load`` is never called on one.
:func:`read_bin` admits only what the format needs -- bytes, lists, tuples and bools -- in three layers:

1. every opcode of the stream is checked against a whitelist before anything is built (no ``STACK_GLOBAL``, no
   ``BUILD``/``INST``/``OBJ``/``NEWOBJ``, no extension registry, no persistent ids, no out-of-band buffers);
   the globals admitted are ``_codecs.encode`` and ``bytes``, which is how Python 3 writes ``bytes`` at pickle
   protocol <= 2 (``encode(<latin-1 str>, "latin1")``, and ``bytes()`` for ``b""``);
2. the unpickler's ``find_class`` maps them to stand-ins that accept only ``(str, "latin1")`` and ``()``
   respectively, and refuses every other global;
3. the result must be exactly ``(list of bytes, list of bool)`` with two images per pair.

A refused file raises :class:`~ppfr.data._common.DataFormatError` naming the offending opcode or global.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ppfr.data._common import DataFormatError

_ALLOWED_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK",
        "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
        "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
        "NEWTRUE", "NEWFALSE", "INT",  # protocol 0/1 write bools as INT "01"/"00"
        "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",  # bytes (protocol >= 3)
        "SHORT_BINSTRING", "BINSTRING", "STRING",  # Python 2 str -> bytes (loaded with encoding="bytes")
        "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",  # only as _codecs.encode's arguments
        "GLOBAL", "REDUCE",  # only ``_codecs encode`` (checked below)
        "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    }
)  # fmt: skip
_ALLOWED_GLOBALS = frozenset({"_codecs encode", "__builtin__ bytes", "builtins bytes"})


def _latin1_bytes(s: object, encoding: object = "latin1") -> bytes:
    # Python 3 pickles b"..." at protocol <= 2 as _codecs.encode(<latin-1 str>, "latin1").
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise DataFormatError("_codecs.encode is admitted only as encode(str, 'latin1') (a pickled bytes object)")
    return s.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    # ... and the empty b"" as bytes() (a REDUCE with no arguments).
    if args:
        raise DataFormatError("bytes() is admitted only without arguments (a pickled empty bytes object)")
    return b""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in (("builtins", "bytes"), ("__builtin__", "bytes")):
            return _empty_bytes
        raise DataFormatError(f"global {module}.{name} is not allowed in a verification .bin")

    def persistent_load(self, pid):  # noqa: D102 - pickle hook
        raise DataFormatError("persistent ids are not allowed in a verification .bin")


def _check_opcodes(data: bytes, where: str) -> None:
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            if op.name not in _ALLOWED_OPCODES:
                raise DataFormatError(
                    f"refusing {where}: pickle opcode {op.name} at byte {pos} is not allowed in a verification .bin "
                    "(only bytes, lists, tuples and bools are admitted; the file may try to run code)"
                )
            if op.name == "GLOBAL" and arg not in _ALLOWED_GLOBALS:
                raise DataFormatError(
                    f"refusing {where}: pickle imports {str(arg).replace(' ', '.')} at byte {pos}; a verification "
                    ".bin holds only bytes, lists, tuples and bools (the file may try to run code)"
                )
    except DataFormatError:
        raise
    except Exception as exc:  # genops raises ValueError & co. on a malformed stream
        raise DataFormatError(f"refusing {where}: not a valid pickle ({exc})") from None


@dataclass(frozen=True)
class BinSet:
    """A verification set: ``images[2 i]``, ``images[2 i + 1]`` form pair ``i``; ``issame[i]`` is its truth."""

    images: list[bytes]
    issame: list[bool]

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def loads_bin(data: bytes, where: str = "<bytes>") -> BinSet:
    """Parse the bytes of a ``.bin`` (see the module docstring for what is admitted)."""
    _check_opcodes(data, where)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataFormatError as exc:
        raise DataFormatError(f"refusing {where}: {exc}") from None
    except Exception as exc:
        raise DataFormatError(f"refusing {where}: unpickling failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataFormatError(f"refusing {where}: expected a pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, list) or not all(isinstance(b, bytes) for b in images):
        raise DataFormatError(f"refusing {where}: the first element must be a list of bytes (encoded images)")
    if not isinstance(issame, list) or not all(isinstance(b, bool) for b in issame):
        raise DataFormatError(f"refusing {where}: the second element must be a list of bools (issame)")
    if len(images) != 2 * len(issame):
        raise DataFormatError(f"refusing {where}: {len(images)} images for {len(issame)} pairs (need 2 per pair)")
    return BinSet(images, issame)


def read_bin(path: str | Path) -> BinSet:
    """Read a verification ``.bin`` safely. Raises DataFormatError (naming the reason) on anything else."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"verification set not found: {p}")
    return loads_bin(p.read_bytes(), str(p))


def write_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(images, issame)`` in insightface's ``.bin`` format (pickle protocol 4: bytes as BINBYTES)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (need 2 per pair)")
    data = pickle.dumps(([bytes(b) for b in images], [bool(s) for s in issame]), protocol=4)
    Path(path).write_bytes(data)
