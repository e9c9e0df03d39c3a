"""Shared exceptions, the one warning class, and the bounds every reader puts on what a file may declare."""

from __future__ import annotations

import math
from pathlib import Path

# Identity labels are indices into a margin head of ``max label + 1`` rows and into per-identity counts, so a label
# is a size request: one line declaring 2**31 asked ``bincount`` for 16 GiB. The largest public face sets have
# ~4 M identities (WebFace260M: 4 M, Glint360K: 360 k); 2**24 leaves 4x headroom and keeps a 512-d head <= 32 GiB.
MAX_LABEL = 1 << 24


class DataFormatError(ValueError):
    """A file that is not what its name or content claims, or that ppfr refuses to read (e.g. a hostile pickle).

    Raised at the API boundary with the path and what was wrong; ``ppfr data inspect`` exits non-zero on it.
    Every reader turns a malformed input (bad numbers, offsets past the end, binary where text belongs, ...) into
    this one type; nothing else escapes a reader's open.
    """


class CorruptSampleError(ValueError):
    """One sample (an image file or a record) cannot be read; loaders skip it and count it."""


class CorruptDataWarning(UserWarning):
    """The single summary warning a loader emits for the samples it skipped."""


def check_label(value: int | float, where: str) -> int:
    """An identity label as an int in ``[0, MAX_LABEL)``; DataFormatError naming ``where`` otherwise.

    ``value`` may be a float (insightface's IRHeader stores labels as float32): it must then be finite and whole.
    """
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise DataFormatError(f"{where}: label {value!r} is not a whole number")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataFormatError(f"{where}: label must be an integer, got {type(value).__name__}")
    if not 0 <= value < MAX_LABEL:
        raise DataFormatError(f"{where}: label {value} outside [0, {MAX_LABEL}) (ppfr's bound on identity labels)")
    return value


def read_text(path: str | Path, what: str = "text file") -> str:
    """The UTF-8 text of a listing (index, pair list, ``.idx``); DataFormatError for a binary or unreadable file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not a {what} (byte {exc.start} is not UTF-8 text)") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
