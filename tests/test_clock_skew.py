"""Takeover decisions do not depend on agreeing clocks: real processes, one with a clock an hour
off (its ``time.time`` shifted by a wrapper, as a node with a wrong clock would be).

A live holder is never taken over, whichever side's clock is off and in which direction; once
it is frozen (SIGSTOP) or dead (SIGKILL) it is taken over after ``stale_after`` of the waiter's
own observation. The two processes have different node ids, so a dead pid proves nothing and
only the lease's heartbeat counts, as between two nodes. ``status`` (one look, no observation)
shows the holder as downloading with a heartbeat a moment old, not an hour.

"The waiter did not take over" is observed, not waited for: the holder's heartbeat sequence is
watched until it has advanced through several ``stale_after`` periods while the waiter waits.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.concurrency_helpers import bytes_by_app, lease_of, process_state, s3_env
from tests.helpers import (
    Proc,
    cli,
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
    "model/config.json": pattern(3_000, 11),
    "model/weights.bin": pattern(6 * CHUNK + 5, 12),
}
STALE_AFTER = 2.0
#: Heartbeats (every STALE_AFTER / 4) the waiter must see go by without taking over: more than
#: three stale_after periods of a holder that is alive.
LIVE_BEATS = 14
HOUR = 3600.0

#: Run first in a child: shift ``time.time`` (and ``time_ns``) by SI_TEST_CLOCK_OFFSET seconds,
#: tag its requests for the proxy, then run the entrypoint. Monotonic clocks are untouched, as
#: on a real node whose wall clock is wrong.
SKEWED = r"""
import os, sys, time, runpy
offset = float(os.environ.pop("SI_TEST_CLOCK_OFFSET", "0") or 0)
if offset:
    real, real_ns = time.time, time.time_ns
    time.time = lambda: real() + offset
    time.time_ns = lambda: real_ns() + int(offset * 1e9)
os.environ["AWS_SDK_UA_APP_ID"] = f"p{os.getpid()}"
sys.argv = sys.argv[1:]
runpy.run_module("storage_initializer.entrypoint", run_name="__main__")
"""


def _start(
    argv: list[str], s3: S3Server, proxy: CountingProxy, tmp: Path, node: str, offset: float
) -> Proc:
    full = [argv[0], "-c", SKEWED, "entrypoint", *argv[3:]]
    env = s3_env(
        s3,
        proxy,
        SI_TEST_CLOCK_OFFSET=str(offset),
        STORAGE_INITIALIZER_NODE_ID=node,
        STORAGE_INITIALIZER_WORKERS="1",
        STORAGE_INITIALIZER_CHUNK_SIZE="64KiB",
        STORAGE_INITIALIZER_STALE_AFTER=str(STALE_AFTER),
        STORAGE_INITIALIZER_PROGRESS_INTERVAL="0.5",
    )
    return start(full, env, tmp / "logs")


def _stderr(proc: Proc) -> str:
    return Path(proc._err.name).read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize(
    ("skewed", "offset", "end"),
    [
        ("holder", -HOUR, signal.SIGSTOP),
        ("holder", -HOUR, signal.SIGKILL),
        ("holder", HOUR, signal.SIGKILL),
        ("waiter", HOUR, signal.SIGSTOP),
    ],
    # A waiter behind is a holder ahead, seen from the other side.
    ids=[
        "holder-behind-frozen",
        "holder-behind-killed",
        "holder-ahead-killed",
        "waiter-ahead-frozen",
    ],
)
def test_a_live_holder_is_never_taken_over_whatever_the_clocks_say(
    s3_server: S3Server,
    proxy: CountingProxy,
    tmp: Path,
    skewed: str,
    offset: float,
    end: signal.Signals,
) -> None:
    bucket = s3_server.new_bucket(MODEL)
    # Hold the holder inside its download (alive, heartbeating) for as long as the test wants.
    held = Fault(
        kind="gate",
        gate=threading.Event(),
        gate_timeout=900.0,
        method="GET",
        path_contains=f"/{bucket}/model/weights.bin",
        predicate=lambda r: (r.range or "").startswith(f"bytes={2 * CHUNK}-"),
        times=1,
    )
    proxy.set_faults(held)
    dest = tmp / "models"
    argv = entrypoint_argv(f"s3://{bucket}/model", dest)
    holder = _start(argv, s3_server, proxy, tmp, "node-a", offset if skewed == "holder" else 0)
    waiter: Proc | None = None
    try:
        poll_until(lambda: (lease_of(dest) or {}).get("pid") == holder.pid, 60, "the lease")
        poll_until(lambda: held.hits >= 1, 60, "the holder inside its download")
        waiter = _start(argv, s3_server, proxy, tmp, "node-b", offset if skewed == "waiter" else 0)
        poll_until(lambda: "waiting for" in _stderr(waiter), 60, "the waiter to wait")
        first = lease_of(dest) or {}
        # The holder lives on through several stale_after periods while the waiter watches.
        poll_until(
            lambda: (
                int((lease_of(dest) or {}).get("seq", 0)) >= int(first["seq"]) + LIVE_BEATS
                or (lease_of(dest) or {}).get("pid") != holder.pid
            ),
            60,
            f"{LIVE_BEATS} heartbeats of the live holder",
        )
        live = lease_of(dest) or {}
        assert live.get("pid") == holder.pid and live.get("generation") == 1, (
            f"a live holder with a clock {offset:+.0f}s off ({skewed}) was taken over: {live}\n"
            + _stderr(waiter)
        )
        assert waiter.popen.poll() is None and "taking over" not in _stderr(waiter)
        # One look (status) judges the lease file's age by the filesystem's clock.
        info = json.loads(cli("status", "--json", "--stale-after", "2", dest).stdout)
        assert info["state"] == "downloading", info
        assert info["lease"]["stale"] is False, info
        assert abs(info["lease"]["heartbeat_age"]) < 600, info
        heartbeat_skew = float(live["heartbeat"]) - time.time()
        # Now the holder stops beating: frozen or dead, it is taken over after stale_after.
        os.kill(holder.pid, end)
        ended = time.monotonic()
        if end == signal.SIGSTOP:
            poll_until(lambda: process_state(holder.pid) == "T", 30, "the holder to freeze")
        taken = poll_until(
            lambda: (lease_of(dest) or {}).get("pid") == waiter.pid or waiter.popen.poll(),
            60,
            "the takeover of the silent holder",
        )
        took = time.monotonic() - ended
        assert taken is True, waiter.wait().describe()
        done = waiter.wait(timeout=120)
    except BaseException:
        for proc in (holder, waiter):
            if proc is not None:
                proc.kill()
        raise
    finally:
        if end == signal.SIGSTOP and holder.popen.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
        assert held.gate is not None
        held.gate.set()
    print(
        f"\n{skewed} clock {offset:+.0f}s (holder heartbeat {heartbeat_skew:+.0f}s off ours):"
        f" live holder kept through {LIVE_BEATS} heartbeats; {end.name}: taken over"
        f" {took:.2f}s later (stale-after {STALE_AFTER:g}s)"
    )
    assert done.returncode == 0, done.describe()
    assert done.outcome() == "downloaded", done.describe()
    assert f"(pid {holder.pid}) is stale; taking over" in done.stderr, done.stderr
    assert tree_digest(dest) == digests({k.split("/", 1)[1]: v for k, v in MODEL.items()})
    late = holder.wait(timeout=60)
    if end == signal.SIGSTOP:
        assert late.returncode == 1 and "lost the download lease" in late.last_line, late.describe()
    else:
        assert late.returncode == -signal.SIGKILL, late.describe()
    # The new owner resumed the two chunks the holder had journalled.
    fetched = bytes_by_app(proxy, bucket).get(f"p{waiter.pid}", 0)
    assert fetched <= len(MODEL["model/weights.bin"]) - 2 * CHUNK + CHUNK, fetched
