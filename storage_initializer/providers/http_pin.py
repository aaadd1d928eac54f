"""Pinning plain HTTP reads to the version that was listed.

A file replaced on the server while it downloads in ranged chunks would otherwise be committed
as a mix of two versions, whose checksum we compute ourselves and so "verifies". So every answer
is checked against the validator of the listing: its ETag (weakly compared), or Last-Modified
when the server gives no ETag; another value means the file changed. Ranged requests also carry
``If-Range`` with that validator (a strong ETag or the date): a server that honours it answers a
changed file with 200 and the whole new version instead of a part of it, which is recognised
the same way. ``If-Range`` rather than ``If-Match``: a condition a redirecting front end (a Hub's
``resolve`` URL, a CDN) would evaluate against its own ETag on the way must not fail a good
read; ``If-Range`` only ever concerns the 206 answer. Either way the read raises
:class:`SourceChangedError` and the pull fetches the new version whole. A server that gives no
validator at all is read in one stream (see HttpSource.list), and so is one that answers a
ranged read with the whole file (:class:`RangesIgnoredError`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from storage_initializer.errors import RangesIgnoredError, SourceChangedError, TransientError
from storage_initializer.providers.base import RemoteFile

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_warned: set[str] = set()


def validator(headers: Mapping[str, str]) -> str:
    """What identifies the version of the answer: the ETag, else Last-Modified, else ""."""
    return headers.get("ETag") or headers.get("Last-Modified") or ""


def is_etag(version: str) -> bool:
    return version.startswith(('"', "W/"))


def conditions(version: str, ranged: bool) -> dict[str, str]:
    """Request headers that keep a ranged GET to ``version`` (If-Range: a part of it, or the
    whole file when it changed). A weak ETag is not allowed in If-Range."""
    if not ranged or not version or version.startswith("W/"):
        return {}
    return {"If-Range": version}


def check_same_version(where: str, file: RemoteFile, headers: Mapping[str, str]) -> None:
    """Raise SourceChangedError when the answer names another version than the listed one (a
    server that ignored the condition)."""
    if not file.version:
        return
    if is_etag(file.version):
        got = headers.get("ETag")
        same = got is None or _weak(got) == _weak(file.version)
    else:
        got = headers.get("Last-Modified")
        same = got is None or got == file.version
    if not same:
        raise SourceChangedError(
            f"{where}: {file.path} changed since it was listed (version {file.version}, "
            f"the server now sends {got})"
        )


def _weak(etag: str) -> str:
    return etag.removeprefix("W/")


def size_and_ranges(status: int, headers: Mapping[str, str], head: bool) -> tuple[int | None, bool]:
    """(size, whether ranged reads work) from the answer to a HEAD (``head``), or to the
    one-byte ranged GET made when HEAD is refused (size from Content-Range; a 206 proves ranges
    work). ``headers``: any mapping whose ``get`` ignores case."""
    if status == 206:
        match = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if match and match.group(3) != "*":
            return int(match.group(3)), True
        return None, False
    length = headers.get("Content-Length")
    encoded = headers.get("Content-Encoding", "identity") not in ("identity", "")
    size = int(length) if length and length.isdigit() and not encoded else None
    ranges = head and size is not None and headers.get("Accept-Ranges", "") == "bytes"
    return size, ranges


def check_content_range(where: str, headers: Mapping[str, str], start: int) -> None:
    got = headers.get("Content-Range", "")
    match = _CONTENT_RANGE.match(got)
    if not match or int(match.group(1)) != start:
        raise TransientError(f"{where}: asked for bytes from {start}, got Content-Range {got!r}")


def ranges_ignored(where: str, file: RemoteFile, status: int) -> RangesIgnoredError:
    """The error for a ranged read answered with the whole file, logged once per source."""
    if where not in _warned:
        _warned.add(where)
        log.warning(
            "%s: the server advertises byte ranges but answered a ranged request with %d: "
            "fetching %s again in one stream",
            where,
            status,
            file.path,
        )
    return RangesIgnoredError(f"{where}: the server ignored a range request for {file.path}")
