"""CRC-32C (Castagnoli), the checksum TFRecord frames carry, and TFRecord's masked form of it.

Two implementations with one answer: ``google_crc32c`` (pinned in requirements.txt; hardware CRC32 instruction,
~7 GB/s here) when importable, else our own table-driven version below (pure Python, ~8 MB/s: fine for tests and small
packs, slow for a large TFRecord set). :func:`crc32c_py` is always available so tests can compare the two.
"""

from __future__ import annotations

_POLY = 0x82F63B78  # reflected Castagnoli polynomial 0x1EDC6F41 (RFC 3720 §B.4)


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (0 to start), pure Python. Returns an unsigned 32-bit int."""
    c = crc ^ 0xFFFFFFFF
    t = _TABLE
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


try:  # optional accelerator: the same function, in C with the SSE4.2 crc32 instruction
    import google_crc32c as _g

    def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        """CRC-32C of ``data`` continuing from ``crc`` (0 to start). Returns an unsigned 32-bit int."""
        return _g.extend(crc, bytes(data)) if crc else _g.value(bytes(data))

    IMPLEMENTATION = f"google_crc32c ({_g.implementation})"
except ImportError:  # pragma: no cover - exercised only where the pinned package is missing
    crc32c = crc32c_py
    IMPLEMENTATION = "python"


_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (so CRCs of CRCs do not degenerate)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF
