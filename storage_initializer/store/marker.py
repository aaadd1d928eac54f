"""The completion marker: the only proof that an entry is complete.

Written last, atomically (temp file → fsync → rename → fsync dir). It lists every file with its
size and checksum, the redacted source, the source's fingerprint and the key of the request, so
that a replica can decide in a few stats whether it may start, and ``verify`` can re-hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage_initializer.store.layout import Entry

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
        data = asdict(self)
        data["total_size"] = self.total_size
        data["completed_at_iso"] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.completed_at)
        )
        return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Marker:
        files = [MarkerFile(**f) for f in data.get("files", [])]
        return cls(
            key=data["key"],
            source=data.get("source", ""),
            fingerprint=data.get("fingerprint", ""),
            files=files,
            include=list(data.get("include", [])),
            exclude=list(data.get("exclude", [])),
            completed_at=float(data.get("completed_at", 0)),
            downloaded_by=dict(data.get("downloaded_by", {})),
            read_only=bool(data.get("read_only", True)),
            tool_version=data.get("tool_version", ""),
            format=int(data.get("format", FORMAT)),
            signature=data["signature"] if isinstance(data.get("signature"), dict) else None,
        )


def read(entry: Entry) -> Marker | None:
    """The entry's marker, or None when there is none or it cannot be parsed."""
    try:
        with open(entry.marker, encoding="utf-8") as handle:
            data = json.load(handle)
        return Marker.from_dict(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
