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
from collections.abc import Iterator, Mapping
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


def _journal_records(entry_root: Path, name: str) -> Iterator[dict[str, Any]]:
    """The records of every owner's staging journal ``name`` (``verified.jsonl``,
    ``chunks.jsonl``), read independently of the store's own reader; torn lines skipped."""
    for journal in (entry_root / STATE_DIR / "staging").glob(f"*/{name}"):
        try:
            lines = journal.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def verified_paths(entry_root: Path) -> set[str]:
    """Files that some owner's staging journal records as verified."""
    return {r["path"] for r in _journal_records(entry_root, "verified.jsonl") if "path" in r}


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


# -- stopping a process at an exact point of its own execution -------------------------------

#: The environment variable that arms :data:`STOP_HOOK` in a child (JSON, see :func:`stop_at`).
STOP_ENV = "SI_TEST_STOP_AT"

#: Python source run first in a child (see ``_start_tagged`` in test_faults.py). When
#: ``SI_TEST_STOP_AT`` is set it installs an audit hook (PEP 578) that follows ``steps`` — each
#: an audit event (``open``, ``os.rename``, ``os.remove``, ``shutil.rmtree``...) whose string
#: arguments contain or end with given text, ``nth`` times — and when the last step matches it
#: claims ``token`` with ``O_EXCL`` (only one process of a round ever stops) and sends itself
#: SIGSTOP, *before* the operation of that event runs. The test then finds the process stopped
#: at exactly that point and SIGKILLs it from outside. The hook only observes and stops: it
#: changes nothing the product does, and with the variable unset it is not even installed.
STOP_HOOK = r"""
def _si_install_stop_hook():
    import json, os, signal, sys, threading
    raw = os.environ.pop("SI_TEST_STOP_AT", "")
    if not raw:
        return
    spec = json.loads(raw)
    steps, token = spec["steps"], spec["token"]
    lock = threading.Lock()
    state = {"step": 0, "count": 0, "done": False}

    def text(value):
        if isinstance(value, bytes):
            return os.fsdecode(value)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        return ""

    def matches(step, event, args):
        if event != step["event"]:
            return False
        for index, how, wanted in step["args"]:
            value = text(args[index]) if index < len(args) else ""
            if how == "contains" and wanted not in value:
                return False
            if how == "endswith" and not value.endswith(wanted):
                return False
        return True

    def hook(event, args):
        if state["done"]:
            return
        with lock:
            if state["done"] or not matches(steps[state["step"]], event, args):
                return
            state["count"] += 1
            if state["count"] < steps[state["step"]].get("nth", 1):
                return
            state["step"] += 1
            state["count"] = 0
            if state["step"] < len(steps):
                return
            state["done"] = True  # from here on the hook ignores everything, itself included
            try:
                fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return  # another process of this round already stopped
            os.write(fd, json.dumps([os.getpid(), event, [text(a) for a in args]]).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGSTOP)

    sys.addaudithook(hook)


_si_install_stop_hook()
"""


def stop_step(event: str, *checks: tuple[int, str, str], nth: int = 1) -> dict[str, Any]:
    """One step of a stop point: ``event`` with ``checks`` = (argument index, "contains" or
    "endswith", text), matched ``nth`` times."""
    return {"event": event, "args": [list(c) for c in checks], "nth": nth}


def stop_at(token: Path, *steps: dict[str, Any]) -> dict[str, str]:
    """The environment that makes a child stop itself after ``steps`` (see :data:`STOP_HOOK`)."""
    return {STOP_ENV: json.dumps({"token": str(token), "steps": list(steps)})}


def process_state(pid: int) -> str:
    """The state letter of ``/proc/<pid>/stat`` ("R", "S", "T" for stopped, "Z"...), "" if
    the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def staged_chunks(entry_root: Path) -> dict[str, int]:
    """Path -> number of chunks that some owner's staging journal records as on disk."""
    found: dict[str, set[tuple[int, int]]] = {}
    for record in _journal_records(entry_root, "chunks.jsonl"):
        try:
            span = (int(record["start"]), int(record["end"]))
            found.setdefault(record["path"], set()).add(span)
        except (ValueError, KeyError, TypeError):
            continue
    return {path: len(spans) for path, spans in found.items()}
