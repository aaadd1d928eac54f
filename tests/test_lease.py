"""The lease protocol with real processes: exactly one winner, lost leases noticed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from storage_initializer.errors import LeaseLostError
from storage_initializer.store import layout
from storage_initializer.store.lease import (
    Observer,
    Owner,
    current,
    generations,
    lease_path,
    try_claim,
)

CONTENDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from storage_initializer.store import layout
    from storage_initializer.store.lease import Observer, Owner, current, try_claim
    entry = layout.Entry(Path(sys.argv[1]), "k", "direct")
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    generation, data = current(entry)
    state = Observer(30).classify(generation, data)
    # Second barrier: every contender has judged the lease before anyone claims it.
    Path(sys.argv[3]).touch()
    claim = Path(sys.argv[4])
    while not claim.exists():
        time.sleep(0.001)
    won = state != "held" and try_claim(entry, Owner.this_process(), generation, {}) is not None
    print("won" if won else "lost", state)
    """
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_dead_lease(entry: layout.Entry, generation: int) -> None:
    owner = Owner.this_process()
    data = {
        "owner": "dead-owner",
        "host_id": owner.host_id,
        "pid": dead_pid(),
        "pid_start": "1",
        "heartbeat": time.time(),
        "seq": 3,
        "released": False,
    }
    layout.ensure_state_dir(entry)
    lease_path(entry, generation).write_text(json.dumps(data))


@pytest.mark.parametrize("round_number", range(10))
def test_exactly_one_of_eight_takes_over_a_dead_holders_lease(
    tmp_path: Path, round_number: int
) -> None:
    entry = layout.Entry(tmp_path / "entry", "k", "direct")
    plant_dead_lease(entry, 4)
    go, claim = tmp_path / "go", tmp_path / "claim"
    ready = [tmp_path / f"ready-{i}" for i in range(8)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(entry.root), str(go), str(mark), str(claim)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for mark in ready
    ]
    go.touch()
    deadline = time.monotonic() + 60
    while not all(mark.exists() for mark in ready):
        assert time.monotonic() < deadline, "contenders did not start"
        time.sleep(0.005)
    claim.touch()
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(out[1] == "stale" for out in outputs), outputs
    assert sum(out[0] == "won" for out in outputs) == 1, outputs
    assert generations(entry) == [5]


def test_fresh_lease_is_not_taken(tmp_path: Path) -> None:
    entry = layout.Entry(tmp_path / "entry", "k", "direct")
    layout.ensure_state_dir(entry)
    holder = try_claim(entry, Owner.this_process(), 0, {})
    assert holder is not None
    generation, data = current(entry)
    assert Observer(30).classify(generation, data) == "held"


def test_silent_lease_becomes_stale_by_the_observers_clock(tmp_path: Path) -> None:
    entry = layout.Entry(tmp_path / "entry", "k", "direct")
    layout.ensure_state_dir(entry)
    lease_path(entry, 1).write_text(
        json.dumps(
            {"owner": "x", "host_id": "elsewhere", "pid": 1, "heartbeat": time.time(), "seq": 1}
        )
    )
    observer = Observer(stale_after=0.3)
    assert observer.classify(*current(entry)) == "held"
    deadline = time.monotonic() + 10
    while observer.classify(*current(entry)) == "held":
        assert time.monotonic() < deadline, "never became stale"
    assert observer.classify(*current(entry)) == "stale"


def test_holder_notices_a_takeover_and_refuses_to_commit(tmp_path: Path) -> None:
    entry = layout.Entry(tmp_path / "entry", "k", "direct")
    layout.ensure_state_dir(entry)
    holder = try_claim(entry, Owner.this_process(), 0, {})
    assert holder is not None
    holder.start_heartbeat(0.05, dict)
    usurper = try_claim(entry, Owner.this_process(), 1, {})
    assert usurper is not None
    assert holder.lost.wait(timeout=10)
    with pytest.raises(LeaseLostError):
        holder.ensure_held()
    holder.release("failed")
    # The loser must not have overwritten the winner's lease.
    generation, data = current(entry)
    assert generation == 2 and data is not None and data["owner"] == usurper.owner.id


def test_a_lost_lease_calls_its_on_lost_callbacks(tmp_path: Path) -> None:
    """How a holder's engine is cancelled by a takeover (pulling.pipeline.cancel_on_loss):
    a callback registered before the loss runs when the heartbeat notices it, and one
    registered after it runs at once."""
    entry = layout.Entry(tmp_path / "entry", "k", "direct")
    layout.ensure_state_dir(entry)
    holder = try_claim(entry, Owner.this_process(), 0, {})
    assert holder is not None
    before, after = threading.Event(), threading.Event()
    holder.on_lost(before.set)
    assert not before.is_set()
    holder.start_heartbeat(0.05, dict)
    assert try_claim(entry, Owner.this_process(), 1, {}) is not None
    assert before.wait(timeout=10)
    holder.on_lost(after.set)
    assert after.is_set()
    holder.release("failed")


def test_released_lease_is_free(tmp_path: Path) -> None:
    entry = layout.Entry(tmp_path / "entry", "k", "direct")
    layout.ensure_state_dir(entry)
    holder = try_claim(entry, Owner.this_process(), 0, {})
    assert holder is not None
    holder.start_heartbeat(0.05, dict)
    holder.release("downloaded")
    assert Observer(30).classify(*current(entry)) == "free"
