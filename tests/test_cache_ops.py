"""Running a cache: status table, verify across entries, gc (LRU/LFU, dry run, never an entry in
use), the metrics file and bulk prefetch — real processes on real directories."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from storage_initializer.engine import INTEGRITY_ATTEMPTS
from tests.helpers import (
    clean_env,
    cli_argv,
    entrypoint,
    pattern,
    poll_until,
    start,
    truncating,
)
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storage_initializer", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def make_model(root: Path, name: str, size: int) -> Path:
    model = root / "sources" / name
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"name": name}))
    (model / "weights.bin").write_bytes(os.urandom(size))
    return model


def seed(tmp_path: Path, cache: Path, names_sizes: dict[str, int]) -> dict[str, str]:
    """Pull each model into the cache; returns name -> key."""
    keys = {}
    for name, size in names_sizes.items():
        source = make_model(tmp_path, name, size)
        run = cli("pull", "--cache-dir", str(cache), str(source), str(tmp_path / "dest" / name))
        assert run.returncode == 0, run.stderr
        status = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)
        keys[name] = next(e["key"] for e in status["entries"] if e["source"] == str(source))
    return keys


def set_history(cache: Path, key: str, hits: int, last_used: float) -> None:
    """A crafted access history: ``hits`` uses, the last at ``last_used``."""
    log = cache / key / ".storage-initializer" / "access.log"
    lines = [f"{last_used - 1000 - i:.3f} complete pod\n" for i in range(hits - 1)]
    lines.append(f"{last_used:.3f} complete pod\n")
    log.write_text("".join(lines))


def test_status_table_and_json(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    seed(tmp_path, cache, {"a": 1000, "b": 2000})
    table = cli("status", "--cache-dir", str(cache))
    assert table.returncode == 0
    assert table.stdout.count("complete") == 2
    assert "free" in table.stdout
    data = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)
    sizes = sorted(e["size"] for e in data["entries"])
    assert sizes == [1000 + len('{"name": "a"}'), 2000 + len('{"name": "b"}')]
    assert data["volume"]["free"] > 0


def test_published_is_what_readers_get(tmp_path: Path) -> None:
    """``Entry.published`` (the one copy status, gc and pull use): a cache entry's current
    version, and the entry itself in direct mode or before a cache entry has a version."""
    from storage_initializer.store import layout
    from storage_initializer.store import marker as marker_io

    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"m": 1000})
    entry = layout.cached(cache, keys["m"])
    first = entry.published()
    assert first.mode == "version" and first.root == (cache / keys["m"] / "current").resolve()
    assert marker_io.read(first) is not None and (first.root / "weights.bin").is_file()
    source = str(tmp_path / "sources" / "m")
    direct = tmp_path / "direct"
    assert cli("pull", source, str(direct)).returncode == 0
    plain = layout.Entry(direct, "", "direct")
    assert plain.published() is plain
    empty = layout.cached(cache, "0" * 16)
    assert empty.published() is empty  # no version yet: nothing to read


def test_verify_across_a_cache_finds_the_damaged_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"good": 500, "bad": 500})
    assert cli("verify", "--cache-dir", str(cache)).returncode == 0
    victim = cache / keys["bad"] / "current" / "weights.bin"
    os.chmod(victim, 0o644)
    victim.write_bytes(b"x" * 500)  # same size, other bytes: only a re-hash can tell
    run = cli("verify", "--cache-dir", str(cache))
    assert run.returncode == 1
    assert "weights.bin" in run.stdout and str(cache / keys["bad"]) in run.stderr
    assert cli("verify", "--cache-dir", str(cache), "--entry", keys["good"]).returncode == 0


def test_lru_and_lfu_pick_different_victims(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"old-popular": 3000, "new-rare": 3000, "mid": 3000})
    now = time.time()
    set_history(cache, keys["old-popular"], hits=50, last_used=now - 7200)
    set_history(cache, keys["new-rare"], hits=1, last_used=now - 3600)
    set_history(cache, keys["mid"], hits=10, last_used=now - 5400)
    limit = str(2 * 3100)  # room for two of the three
    lru = cli("gc", "--cache-dir", str(cache), "--max-size", limit, "--policy", "lru", "--dry-run")
    lfu = cli("gc", "--cache-dir", str(cache), "--max-size", limit, "--policy", "lfu", "--dry-run")
    assert lru.returncode == 0 and lfu.returncode == 0
    assert keys["old-popular"] in lru.stdout and keys["new-rare"] not in lru.stdout
    assert keys["new-rare"] in lfu.stdout and keys["old-popular"] not in lfu.stdout


def du(path: Path) -> int:
    """Bytes on disk under ``path`` as du counts them (allocated blocks, hard links once)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[0])


