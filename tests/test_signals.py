"""SIGTERM and SIGINT, the normal way a pod dies: real processes, real signals, a real S3.

A holder that is terminated stops its workers (even one stuck inside a request the proxy
holds), keeps its staging journal, marks its lease released as ``terminated`` and exits 143
with one last line saying how far it got; a waiter takes over at once (``stale_after`` is 600 s
in these tests, so only the release explains a takeover) and fetches only what was missing. A
terminated waiter exits 143 too, and the holder is untouched. The same for the KServe
entrypoint with several pairs, the CLI ``pull`` and ``prefetch``.

Every point in time is reached by watching state: the lease file, a gate in the proxy that
holds a chosen request, a log line.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.concurrency_helpers import (
    bytes_by_app,
    lease_of,
    s3_env,
    staged_chunks,
    verified_paths,
)
from tests.helpers import (
    Proc,
    cli,
    cli_argv,
    digests,
    entrypoint_argv,
    pattern,
    poll_until,
    start,
    tree_digest,
)
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, proxy, s3_server

__all__ = ["proxy", "s3_server"]

CHUNK = 64 * 1024
MODEL = {
    "model/config.json": pattern(3_000, 1),
    "model/weights/a.bin": pattern(4 * CHUNK, 2),
    "model/weights/b.bin": pattern(6 * CHUNK + 77, 3),
}
SIZE = sum(len(v) for v in MODEL.values())
#: Long enough that a holder waiting for the request it is stuck in would never exit in time.
GATE_SECONDS = 900.0
#: Only a released lease lets a waiter take over within a test's deadlines.
NO_STALENESS = "600"


def _gate(bucket: str, key: str, start_byte: int) -> tuple[Fault, threading.Event]:
    """Hold the GET of ``key`` from ``start_byte`` until the event is set."""
    opened = threading.Event()
    wanted = f"bytes={start_byte}-"
    fault = Fault(
        kind="gate",
        gate=opened,
        gate_timeout=GATE_SECONDS,
        method="GET",
        path_contains=f"/{bucket}/{key}",
        predicate=lambda r: (r.range or "").startswith(wanted),
        times=1,
    )
    return fault, opened


def tagged(argv: list[str], s3: S3Server, proxy: CountingProxy, tmp: Path, **more: str) -> Proc:
    """A process whose requests the proxy counts under ``app/p<pid>``."""
    wrapper = (
        "import os, sys, runpy; os.environ['AWS_SDK_UA_APP_ID'] = f'p{os.getpid()}'; "
        "module = sys.argv[1]; sys.argv = sys.argv[1:]; "
        "runpy.run_module(module, run_name='__main__')"
    )
    module = "storage_initializer.entrypoint" if "entrypoint" in argv[2] else "storage_initializer"
    full = [argv[0], "-c", wrapper, module, *argv[3:]]
    env = s3_env(
        s3,
        proxy,
        STORAGE_INITIALIZER_WORKERS="1",
        STORAGE_INITIALIZER_CHUNK_SIZE="64KiB",
        STORAGE_INITIALIZER_STALE_AFTER=NO_STALENESS,
        STORAGE_INITIALIZER_PROGRESS_INTERVAL="0.5",
        **more,
    )
    return start(full, env, tmp / "logs")


def stderr_of(proc: Proc) -> str:
    return Path(proc._err.name).read_text(encoding="utf-8", errors="replace")


def waiting(proc: Proc) -> bool:
    return "waiting for" in stderr_of(proc) or proc.popen.poll() is not None


def last_message(stderr: str) -> str:
    """The message of the last JSON log line."""
    for line in reversed(stderr.splitlines()):
        try:
            return str(json.loads(line)["message"])
        except (ValueError, KeyError, TypeError):
            continue
    return ""


def holder_stuck(dest: Path, holder: Proc, gate: Fault) -> None:
    poll_until(lambda: (lease_of(dest) or {}).get("pid") == holder.pid, 60, "the holder's lease")
    poll_until(lambda: gate.hits >= 1 or holder.popen.poll() is not None, 60, "the gated request")
    assert holder.popen.poll() is None, holder.wait().describe()


@pytest.mark.parametrize(
    ("program", "signum"),
    [("entrypoint", signal.SIGTERM), ("pull", signal.SIGTERM), ("entrypoint", signal.SIGINT)],
    ids=["entrypoint-sigterm", "pull-sigterm", "entrypoint-sigint"],
)
def test_a_terminated_holder_keeps_its_work_and_hands_over_at_once(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path, program: str, signum: int
) -> None:
    bucket = s3_server.new_bucket(MODEL)
    gate, opened = _gate(bucket, "model/weights/b.bin", 2 * CHUNK)
    proxy.set_faults(gate)
    dest = tmp / "models"
    source = f"s3://{bucket}/model"
    argv = (
        entrypoint_argv(source, dest) if program == "entrypoint" else cli_argv("pull", source, dest)
    )
    report = tmp / "termination-log"
    holder = tagged(argv, s3_server, proxy, tmp, STORAGE_INITIALIZER_TERMINATION_LOG=str(report))
    waiter = None
    try:
        holder_stuck(dest, holder, gate)
        waiter = tagged(argv, s3_server, proxy, tmp)
        poll_until(lambda: waiting(waiter), 60, "the second process to wait")
        # Inside b.bin's third chunk, a request that the proxy holds: a.bin and config.json
        # verified, two chunks of b.bin on disk.
        before = bytes_by_app(proxy, bucket).get(f"p{holder.pid}", 0)
        os.kill(holder.pid, signum)
        signalled = time.monotonic()
        dead = holder.wait(timeout=60)
        taken = poll_until(
            lambda: (lease_of(dest) or {}).get("pid") == waiter.pid or waiter.popen.poll(),
            60,
            "the waiter's takeover",
        )
        took = time.monotonic() - signalled
        opened.set()
        done = waiter.wait(timeout=120)
    finally:
        opened.set()
        for proc in (holder, waiter):
            if proc is not None:
                proc.kill()
    name = signal.Signals(signum).name
    assert dead.returncode == 128 + signum, dead.describe()
    last = last_message(dead.stderr)
    assert f"terminated by {name} while downloading {source}" in last, dead.stderr
    assert "phase transfer" in last and "2/3 files" in last, last
    assert "staged files are kept" in last and "lease is released" in last, last
    assert "Traceback" not in dead.stderr, dead.stderr
    # The termination message says it too (one JSON line, what KServe shows).
    message = json.loads(report.read_text())
    assert message["outcome"] == "failed" and f"terminated by {name}" in message["reason"]
    assert taken is True, done.describe()
    print(f"\n{program}: waiter took over {took:.3f}s after {name} (stale-after {NO_STALENESS})")
    assert done.returncode == 0, done.describe()
    assert done.outcome() == "downloaded", done.describe()
    assert f"(pid {holder.pid}) was terminated while downloading" in done.stderr
    assert tree_digest(dest) == digests({k.split("/", 1)[1]: v for k, v in MODEL.items()})
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()
    # The waiter resumed: it fetched what the holder had not (b.bin from its third chunk).
    after = bytes_by_app(proxy, bucket).get(f"p{waiter.pid}", 0)
    assert before == SIZE - len(MODEL["model/weights/b.bin"]) + 2 * CHUNK, before
    assert after == SIZE - before, (before, after)


def test_a_terminated_waiter_exits_at_once_and_leaves_the_holder_alone(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(MODEL)
    gate, opened = _gate(bucket, "model/weights/b.bin", 2 * CHUNK)
    proxy.set_faults(gate)
    dest = tmp / "models"
    source = f"s3://{bucket}/model"
    argv = entrypoint_argv(source, dest)
    holder = tagged(argv, s3_server, proxy, tmp)
    waiter = None
    try:
        holder_stuck(dest, holder, gate)
        waiter = tagged(argv, s3_server, proxy, tmp)
        poll_until(lambda: waiting(waiter), 60, "the second process to wait")
        lease_before = lease_of(dest)
        os.kill(waiter.pid, signal.SIGTERM)
        gone = waiter.wait(timeout=60)
        lease_after = lease_of(dest)
        opened.set()
        done = holder.wait(timeout=120)
    finally:
        opened.set()
        for proc in (holder, waiter):
            if proc is not None:
                proc.kill()
    assert gone.returncode == 143, gone.describe()
    last = last_message(gone.stderr)
    assert last.startswith("terminated by SIGTERM while waiting for "), gone.stderr
    assert f"(pid {holder.pid}) to download {source}" in last, last
    assert "this pod fetched nothing" in last, last
    # The holder's lease was not touched by the waiter leaving.
    assert lease_before and lease_after
    assert lease_after["pid"] == holder.pid and lease_after["generation"] == 1
    assert done.returncode == 0 and done.outcome() == "downloaded", done.describe()
    assert bytes_by_app(proxy, bucket).get(f"p{waiter.pid}", 0) == 0


def test_the_entrypoint_terminated_during_its_second_pair_reports_the_first(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    small = {"one/config.json": pattern(1_000, 7)}
    first = s3_server.new_bucket(small)
    bucket = s3_server.new_bucket(MODEL)
    gate, opened = _gate(bucket, "model/weights/b.bin", 2 * CHUNK)
    proxy.set_faults(gate)
    dest = tmp / "models"
    report = tmp / "termination-log"
    metrics = tmp / "metrics.json"
    argv = entrypoint_argv(f"s3://{first}/one", tmp / "one", f"s3://{bucket}/model", dest)
    holder = tagged(
        argv,
        s3_server,
        proxy,
        tmp,
        STORAGE_INITIALIZER_TERMINATION_LOG=str(report),
        STORAGE_INITIALIZER_METRICS_FILE=str(metrics),
    )
    try:
        holder_stuck(dest, holder, gate)
        os.kill(holder.pid, signal.SIGTERM)
        dead = holder.wait(timeout=60)
    finally:
        opened.set()
        holder.kill()
    assert dead.returncode == 143, dead.describe()
    last = last_message(dead.stderr)
    assert last.startswith("terminated by SIGTERM (model 2 of 2) while downloading"), last
    message = json.loads(report.read_text())
    assert message["outcome"] == "failed" and "terminated by SIGTERM" in message["reason"]
    assert [p["outcome"] for p in message["pulls"]] == ["downloaded"], message
    # The lease is released as terminated; the journal names what a resume keeps.
    lease = lease_of(dest) or {}
    assert lease.get("released") is True and lease.get("outcome") == "terminated", lease
    assert verified_paths(dest) == {"config.json", "weights/a.bin"}
    assert staged_chunks(dest).get("weights/b.bin") == 2
    assert "terminated" in metrics.read_text()


def test_prefetch_terminated_releases_every_lease_it_holds(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    buckets = [s3_server.new_bucket(MODEL) for _ in range(2)]
    gates = [_gate(b, "model/weights/b.bin", 2 * CHUNK) for b in buckets]
    proxy.set_faults(*(fault for fault, _ in gates))
    cache = tmp / "cache"
    models = tmp / "models.yaml"
    models.write_text("parallel: 2\nmodels:\n" + "".join(f"  - s3://{b}/model\n" for b in buckets))
    argv = cli_argv("prefetch", "--from-file", models, "--cache-dir", cache)
    job = tagged(argv, s3_server, proxy, tmp)
    try:
        for fault, _ in gates:
            poll_until(
                lambda f=fault: f.hits >= 1 or job.popen.poll() is not None,
                60,
                "both downloads to reach their gate",
            )
        assert job.popen.poll() is None, job.wait().describe()
        os.kill(job.pid, signal.SIGTERM)
        dead = job.wait(timeout=60)
    finally:
        for _, opened in gates:
            opened.set()
        job.kill()
    assert dead.returncode == 143, dead.describe()
    last = last_message(dead.stderr)
    assert last.startswith("terminated by SIGTERM while prefetching 2 model(s)"), dead.stderr
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2, entries
    for entry in entries:
        lease = lease_of(entry) or {}
        assert lease.get("released") is True and lease.get("outcome") == "terminated", lease
        assert verified_paths(entry) == {"config.json", "weights/a.bin"}


def test_prefetch_watch_stops_the_pull_in_progress_at_once(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """The node preloader (a DaemonSet) is deleted or its node drained mid-pull: the pull stops
    now, not when it would have finished (after the kubelet's SIGKILL), keeping its work."""
    bucket = s3_server.new_bucket(MODEL)
    gate, opened = _gate(bucket, "model/weights/b.bin", 2 * CHUNK)
    proxy.set_faults(gate)
    cache = tmp / "cache"
    models = tmp / "models.yaml"
    models.write_text(f"models:\n  - s3://{bucket}/model\n")
    argv = cli_argv(
        "prefetch", "--from-file", models, "--watch", "--cache-dir", cache, "--poll-interval", "0.1"
    )
    job = tagged(argv, s3_server, proxy, tmp)
    try:
        poll_until(lambda: gate.hits >= 1 or job.popen.poll() is not None, 60, "the gate")
        assert job.popen.poll() is None, job.wait().describe()
        os.kill(job.pid, signal.SIGTERM)
        dead = job.wait(timeout=60)
    finally:
        opened.set()
        job.kill()
    assert dead.returncode == 0, dead.describe()
    assert "stopped: SIGTERM received" in last_message(dead.stderr), dead.stderr
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    lease = lease_of(entry) or {}
    assert lease.get("released") is True and lease.get("outcome") == "terminated", lease
    assert verified_paths(entry) == {"config.json", "weights/a.bin"}
