"""CRC-32C (Castagnoli) in pure Python: a table-driven reference and a faster path.

CRC-32C is the checksum of iSCSI, SCTP, ext4 and QUIC-adjacent protocols: reflected
polynomial ``0x82F63B78``, initial register ``0xFFFFFFFF``, final XOR ``0xFFFFFFFF``.
It detects every burst error up to 32 bits and every odd number of bit errors in a
message, which is why every reliable datagram carries one (``reliable.py``). The standard
library has only CRC-32 (zlib, another polynomial), so this module computes it itself.

Theory of operation
-------------------
Two implementations, checked against each other and against known vectors by the tests:

* :func:`crc32c_table` is the textbook *slicing-by-8* algorithm: eight 256-entry tables,
  where table ``k`` holds the CRC contribution of a byte followed by ``k`` zero bytes.
  One loop iteration folds 8 message bytes into the register with 8 lookups.
  About 18-20 MB/s on the 2-vCPU reference VM (Python 3.11); a byte-at-a-time loop
  does about 14 MB/s. Python's per-bytecode cost, not the tables, is the limit.

* :func:`crc32c` (the one to use) leans on linearity instead of a loop. Without the
  initial register and the final XOR, a CRC is a *linear* map over GF(2) from message
  bits to 32 CRC bits, and the contribution of a byte depends only on its distance from
  the *end* of the message. So bit ``r`` of the CRC is the parity of the message bits
  selected by a fixed mask ``row[r]`` (bit ``8k + t`` of the mask: does bit ``t`` of the
  byte ``k`` places before the end flip CRC bit ``r``)::

      M    = int.from_bytes(message, "big")   # the last byte is the least significant
      crc  = sum(((M & row[r]).bit_count() & 1) << r for r in range(32))

  That is 32 big-integer ANDs and popcounts, all running in C over the whole message:
  about 60-80 MB/s for 1 KiB-64 KiB inputs (3-4x the tables). The initial register is
  folded in by XOR-ing it into the first four bytes (true of every reflected CRC), and
  the final XOR is applied at the end. The masks are built by doubling: the masks for
  distances ``[D, 2D)`` are the masks for ``[0, D)`` passed through the 32x32 matrix
  "append D zero bytes", which is squared at each step. They grow on demand, by
  powers of two, up to 64 KiB (32 masks of 64 KiB: 2 MiB, built in about 7 ms); longer
  inputs are processed in 64 KiB chunks, chaining the register. Inputs shorter than
  :data:`_SMALL` bytes go through the tables, which win there.

:func:`crc32c` itself calls the C extension ``buzon._crc32c`` (the SSE4.2 ``crc32``
instruction, about 10 GB/s on the reference VM; a table where the CPU lacks it) and
falls back to the masks when the extension is missing. The tests check all of them
against each other.

This module is sans-IO and pure: no state but the lazily built, immutable masks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["POLYNOMIAL", "crc32c", "crc32c_bytewise", "crc32c_masks", "crc32c_table"]

_c_crc32c: Callable[[Buffer, int], int] | None
try:  # the C twin, built by the normal install; the code below is its reference
    from .._crc32c import crc32c as _c_crc32c
except ImportError:  # pragma: no cover - the extension is always built by make
    _c_crc32c = None

POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reversed
_MASK32 = 0xFFFFFFFF
_SMALL = 48  # below this many bytes the tables are faster than the masks
_CHUNK = 64 * 1024  # the masks cover at most this many bytes; longer inputs are chunked

Buffer = bytes | bytearray | memoryview


def _make_tables() -> tuple[tuple[int, ...], ...]:
    t0 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (POLYNOMIAL if c & 1 else 0)
        t0.append(c)
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        # one more zero byte after the byte: shift the register by 8 and fold the low byte
        tables.append([(prev[i] >> 8) ^ t0[prev[i] & 0xFF] for i in range(256)])
    return tuple(tuple(t) for t in tables)


_TABLES = _make_tables()
_T0 = _TABLES[0]


def crc32c_bytewise(data: Buffer, crc: int = 0) -> int:
    """CRC-32C one byte per iteration (the simplest reference; used by the tests)."""
    t0 = _T0
    reg = crc ^ _MASK32
    for b in bytes(data):
        reg = (reg >> 8) ^ t0[(reg ^ b) & 0xFF]
    return reg ^ _MASK32


def crc32c_table(data: Buffer, crc: int = 0) -> int:
    """CRC-32C of ``data`` by slicing-by-8; ``crc`` continues a previous result."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _TABLES
    reg = crc ^ _MASK32
    if isinstance(data, memoryview):
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    n = len(data)
    n8 = n & ~7
    if n8:
        words = struct.unpack(f"<{n8 >> 2}I", data[:n8] if n8 != n else data)
        it = iter(words)
        for lo in it:
            hi = next(it)
            lo ^= reg
            reg = (
                t7[lo & 0xFF]
                ^ t6[(lo >> 8) & 0xFF]
                ^ t5[(lo >> 16) & 0xFF]
                ^ t4[lo >> 24]
                ^ t3[hi & 0xFF]
                ^ t2[(hi >> 8) & 0xFF]
                ^ t1[(hi >> 16) & 0xFF]
                ^ t0[hi >> 24]
            )
    for b in bytes(data[n8:]):
        reg = (reg >> 8) ^ t0[(reg ^ b) & 0xFF]
    return reg ^ _MASK32