def new_version(tmp_path: Path, cache: Path, name: str) -> None:
    """Change a local model and pull it again with --revalidate: a second version in the
    cache, the first kept (as it is for pods linked to it)."""
    source = tmp_path / "sources" / name
    weights = source / "weights.bin"
    weights.write_bytes(os.urandom(weights.stat().st_size))
    dest = tmp_path / "dest" / f"{name}-v2"
    run = cli("pull", "--cache-dir", str(cache), "--revalidate", str(source), str(dest))
    assert run.returncode == 0, run.stderr


def test_gc_frees_exactly_what_the_dry_run_announced(tmp_path: Path) -> None:
    """Measured on disk: du of the cache before and after equals the dry run's total, with
    an evicted entry that has an old version (counted once, not as a "clean" and an "evict")
    and a kept entry whose old version alone goes."""
    from storage_initializer.cache import eviction as gc_mod
    from storage_initializer.report import human_bytes

    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"x": 40_000, "y": 40_000, "z": 40_000})
    new_version(tmp_path, cache, "x")
    new_version(tmp_path, cache, "z")
    now = time.time()
    for age, name in enumerate(("x", "y", "z")):
        set_history(cache, keys[name], hits=1, last_used=now - 1000 * (3 - age))
    # Models: x 2 versions, y 1, z 2 = 5 units; z's old version goes (-1), then LRU evicts
    # x (-2) and y (-1) to get under 1.5 units.
    limit = 60_000
    args = ["gc", "--cache-dir", str(cache), "--max-size", str(limit), "--min-idle", "0"]
    policy = gc_mod.Policy(max_size=limit, min_idle=0)
    planned, _ = gc_mod.run(cache, policy, dry_run=True)
    announced = sum(a.bytes for a in planned)
    assert sorted((a.kind, a.entry.key) for a in planned) == sorted(
        [("evict", keys["x"]), ("evict", keys["y"]), ("clean", keys["z"])]
    )
    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == f"would free {human_bytes(announced)} in 3 actions"
    before = du(cache)
    real = cli(*args)
    after = du(cache)
    assert real.returncode == 0, real.stderr
    assert before - after == announced
    # The reasons quote ages ("replaced 2s ago"); the clock moves between the two runs.
    assert [_ageless(line.removeprefix("would ")) for line in dry.stdout.splitlines()] == [
        _ageless(line.replace("freed", "free", 1)) for line in real.stdout.splitlines()
    ]
    assert not (cache / keys["x"]).exists() and not (cache / keys["y"]).exists()
    left = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)["entries"]
    assert [(e["key"], e["state"], e["old_versions"]) for e in left] == [
        (keys["z"], "complete", [])
    ]


def _ageless(line: str) -> str:
    """A gc line with its durations blanked: they grow between a dry run and the real one."""
    return re.sub(r"\b\d+(?:\.\d+)?(?:s|m|h|d)\b", "<age>", line)


def held_env(**more: str) -> dict[str, str]:
    """A pull's environment for the held-download tests: heartbeats every half second."""
    return clean_env(STORAGE_INITIALIZER_STALE_AFTER="2", **more)


