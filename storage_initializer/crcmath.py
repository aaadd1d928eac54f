"""CRC-32, CRC-32C and CRC-64/NVME of a file from the CRCs of its chunks, so chunks are hashed
in parallel.

A file fetched in concurrent ranged chunks can only be hashed in order for MD5 or SHA-256 (the
engine then reads finished chunks back from the page cache, one file at a time). CRCs combine:
``crc(A + B)`` follows from ``crc(A)``, ``crc(B)`` and ``len(B)`` (zlib's ``crc32_combine``,
which Python's zlib does not expose). So each worker hashes its own chunk as the bytes arrive,
and the file's CRC is put together at the end, in microseconds.

The math: appending ``n`` zero bytes to a message is a linear map on the CRC register over
GF(2), a 32 x 32 bit matrix; the operators for 2**k zero bytes are precomputed once per
polynomial by repeated squaring, then combining costs at most one matrix-vector product per set
bit of ``len(B)``.

awscrt (a pinned dependency; botocore uses it too when installed) computes CRC64NVME and CRC32C
in native code at tens of GiB/s and combines them natively. CRC-32 comes from zlib-ng (a pinned
dependency: SIMD folding, 35 GiB/s on one core of the benchmark machine, where zlib and awscrt
both compute CRC-32 at about 2 GiB/s, which made it half a CPU-second per GiB of a pull of
objects uploaded with boto3's default CRC32), with its native combine; Python's zlib is the
fallback. The matrix code below is the fallback for CRC32/CRC32C without native code. awscrt
takes only ``bytes``: other buffers are copied first.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import cache
from types import ModuleType

#: Reflected polynomials of the combinable algorithms, by our checksum names.
POLYNOMIALS = {"crc32": 0xEDB88320, "crc32c": 0x82F63B78}


def _times(matrix: list[int], vector: int) -> int:
    total = 0
    index = 0
    while vector:
        if vector & 1:
            total ^= matrix[index]
        vector >>= 1
        index += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, row) for row in matrix]


@cache
def _zero_operators(polynomial: int) -> tuple[list[int], ...]:
    """Operator ``k`` appends ``2**k`` zero bytes to a CRC register (k < 64)."""
    one_bit = [polynomial] + [1 << n for n in range(31)]
    two_bits = _square(one_bit)
    four_bits = _square(two_bits)
    operator = _square(four_bits)  # one zero byte
    operators = [operator]
    for _ in range(63):
        operator = _square(operator)
        operators.append(operator)
    return tuple(operators)


@cache
def _zlib_ng() -> ModuleType | None:
    try:
        from zlib_ng import zlib_ng  # native CRC-32 with SIMD: probed once
    except ImportError:
        return None
    return zlib_ng


def crc32_update() -> Callable[[bytes, int], int]:
    """``update(data, crc) -> crc`` for CRC-32: zlib-ng's when installed, else zlib's."""
    fast = _zlib_ng()
    return zlib.crc32 if fast is None else fast.crc32


def native_crc32() -> bool:
    """Whether CRC-32 is computed by zlib-ng (fast) rather than zlib (~2 GiB/s)."""
    return _zlib_ng() is not None


@cache
def _awscrt() -> ModuleType | None:
    try:
        from awscrt import checksums  # optional native code: probed once
    except ImportError:
        return None
    return checksums


def combine(algorithm: str, first: int, second: int, second_length: int) -> int:
    """The CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    if second_length <= 0:
        return first
    fast = _zlib_ng() if algorithm == "crc32" else None
    if fast is not None:
        return int(fast.crc32_combine(first, second, second_length))
    native = _awscrt()
    if native is not None:
        function = getattr(native, f"combine_{algorithm}")
        return int(function(first, second, second_length))
    if algorithm not in POLYNOMIALS:
        raise ValueError(f"combining {algorithm} needs awscrt")
    return matrix_combine(algorithm, first, second, second_length)


def matrix_combine(algorithm: str, first: int, second: int, second_length: int) -> int:
    """:func:`combine` in pure Python (CRC32 and CRC32C only): the fallback without awscrt."""
    operators = _zero_operators(POLYNOMIALS[algorithm])
    index = 0
    length = second_length
    while length:
        if length & 1:
            first = _times(operators[index], first)
        length >>= 1
        index += 1
    return first ^ second


def updater(algorithm: str) -> Callable[[bytes, int], int] | None:
    """``update(data, crc) -> crc`` for a combinable algorithm (None if not available)."""
    if algorithm == "crc32":
        return crc32_update()
    native = _awscrt()
    if algorithm in ("crc32c", "crc64nvme") and native is not None:
        function = getattr(native, algorithm)

        def update(data: bytes, crc: int) -> int:
            if type(data) is not bytes:
                data = bytes(data)
            return int(function(data, crc))

        return update
    if algorithm == "crc32c":
        try:
            import google_crc32c  # the fallback when awscrt is absent
        except ImportError:
            return None
        extend = google_crc32c.extend
        return lambda data, crc: extend(crc, bytes(data) if type(data) is not bytes else data)
    return None


#: Hex digits of each CRC in our checksum form.
WIDTHS = {"crc32": 8, "crc32c": 8, "crc64nvme": 16}


def hexdigest(value: int, algorithm: str = "crc32") -> str:
    """Our checksum form: lowercase hex, 8 digits (16 for CRC64NVME), big-endian, as
    ``checksums`` writes CRCs."""
    return f"{value:0{WIDTHS[algorithm]}x}"
