"""Making a verified download visible: renames, permissions, then the marker.

Order matters: files get their final mode while still private, top-level items are renamed into
the entry one by one (each rename atomic), directories get their mode, everything is fsynced,
and only then is the marker written. A reader that trusts the marker can never see half a model.

A commit interrupted by a crash leaves a journal naming the items it was moving; the next owner
moves those back into its staging area (they were verified) and commits again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

from storage_initializer import signals
from storage_initializer.paths import UnsafePathError, safe_relpath
from storage_initializer.store import marker as marker_io
from storage_initializer.store.fsutil import (
    read_state_text,
    remove_path,
    set_dir_modes,
    set_file_modes,
)
from storage_initializer.store.layout import CURRENT_NAME, Entry, EntryMode
from storage_initializer.store.lease import Lease
from storage_initializer.store.staging import Staging

log = logging.getLogger(__name__)


class MalformedJournal(ValueError):
    """A commit journal that is not one we wrote (see :func:`_journal_items`)."""


def _journal_items(entry: Entry) -> list[str]:
    """The top-level names a commit was moving, or [] when there is no usable journal.

    The journal lives in the group-writable state directory, so it is input: each item must be
    one plain top-level name of the model (no ``/``, no ``..``, not our state directory), or
    recovery would move or delete whatever a planted journal names — ``../../etc`` included.
    A journal that is not what :func:`commit` writes is ignored as a whole, with a warning."""
    try:
        return _parse_journal(read_state_text(entry.commit_journal))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc if isinstance(exc, MalformedJournal) else "it is not valid JSON"
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            reason = f"it cannot be read safely ({exc.strerror})"
        log.warning(
            "ignoring the commit journal %s: %s; nothing it names is touched (delete %s if "
            "this repeats)",
            entry.commit_journal,
            reason,
            entry.commit_journal,
        )
        return []


def _parse_journal(text: str) -> list[str]:
    data = json.loads(text)
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise MalformedJournal("it has no list of items")
    for item in items:
        if not isinstance(item, str):
            raise MalformedJournal(f"it names {item!r}, which is not a file name")
        try:
            clean = safe_relpath(item, "commit journal item")
        except UnsafePathError as exc:
            raise MalformedJournal(str(exc)) from None
        if clean != item or "/" in item or item == "lost+found":
            raise MalformedJournal(f"it names {item!r}, which is not a top-level model item")
    return list(items)


def recover_interrupted(entry: Entry, staging: Staging | None) -> None:
    """Undo the visible half of a commit that a crash interrupted."""
    items = _journal_items(entry)
    if not items and not os.path.lexists(entry.commit_journal):
        return
    log.info("recovering a commit interrupted by a crash (%d items)", len(items))
    for name in items:
        source = entry.root / name
        if not os.path.lexists(source):
            continue
        target = staging.data / name if staging is not None else None
        if target is not None and not os.path.lexists(target):
            if source.is_dir() and not source.is_symlink():  # chmod would follow a link
                with contextlib.suppress(OSError):
                    os.chmod(source, 0o755)
            os.rename(source, target)
        else:
            remove_path(source)
    with contextlib.suppress(FileNotFoundError):
        entry.commit_journal.unlink()


@signals.deferred  # a SIGTERM meanwhile ends the pull once the model is published
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
        if os.path.lexists(target):  # anything there, a dangling link too: one lstat
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


def version_name(fingerprint: str, owner_id: str) -> str:
    """A fresh, unique name for a version directory: creation time (for humans and ordering),
    the source fingerprint, and the owner that made it (never reused, so a version directory
    is never written twice)."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    return f"v{int(time.time()):010d}-{digest}-{owner_id}"


def switch_current(entry: Entry, name: str) -> None:
    """Point ``<key>/current`` at version ``name``: one atomic rename of a new symlink, so a
    reader resolves either the old version or the new one, never something in between."""
    tmp = entry.root / f".{CURRENT_NAME}.{uuid.uuid4().hex}.tmp"
    os.symlink(name, tmp)
    try:
        os.replace(tmp, entry.current_link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    marker_io.fsync_dir(entry.root)


def find_version(entry: Entry, fingerprint: str) -> str | None:
    """Cache mode: a complete version directory of this fingerprint that is not current (a
    holder died between publishing it and switching ``current``, or the source went back to an
    earlier version): switching to it costs no download."""
    for name in reversed(entry.versions()):
        version = entry.version(name)
        found = marker_io.read(version)
        if (
            found is not None
            and found.key == entry.key
            and found.fingerprint == fingerprint
            and not marker_io.problems(version, found)
        ):
            return name
    return None


@signals.deferred
def commit_version(
    entry: Entry,
    staging: Staging,
    new_marker: marker_io.Marker,
    lease: Lease,
    read_only: bool,
) -> str:
    """Cache mode: publish the staged download as a new immutable version, then switch to it.

    The staged tree gets its marker and file modes while still private, is renamed into the
    entry as one directory (one atomic rename: the version appears complete or not at all),
    gets its directory modes, and only then does ``current`` move. Running pods keep the links
    to the version they started with; a crash before the switch leaves a complete version that
    the next owner switches to without downloading (:func:`find_version`)."""
    name = version_name(new_marker.fingerprint, lease.owner.id)
    set_file_modes(staging.data, read_only)
    version = Entry(staging.data, entry.key, EntryMode.VERSION)
    version.state.mkdir(exist_ok=True)
    marker_io.write(version, new_marker)
    lease.ensure_held()
    target = entry.root / name
    os.rename(staging.data, target)
    # Directories last: a read-only directory cannot be renamed into place.
    set_dir_modes([target], read_only)
    marker_io.fsync_dir(target)
    marker_io.fsync_dir(entry.root)
    # A holder frozen until another took over must not move ``current`` (the version it
    # published is complete and harmless; issue 8's gc removes unused versions).
    lease.ensure_held()
    switch_current(entry, name)
    staging.discard()
    return name


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
