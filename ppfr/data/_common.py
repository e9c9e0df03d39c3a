"""Shared exceptions and the one warning class of the data layer."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A file that is not what its name or content claims, or that ppfr refuses to read (e.g. a hostile pickle).

    Raised at the API boundary with the path and what was wrong; ``ppfr data inspect`` exits non-zero on it.
    """


class CorruptSampleError(ValueError):
    """One sample (an image file or a record) cannot be read; loaders skip it and count it."""


class CorruptDataWarning(UserWarning):
    """The single summary warning a loader emits for the samples it skipped."""
