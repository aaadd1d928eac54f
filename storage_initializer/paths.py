"""Sanitising relative paths that come from a source: object keys, archive members, Hub paths.

Every byte a source sends is untrusted, names included. A name that is absolute, climbs with
``..``, holds a NUL or a backslash, or is empty is rejected before anything is written; writes
then happen only below a staging directory we created, so nothing can land outside it.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterable

from storage_initializer.errors import SourceError

STATE_DIR_NAME = ".storage-initializer"


class UnsafePathError(SourceError):
    hint = "The source holds a name that would write outside the model directory; it was refused"


def safe_relpath(name: str, what: str = "file") -> str:
    """Return ``name`` as a clean relative POSIX path, or raise :class:`UnsafePathError`."""
    if not name or "\0" in name:
        raise UnsafePathError(f"{what} name {name!r} is empty or holds a NUL byte")
    if "\\" in name:
        raise UnsafePathError(f"{what} name {name!r} holds a backslash")
    if name.startswith("/"):
        raise UnsafePathError(f"{what} name {name!r} is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts):
        raise UnsafePathError(f"{what} name {name!r} leaves the model directory")
    if parts[0] == STATE_DIR_NAME:
        raise UnsafePathError(f"{what} name {name!r} collides with our state directory")
    return posixpath.join(*parts)


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is one entry a directory listing can name: not empty, not "." or "..",
    no "/". Walking a listing that names anything else can list a directory again, for ever,
    or one above it."""
    return name not in ("", ".", "..") and "/" not in name


def matches(path: str, patterns: Iterable[str]) -> bool:
    """fnmatch on the relative path, as the stock initializer does; a pattern without a slash
    also matches the base name, so ``*.bin`` finds ``shards/a.bin``."""
    base = posixpath.basename(path)
    for pattern in patterns:
        if fnmatch.fnmatchcase(path, pattern):
            return True
        if "/" not in pattern and fnmatch.fnmatchcase(base, pattern):
            return True
    return False


def selected(path: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    include = tuple(include)
    if include and not matches(path, include):
        return False
    return not matches(path, exclude)
