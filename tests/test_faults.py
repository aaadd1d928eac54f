"""The download-once guarantee under faults, with real processes and real signals.

- 8 entrypoint processes × 3 models into one shared directory: each model leaves the origin
  once (bytes and GETs counted at the proxy), all exit 0, every tree verifies.
- Chaos: the lease holder is SIGKILLed at a chosen point (listing, mid-file, between files,
  during commit, after the marker); the survivor always finishes, a tight poller never sees an
  incomplete model, and the survivor fetches no more than what the dead holder had not
  fetched, plus one chunk.
- SIGSTOP: a frozen holder is taken over after ``--stale-after``; on SIGCONT it stops with the
  lease-lost message and does not commit over the new owner's result.
- ``--lock-timeout`` gives up clearly while a live holder keeps its lease.

Points in time are reached by watching the lease file, the staging journal and the proxy's
counters (polled with a deadline), and held open with proxy delays; nothing relies on a sleep.
"""

from __future__ import annotations

import collections
import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.concurrency_helpers import (
    TightPoller,
    app_of,
    bytes_by_app,
    lease_of,
    object_gets,
    s3_env,
    verified_paths,
)
from tests.helpers import (
    STATE_DIR,
    Proc,
    cli,
    digests,
    entrypoint_argv,
    marker_path,
    pattern,
    poll_until,
    start,
    tree_digest,
    wait_all,
)
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, s3_server

__all__ = ["s3_server"]

CHUNK = 64 * 1024


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[CountingProxy]:
    with CountingProxy(s3_server.endpoint) as counting:
        yield counting


def _object_delay(bucket: str, seconds: float, key: str = "", times: int | None = None) -> Fault:
    """Delay object GETs (not listings) below ``bucket/key``, so a download lasts long enough
    to be interrupted, or waits at a chosen place."""
    return Fault(
        kind="delay",
        delay=seconds,
        method="GET",
        path_contains=f"/{bucket}/{key}",
        predicate=lambda r: "list-type" not in r.query,
        times=times,
    )


# -- 8 processes × 3 models ------------------------------------------------------------------


