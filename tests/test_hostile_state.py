"""The state directory is untrusted input (issue 14, item 2).

``.storage-initializer/`` is group-writable by design, so any process of the pod's group (the
model server) can write there, while the init container may run with more privilege and cloud
credentials. Each test plants what such a process could — a journal naming paths outside the
entry, symbolic links where our state lives, forged or truncated markers, garbage journals and
access records — then runs the real entrypoint or CLI against real nginx, and checks that
nothing outside the entry is touched, that the pull still ends with the right model (or a
message saying what to delete), and that the warning says what was found.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import helpers
from tests.helpers import STATE_DIR
from tests.servers.nginx import Nginx

MODEL = {"config.json": b'{"hostile": true}', "weights.bin": helpers.pattern(300_000, 14)}


def _env(**extra: str) -> dict[str, str]:
    return helpers.clean_env(STORAGE_INITIALIZER_RETRIES="0", **extra)


def _source(nginx: Nginx, name: str = "weights.bin") -> tuple[str, str]:
    """A one-file model on nginx: (URI, the folder that isolates this test's log lines)."""
    folder = nginx.new_dir()
    nginx.put(f"{folder}/{name}", MODEL["weights.bin"])
    return nginx.url(f"{folder}/{name}"), folder


def _pull(uri: str, dest: Path, *flags: str) -> helpers.Run:
    if flags:
        return helpers.cli("pull", *flags, uri, dest, env=_env())
    return helpers.entrypoint(uri, dest, env=_env())


def _model_ok(run: helpers.Run, dest: Path) -> None:
    assert run.returncode == 0, run.describe()
    assert (dest / "weights.bin").read_bytes() == MODEL["weights.bin"]
    marker = helpers.marker_path(dest)
    assert marker.is_file() and not marker.is_symlink()


def _gets(nginx: Nginx, folder: str) -> int:
    return len([r for r in nginx.requests(folder) if r.method == "GET"])


def _precious(directory: Path) -> dict[str, bytes]:
    """A directory of someone else's files, one level deep."""
    (directory / "sub").mkdir(parents=True)
    files = {"keep.txt": b"precious", "sub/deeper.txt": b"also precious"}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def _intact(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (directory / name).read_bytes() == data, f"{directory / name} was touched"


# -- the commit journal ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["climbing", "absolute", "nested", "not-json", "items-wrong"])
def test_a_planted_commit_journal_touches_nothing_outside(
    nginx: Nginx, tmp: Path, how: str
) -> None:
    uri, _folder = _source(nginx)
    outside = tmp / "outside"
    files = _precious(outside)
    dest = tmp / "pods" / "dest"
    (dest / STATE_DIR).mkdir(parents=True)
    item = {
        "climbing": "../../outside",
        "absolute": str(outside),
        "nested": "a/../../../outside",
    }.get(how, "")
    journal = dest / STATE_DIR / "commit.json"
    journal.write_text(json.dumps({"items": [item], "owner": "planted"}))
    if how == "not-json":
        journal.write_text('{"items": ["../../outside"')
    elif how == "items-wrong":
        journal.write_text(json.dumps({"items": [["../../outside"], 5]}))
    run = _pull(uri, dest)
    _intact(outside, files)
    _model_ok(run, dest)
    assert f"ignoring the commit journal {journal}" in run.stderr, run.stderr
    assert not journal.exists()


# -- links where our state lives ---------------------------------------------------------------


def test_a_linked_staging_directory_is_removed_not_followed(nginx: Nginx, tmp: Path) -> None:
    uri, _folder = _source(nginx)
    victim = tmp / "victim"
    files = _precious(victim)
    dest = tmp / "dest"
    (dest / STATE_DIR).mkdir(parents=True)
    os.symlink(victim, dest / STATE_DIR / "staging")
    run = _pull(uri, dest)
    _intact(victim, files)
    _model_ok(run, dest)
    assert "staging" in run.stderr and "is a symbolic link" in run.stderr, run.stderr


def test_a_linked_lock_does_not_truncate_its_target(nginx: Nginx, tmp: Path) -> None:
    uri, _folder = _source(nginx)
    victim = tmp / "victim.conf"
    victim.write_bytes(b"precious settings\n")
    dest = tmp / "dest"
    (dest / STATE_DIR).mkdir(parents=True)
    os.symlink(victim, dest / STATE_DIR / "lock")
    run = _pull(uri, dest)
    assert victim.read_bytes() == b"precious settings\n"
    _model_ok(run, dest)
    assert f"{dest / STATE_DIR / 'lock'} is a symbolic link to {victim}" in run.stderr


def test_a_linked_state_directory_is_removed_not_followed(nginx: Nginx, tmp: Path) -> None:
    uri, _folder = _source(nginx)
    victim = tmp / "victim"
    files = _precious(victim)
    os.symlink(victim / "keep.txt", victim / "lock")
    dest = tmp / "dest"
    dest.mkdir()
    os.symlink(victim, dest / STATE_DIR)
    run = _pull(uri, dest)
    _intact(victim, files)
    assert "lease.000000000001.json" not in os.listdir(victim)
    _model_ok(run, dest)
    assert not (dest / STATE_DIR).is_symlink()


def test_a_linked_marker_is_not_trusted(nginx: Nginx, tmp: Path) -> None:
    """A marker that is a link to a genuine marker elsewhere: the model is not taken as
    complete through it; the link is removed (its target kept) and the model downloaded."""
    uri, folder = _source(nginx)
    first = tmp / "first"
    assert _pull(uri, first).returncode == 0
    genuine = helpers.marker_path(first).read_bytes()
    dest = tmp / "second"
    (dest / STATE_DIR).mkdir(parents=True)
    (dest / "weights.bin").write_bytes(MODEL["weights.bin"])
    os.symlink(helpers.marker_path(first), helpers.marker_path(dest))
    before = _gets(nginx, folder)
    refused = _pull(uri, dest)
    # Without a marker of its own, the file in DEST is not known to be ours: refused, saying how.
    assert refused.returncode == 1, refused.describe()
    assert "did not write (weights.bin)" in refused.last_line and "--replace" in refused.last_line
    assert "marker" in refused.stderr and "is a symbolic link" in refused.stderr
    assert _gets(nginx, folder) == before
    run = helpers.entrypoint(uri, dest, env=_env(STORAGE_INITIALIZER_REPLACE="true"))
    _model_ok(run, dest)
    assert helpers.marker_path(first).read_bytes() == genuine
    assert _gets(nginx, folder) == before + 1


def test_a_linked_access_log_is_not_appended_to(nginx: Nginx, tmp: Path) -> None:
    uri, _folder = _source(nginx)
    dest = tmp / "dest"
    assert _pull(uri, dest).returncode == 0
    victim = tmp / "victim.txt"
    victim.write_bytes(b"precious\n")
    log = dest / STATE_DIR / "access.log"
    log.unlink()
    os.symlink(victim, log)
    run = _pull(uri, dest)  # the fast path records the use
    assert run.returncode == 0, run.describe()
    assert victim.read_bytes() == b"precious\n"


def test_a_linked_version_directory_is_not_served(nginx: Nginx, tmp: Path) -> None:
    """Cache mode: a version directory replaced by a link to a copy outside the cache is not
    linked into pods; the link goes (the copy stays) and a real version is downloaded."""
    uri, folder = _source(nginx)
    cache = tmp / "cache"
    assert _pull(uri, tmp / "pod-a", "--cache-dir", str(cache)).returncode == 0
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    version = entry / os.readlink(entry / "current")
    elsewhere = tmp / "elsewhere" / version.name
    elsewhere.parent.mkdir()
    os.rename(version, elsewhere)
    os.symlink(elsewhere, version)
    before = _gets(nginx, folder)
    pod = tmp / "pod-b"
    run = _pull(uri, pod, "--cache-dir", str(cache))
    assert run.returncode == 0, run.describe()
    assert "version directory" in run.stderr and "is a symbolic link" in run.stderr
    assert (elsewhere / "weights.bin").read_bytes() == MODEL["weights.bin"]
    served = Path(os.path.realpath(pod / "weights.bin"))
    assert served.parent.parent == entry and not served.parent.is_symlink()
    assert served.read_bytes() == MODEL["weights.bin"]
    assert _gets(nginx, folder) == before + 1


# -- forged and truncated markers --------------------------------------------------------------


FORGERIES = {
    "path-escaping": lambda key, n: {"key": key, "files": [{"path": "../outside.bin", "size": n}]},
    "path-not-a-string": lambda key, n: {"key": key, "files": [{"path": 5, "size": n}]},
    "size-negative": lambda key, n: {"key": key, "files": [{"path": "weights.bin", "size": -1}]},
    "size-a-string": lambda key, n: {"key": key, "files": [{"path": "weights.bin", "size": "9"}]},
    "files-not-a-list": lambda key, n: {"key": key, "files": {"weights.bin": n}},
    "checksums-wrong": lambda key, n: {
        "key": key,
        "files": [{"path": "weights.bin", "size": n, "checksums": [1]}],
    },
    "not-an-object": lambda key, n: [key],
}


@pytest.mark.parametrize("forgery", [*sorted(FORGERIES), "truncated"])
def test_a_forged_or_truncated_marker_means_incomplete(
    nginx: Nginx, tmp: Path, forgery: str
) -> None:
    uri, folder = _source(nginx)
    first = tmp / "first"
    assert _pull(uri, first).returncode == 0
    genuine = helpers.marker_path(first).read_text()
    key = json.loads(genuine)["key"]
    size = len(MODEL["weights.bin"])
    # A file of the right size outside the entry, for the marker that names it.
    (tmp / "outside.bin").write_bytes(MODEL["weights.bin"])
    dest = tmp / "second"
    (dest / STATE_DIR).mkdir(parents=True)
    if forgery == "truncated":
        text = genuine[: len(genuine) // 2]
    else:
        text = json.dumps(FORGERIES[forgery](key, size))
    helpers.marker_path(dest).write_text(text)
    before = _gets(nginx, folder)
    run = _pull(uri, dest)
    _model_ok(run, dest)
    assert _gets(nginx, folder) == before + 1
    assert f"ignoring the marker {helpers.marker_path(dest)}" in run.stderr, run.stderr
    assert "treating the model as incomplete" in run.stderr
    assert (tmp / "outside.bin").read_bytes() == MODEL["weights.bin"]
    assert "Traceback" not in run.stderr


# -- garbage journals and access records -------------------------------------------------------


GARBAGE_LINES = [
    "[1, 2]",
    '"a string"',
    "null",
    '{"path": "weights.bin", "size": 1e400, "checksums": {}}',
    '{"path": "weights.bin", "size": true}',
    '{"path": ["weights.bin"], "size": 3}',
    '{"path": "../../outside.bin", "size": 3, "checksums": {}}',
    '{"path": "weights.bin", "size": 300000, "checksums": {"md5": 5}}',
    '{"path": "weights.bin", "start": 1e400, "end": 2}',
    '{"path": "weights.bin", "start": -5, "end": 2}',
    '{"path": "weights.bin", "start": "0", "end": "100"}',
    '{"path": "/etc/passwd", "start": 0, "end": 100}',
    "{" * 50_000,
    "not json at all",
]


def test_garbage_staging_journals_are_ignored(nginx: Nginx, tmp: Path) -> None:
    """A staging area of the same source version whose journals hold garbage: adopted, its
    garbage ignored with a warning, the model downloaded whole and right."""
    uri, folder = _source(nginx)
    first = tmp / "first"
    assert _pull(uri, first).returncode == 0
    genuine = json.loads(helpers.marker_path(first).read_text())
    dest = tmp / "second"
    area = dest / STATE_DIR / "staging" / "0123456789ab"
    (area / "data").mkdir(parents=True)
    (area / "data" / "weights.bin").write_bytes(b"\0" * len(MODEL["weights.bin"]))
    meta = {"key": genuine["key"], "fingerprint": genuine["fingerprint"]}
    (area / "source.json").write_text(json.dumps(meta))
    for name in ("verified.jsonl", "chunks.jsonl"):
        (area / name).write_text("\n".join(GARBAGE_LINES) + "\n")
    before = _gets(nginx, folder)
    run = _pull(uri, dest)
    _model_ok(run, dest)
    assert _gets(nginx, folder) == before + 1
    assert "ignoring a malformed line" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_garbage_access_records_do_not_break_status_or_gc(nginx: Nginx, tmp: Path) -> None:
    uri, _folder = _source(nginx)
    cache = tmp / "cache"
    assert _pull(uri, tmp / "pod", "--cache-dir", str(cache)).returncode == 0
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    with open(entry / STATE_DIR / "access.log", "a", encoding="utf-8") as log:
        log.write("nan use pod\ninf use pod\n-5 use pod\n1e400 total 7\n")
        log.write("100.0 total ²\n100.0 total " + "9" * 5000 + "\n\0\0\0\nbroken\n")
    status = helpers.cli("status", "--cache-dir", cache, "--json")
    assert status.returncode == 0, status.describe()
    gc = helpers.cli("gc", "--cache-dir", cache, "--max-size", "1", "--dry-run")
    assert gc.returncode == 0, gc.describe()
    assert "Traceback" not in status.stderr + gc.stderr


def test_a_garbage_cache_pointer_in_dest_is_ignored(nginx: Nginx, tmp: Path) -> None:
    uri, _folder = _source(nginx)
    pod = tmp / "pod"
    assert _pull(uri, pod, "--cache-dir", str(tmp / "cache")).returncode == 0
    pointer = pod / STATE_DIR / "link.json"
    for forged in ({"entry": 5}, {"entry": "relative/path"}, {"entry": "/a/../../etc"}, [1]):
        os.chmod(pointer.parent, 0o775)
        pointer.write_text(json.dumps(forged))
        status = helpers.cli("status", "--json", pod)
        assert "Traceback" not in status.stderr, status.describe()
        assert f"ignoring {pointer}" in status.stderr, status.describe()
        assert "/etc" not in json.loads(status.stdout).get("entry", "")


# -- property: whatever a journal holds, what we read from it stays inside the entry ----------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["weights.bin", "../x", "/etc/passwd", "a/../../b", ".storage-initializer/x"])
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_record = st.fixed_dictionaries(
    {},
    optional={
        "path": _json,
        "size": _json,
        "start": _json,
        "end": _json,
        "checksums": _json,
        "items": st.lists(_json, max_size=4) | _json,
    },
)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(_record | _json, max_size=6))
def test_any_journal_content_reads_safely(lines: list[object]) -> None:
    """Staging and commit journals hold any JSON at all: reading them never raises, and every
    path that comes out is a clean relative path inside the entry (a top-level name for the
    commit journal), every size and offset a non-negative whole number."""
    from storage_initializer.paths import safe_relpath
    from storage_initializer.store import layout
    from storage_initializer.store.commit import _journal_items
    from storage_initializer.store.staging import Staging

    with tempfile.TemporaryDirectory() as root:
        entry = layout.direct(Path(root) / "dest", "k")
        staging = Staging(entry, "0123456789ab")
        staging.dir.mkdir(parents=True)
        text = "\n".join(json.dumps(line) for line in lines) + "\n"
        (staging.dir / "verified.jsonl").write_text(text)
        (staging.dir / "chunks.jsonl").write_text(text)
        entry.commit_journal.write_text(json.dumps(lines[0] if lines else {}))
        for path, record in staging.verified().items():
            assert safe_relpath(path) == path == record.path
            assert type(record.size) is int and record.size >= 0
        for path, ranges in staging.chunks().items():
            assert safe_relpath(path) == path
            assert all(type(a) is int and type(b) is int and 0 <= a < b for a, b in ranges)
        for item in _journal_items(entry):
            assert safe_relpath(item) == item and "/" not in item


def test_a_link_planted_in_a_resumed_staging_area_is_not_written_through(
    nginx: Nginx, tmp: Path
) -> None:
    """A staging area of the same source version whose data holds a link named like a model
    file: resuming must not write the download through it (it would overwrite the target)."""
    uri, _folder = _source(nginx)
    first = tmp / "first"
    assert _pull(uri, first).returncode == 0
    genuine = json.loads(helpers.marker_path(first).read_text())
    victim = tmp / "victim.conf"
    victim.write_bytes(b"precious settings\n")
    dest = tmp / "second"
    area = dest / STATE_DIR / "staging" / "0123456789ab"
    (area / "data").mkdir(parents=True)
    os.symlink(victim, area / "data" / "weights.bin")
    meta = {"key": genuine["key"], "fingerprint": genuine["fingerprint"]}
    (area / "source.json").write_text(json.dumps(meta))
    (area / "chunks.jsonl").write_text('{"path": "weights.bin", "start": 0, "end": 1}\n')
    run = _pull(uri, dest)
    assert victim.read_bytes() == b"precious settings\n"
    _model_ok(run, dest)
    assert not (dest / "weights.bin").is_symlink()
    assert "removed 1 symbolic link(s) from the staging area" in run.stderr, run.stderr


def test_removing_an_orphaned_staging_area_never_descends_through_a_link(
    nginx: Nginx, tmp: Path
) -> None:
    """An orphaned staging area (another source version) holding a link to a directory: the
    area is removed, the directory it names keeps its files and its mode."""
    uri, _folder = _source(nginx)
    victim = tmp / "victim"
    files = _precious(victim)
    os.chmod(victim / "sub", 0o750)
    dest = tmp / "dest"
    area = dest / STATE_DIR / "staging" / "0123456789ab"
    (area / "data" / "shards").mkdir(parents=True)
    os.symlink(victim, area / "data" / "shards" / "linked")
    os.symlink(victim / "sub", area / "data" / "linked-sub")
    (area / "source.json").write_text('{"key": "another", "fingerprint": "version"}')
    run = _pull(uri, dest)
    _model_ok(run, dest)
    _intact(victim, files)
    assert oct(os.stat(victim / "sub").st_mode & 0o777) == oct(0o750)
    assert not area.exists()


def test_status_does_not_report_what_a_linked_staging_directory_names(
    nginx: Nginx, tmp: Path
) -> None:
    uri, _folder = _source(nginx)
    dest = tmp / "dest"
    assert _pull(uri, dest).returncode == 0
    victim = tmp / "victim"
    _precious(victim)
    staging = dest / STATE_DIR / "staging"
    if staging.exists():
        os.rmdir(staging)
    os.symlink(victim, staging)
    info = json.loads(helpers.cli("status", "--json", dest).stdout)
    assert info["state"] == "complete"
    assert "sub" not in info.get("staging_areas", [])
