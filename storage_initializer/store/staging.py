"""Private staging: where a download happens before anything becomes visible.

Each owner writes below ``<state>/staging/<owner>/data`` on the same filesystem as the entry,
so that commit is a rename. Every file that passed verification is appended to a journal, and
the ranges durably written so far to another (resume.py); a new owner that takes over adopts the
most recent orphaned staging area of the same source version and keeps the verified files and
the written ranges, so a killed download resumes instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from storage_initializer.paths import UnsafePathError, safe_relpath
from storage_initializer.store.fsutil import (
    append_state_line,
    read_state_text,
    remove_tree,
    unlink_planted_link,
)
from storage_initializer.store.layout import Entry
from storage_initializer.store.marker import write_atomic

log = logging.getLogger(__name__)

JOURNAL = "verified.jsonl"
CHUNKS = "chunks.jsonl"
META = "source.json"


@dataclass
class VerifiedRecord:
    path: str
    size: int
    checksums: dict[str, str]


class Staging:
    def __init__(self, entry: Entry, owner_id: str) -> None:
        self.entry = entry
        self.dir = entry.staging_root / owner_id
        self.data = self.dir / "data"
        self._journal = self.dir / JOURNAL

    @classmethod
    def prepare(
        cls, entry: Entry, owner_id: str, key: str, fingerprint: str, made_by: str = ""
    ) -> Staging:
        """Create our staging area, adopting a dead owner's one for the same source version.

        Called only while holding the lease, so every other staging area is an orphan.
        ``made_by`` names who stages files for a later pull to adopt (``verify --repair``),
        so that the pull says what it resumes.

        The staging root is in the group-writable state directory: a link planted as the
        root, as an area or inside one is removed (the link, never its target) and an area
        holding one is not adopted, so nothing here ever reads, writes or deletes through
        a link (store/planted.py)."""
        staging = cls(entry, owner_id)
        unlink_planted_link(entry.staging_root, "the staging directory")
        entry.staging_root.mkdir(parents=True, exist_ok=True)
        candidates = []
        for child in entry.staging_root.iterdir():
            if child.name == owner_id or unlink_planted_link(child, "the staging area"):
                continue
            if not child.is_dir():
                continue
            meta = _read_meta(child / META)
            # Verified files or finished chunks of a big file: either is worth resuming (a
            # single-file model killed mid-download has only chunks).
            progress = [p for p in (child / JOURNAL, child / CHUNKS) if _is_regular(p)]
            same = meta.get("key") == key and meta.get("fingerprint") == fingerprint
            if same and progress and _adoptable(child):
                candidates.append((max(p.lstat().st_mtime for p in progress), child, meta))
            else:
                log.info("removing an orphaned staging area %s", child.name)
                remove_tree(child)
        candidates.sort(key=lambda found: found[0])
        adopted = candidates.pop() if candidates else None
        for _, child, _meta in candidates:
            remove_tree(child)
        if adopted is not None and not staging.dir.exists():
            if adopted[2].get("made_by") == "verify --repair":
                log.info("fetching the files that verify --repair found bad (%s)", adopted[1].name)
            else:
                log.info("resuming the download left by a previous owner (%s)", adopted[1].name)
            _unlink_links_below(adopted[1] / "data")
            os.rename(adopted[1], staging.dir)
        staging.data.mkdir(parents=True, exist_ok=True)
        meta = {"key": key, "fingerprint": fingerprint, **({"made_by": made_by} if made_by else {})}
        write_atomic(staging.dir / META, json.dumps(meta))
        return staging

    def staged_size(self, path: str) -> int | None:
        """The size of the staged file ``path`` when it is a regular file reached without any
        symbolic link (a link planted in an adopted area must not become part of the model);
        None otherwise."""
        current = self.data
        parts = path.split("/")
        for part in parts[:-1]:
            current = current / part
            if current.is_symlink() or not current.is_dir():
                return None
        try:
            info = (current / parts[-1]).lstat()
        except OSError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def verified(self) -> dict[str, VerifiedRecord]:
        records: dict[str, VerifiedRecord] = {}
        for data in _journal_lines(self._journal):
            record = _verified_record(data)
            if record is not None:
                records[record.path] = record
        return records

    def record(self, path: str, size: int, checksums: dict[str, str]) -> None:
        line = json.dumps({"path": path, "size": size, "checksums": checksums}) + "\n"
        # O_APPEND writes of one short line are atomic enough; a torn last line is skipped.
        append_state_line(self._journal, line)

    def record_chunk(self, path: str, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of ``path`` are durably on disk; a new owner need not fetch
        them again."""
        self.record_ranges([(path, start, end)])

    def record_ranges(self, ranges: list[tuple[str, int, int]]) -> None:
        """Several ranges in one append (the checkpointer's round, see resume.py)."""
        if not ranges:
            return
        lines = "".join(
            json.dumps({"path": path, "start": start, "end": end}) + "\n"
            for path, start, end in ranges
        )
        append_state_line(self.dir / CHUNKS, lines)

    def chunks(self) -> dict[str, set[tuple[int, int]]]:
        found: dict[str, set[tuple[int, int]]] = {}
        for data in _journal_lines(self.dir / CHUNKS):
            path, start, end = data.get("path"), data.get("start"), data.get("end")
            if _safe(path) and _whole(start) and _whole(end) and start < end:
                found.setdefault(path, set()).add((start, end))
            else:
                _malformed(self.dir / CHUNKS, data)
        return found

    def forget(self, path: str) -> None:
        """Drop a file whose staged copy turned out bad (rewrites the journal)."""
        records = self.verified()
        records.pop(path, None)
        text = "".join(json.dumps(rec.__dict__) + "\n" for rec in records.values())
        write_atomic(self._journal, text)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            remove_tree(self.dir)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_state_text(path))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _adoptable(area: Path) -> bool:
    """An area whose data directory and journals are what we make: no link among them."""
    for name in ("data", JOURNAL, CHUNKS, META):
        if (area / name).is_symlink():
            log.warning(
                "not resuming the staging area %s: its %s is a symbolic link, which "
                "storage-initializer never creates; removing the area (the link, not its target)",
                area,
                name,
            )
            return False
    return True