def test_eight_processes_three_models_each_fetched_once(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    models = {
        name: {
            f"{name}/config.json": pattern(2_000, 10 + i),
            f"{name}/weights/model.bin": pattern(300_000 + 10_000 * i, 20 + i),
            f"{name}/tokenizer.txt": pattern(5_000, 30 + i),
        }
        for i, name in enumerate(("alpha", "beta", "gamma"))
    }
    bucket = s3_server.new_bucket({k: v for files in models.values() for k, v in files.items()})
    # Slow each object GET a little so the eight processes really overlap on every model.
    proxy.set_faults(_object_delay(bucket, 0.05))
    shared = tmp / "volume"
    names = list(models)
    argvs = []
    for index in range(8):
        order = names[index % 3 :] + names[: index % 3]
        if index >= 4:
            order.reverse()
        pairs: list[str] = []
        for name in order:
            pairs += [f"s3://{bucket}/{name}", str(shared / name)]
        argvs.append(entrypoint_argv(*pairs))
    env = s3_env(s3_server, proxy, STORAGE_INITIALIZER_CHUNK_SIZE="64KiB")
    procs = [start(argv, env, tmp / "logs") for argv in argvs]
    runs = wait_all(procs, timeout=240)
    for result in runs:
        assert result.returncode == 0, result.describe()

    outcomes = collections.Counter(e["outcome"] for r in runs for e in r.json_events("summary"))
    assert outcomes["downloaded"] == 3, outcomes
    assert sum(outcomes.values()) == 24, outcomes
    for name, files in models.items():
        size = sum(len(v) for v in files.values())
        gets = object_gets(proxy, bucket, f"{name}/")
        served = sum(r.bytes for r in gets)
        print(f"\n{name}: {size} bytes in the model, {served} bytes from origin, {len(gets)} GETs")
        assert served == size, (name, served, size)
        keys = [(r.path, r.range) for r in gets]
        assert len(keys) == len(set(keys)), f"{name}: a request was repeated: {keys}"
        local = {k.split("/", 1)[1]: v for k, v in files.items()}
        assert tree_digest(shared / name) == digests(local)
        verify = cli("verify", shared / name)
        assert verify.returncode == 0, verify.describe()


# -- chaos: SIGKILL at chosen points ---------------------------------------------------------

CHAOS_MODEL = {
    "model/config.json": pattern(3_000, 1),
    "model/tokenizer.json": pattern(20_000, 2),
    "model/weights/a.bin": pattern(10 * CHUNK + 123, 3),
    "model/weights/b.bin": pattern(6 * CHUNK, 4),
}
CHAOS_SIZE = sum(len(v) for v in CHAOS_MODEL.values())
POINTS = ("listing", "mid-file", "between-files", "commit", "after-marker")


def _holder(dest: Path, procs: dict[int, Proc]) -> Proc:
    def find() -> Proc | None:
        data = lease_of(dest)
        if data and not data.get("released"):
            return procs.get(int(data.get("pid", 0)))
        return None

    return poll_until(find, 60, "a lease held by one of the processes")


def _kill_at(point: str, dest: Path, holder: Proc, proxy: CountingProxy, rng: random.Random) -> str:
    """Drive the holder to ``point`` and SIGKILL it there; returns what was observed."""
    app = f"p{holder.pid}"
    if point == "listing":
        poll_until(
            lambda: (lease_of(dest) or {}).get("phase") == "listing", 60, "the listing phase"
        )
    elif point == "mid-file":
        target = rng.randint(CHUNK, CHAOS_SIZE - 2 * CHUNK)
        poll_until(
            lambda: (
                sum(r.bytes for r in proxy.select(method="GET") if app_of(r) == app) >= target
                or holder.popen.poll() is not None
            ),
            60,
            f"{target} bytes fetched by the holder",
        )
    elif point == "between-files":
        poll_until(
            lambda: "weights/a.bin" in verified_paths(dest) or holder.popen.poll() is not None,
            60,
            "weights/a.bin verified",
        )
    elif point == "commit":
        # The commit lasts a few fsyncs: poll the lease as tightly as Python can.
        end = time.monotonic() + 60
        while (lease_of(dest) or {}).get("phase") != "commit":
            assert time.monotonic() < end, "the holder never reached the commit"
            if holder.popen.poll() is not None:
                break
    elif point == "after-marker":
        poll_until(
            lambda: marker_path(dest).is_file() or holder.popen.poll() is not None,
            60,
            "the marker",
        )
    holder.popen.send_signal(signal.SIGKILL)
    holder.popen.wait(timeout=30)
    state = dest / STATE_DIR
    if (state / "commit.json").exists():
        return "killed mid-commit"
    if (state / "marker.json").exists():
        return "killed after the marker"
    return f"killed at {point}"


@pytest.mark.slow
def test_chaos_sigkill_the_holder(s3_server: S3Server, proxy: CountingProxy, tmp: Path) -> None:
    bucket = s3_server.new_bucket(CHAOS_MODEL)
    expected = digests({k.split("/", 1)[1]: v for k, v in CHAOS_MODEL.items()})
    rng = random.Random(20261125)
    seen: collections.Counter[str] = collections.Counter()
    takeovers: list[float] = []
    rounds = 20
    for number in range(rounds):
        point = POINTS[number % len(POINTS)]
        proxy.reset()
        faults = [_object_delay(bucket, 0.03)]
        if point == "listing":
            # Hold the first listing open so the kill lands in it.
            faults.insert(
                0,
                Fault(
                    kind="delay",
                    delay=3.0,
                    method="GET",
                    predicate=lambda r: "list-type" in r.query,
                    times=1,
                ),
            )
        if point == "between-files":
            # b.bin's first request waits: the holder sits between a.bin and b.bin.
            faults.insert(0, _object_delay(bucket, 3.0, "model/weights/b.bin", times=1))
        proxy.set_faults(*faults)
        dest = tmp / f"round-{number}" / "models"
        argv = entrypoint_argv(f"s3://{bucket}/model", dest)
        with TightPoller(dest, expected) as poller:
            started = [_start_tagged(argv, s3_server, proxy, tmp) for _ in range(2)]
            holder = _holder(dest, {p.pid: p for p in started})
            survivor = next(p for p in started if p is not holder)
            what = _kill_at(point, dest, holder, proxy, rng)
            killed_at = time.monotonic()
            seen[what] += 1
            if "marker" not in what:
                _await_takeover(dest, survivor)
                takeovers.append(time.monotonic() - killed_at)
            result = survivor.wait(timeout=120)
            assert result.returncode == 0, f"round {number} ({what}): {result.describe()}"
        holder.wait(timeout=10)
        assert not poller.violations, f"round {number} ({what}): {poller.violations[:5]}"
        assert tree_digest(dest) == expected
        verify = cli("verify", dest)
        assert verify.returncode == 0, verify.describe()
        per_app = bytes_by_app(proxy, bucket)
        dead = per_app.get(f"p{holder.pid}", 0)
        after = per_app.get(f"p{survivor.pid}", 0)
        remainder = CHAOS_SIZE - dead
        assert after <= max(0, remainder) + CHUNK, (
            f"round {number} ({what}): the survivor fetched {after} bytes, the holder had "
            f"fetched {dead} of {CHAOS_SIZE}"
        )
    print(f"\nchaos: {rounds} rounds, kill points: {dict(seen)}")
    if takeovers:
        median = sorted(takeovers)[len(takeovers) // 2]
        print(
            f"takeover after SIGKILL (same host): median {median:.3f}s,"
            f" max {max(takeovers):.3f}s over {len(takeovers)} rounds"
        )


def _start_tagged(
    argv: list[str], s3: S3Server, proxy: CountingProxy, tmp: Path, **more: str
) -> Proc:
    """Start a process whose requests carry ``app/p<pid>``: the id must be in its environment
    before it starts, so reserve it with a wrapper that sets it from its own pid."""
    wrapper = (
        "import os, sys; os.environ['AWS_SDK_UA_APP_ID'] = f'p{os.getpid()}'; "
        "sys.argv = sys.argv[1:]; import runpy; "
        "runpy.run_module('storage_initializer.entrypoint', run_name='__main__')"
    )
    full = [argv[0], "-c", wrapper, "entrypoint", *argv[3:]]
    env = s3_env(
        s3,
        proxy,
        STORAGE_INITIALIZER_WORKERS="1",
        STORAGE_INITIALIZER_CHUNK_SIZE="64KiB",
        STORAGE_INITIALIZER_PROGRESS_INTERVAL="0.5",
        **more,
    )
    return start(full, env, tmp / "logs")


def _await_takeover(dest: Path, survivor: Proc) -> None:
    poll_until(
        lambda: (
            (lease_of(dest) or {}).get("pid") == survivor.pid or survivor.popen.poll() is not None
        ),
        60,
        "the survivor's takeover",
    )


# -- a frozen holder, and --lock-timeout -----------------------------------------------------

SLOW_MODEL = {
    "model/config.json": pattern(2_000, 5),
    "model/weights.bin": pattern(12 * CHUNK, 6),
}


def _stderr_so_far(proc: Proc) -> str:
    return Path(proc._err.name).read_text(encoding="utf-8", errors="replace")


def _waiting(proc: Proc) -> bool:
    return "waiting for" in _stderr_so_far(proc) or proc.popen.poll() is not None


def test_frozen_holder_is_taken_over_and_does_not_commit_after_sigcont(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(SLOW_MODEL)
    expected = digests({k.split("/", 1)[1]: v for k, v in SLOW_MODEL.items()})
    proxy.set_faults(_object_delay(bucket, 0.1))
    dest = tmp / "models"
    argv = entrypoint_argv(f"s3://{bucket}/model", dest)
    more = {"STORAGE_INITIALIZER_STALE_AFTER": "2"}
    first = _start_tagged(argv, s3_server, proxy, tmp, **more)
    poll_until(lambda: (lease_of(dest) or {}).get("pid") == first.pid, 60, "the first lease")
    second = _start_tagged(argv, s3_server, proxy, tmp, **more)
    poll_until(lambda: _waiting(second), 60, "the second process to wait")
    poll_until(
        lambda: bytes_by_app(proxy, bucket).get(f"p{first.pid}", 0) >= 2 * CHUNK,
        60,
        "the holder to fetch two chunks",
    )
    first.popen.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    # What the holder had when it froze (its in-flight request may still be counted).
    fetched_before_freeze = bytes_by_app(proxy, bucket).get(f"p{first.pid}", 0)
    try:
        poll_until(lambda: (lease_of(dest) or {}).get("pid") == second.pid, 60, "the takeover")
        print(f"\nfrozen holder taken over {time.monotonic() - stopped_at:.2f}s after SIGSTOP")
        result = second.wait(timeout=120)
        assert result.returncode == 0, result.describe()
        owner_marker = marker_path(dest).read_text()
        assert json.loads(owner_marker)["downloaded_by"]["pid"] == second.pid
    finally:
        first.popen.send_signal(signal.SIGCONT)
    late = first.wait(timeout=60)
    assert late.returncode == 1, late.describe()
    assert "lost the download lease" in late.last_line, late.last_line
    # The tree and its marker are the new owner's, untouched by the late holder.
    assert marker_path(dest).read_text() == owner_marker
    assert tree_digest(dest) == expected
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()
    # The new owner resumed: it did not fetch again what the frozen holder had journalled.
    per_app = bytes_by_app(proxy, bucket)
    size = sum(len(v) for v in SLOW_MODEL.values())
    assert per_app.get(f"p{second.pid}", 0) <= size - fetched_before_freeze + CHUNK, (
        per_app,
        fetched_before_freeze,
    )


def test_lock_timeout_gives_up_while_a_live_holder_keeps_the_lease(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(SLOW_MODEL)
    proxy.set_faults(_object_delay(bucket, 0.15))
    dest = tmp / "models"
    argv = entrypoint_argv(f"s3://{bucket}/model", dest)
    holder = _start_tagged(argv, s3_server, proxy, tmp)
    poll_until(lambda: (lease_of(dest) or {}).get("pid") == holder.pid, 60, "the lease")
    impatient = _start_tagged(argv, s3_server, proxy, tmp, STORAGE_INITIALIZER_LOCK_TIMEOUT="1")
    gave_up = impatient.wait(timeout=60)
    assert gave_up.returncode == 1, gave_up.describe()
    assert "gave up after 1s waiting for" in gave_up.last_line, gave_up.last_line
    assert f"s3://{bucket}/model" in gave_up.last_line
    assert "--lock-timeout" in gave_up.last_line
    done = holder.wait(timeout=120)
    assert done.returncode == 0, done.describe()
    assert done.outcome() == "downloaded"
    data = lease_of(dest)
    assert data is not None and data["pid"] == holder.pid and data["generation"] == 1
    assert bytes_by_app(proxy, bucket).get(f"p{impatient.pid}", 0) == 0
