"""Checksum algorithms: computed while bytes stream, compared against what the source announced.

Values are always lowercase hex in our data model, whatever the source's encoding (providers
convert base64 MD5s and CRCs before building a :class:`RemoteFile`). The marker keeps them, so
``storage-initializer verify`` can re-check a tree long after the download.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Protocol

from storage_initializer import crcmath
from storage_initializer.blocks import BLOCK


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32:
    def __init__(self) -> None:
        self._fn = crcmath.crc32_update()
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


class _Crc32c:
    def __init__(self) -> None:
        update = crcmath.updater("crc32c")
        if update is None:
            raise ImportError("neither awscrt nor google-crc32c is installed")
        self._fn = update
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


class _Crc64Nvme:
    def __init__(self) -> None:
        update = crcmath.updater("crc64nvme")
        if update is None:
            raise ImportError("CRC64NVME needs awscrt")
        self._fn = update
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:016x}"


#: Preference order when a source offers several: the combinable CRCs first (each chunk of a
#: large file is hashed by the worker that fetched it and the file's CRC is combined at the end,
#: crcmath), fastest first (awscrt: CRC64NVME and CRC32C at tens of GiB/s on one core, zlib-ng's
#: CRC32 at ~35), then the digests that must be computed in order (MD5 ~0.5 GiB/s). Current AWS
#: SDKs upload with CRC64NVME by default and S3 still gives single-part objects an MD5 ETag:
#: that object is verified with its CRC64NVME, in one pass.
PREFERENCE = ("crc64nvme", "crc32c", "crc32", "md5", "sha256", "sha1")


def local_default() -> str:
    """Algorithm we compute when the source announces none, so that ``verify`` can still detect
    rot. A CRC, because CRCs combine across parallel chunks (no serial read-back at the end):
    CRC-32 by zlib-ng (tens of GiB/s, a 1 ms import), else CRC32C (awscrt or google-crc32c;
    awscrt's import costs ~40 ms of CPU, which a pull that announces nothing, an http file say,
    need not pay), else zlib's CRC-32. Markers written with CRC32C before stay valid: each file
    names its algorithm. It guards against corruption, not tampering: a source that announces a
    digest is verified with it."""
    if crcmath.native_crc32():
        return "crc32"
    return "crc32c" if available("crc32c") else "crc32"


def new_hasher(algorithm: str) -> Hasher:
    if algorithm in ("md5", "sha1", "sha256"):
        return hashlib.new(algorithm)
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "crc32c":
        return _Crc32c()
    if algorithm == "crc64nvme":
        return _Crc64Nvme()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def available(algorithm: str) -> bool:
    try:
        new_hasher(algorithm)
    except (ImportError, ValueError):
        return False
    return True


def choose(checksums: Mapping[str, str]) -> str | None:
    """The algorithm to verify with: the first of :data:`PREFERENCE` the source gave us."""
    for algorithm in PREFERENCE:
        if algorithm in checksums and available(algorithm):
            return algorithm
    return None


def b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def file_digest(path: str, algorithm: str, block: int = BLOCK) -> str:
    hasher = new_hasher(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            hasher.update(chunk)
    return hasher.hexdigest()
