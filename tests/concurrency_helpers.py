"""Shared pieces of the fault, version, multi-source and two-node tests.

Why these exist: the download-once guarantee is about what the *origin* serves and what a
*reader* of the shared directory can see, so the tests count bytes per process at the counting
proxy (each process gets its own ``AWS_SDK_UA_APP_ID``, which botocore puts in the User-Agent)
and run a tight poller over the destination while processes are killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storage_initializer.store import layout
from storage_initializer.store.lease import current
from tests.helpers import STATE_DIR, clean_env, marker_path, model_files
from tests.servers.proxy import CountingProxy, RequestRecord
from tests.servers.s3 import S3Server


def s3_env(s3: S3Server, proxy: CountingProxy, app: str = "", **more: str) -> dict[str, str]:
    """A child's environment: S3 through the proxy, JSON logs, tagged with ``app``."""
    extra = dict(s3.env(proxy.url))
    extra["STORAGE_INITIALIZER_LOG_FORMAT"] = "json"
    extra["STORAGE_INITIALIZER_PROGRESS_INTERVAL"] = "1"
    if app:
        extra["AWS_SDK_UA_APP_ID"] = app
    extra.update(more)
    return clean_env(extra)


def object_gets(proxy: CountingProxy, bucket: str, prefix: str = "") -> list[RequestRecord]:
    """GETs of objects (not listings) below ``bucket/prefix``."""
    start = f"/{bucket}/{prefix}"
    return [
        r
        for r in proxy.select(method="GET")
        if r.path.startswith(start) and "list-type" not in r.query and r.path != f"/{bucket}"
    ]


def app_of(record: RequestRecord) -> str:
    agent = next((v for k, v in record.headers.items() if k.lower() == "user-agent"), "")
    for token in agent.split():
        if token.startswith("app/"):
            return token[4:]
    return ""


def bytes_by_app(proxy: CountingProxy, bucket: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for record in object_gets(proxy, bucket):
        app = app_of(record)
        totals[app] = totals.get(app, 0) + record.bytes
    return totals


def lease_of(entry_root: Path) -> dict[str, Any] | None:
    """The current lease of an entry as a waiter reads it (None when there is none)."""
    return current(layout.Entry(entry_root, "", "direct"))[1]


def verified_paths(entry_root: Path) -> set[str]:
    """Files that some owner's staging journal records as verified."""
    found: set[str] = set()
    staging = entry_root / STATE_DIR / "staging"
    if not staging.is_dir():
        return found
    for journal in staging.glob("*/verified.jsonl"):
        try:
            lines = journal.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                found.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue
    return found


class TightPoller:
    """Reads the destination as fast as it can while processes race and die, and records
    every moment where a reader could have seen a model that is not whole: a model file
    with partial or wrong content, a file that is not part of the model, or a marker while a
    file is missing."""

    def __init__(self, dest: Path, expected: Mapping[str, str]) -> None:
        self.dest = dest
        self.expected = dict(expected)
        self.violations: list[str] = []
        self.looks = 0
        self.saw_files = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tight-poller", daemon=True)

    def __enter__(self) -> TightPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.look()

    def look(self) -> None:
        self.looks += 1
        marked = marker_path(self.dest).is_file()
        seen = model_files(self.dest) if self.dest.is_dir() else {}
        for rel, path in seen.items():
            if rel not in self.expected:
                self.violations.append(f"unexpected file {rel} visible")
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue  # moved away between the listing and the read (crash recovery)
            self.saw_files += 1
            if hashlib.sha256(data).hexdigest() != self.expected[rel]:
                self.violations.append(f"{rel} visible with {len(data)} bytes of wrong content")
        if marked:
            missing = sorted(set(self.expected) - set(seen))
            if missing:
                self.violations.append(f"marker present while {missing} missing")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