def _unlink_links_below(tree: Path) -> None:
    """Remove every symbolic link in an adopted area's data (the links, not their targets).
    No source stages a link (archive and OCI links become copies), so one there was planted,
    and writing a resumed file through it would write wherever it points."""
    found = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                found.append(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    if found:
        log.warning(
            "removed %d symbolic link(s) from the staging area being resumed (first: %s), "
            "which storage-initializer never stages; their targets were not touched",
            len(found),
            found[0],
        )


# -- reading the journals: every line is input (torn by a crash, or written by another process
# of the pod's group), so it is checked field by field and skipped when wrong.


def _journal_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = read_state_text(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("ignoring the journal %s: %s (delete it)", path, exc.strerror)
        return []
    found = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line torn by a crash
        if isinstance(data, dict):
            found.append(data)
        else:
            _malformed(path, data)
    return found


def _safe(path: object) -> TypeGuard[str]:
    if not isinstance(path, str):
        return False
    try:
        return safe_relpath(path) == path
    except UnsafePathError:
        return False


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _verified_record(data: dict[str, Any]) -> VerifiedRecord | None:
    path, size, checksums = data.get("path"), data.get("size"), data.get("checksums", {})
    if (
        _safe(path)
        and _whole(size)
        and isinstance(checksums, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in checksums.items())
    ):
        return VerifiedRecord(path, size, dict(checksums))
    _malformed(None, data)
    return None


_warned: set[str] = set()


def _malformed(path: Path | None, data: Any) -> None:
    """One warning per journal: a line that parses but is not one we write."""
    where = str(path) if path is not None else "a staging journal"
    if where in _warned:
        return
    _warned.add(where)
    shown = json.dumps(data, default=str)[:120]
    log.warning(
        "ignoring a malformed line in %s (%s): not written by storage-initializer; the "
        "file it concerns is downloaded again",
        where,
        shown,
    )
