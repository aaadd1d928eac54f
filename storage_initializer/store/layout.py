"""Where an entry's model and state live.

An *entry* is one (source, filters) → one directory. In direct mode the entry is the
destination itself; in cache mode it is ``<cache>/<key>`` and the destination gets links.
All our state sits in one dot-directory inside the entry, so nothing is ever added beside the
model and a model server that lists the directory sees only the model and that one hidden entry.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from storage_initializer.paths import STATE_DIR_NAME

MARKER_NAME = "marker.json"
LOCK_NAME = "lock"
STAGING_NAME = "staging"
COMMIT_JOURNAL = "commit.json"


@dataclass(frozen=True)
class Entry:
    root: Path
    key: str
    #: "direct" or "cache"
    mode: str

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

    def model_items(self) -> list[str]:
        """Top-level names of the model (everything but our state directory)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n != STATE_DIR_NAME)


def direct(dest: Path, key: str) -> Entry:
    return Entry(dest, key, "direct")


def cached(cache_dir: Path, key: str) -> Entry:
    return Entry(cache_dir / key, key, "cache")


def ensure_state_dir(entry: Entry) -> None:
    """Create the state directory group-writable, so replicas running as other UIDs of the
    same group (fsGroup) can lock and lease too."""
    with contextlib.suppress(FileExistsError):
        entry.state.mkdir(parents=True, exist_ok=True)
    # Created by another UID: its mode is already right, and we may not change it.
    with contextlib.suppress(PermissionError):
        os.chmod(entry.state, 0o2775)
