"""The completion marker: the only proof that an entry is complete.

Written last, atomically (temp file → fsync → rename → fsync dir). It lists every file with its
size and checksum, the redacted source, the source's fingerprint and the key of the request, so
that a replica can decide in a few stats whether it may start, and ``verify`` can re-hash.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage_initializer.paths import UnsafePathError, safe_relpath
from storage_initializer.store.fsutil import read_state_text
from storage_initializer.store.layout import Entry

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class MarkerFile:
    path: str
    size: int
    #: algorithm -> hex digest (at least one, when the entry was downloaded by us)
    checksums: dict[str, str] = field(default_factory=dict)


@dataclass
class Marker:
    key: str
    source: str
    fingerprint: str
    files: list[MarkerFile]
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    completed_at: float = field(default_factory=time.time)
    downloaded_by: dict[str, Any] = field(default_factory=dict)
    read_only: bool = True
    tool_version: str = ""
    format: int = FORMAT
    #: What ``--require-signature`` verified (signing.py): kind, trust, signer, signature
    #: digest. Absent (None) for a model pulled without a signature requirement.
    signature: dict[str, Any] | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        # What ``dataclasses.asdict`` gives, without its recursive deep copy (half of the
        # marker's cost on a model of many files; json.dumps only reads, so the fields' own
        # dicts serve as they are).
        data = dict(vars(self))
        data["files"] = [vars(f) for f in self.files]
        data["total_size"] = self.total_size
        data["completed_at_iso"] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.completed_at)
        )
        return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any) -> Marker:
        """A marker from its JSON, checked field by field: the state directory is writable by
        the pod's group, so a marker may be forged or truncated. Anything but what
        :meth:`to_json` writes raises :class:`MalformedMarker` saying what is wrong."""
        if not isinstance(data, dict):
            raise MalformedMarker("it is not a JSON object")
        files = data.get("files", [])
        if not isinstance(files, list):
            raise MalformedMarker("'files' is not a list")
        return cls(
            key=_text(data, "key", required=True),
            source=_text(data, "source"),
            fingerprint=_text(data, "fingerprint"),
            files=[_file(item, index) for index, item in enumerate(files)],
            include=_texts(data, "include"),
            exclude=_texts(data, "exclude"),
            completed_at=_time(data.get("completed_at", 0)),
            downloaded_by=_mapping(data, "downloaded_by"),
            read_only=_flag(data, "read_only"),
            tool_version=_text(data, "tool_version"),
            format=_count(data.get("format", FORMAT), "format"),
            signature=data["signature"] if isinstance(data.get("signature"), dict) else None,
        )


class MalformedMarker(ValueError):
    """A marker that is not one we wrote: treated as no marker (the entry is incomplete)."""


def _text(data: dict[str, Any], name: str, required: bool = False) -> str:
    value = data.get(name, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise MalformedMarker(f"{name!r} is not a string")
    return value


def _texts(data: dict[str, Any], name: str) -> list[str]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedMarker(f"{name!r} is not a list of strings")
    return list(value)


def _mapping(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise MalformedMarker(f"{name!r} is not an object")
    return dict(value)


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, True)
    if not isinstance(value, bool):
        raise MalformedMarker(f"{name!r} is not true or false")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedMarker(f"{what} is {value!r}, not a whole number ≥ 0")
    return value


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MalformedMarker(f"'completed_at' is {value!r}, not a time")
    return float(value)


def _file(item: Any, index: int) -> MarkerFile:
    where = f"files[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise MalformedMarker(f"{where} has no path")
    path = item["path"]
    try:
        clean = safe_relpath(path)
    except UnsafePathError as exc:
        raise MalformedMarker(f"{where}: {exc}") from None
    if clean != path:
        raise MalformedMarker(f"{where}: {path!r} is not a clean relative path")
    checksums = item.get("checksums", {})
    if not isinstance(checksums, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in checksums.items()
    ):
        raise MalformedMarker(f"{where}: 'checksums' is not an object of strings")
    return MarkerFile(path, _count(item.get("size"), f"{where}.size"), dict(checksums))


def read(entry: Entry) -> Marker | None:
    """The entry's marker, or None when there is none or it is not one we wrote (a link, a
    truncated or forged file: the entry is then incomplete, and the warning says what to
    delete). Never raises on bad content: a malformed marker must not crash-loop a pod."""
    if os.path.islink(entry.state):
        _warn_once(
            entry.state,
            "the state directory %s is a symbolic link, which storage-initializer never "
            "creates; treating the model as incomplete (delete the link)",
            entry.state,
        )
        return None
    try:
        text = read_state_text(entry.marker)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _warn_once(
                entry.marker,
                "the marker %s is a symbolic link, which storage-initializer never creates; "
                "treating the model as incomplete (delete the link)",
                entry.marker,
            )
        return None
    try:
        return Marker.from_dict(json.loads(text))
    except (ValueError, RecursionError) as exc:
        detail = exc if isinstance(exc, MalformedMarker) else "it is not valid JSON (truncated?)"
        _warn_once(
            entry.marker,
            "ignoring the marker %s: %s; treating the model as incomplete (delete %s if this "
            "repeats)",
            entry.marker,
            detail,
            entry.marker,
        )
        return None


_warned: set[Path] = set()


def _warn_once(path: Path, message: str, *args: Any) -> None:
    """A waiter re-reads the marker at every poll: one warning per path and process."""
    if path not in _warned:
        _warned.add(path)
        log.warning(message, *args)


def problems(entry: Entry, marker: Marker) -> list[str]:
    """Cheap completeness check (stat sizes only): the files the marker promises, as listed."""
    found = []
    root = entry.root
    for item in marker.files:
        try:
            size = os.stat(root / item.path).st_size
        except OSError:
            found.append(f"{item.path}: missing")
            continue
        if size != item.size:
            found.append(f"{item.path}: size {size}, expected {item.size}")
    return found


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, mode: int = 0o664) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        # Not the umask's choice: replicas running as other UIDs of the group must rewrite it.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write(entry: Entry, marker: Marker) -> None:
    write_atomic(entry.marker, marker.to_json() + "\n")


def remove(entry: Entry) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry.marker)
    fsync_dir(entry.state)
