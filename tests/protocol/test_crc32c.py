"""CRC-32C: published test vectors, three implementations that must agree, chaining,
and the property the reliable protocol relies on (any single bit flip is detected)."""

from __future__ import annotations

import array
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buzon._crc32c import crc32c as crc32c_c
from buzon.protocol.crc32c import POLYNOMIAL, crc32c, crc32c_bytewise, crc32c_masks, crc32c_table

IMPLEMENTATIONS = [crc32c, crc32c_c, crc32c_masks, crc32c_table, crc32c_bytewise]

# RFC 3720 (iSCSI) appendix B.4, plus the customary "123456789" check value.
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (
        bytes.fromhex(
            "01c00000000000000000000000000000"  # iSCSI Read (10) command PDU
            "14000000000004000000001400000018"
            "28000000000000000200000000000000"
        ),
        0xD9963A56,
    ),
    (b"a", 0xC1D04330),
    (b"The quick brown fox jumps over the lazy dog", 0x22620404),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("data", "expected"), VECTORS, ids=lambda v: repr(v)[:20])
def test_known_vectors(impl, data: bytes, expected: int) -> None:  # type: ignore[no-untyped-def]
    assert impl(data) == expected
    assert impl(bytearray(data)) == expected
    assert impl(memoryview(data)) == expected


def test_polynomial_is_castagnoli() -> None:
    assert POLYNOMIAL == 0x82F63B78  # 0x1EDC6F41 bit-reversed


@pytest.mark.parametrize(
    "size",
    [*range(0, 130), 1000, 1400, 4095, 4096, 4097, 65535, 65536, 65537, 2 * 65536 + 5, 200_001],
)
def test_implementations_agree(size: int) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    start = rng.getrandbits(32)
    expected = crc32c_bytewise(data, start)
    assert crc32c_table(data, start) == expected
    assert crc32c(data, start) == expected
    assert crc32c(data) == crc32c_bytewise(data)


def test_chaining() -> None:
    rng = random.Random(7)
    data = rng.randbytes(70_000)
    whole = crc32c(data)
    for cut in (0, 1, 3, 4, 5, 47, 48, 49, 1000, 65536, 69_999, 70_000):
        assert crc32c(data[cut:], crc32c(data[:cut])) == whole, cut
        assert crc32c_table(data[cut:], crc32c_table(data[:cut])) == whole, cut


def test_memoryview_of_other_formats() -> None:
    words = array.array("I", range(1000))
    raw = words.tobytes()
    assert crc32c(memoryview(words)) == crc32c_bytewise(raw)
    assert crc32c_table(memoryview(words)) == crc32c_bytewise(raw)


@given(st.binary(max_size=3000), st.integers(0, 0xFFFFFFFF), st.data())
def test_fast_path_matches_reference(data: bytes, start: int, draw: st.DataObject) -> None:
    assert crc32c(data, start) == crc32c_bytewise(data, start)
    cut = draw.draw(st.integers(0, len(data)))
    assert crc32c(data[cut:], crc32c(data[:cut], start)) == crc32c_bytewise(data, start)


def test_every_single_bit_flip_changes_the_crc() -> None:
    sample = random.Random(1).randbytes(200)
    good = crc32c(sample)
    buf = bytearray(sample)
    for bit in range(len(buf) * 8):
        buf[bit // 8] ^= 1 << (bit % 8)
        assert crc32c(buf) != good, bit
        buf[bit // 8] ^= 1 << (bit % 8)
    assert crc32c(buf) == good