# -- the GF(2) masks ---------------------------------------------------------------------

Matrix = list[int]  # 32 columns: column s is the image of the register bit s


def _zero_byte(reg: int) -> int:
    return (reg >> 8) ^ _T0[reg & 0xFF]


def _apply(matrix: Matrix, vector: int) -> int:
    out = 0
    s = 0
    while vector:
        if vector & 1:
            out ^= matrix[s]
        vector >>= 1
        s += 1
    return out


class _Masks:
    """The 32 parity masks, grown by doubling (see the module docstring)."""

    __slots__ = ("rows", "span", "zeros")

    def __init__(self) -> None:
        rows = [0] * 32
        for t in range(8):  # distance 0: the byte alone, i.e. table 0
            g = _T0[1 << t]
            for r in range(32):
                if g >> r & 1:
                    rows[r] |= 1 << t
        self.rows: tuple[int, ...] = tuple(rows)
        self.span = 1  # the masks cover distances [0, span)
        self.zeros: Matrix = [_zero_byte(1 << s) for s in range(32)]  # "append span zeros"

    def grow(self, need: int) -> tuple[int, ...]:
        while self.span < need:
            rows, zeros, shift = self.rows, self.zeros, 8 * self.span
            grown = []
            for r in range(32):
                acc = 0
                for s in range(32):
                    if zeros[s] >> r & 1:
                        acc ^= rows[s]
                grown.append(rows[r] | (acc << shift))
            self.zeros = [_apply(zeros, c) for c in zeros]  # squared: twice as many zeros
            self.rows = tuple(grown)  # replaced whole, so readers never see a half-built set
            self.span *= 2
        return self.rows


_masks = _Masks()


def _crc_masks(data: Buffer, reg: int) -> int:
    """Continue register ``reg`` (pre-inverted) over ``data`` (4 <= len <= _CHUNK)."""
    n = len(data)
    rows = _masks.rows if n <= _masks.span else _masks.grow(max(n, 2048))
    # the register meets the first four bytes in little-endian order; the int is big-endian
    first = int.from_bytes(reg.to_bytes(4, "little"), "big")
    m = int.from_bytes(data, "big") ^ (first << (8 * (n - 4)))
    out = 0
    for r in range(32):
        out |= ((m & rows[r]).bit_count() & 1) << r
    return out


def crc32c(data: Buffer, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue it.

    ``crc32c(a + b) == crc32c(b, crc32c(a))``. Uses the C extension ``buzon._crc32c``
    (the SSE4.2 instruction: GB/s) when it is built, else :func:`crc32c_masks`.
    """
    if _c_crc32c is not None:
        return _c_crc32c(data, crc)
    return crc32c_masks(data, crc)


def crc32c_masks(data: Buffer, crc: int = 0) -> int:
    """The pure-Python fast path (masks and popcounts; see the module docstring)."""
    if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
        data = data.cast("B")
    n = len(data)
    if n < _SMALL:
        return crc32c_table(data, crc)
    reg = crc ^ _MASK32
    if n <= _CHUNK:
        return _crc_masks(data, reg) ^ _MASK32
    view = memoryview(data)
    for start in range(0, n, _CHUNK):
        part = view[start : start + _CHUNK]
        if len(part) < _SMALL:
            return crc32c_table(part, reg ^ _MASK32)
        reg = _crc_masks(part, reg)
    return reg ^ _MASK32
