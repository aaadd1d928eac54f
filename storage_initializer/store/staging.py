"""Private staging: where a download happens before anything becomes visible.

Each owner writes below ``<state>/staging/<owner>/data`` on the same filesystem as the entry,
so that commit is a rename. Every file that passed verification is appended to a journal; a new
owner that takes over adopts the most recent orphaned staging area of the same source version
and keeps the verified files, so a killed download resumes instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage_initializer.store.fsutil import remove_tree
from storage_initializer.store.layout import Entry

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
    def prepare(cls, entry: Entry, owner_id: str, key: str, fingerprint: str) -> Staging:
        """Create our staging area, adopting a dead owner's one for the same source version.

        Called only while holding the lease, so every other staging area is an orphan."""
        staging = cls(entry, owner_id)
        entry.staging_root.mkdir(parents=True, exist_ok=True)
        candidates = []
        for child in entry.staging_root.iterdir():
            if child.name == owner_id or not child.is_dir():
                continue
            meta = _read_meta(child / META)
            # Verified files or finished chunks of a big file: either is worth resuming (a
            # single-file model killed mid-download has only chunks).
            progress = [p for p in (child / JOURNAL, child / CHUNKS) if p.exists()]
            same = meta.get("key") == key and meta.get("fingerprint") == fingerprint
            if same and progress:
                candidates.append((max(p.stat().st_mtime for p in progress), child))
            else:
                log.info("removing an orphaned staging area %s", child.name)
                remove_tree(child)
        candidates.sort()
        adopted = candidates.pop()[1] if candidates else None
        for _, child in candidates:
            remove_tree(child)
        if adopted is not None and not staging.dir.exists():
            log.info("resuming the download left by a previous owner (%s)", adopted.name)
            os.rename(adopted, staging.dir)
        staging.data.mkdir(parents=True, exist_ok=True)
        meta_text = json.dumps({"key": key, "fingerprint": fingerprint})
        (staging.dir / META).write_text(meta_text, encoding="utf-8")
        return staging

    def verified(self) -> dict[str, VerifiedRecord]:
        records: dict[str, VerifiedRecord] = {}
        try:
            with open(self._journal, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        data = json.loads(line)
                        records[data["path"]] = VerifiedRecord(
                            data["path"], int(data["size"]), dict(data.get("checksums", {}))
                        )
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a crash
        except FileNotFoundError:
            pass
        return records

    def record(self, path: str, size: int, checksums: dict[str, str]) -> None:
        line = json.dumps({"path": path, "size": size, "checksums": checksums}) + "\n"
        # O_APPEND writes of one short line are atomic enough; a torn last line is skipped.
        with open(self._journal, "a", encoding="utf-8") as handle:
            handle.write(line)

    def record_chunk(self, path: str, start: int, end: int) -> None:
        """A chunk of a large file is on disk; a new owner need not fetch it again."""
        line = json.dumps({"path": path, "start": start, "end": end}) + "\n"
        with open(self.dir / CHUNKS, "a", encoding="utf-8") as handle:
            handle.write(line)

    def chunks(self) -> dict[str, set[tuple[int, int]]]:
        found: dict[str, set[tuple[int, int]]] = {}
        try:
            with open(self.dir / CHUNKS, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        data = json.loads(line)
                        found.setdefault(data["path"], set()).add(
                            (int(data["start"]), int(data["end"]))
                        )
                    except (ValueError, KeyError, TypeError):
                        continue
        except FileNotFoundError:
            pass
        return found

    def forget(self, path: str) -> None:
        """Drop a file whose staged copy turned out bad (rewrites the journal)."""
        records = self.verified()
        records.pop(path, None)
        tmp = self._journal.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for rec in records.values():
                handle.write(json.dumps(rec.__dict__) + "\n")
        os.replace(tmp, self._journal)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            remove_tree(self.dir)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
