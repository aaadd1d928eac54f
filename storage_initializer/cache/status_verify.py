"""Reading an entry without changing it: ``status`` and ``verify``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from storage_initializer import checksums
from storage_initializer.diskspace import usage
from storage_initializer.paths import STATE_DIR_NAME
from storage_initializer.signing import recheck
from storage_initializer.store import layout
from storage_initializer.store import marker as marker_io
from storage_initializer.store.layout import EntryMode
from storage_initializer.store.lease import current, silent_for, stale_at_a_glance
from storage_initializer.store.links import read_pointer


def find_entry(path: Path) -> layout.Entry | None:
    """The entry behind ``path``: the path itself (direct mode or a cache entry), or, for a
    destination populated from a cache, the entry its links point into."""
    path = path.absolute()
    note = read_pointer(path)
    if note is not None:  # a destination populated from a cache (any link mode)
        root = Path(note["entry"])
        data = marker_io.read(layout.Entry(root, "", EntryMode.VERSION))
        mode = EntryMode.VERSION if layout.VERSION_RE.match(root.name) else EntryMode.CACHE
        return layout.Entry(root, data.key if data else note.get("key", ""), mode)
    if (path / STATE_DIR_NAME).is_dir():
        model = layout.Entry(path, path.name, EntryMode.CACHE).published()
        if model.mode == EntryMode.VERSION:  # a cache entry <cache>/<key>: its current version
            data = marker_io.read(model)
            return layout.Entry(model.root, data.key if data else path.name, EntryMode.VERSION)
        data = marker_io.read(layout.Entry(path, "", EntryMode.DIRECT))
        return layout.Entry(path, data.key if data else "", EntryMode.DIRECT)
    try:
        names = os.listdir(path)
    except OSError:
        return None
    for name in names:
        item = path / name
        if item.is_symlink():
            root = Path(os.path.realpath(item)).parent
            if (root / STATE_DIR_NAME).is_dir():
                data = marker_io.read(layout.Entry(root, "", EntryMode.CACHE))
                mode = EntryMode.VERSION if layout.VERSION_RE.match(root.name) else EntryMode.CACHE
                return layout.Entry(root, data.key if data else root.name, mode)
    return None


def _lease_entry(entry: layout.Entry) -> layout.Entry:
    """Where the lease of ``entry`` lives: a version directory's is its cache entry's."""
    if entry.mode == EntryMode.VERSION:
        return layout.Entry(entry.root.parent, entry.key, EntryMode.CACHE)
    return entry


def status(path: Path, stale_after: float, max_size: int = 0) -> dict[str, Any]:
    """What ``path`` holds. ``size`` is what the marker recorded at commit; ``usage`` is measured
    now, so a writable entry that grew since (a model server writing caches beside the weights)
    shows, and is flagged ``over_quota`` when it exceeds ``max_size`` (--max-size)."""
    entry = find_entry(path)
    if entry is None:
        return {"path": str(path), "state": "absent"}
    marker = marker_io.read(entry)
    info: dict[str, Any] = {"path": str(path), "entry": str(entry.root), "mode": entry.mode}
    # A cheap walk (stat only, no hashing) of the model's files; the state directory (lease,
    # staging areas) is not part of the model.
    measured = usage(entry.root, skip=STATE_DIR_NAME)
    info["usage"] = {
        "bytes": measured.bytes,
        "allocated": measured.allocated,
        "files": measured.files,
    }
    if max_size:
        info["max_size"] = max_size
        info["over_quota"] = measured.bytes > max_size
    if marker is not None:
        bad = marker_io.problems(entry, marker)
        info.update(
            state="complete" if not bad else "damaged",
            problems=bad,
            source=marker.source,
            key=marker.key,
            fingerprint=marker.fingerprint,
            files=len(marker.files),
            size=marker.total_size,
            completed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(marker.completed_at)),
            downloaded_by=marker.downloaded_by,
            read_only=marker.read_only,
        )
        if marker.signature is not None:  # what --require-signature verified (signing.py)
            info["signature"] = {k: v for k, v in marker.signature.items() if k != "bundle"}
    else:
        info["state"] = "incomplete"
    generation, lease = current(_lease_entry(entry))
    if lease is not None and lease.get("released") is not True:
        # The lease file's age by the filesystem's clock (never the holder's heartbeat time:
        # its clock may be hours off ours), and the same one-look test as gc and `status
        # --cache-dir`: a dead local holder, or a file older than stale-after plus the skew.
        age = silent_for(_lease_entry(entry), generation) or 0.0
        stale = stale_at_a_glance(_lease_entry(entry), generation, lease, stale_after)
        info["lease"] = {
            "generation": generation,
            "holder": lease.get("pod") or lease.get("host"),
            "host": lease.get("host"),
            "pid": lease.get("pid"),
            "phase": lease.get("phase"),
            "heartbeat_age": round(age, 1),
            "stale": stale,
            "bytes_done": lease.get("bytes_done", 0),
            "bytes_total": lease.get("bytes_total", 0),
            "files_done": lease.get("files_done", 0),
            "files_total": lease.get("files_total", 0),
        }
        if marker is None:
            info["state"] = "stale lease" if stale else "downloading"
    elif lease is not None:
        info["last_outcome"] = lease.get("outcome")
    staging = _lease_entry(entry).staging_root
    if staging.is_dir() and not staging.is_symlink():  # a link there is planted, not ours
        info["staging_areas"] = sorted(
            p.name for p in staging.iterdir() if p.is_dir() and not p.is_symlink()
        )
    return info


def verify(
    path: Path, require_signature: str = "", trust_root: str = ""
) -> tuple[layout.Entry | None, list[str], int]:
    """Re-hash every file against the marker: (entry, problems, files checked). A model verified
    against a signature at download is checked against it again (under ``require_signature``
    when given, else the trust the marker recorded); ``require_signature`` also flags a model
    that was never verified."""
    entry = find_entry(path)
    if entry is None:
        return None, [f"{path}: no storage-initializer entry here"], 0
    marker = marker_io.read(entry)
    if marker is None:
        return entry, [f"{entry.root}: no completion marker (incomplete download?)"], 0
    bad: list[str] = []
    for item in marker.files:
        full = entry.root / item.path
        try:
            size = full.stat().st_size
        except OSError:
            bad.append(f"{item.path}: missing")
            continue
        if size != item.size:
            bad.append(f"{item.path}: size {size}, expected {item.size}")
            continue
        algorithm = checksums.choose(item.checksums)
        if algorithm is None:
            continue
        digest = checksums.file_digest(str(full), algorithm)
        if digest != item.checksums[algorithm].lower():
            bad.append(f"{item.path}: {algorithm} {digest}, expected {item.checksums[algorithm]}")
    if not bad and (marker.signature is not None or require_signature):
        bad.extend(recheck(entry.root, marker, require_signature, trust_root))
    return entry, bad, len(marker.files)
