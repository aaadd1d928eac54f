"""A whole cache directory: its entries, their state and use, and the volume's space.

Used by ``status --cache-dir`` and ``gc``. Reads only; never takes a lock.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage_initializer.paths import STATE_DIR_NAME
from storage_initializer.store import access, layout
from storage_initializer.store import marker as marker_io
from storage_initializer.store.layout import EntryMode
from storage_initializer.store.lease import LeaseState, current, glance, number
from storage_initializer.uri import parse

if TYPE_CHECKING:
    from storage_initializer.settings import Settings


@dataclass
class EntryInfo:
    key: str
    path: str
    source: str
    state: str
    size: int
    files: int
    created: float | None
    last_used: float | None
    hits: int
    holder: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    staging_bytes: int = 0
    #: Versions no longer current (kept for pods that linked to them), and their bytes.
    old_versions: list[str] = field(default_factory=list)
    old_versions_bytes: int = 0
    #: The current lease at a glance (gc keeps entries whose lease is held).
    lease: LeaseState = LeaseState.FREE
    #: The lease's last heartbeat (Unix time): the last sign of life of its downloader.
    heartbeat: float | None = None
    #: Bytes of its files that other entries hold too (hard links: content reuse), which
    #: evicting this entry alone would not free.
    shared_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def shared_bytes(entry: layout.Entry) -> int:
    """Bytes of the entry's files (every version) that are also linked from outside it: an
    inode counted once, shared when its link count exceeds the links found inside the entry."""
    inside: dict[tuple[int, int], list[int]] = {}  # inode -> [links inside, nlink, size]
    places = [entry.root / v for v in entry.versions()] if entry.mode == EntryMode.CACHE else []
    for place in places or [entry.root]:
        for dirpath, dirs, files in os.walk(place):
            dirs[:] = [d for d in dirs if d != STATE_DIR_NAME]
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                seen = inside.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_size])
                seen[0] += 1
    return sum(size for links, nlink, size in inside.values() if nlink > links)


def lease_state(
    entry: layout.Entry, stale_after: float
) -> tuple[LeaseState, dict[str, Any] | None]:
    """Judged from one look (no observation over time) by the same test
    that ``gc`` applies right before it claims a lease (store.lease.glance)."""
    generation, data = current(entry)
    return glance(entry, generation, data, stale_after), data


def describe(entry: layout.Entry, stale_after: float) -> EntryInfo:
    # The current version (the entry itself in direct mode, or for a cache written before
    # versions existed).
    model = entry.published()
    marker = marker_io.read(model)
    usage = access.usage(entry)
    lease, data = lease_state(entry, stale_after)
    # A linked staging root is planted (store/planted.py): its target is not ours to count.
    staging = entry.staging_root
    staging_bytes = _tree_size(staging) if staging.is_dir() and not staging.is_symlink() else 0
    current_name = model.root.name if model is not entry else None
    old = (
        [v for v in entry.versions() if v != current_name] if entry.mode == EntryMode.CACHE else []
    )
    old_bytes = sum(_tree_size(entry.root / v) for v in old)
    if marker is not None and not marker_io.problems(model, marker):
        state = "complete"
    elif lease == LeaseState.HELD:
        state = "downloading"
    elif lease == LeaseState.STALE:
        state = "stale lease"
    elif staging_bytes:
        state = "orphaned staging"
    elif marker is not None:
        state = "damaged"
    else:
        state = "incomplete"
    holder = ""
    progress: dict[str, Any] = {}
    if data and lease != LeaseState.FREE:
        holder = f"{data.get('pod') or data.get('host')} pid {data.get('pid')}"
        progress = {k: data.get(k, 0) for k in ("phase", "bytes_done", "bytes_total")}
    return EntryInfo(
        key=entry.key,
        path=str(entry.root),
        source=marker.source if marker else str((data or {}).get("source", "")),
        state=state,
        size=marker.total_size if marker else 0,
        files=len(marker.files) if marker else 0,
        created=marker.completed_at if marker else None,
        last_used=usage.last_used,
        hits=usage.hits,
        holder=holder,
        progress=progress,
        staging_bytes=staging_bytes,
        old_versions=old,
        old_versions_bytes=old_bytes,
        lease=lease,
        heartbeat=_heartbeat(data),
        shared_bytes=shared_bytes(entry) if state == "complete" else 0,
    )


def _heartbeat(data: dict[str, Any] | None) -> float | None:
    return number(data.get("heartbeat")) if data else None


def entries(cache_dir: Path) -> list[layout.Entry]:
    try:
        names = sorted(os.listdir(cache_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        root = cache_dir / name
        # Dot names are never keys: a gc's trash on its way out, temp files.
        if not name.startswith(".") and (root / STATE_DIR_NAME).is_dir():
            found.append(layout.cached(cache_dir, name))
    return found


def volume(cache_dir: Path) -> dict[str, int]:
    stats = os.statvfs(cache_dir)
    total = stats.f_blocks * stats.f_frsize
    free = stats.f_bavail * stats.f_frsize
    return {"total": total, "free": free, "used": total - stats.f_bfree * stats.f_frsize}


def survey(cache_dir: Path, stale_after: float) -> dict[str, Any]:
    infos = [describe(e, stale_after) for e in entries(cache_dir)]
    return {
        "cache_dir": str(cache_dir),
        "volume": volume(cache_dir),
        "entries": [i.to_dict() for i in infos],
        "entries_size": sum(i.size + i.old_versions_bytes for i in infos),
    }


def find(cache_dir: Path, key_or_uri: str, settings: Settings) -> layout.Entry | None:
    """An entry by its key, or by the URI (with the settings' filters) that names it."""
    if (cache_dir / key_or_uri / STATE_DIR_NAME).is_dir():
        return layout.cached(cache_dir, key_or_uri)
    key = parse(key_or_uri).key(settings.include, settings.exclude)
    if (cache_dir / key / STATE_DIR_NAME).is_dir():
        return layout.cached(cache_dir, key)
    return None
