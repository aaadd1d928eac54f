"""Malformed leases (issue 14, item 2): a lease file is untrusted input too.

The state directory is group-writable, and a lease may also be cut short by a crash or written
by another version. Each test plants a lease of one bad kind as the current one — fields of the
wrong type, an absurd generation number, times far in the past or future, NaN, something that
is not a JSON object, not a regular file at all (a directory, a FIFO that would block a reader
forever) — and runs the real CLI against real nginx: ``status`` reports without a traceback,
and the pull proceeds (the bad lease is judged stale once it has stayed unchanged for
``--stale-after``, or its bad fields are ignored with a warning) and ends with the model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from storage_initializer.store import layout
from storage_initializer.uri import parse
from tests import helpers
from tests.helpers import STATE_DIR
from tests.servers.nginx import Nginx

DATA = helpers.pattern(200_000, 31)
FIRST = "lease.000000000001.json"
#: Fields a live lease of another node would have (so no dead-pid shortcut applies).
REMOTE = {"owner": "elsewhere", "host": "node-x", "host_id": "node-x/1/boot", "pid": 4242}

WRONG_TYPES = {
    **REMOTE,
    "owner": 5,
    "pid": "abc",
    "host_id": ["x"],
    "pid_start": 7,
    "seq": {"a": [1]},
    "heartbeat": "yesterday",
    "started": [],
    "released": "no",
    "phase": 3,
    "pod": 42,
    "bytes_done": "lots",
    "bytes_total": {},
    "files_done": None,
}
#: name -> (lease file name, how to plant it).
CASES: dict[str, tuple[str, object]] = {
    "wrong-types": (FIRST, json.dumps(WRONG_TYPES)),
    "absurd-generation": (
        "lease.999999999999.json",
        json.dumps({**REMOTE, "seq": 1, "heartbeat": time.time(), "bytes_done": 1}),
    ),
    "negative-times": (
        FIRST,
        json.dumps({**REMOTE, "seq": 1, "heartbeat": -1e18, "started": -5, "pid": -1}),
    ),
    "far-future-times": (
        FIRST,
        json.dumps({**REMOTE, "seq": 1, "heartbeat": 1e308, "started": 9e18, "bytes_done": 10**30}),
    ),
    "nan-and-infinity": (
        FIRST,
        '{"owner": "x", "pid": 1, "seq": NaN, "heartbeat": NaN, "bytes_done": Infinity}',
    ),
    "deeply-nested": (FIRST, "[" * 100_000),
    "not-an-object": (FIRST, "[1, 2, 3]"),
    "empty": (FIRST, ""),
    "directory": (FIRST, "dir"),
    "fifo": (FIRST, "fifo"),
}


def _plant(state: Path, name: str, how: object) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = state / name
    if how == "dir":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(str(how))
    return path


def _clean(run: helpers.Run) -> None:
    assert "Traceback" not in run.output, run.describe()
    assert "unexpected" not in run.output, run.describe()


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_lease_never_stops_a_pull(nginx: Nginx, tmp: Path, case: str) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", DATA)
    uri = nginx.url(f"{folder}/model.bin")
    dest = tmp / "models"
    name, how = CASES[case]
    _plant(dest / STATE_DIR, name, how)
    env = helpers.clean_env(STORAGE_INITIALIZER_LOG_FORMAT="json")

    status = helpers.run(
        helpers.cli_argv("status", "--json", dest), env=env, timeout=60
    )  # a FIFO must not block it
    _clean(status)
    assert json.loads(status.stdout)["state"] in ("incomplete", "downloading", "stale lease")

    pulled = helpers.run(
        helpers.cli_argv("pull", "--stale-after", "1", uri, dest), env=env, timeout=120
    )
    _clean(pulled)
    assert pulled.returncode == 0, pulled.describe()
    assert pulled.outcome() == "downloaded", pulled.describe()
    assert (dest / "model.bin").read_bytes() == DATA
    if case == "wrong-types":
        warned = [e["message"] for e in pulled.json_events() if "wrong type" in e["message"]]
        assert len(warned) == 1, pulled.stderr
        for field in ("pid", "released", "bytes_done", "heartbeat"):
            assert field in warned[0], warned
    leases = sorted(p.name for p in (dest / STATE_DIR).glob("lease.*.json") if p.is_file())
    if case == "absurd-generation":
        assert leases == ["lease.1000000000000.json"], leases
    done = json.loads(helpers.cli("status", "--json", dest, env=env).stdout)
    assert done["state"] == "complete", done


def test_a_malformed_lease_in_a_cache_entry_never_stops_status_gc_or_a_pull(
    nginx: Nginx, tmp: Path
) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", DATA)
    uri = nginx.url(f"{folder}/model.bin")
    cache = tmp / "cache"
    entry = layout.cached(cache, parse(uri).key((), ()))
    # Not "released" (a non-boolean one is not a release): the other fields must be judged.
    _plant(entry.state, FIRST, json.dumps({**WRONG_TYPES, "released": None}))
    env = helpers.clean_env()

    for argv in (
        ("status", "--cache-dir", cache),
        ("status", "--cache-dir", cache, "--json"),
        ("gc", "--cache-dir", cache, "--dry-run", "--min-idle", "0", "--max-size", "1"),
    ):
        run = helpers.cli(*argv, env=env)
        _clean(run)
        assert run.returncode == 0, run.describe()
        assert entry.key in run.output, run.describe()  # the planted entry was looked at
    dest = tmp / "dest"
    pulled = helpers.cli("pull", "--cache-dir", cache, "--stale-after", "1", uri, dest, env=env)
    _clean(pulled)
    assert pulled.returncode == 0, pulled.describe()
    assert (dest / "model.bin").read_bytes() == DATA
