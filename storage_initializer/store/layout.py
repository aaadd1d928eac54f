"""Where an entry's model and state live.

An *entry* is one (source, filters) → one directory. In direct mode the entry is the
destination itself; in cache mode it is ``<cache>/<key>``, which holds the state, one immutable
directory per downloaded version and a ``current`` symlink naming the newest complete one; the
destination gets links into the concrete version, so a later version never changes a running
pod's model.
All our state sits in one dot-directory inside the entry, so nothing is ever added beside the
model and a model server that lists the directory sees only the model and that one hidden entry.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from storage_initializer.paths import STATE_DIR_NAME

MARKER_NAME = "marker.json"
LOCK_NAME = "lock"
STAGING_NAME = "staging"
COMMIT_JOURNAL = "commit.json"
#: Cache mode: ``<cache>/<key>/current`` → ``v<time>-<fingerprint>-<owner>``, one immutable
#: directory per downloaded version, so that a new version never changes what a running pod
#: linked to (see docs/concurrency.md, "Source changes").
CURRENT_NAME = "current"
VERSION_RE = re.compile(r"^v\d{10}-[0-9a-f]{12}-[0-9a-f]{12}$")


class EntryMode(StrEnum):
    """What an entry's directory is, the one vocabulary for it. A StrEnum: it equals (and
    prints as) its string, as in ``status --json``'s ``mode``."""

    #: The destination itself (no cache).
    DIRECT = "direct"
    #: A cache's key directory: state, versions and the ``current`` link.
    CACHE = "cache"
    #: One immutable version directory of a cache entry.
    VERSION = "version"


@dataclass(frozen=True)
class Entry:
    root: Path
    key: str
    mode: EntryMode

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR_NAME

    @property
    def marker(self) -> Path:
        return self.state / MARKER_NAME

    @property
    def lock(self) -> Path:
        return self.state / LOCK_NAME

    @property
    def staging_root(self) -> Path:
        return self.state / STAGING_NAME

    @property
    def commit_journal(self) -> Path:
        return self.state / COMMIT_JOURNAL

    @property
    def current_link(self) -> Path:
        """Cache mode: the symlink naming the version directory that new readers get."""
        return self.root / CURRENT_NAME

    def current_version(self) -> str | None:
        """Cache mode: the name of the current version directory (None before the first)."""
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        name = os.path.basename(os.path.normpath(target))
        # A version directory is never a link: one there was planted (store/planted.py).
        if not VERSION_RE.match(name) or os.path.islink(self.root / name):
            return None
        return name

    def published(self) -> Entry:
        """The directory readers get: in cache mode the version that ``current`` names (read
        once: read its marker from the returned entry, never from ``current`` again, so that a
        switch happening meanwhile cannot pair one version's marker with another's files);
        otherwise, or before a cache entry has any version, the entry itself."""
        if self.mode == EntryMode.CACHE:
            name = self.current_version()
            if name is not None:
                return self.version(name)
        return self

    def version(self, name: str) -> Entry:
        """Cache mode: one immutable version of this entry, itself laid out like a direct
        entry (model files, and a state directory holding only its marker)."""
        return Entry(self.root / name, self.key, EntryMode.VERSION)

    def versions(self) -> list[str]:
        """Cache mode: every version directory present, oldest first (by name: they start
        with a timestamp)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if VERSION_RE.match(n) and not os.path.islink(self.root / n))

    def model_items(self) -> list[str]:
        """Top-level names of the model (everything but our state directory)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n != STATE_DIR_NAME)


def direct(dest: Path, key: str) -> Entry:
    return Entry(dest, key, EntryMode.DIRECT)


def cached(cache_dir: Path, key: str) -> Entry:
    return Entry(cache_dir / key, key, EntryMode.CACHE)


def ensure_state_dir(entry: Entry) -> None:
    """Create the state directory group-writable, so replicas running as other UIDs of the
    same group (fsGroup) can lock and lease too. Links planted where our state lives are
    removed first, so that nothing below follows one (store/planted.py)."""
    from storage_initializer.store.planted import remove_planted_links

    remove_planted_links(entry)
    with contextlib.suppress(FileExistsError):
        entry.state.mkdir(parents=True, exist_ok=True)
    # Created by another UID: its mode is already right, and we may not change it.
    with contextlib.suppress(PermissionError):
        os.chmod(entry.state, 0o2775)