class GatedFiles:
    """Files on nginx behind the counting proxy, whose GETs can be held mid-body.

    Why: the cache tests need a real pull that is *downloading right now* (holding the lease,
    heartbeating, bytes in staging) while ``gc`` or ``status`` runs, without depending on
    timing. :meth:`gate` holds every GET of a file after its first ``hold_after`` bytes (a
    ``"hold"`` fault) until the test opens the gate (the pull completes) or cuts it (the
    connection closes mid-body: a broken transfer that keeps its staging for a resume)."""

    def __init__(self, nginx: Nginx, files: dict[str, bytes]) -> None:
        self.nginx, self.root = nginx, nginx.new_dir()
        self.proxy = CountingProxy(f"http://127.0.0.1:{nginx.http_port}")
        self.gates: dict[str, Fault] = {}
        for name, data in files.items():
            nginx.put(f"{self.root}/{name}", data)

    def __enter__(self) -> GatedFiles:
        self.proxy.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for gate in self.gates.values():
            gate.release(cut=True)
        self.proxy.stop()

    def url(self, name: str) -> str:
        return f"{self.proxy.url}/{self.root}/{name}"

    def replace(self, name: str, data: bytes) -> None:
        """A new version of ``name``: new bytes and an older date (nginx's ETag is the date and
        the size, and the size stays)."""
        path = self.nginx.docroot / self.root / name
        date = path.stat().st_mtime - 60
        path.write_bytes(data)
        os.utime(path, (date, date))

    def gate(self, name: str, hold_after: int) -> None:
        self.gates[name] = self.proxy.add_fault(
            Fault(
                kind="hold",
                hold_after=hold_after,
                gate=threading.Event(),
                gate_timeout=120,  # a failing test must not hang forever
                method="GET",
                path_contains=f"/{self.root}/{name}",
            )
        )

    def wait_held(self, name: str) -> None:
        poll_until(lambda: self.gates[name].held, 60, f"a download of {name} at the gate")

    def open(self, name: str) -> None:
        self.gates[name].release()

    def cut(self, name: str) -> None:
        self.gates[name].release(cut=True)


def http_key(url: str) -> str:
    from storage_initializer.uri import parse

    return parse(url).key((), ())


def test_gc_keeps_entries_that_real_pulls_are_downloading(nginx: Nginx, tmp_path: Path) -> None:
    """Two pulls held mid-download at the origin — a first download, and a complete entry
    being revalidated into a new version (complete, but its lease is held) — survive a gc
    that evicts everything it may, and gc says why; both pulls then finish."""
    cache = tmp_path / "cache"
    fresh, again = pattern(3 << 20, 1), pattern(1 << 20, 2)
    with GatedFiles(nginx, {"fresh.bin": fresh, "again.bin": again}) as origin:
        pod0 = str(tmp_path / "p0")
        first = cli("pull", "--cache-dir", str(cache), origin.url("again.bin"), pod0)
        assert first.returncode == 0, first.stderr
        idle = seed(tmp_path, cache, {"idle": 4000})["idle"]
        fresh_key, again_key = http_key(origin.url("fresh.bin")), http_key(origin.url("again.bin"))
        for key in (idle, again_key):
            set_history(cache, key, hits=1, last_used=time.time() - 9000)
        changed = pattern(1 << 20, 3)
        origin.replace("again.bin", changed)
        origin.gate("fresh.bin", 256 << 10)
        origin.gate("again.bin", 256 << 10)
        argvs = [
            cli_argv("pull", "--cache-dir", cache, origin.url("fresh.bin"), tmp_path / "p1"),
            cli_argv(
                "pull", "--cache-dir", cache, "--revalidate", origin.url("again.bin"),
                tmp_path / "p2",
            ),
        ]  # fmt: skip
        pulls = [start(argv, held_env(), tmp_path / "logs") for argv in argvs]
        try:
            origin.wait_held("fresh.bin")
            origin.wait_held("again.bin")
            args = ["gc", "--cache-dir", str(cache), "--max-size", "1", "--max-idle", "1"]
            dry = cli(*args, "--min-idle", "0", "--dry-run")
            real = cli(*args, "--min-idle", "0")
        finally:
            origin.open("fresh.bin")
            origin.open("again.bin")
            runs = [p.wait() for p in pulls]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert dry.returncode == 0 and real.returncode == 0, real.stderr
    for out in (dry.stdout, real.stdout):
        assert idle in out and fresh_key not in out and again_key not in out
    assert f"keeping {fresh_key}: downloading by" in real.stderr
    assert f"keeping {again_key}: complete, lease held by" in real.stderr
    assert not (cache / idle).exists()
    assert (tmp_path / "p1" / "fresh.bin").read_bytes() == fresh
    assert (tmp_path / "p2" / "again.bin").read_bytes() == changed
    assert cli("verify", "--cache-dir", str(cache)).returncode == 0


