"""Making a verified download visible: renames, permissions, then the marker.

Order matters: files get their final mode while still private, top-level items are renamed into
the entry one by one (each rename atomic), directories get their mode, everything is fsynced,
and only then is the marker written. A reader that trusts the marker can never see half a model.

A commit interrupted by a crash leaves a journal naming the items it was moving; the next owner
moves those back into its staging area (they were verified) and commits again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from storage_initializer.store import marker as marker_io
from storage_initializer.store.fsutil import remove_path, set_dir_modes, set_file_modes
from storage_initializer.store.layout import Entry
from storage_initializer.store.lease import Lease
from storage_initializer.store.staging import Staging

log = logging.getLogger(__name__)


def _journal_items(entry: Entry) -> list[str]:
    try:
        data = json.loads(entry.commit_journal.read_text(encoding="utf-8"))
        return [str(i) for i in data.get("items", [])]
    except (OSError, ValueError, AttributeError):
        return []


def recover_interrupted(entry: Entry, staging: Staging | None) -> None:
    """Undo the visible half of a commit that a crash interrupted."""
    items = _journal_items(entry)
    if not items and not entry.commit_journal.exists():
        return
    log.info("recovering a commit interrupted by a crash (%d items)", len(items))
    for name in items:
        source = entry.root / name
        if not (source.exists() or source.is_symlink()):
            continue
        target = staging.data / name if staging is not None else None
        if target is not None and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(OSError):
                os.chmod(source, 0o755) if source.is_dir() else None
            os.rename(source, target)
        else:
            remove_path(source)
    with contextlib.suppress(FileNotFoundError):
        entry.commit_journal.unlink()


def commit(
    entry: Entry,
    staging: Staging,
    new_marker: marker_io.Marker,
    lease: Lease,
    read_only: bool,
    remove_others: bool,
) -> None:
    items = sorted(os.listdir(staging.data))
    set_file_modes(staging.data, read_only)
    lease.ensure_held()
    marker_io.write_atomic(
        entry.commit_journal, json.dumps({"items": items, "owner": lease.owner.id})
    )
    # Whatever marker was there describes a tree we are about to change.
    marker_io.remove(entry)
    wanted = set(items)
    for name in entry.model_items():
        if name not in wanted and remove_others:
            remove_path(entry.root / name)
    for name in items:
        target = entry.root / name
        if target.exists() or target.is_symlink():
            remove_path(target)
        os.rename(staging.data / name, target)
    set_dir_modes([entry.root / name for name in items], read_only)
    marker_io.fsync_dir(entry.root)
    # A holder frozen mid-commit and taken over must not publish a marker over the new
    # owner's work (its files were identical, but the new owner owns the entry now).
    lease.ensure_held()
    marker_io.write(entry, new_marker)
    with contextlib.suppress(FileNotFoundError):
        entry.commit_journal.unlink()
    staging.discard()


def top_level(paths: list[str]) -> list[str]:
    return sorted({p.split("/", 1)[0] for p in paths})


def is_ours(entry: Entry, names: list[str], marker: marker_io.Marker | None) -> bool:
    """Whether everything in the entry was put there by us (a marker or a journal names it)."""
    known: set[str] = set(_journal_items(entry))
    if marker is not None:
        known.update(top_level([f.path for f in marker.files]))
    return all(name in known for name in names)


def describe_foreign(entry: Entry, names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
    return f"{entry.root} already holds files that storage-initializer did not write ({shown})"


def path_of(entry: Entry, relative: str) -> Path:
    return entry.root / relative
