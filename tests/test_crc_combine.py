"""The CRC combine of crcmath, property-tested: for any byte strings ``a`` and ``b``,
``combine(crc(a), crc(b), len(b)) == crc(a + b)``, for each combinable algorithm (CRC-32,
CRC-32C, CRC-64/NVME), with the native combines (zlib-ng for CRC-32, awscrt for the others)
and with the pure-Python matrix fallback.

The engine relies on it for every file fetched in ranged chunks (each worker hashes its own
chunk, the file's CRC is put together at the end), so a wrong combine would fail verification
of a good download, or pass a bad one. The CRCs themselves are checked against references that
share no code with crcmath: the catalogue's check values, google-crc32c for CRC-32C and a
bitwise pure-Python CRC-64/NVME.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_initializer import crcmath

ALGORITHMS = ("crc32", "crc32c", "crc64nvme")
#: The CRC catalogue's check value of each algorithm (the CRC of b"123456789").
CHECK = {"crc32": 0xCBF43926, "crc32c": 0xE3069283, "crc64nvme": 0xAE8B14860A799888}


def _crc64nvme(data: bytes) -> int:
    """CRC-64/NVME (reflected 0x9A6C9329AC4BC9B5, init and xor-out all ones), bit by bit."""
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x9A6C9329AC4BC9B5 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFFFFFFFFFF


#: CRCs computed without crcmath.
REFERENCE: dict[str, Callable[[bytes], int]] = {
    "crc32": zlib.crc32,
    "crc32c": google_crc32c.value,
    "crc64nvme": _crc64nvme,
}


def crc(algorithm: str, data: bytes) -> int:
    update = crcmath.updater(algorithm)
    assert update is not None, f"{algorithm} is not available"
    return update(data, 0)


#: Small strings (checked against the bitwise references too).
small = st.binary(max_size=2048)
#: Long strings, cheap to generate: a short pattern repeated, up to a few MiB, so that the
#: combine's length has high bits set (every zero-byte operator up to 2**22 is used).
long = st.builds(
    lambda seed, times: seed * times, st.binary(min_size=1, max_size=64), st.integers(0, 1 << 16)
)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_crc_has_its_catalogue_check_value(algorithm: str) -> None:
    assert crc(algorithm, b"123456789") == CHECK[algorithm]
    assert REFERENCE[algorithm](b"123456789") == CHECK[algorithm]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=200, deadline=None)
@given(a=small, b=small)
def test_combining_the_crcs_of_two_strings_gives_the_crc_of_their_concatenation(
    algorithm: str, a: bytes, b: bytes
) -> None:
    combined = crcmath.combine(algorithm, crc(algorithm, a), crc(algorithm, b), len(b))
    assert combined == crc(algorithm, a + b) == REFERENCE[algorithm](a + b)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=50, deadline=None)
@given(a=small, b=long)
def test_the_combine_holds_for_long_second_strings(algorithm: str, a: bytes, b: bytes) -> None:
    combined = crcmath.combine(algorithm, crc(algorithm, a), crc(algorithm, b), len(b))
    assert combined == crc(algorithm, a + b)


@pytest.mark.parametrize("algorithm", sorted(crcmath.POLYNOMIALS))
@settings(max_examples=100, deadline=None)
@given(a=small, b=st.one_of(small, long))
def test_the_pure_python_fallback_combines_like_the_native_code(
    algorithm: str, a: bytes, b: bytes
) -> None:
    first, second = crc(algorithm, a), crc(algorithm, b)
    expected = crc(algorithm, a + b)
    assert crcmath.matrix_combine(algorithm, first, second, len(b)) == expected
    assert crcmath.combine(algorithm, first, second, len(b)) == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=100, deadline=None)
@given(parts=st.lists(small, max_size=8))
def test_chunks_folded_in_order_give_the_crc_of_the_file(
    algorithm: str, parts: list[bytes]
) -> None:
    """What the engine does: start from the CRC of nothing, add each chunk's CRC in order."""
    value = crc(algorithm, b"")
    for part in parts:
        value = crcmath.combine(algorithm, value, crc(algorithm, part), len(part))
    assert value == crc(algorithm, b"".join(parts))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=50, deadline=None)
@given(data=small, start=st.integers(0, 0xFFFFFFFF))
def test_the_updater_takes_any_buffer_and_continues_a_running_crc(
    algorithm: str, data: bytes, start: int
) -> None:
    """Chunks arrive as bytearray or memoryview (awscrt takes only bytes: crcmath copies)."""
    update = crcmath.updater(algorithm)
    assert update is not None
    expected = update(data, start)
    assert update(bytearray(data), start) == expected
    assert update(memoryview(data), start) == expected


def test_crc32_is_computed_and_combined_by_zlib_ng() -> None:
    """CRC-32 (boto3's default upload checksum) is in the data path of most S3 pulls: zlib and
    awscrt compute it at ~2 GiB/s, zlib-ng at tens of GiB/s. zlib-ng is a dependency, so the
    fast one must be the one in use (and must agree with zlib, which the tests above check)."""
    from zlib_ng import zlib_ng

    assert crcmath.updater("crc32") is zlib_ng.crc32
    a, b = b"a" * 1000, b"b" * 3000
    assert crcmath.combine("crc32", zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