def test_gc_right_after_a_real_pull_keeps_what_it_used(tmp_path: Path) -> None:
    """A pull's own access record (not a hand-written one) protects the entry for
    --min-idle; the control entry, untouched as long, goes."""
    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"used": 3000, "unused": 3000})
    for key in keys.values():
        set_history(cache, key, hits=1, last_used=time.time() - 9000)
    pod = tmp_path / "dest" / "another-pod"
    source = tmp_path / "sources" / "used"
    again = cli("pull", "--cache-dir", str(cache), str(source), str(pod))
    assert again.returncode == 0, again.stderr
    run = cli("gc", "--cache-dir", str(cache), "--max-idle", "60", "--min-idle", "600")
    assert run.returncode == 0, run.stderr
    assert f"keeping {keys['used']}: used" in run.stderr and "within --min-idle" in run.stderr
    assert run.stdout.splitlines()[0].startswith(f"evict {keys['unused']} ")
    assert (pod / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()
    assert not (cache / keys["unused"]).exists()


def test_a_use_after_gc_planned_cancels_the_eviction(tmp_path: Path) -> None:
    """gc re-reads the access log under the entry's lease: a real pull that used the entry
    between the plan and the removal keeps it, even with --min-idle 0 (no timestamps
    involved: the log changed)."""
    from storage_initializer.cache import eviction as gc_mod

    cache = tmp_path / "cache"
    key = seed(tmp_path, cache, {"m": 3000})["m"]
    set_history(cache, key, hits=1, last_used=time.time() - 9000)
    policy = gc_mod.Policy(max_size=1, min_idle=0)
    [action] = gc_mod.plan(cache, policy)
    assert action.kind == "evict"
    pod = tmp_path / "dest" / "late-pod"
    source = tmp_path / "sources" / "m"
    late = cli("pull", "--cache-dir", str(cache), str(source), str(pod))
    assert late.returncode == 0, late.stderr
    assert gc_mod.apply(action, policy) is False
    assert (pod / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()
    assert cli("verify", "--cache-dir", str(cache)).returncode == 0
    # Nothing changed since a fresh plan: now it goes, whole.
    [again] = gc_mod.plan(cache, policy)
    assert gc_mod.apply(again, policy) is True
    assert os.listdir(cache) == []


def test_a_pull_waiting_while_gc_removes_the_entry_downloads_it_afresh(tmp_path: Path) -> None:
    """A real pull arrives while gc evicts an entry (lease claimed, ``current`` hidden) and
    waits — holding the entry's file lock — for gc's lease; gc removes the whole entry, state
    directory, lease and lock file included. The waiter must then claim a fresh entry and
    download, not fail writing its lease into a directory that is gone. The gc steps run
    here, in the order ``gc.apply`` takes them, so that the pull is seen waiting at the
    moment the entry goes."""
    from storage_initializer.cache import eviction as gc_mod
    from storage_initializer.store import layout
    from storage_initializer.store.lease import Owner, current, try_claim

    cache = tmp_path / "cache"
    key = seed(tmp_path, cache, {"w": 5000})["w"]
    source = tmp_path / "sources" / "w"
    entry = layout.cached(cache, key)
    gc_lease = try_claim(entry, Owner.this_process(), current(entry)[0], {"phase": "gc"})
    assert gc_lease is not None
    assert gc_mod.hide_current(entry)  # no replica trusts the entry from here on
    logs = tmp_path / "logs"
    argv = cli_argv(
        "pull", "--cache-dir", cache, "--stale-after", "60", source, tmp_path / "dest" / "waiter"
    )
    waiter = start(argv, clean_env(STORAGE_INITIALIZER_LOG_FORMAT="json"), logs)
    try:
        poll_until(
            lambda: any("waiting for" in f.read_text() for f in logs.glob("err.*")),
            deadline=60,
            what="the pull to wait for gc's lease",
        )
        gc_mod.remove_entry(entry)
    finally:
        done = waiter.wait()
    assert done.returncode == 0, done.stderr
    assert done.outcome() == "downloaded"
    assert (tmp_path / "dest" / "waiter" / "weights.bin").read_bytes() == (
        source / "weights.bin"
    ).read_bytes()
    assert cli("verify", "--cache-dir", str(cache)).returncode == 0


DOCS = Path(__file__).resolve().parents[1] / "docs" / "cache.md"


def documented_metrics() -> tuple[set[str], set[str]]:
    """Metric names and ``phase`` values as docs/cache.md's table documents them: the test
    holds the code to the documentation, not to itself."""
    rows = [r for r in DOCS.read_text().splitlines() if r.startswith("| `storage_initializer_")]
    names = {r.split("`")[1].split("{")[0] for r in rows}
    phase_row = next(r for r in rows if "_phase_seconds" in r)
    phases = set(re.findall(r"`([a-z]+)`", phase_row.split("|")[2]))
    return names, phases


def read_metrics(path: Path) -> dict[str, list[Any]]:
    """Sample name -> samples, as Prometheus' own parser reads the file (``_created``
    companions of counters left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples.setdefault(sample.name, []).append(sample)
    return samples


def check_documented(samples: dict[str, list[Any]], outcome: str) -> dict[str, Any]:
    """Every documented family, with its labels and every documented phase, and nothing
    undocumented; returns name -> the one value (phase_seconds: phase -> value)."""
    names, phases = documented_metrics()
    assert set(samples) == names
    values: dict[str, Any] = {}
    for name, found in samples.items():
        for sample in found:
            assert sample.labels["outcome"] == outcome, sample
            assert sample.labels["source"], sample
        if name.endswith("_phase_seconds"):
            assert sorted(s.labels["phase"] for s in found) == sorted(phases)
            values[name] = {s.labels["phase"]: s.value for s in found}
        else:
            assert [set(s.labels) for s in found] == [{"source", "outcome"}], found
            values[name] = found[0].value
    return values


def test_metrics_file_of_a_download_has_every_documented_series(
    nginx: Nginx, tmp_path: Path
) -> None:
    folder = nginx.new_dir()
    data = pattern(3 << 20, 7)
    nginx.put(f"{folder}/model.bin", data)
    metrics = tmp_path / "metrics" / "si.prom"
    env = clean_env(STORAGE_INITIALIZER_METRICS_FILE=str(metrics))
    run = entrypoint(nginx.url(f"{folder}/model.bin"), tmp_path / "d", env=env)
    assert run.returncode == 0, run.stderr
    values = check_documented(read_metrics(metrics), "downloaded")
    p = "storage_initializer_"
    assert values[f"{p}bytes_from_origin_total"] == len(data)
    assert values[f"{p}bytes_reused_total"] == 0
    assert values[f"{p}files"] == 1 and values[f"{p}success"] == 1
    assert values[f"{p}retries_total"] == values[f"{p}verify_failures_total"] == 0
    phases = values[f"{p}phase_seconds"]
    # Every phase a plain download goes through took time; nothing was extracted.
    assert all(phases[name] > 0 for name in ("list", "transfer", "verify", "commit", "total"))
    assert phases["extract"] == 0
    assert phases["total"] >= phases["list"] + phases["transfer"] + phases["commit"]
    # The next replica: the fast path, timed as the marker check.
    again = entrypoint(nginx.url(f"{folder}/model.bin"), tmp_path / "d", env=env)
    assert again.returncode == 0, again.stderr
    found = check_documented(read_metrics(metrics), "complete")
    assert found[f"{p}bytes_reused_total"] == len(data)
    assert found[f"{p}bytes_from_origin_total"] == 0
    assert found[f"{p}phase_seconds"]["verify"] > 0


def test_metrics_file_of_failed_pulls_keeps_what_they_spent(nginx: Nginx, tmp_path: Path) -> None:
    """A failed run still reports the origin bytes it used, its retries, its verification
    failures and outcome "failed" (success 0), every documented series present."""
    folder = nginx.new_dir()
    data = pattern(200_000, 8)
    nginx.put(f"{folder}/model.bin", data)
    metrics = tmp_path / "metrics" / "si.prom"
    env = clean_env(STORAGE_INITIALIZER_METRICS_FILE=str(metrics))
    wrong = nginx.url(f"{folder}/model.bin") + "#sha256=" + "0" * 64
    run = entrypoint(wrong, tmp_path / "d1", env=env)
    assert run.returncode == 1 and "failed verification" in run.last_line
    values = check_documented(read_metrics(metrics), "failed")
    p = "storage_initializer_"
    # Fetched and found wrong INTEGRITY_ATTEMPTS times: every failure but the last is
    # counted as a verify failure and fetched again.
    assert values[f"{p}verify_failures_total"] == INTEGRITY_ATTEMPTS - 1
    assert values[f"{p}bytes_from_origin_total"] == INTEGRITY_ATTEMPTS * len(data)
    assert values[f"{p}success"] == 0
    assert values[f"{p}phase_seconds"]["transfer"] > 0
    with truncating(nginx) as broken:
        env_retry = clean_env(
            STORAGE_INITIALIZER_METRICS_FILE=str(metrics), STORAGE_INITIALIZER_RETRIES="1"
        )
        run = entrypoint(f"{broken.url}/{folder}/model.bin", tmp_path / "d2", env=env_retry)
    assert run.returncode == 1
    values = check_documented(read_metrics(metrics), "failed")
    # One retry was made (two GETs); the failure that gave up is not a retry.
    assert values[f"{p}retries_total"] == 1
    # Half the body per attempt (the server cuts every answer there), restarted once.
    assert values[f"{p}bytes_from_origin_total"] == 2 * (len(data) // 2)
    assert values[f"{p}success"] == 0


def test_prefetch_reports_the_one_bad_model(tmp_path: Path) -> None:
    sources = [make_model(tmp_path, f"m{i}", 300 * (i + 1)) for i in range(4)]
    listing = tmp_path / "models.yaml"
    listing.write_text(
        "parallel: 3\n"
        "models:\n"
        + "".join(f"  - uri: {s}\n    dest: {tmp_path / 'out' / s.name}\n" for s in sources)
        + f"  - uri: {tmp_path / 'missing-model'}\n    dest: {tmp_path / 'out' / 'missing'}\n"
    )
    run = cli("prefetch", "--from-file", str(listing))
    assert run.returncode == 1
    assert "4 of 5 models ready, 1 failed" in run.stdout
    bad_row = next(line for line in run.stdout.splitlines() if "missing-model" in line)
    assert "failed" in bad_row
    for source in sources:
        assert (tmp_path / "out" / source.name / "weights.bin").exists()


@pytest.mark.parametrize("content", ["models: 3\n", "- {dest: /x}\n"])
def test_prefetch_rejects_a_malformed_file(tmp_path: Path, content: str) -> None:
    listing = tmp_path / "models.yaml"
    listing.write_text(content)
    run = cli("prefetch", "--from-file", str(listing))
    assert run.returncode == 1 and "prefetch:" in run.stderr


def test_concurrent_pulls_record_hits_and_last_use(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = make_model(tmp_path, "popular", 50_000)
    before = time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "storage_initializer",
                "pull",
                "--cache-dir",
                str(cache),
                str(source),
                str(tmp_path / "pods" / str(i)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(6)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    entry = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)["entries"][0]
    # O_APPEND lines on a local filesystem do not get lost: every pull counted once.
    assert entry["hits"] == 6
    assert before <= entry["last_used"] <= time.time()


def test_prefetch_into_a_cache_without_destinations(tmp_path: Path) -> None:
    sources = [make_model(tmp_path, f"c{i}", 1000) for i in range(3)]
    cache = tmp_path / "cache"
    listing = tmp_path / "models.yaml"
    listing.write_text(
        f"defaults:\n  cache_dir: {cache}\nmodels:\n" + "".join(f"  - {s}\n" for s in sources)
    )
    run = cli("prefetch", "--from-file", str(listing))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 of 3 models ready" in run.stdout
    entries = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)["entries"]
    assert sorted(e["state"] for e in entries) == ["complete"] * 3


def test_status_states_of_real_failures_and_gc_cleans_them(nginx: Nginx, tmp_path: Path) -> None:
    """Every state of ``status --cache-dir``, made by real pulls: a pull SIGKILLed mid-download
    (stale lease: its pid is dead), a pull whose origin broke mid-body with no retries left
    (orphaned staging, kept for a resume), a pull held mid-download (downloading, with holder
    and progress), a complete entry. gc then removes the two leftovers whole, keeps the rest,
    and the held pull still finishes."""
    cache = tmp_path / "cache"
    files = {name: pattern(2 << 20, i) for i, name in enumerate(("killed", "broken", "busy"))}
    with GatedFiles(nginx, files) as origin:
        keys = {name: http_key(origin.url(name)) for name in files}
        keys["done"] = seed(tmp_path, cache, {"done": 4000})["done"]
        pulls = {}
        for name in files:
            origin.gate(name, 512 << 10)
            argv = cli_argv("pull", "--cache-dir", cache, origin.url(name), tmp_path / name)
            pulls[name] = start(argv, held_env(STORAGE_INITIALIZER_RETRIES="0"), tmp_path / "logs")
        try:
            for name in files:
                origin.wait_held(name)

            def survey() -> dict[str, dict[str, Any]]:
                data = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)
                return {e["key"]: e for e in data["entries"]}

            poll_until(
                lambda: all(
                    survey().get(keys[n], {}).get("progress", {}).get("bytes_done") for n in files
                ),
                deadline=60,
                what="every held pull to report progress in its lease",
            )
            pulls["killed"].popen.send_signal(signal.SIGKILL)
            killed = pulls["killed"].wait()
            origin.cut("broken")
            broken = pulls["broken"].wait()
            table = cli("status", "--cache-dir", str(cache))
            found = survey()
            dry = cli("gc", "--cache-dir", str(cache), "--min-idle", "0", "--dry-run")
            real = cli("gc", "--cache-dir", str(cache), "--min-idle", "0")
            after = survey()
        finally:
            origin.open("busy")
            busy = pulls["busy"].wait()
    print(table.stdout)  # the table of a real run, for the docs
    assert killed.returncode == -signal.SIGKILL
    assert broken.returncode == 1 and "transfer broke" in broken.last_line, broken.stderr
    assert busy.returncode == 0, busy.stderr
    states = {key: found[key]["state"] for key in found}
    assert states == {
        keys["killed"]: "stale lease",
        keys["broken"]: "orphaned staging",
        keys["busy"]: "downloading",
        keys["done"]: "complete",
    }
    assert found[keys["killed"]]["staging_bytes"] > 0
    assert found[keys["broken"]]["staging_bytes"] > 0
    busy_row = next(line for line in table.stdout.splitlines() if keys["busy"] in line)
    assert f"pid {pulls['busy'].pid}" in busy_row and "/2.0 MiB" in busy_row
    for key in (keys["killed"], keys["broken"]):
        assert f"clean {key} " in real.stdout and f"would clean {key} " in dry.stdout
    assert keys["busy"] not in real.stdout and keys["done"] not in real.stdout
    assert f"keeping {keys['busy']}: downloading by" in real.stderr
    assert set(after) == {keys["busy"], keys["done"]}
    assert sorted(os.listdir(cache)) == sorted([keys["busy"], keys["done"]])
    assert (tmp_path / "busy" / "busy").read_bytes() == files["busy"]
