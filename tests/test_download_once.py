"""Download once: 8 replicas started at the same moment, one origin download.

nginx's access log is the proof: exactly one HEAD (the listing) and one GET per file (or per
chunk) however many replicas ask. The replicas really overlap, by construction: a gate in a
proxy in front of nginx holds the download's GETs until the seven other replicas have logged
that they are waiting, so the summaries are exactly one ``downloaded`` and seven ``waited``.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    Proc,
    Run,
    clean_env,
    cli,
    cli_argv,
    modes,
    pattern,
    poll_until,
    run,
    sha256,
    start,
    start_all,
    tree_digest,
    wait_all,
)
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault

REPLICAS = 8
SIZE = 420_000


def _env() -> dict[str, str]:
    return clean_env(
        STORAGE_INITIALIZER_LOG_FORMAT="json",
        STORAGE_INITIALIZER_PROGRESS_INTERVAL="0.5",
    )


def _waiting(proc: Proc) -> bool:
    """Whether a running replica has logged that it waits for another one's download."""
    return "waiting for " in Path(proc._err.name).read_text(errors="replace")


def _run_gated(
    nginx: Nginx, folder: str, argvs: Callable[[str], list[list[str]]], workdir: Path
) -> list[Run]:
    """Start the replicas (``argvs(url of the model)``) with the origin's GETs held at a gate;
    open it only once one replica is downloading (its GET reached the gate) and all the others
    have said that they wait."""
    gate = threading.Event()
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        held = Fault(kind="gate", gate=gate, method="GET", path_contains=f"/{folder}/")
        proxy.set_faults(held)
        procs = start_all(argvs(f"{proxy.url}/{folder}/model.bin"), _env(), workdir)
        try:
            # (Well within the client's 60 s read timeout of the held GET.)
            poll_until(
                lambda: held.hits >= 1 and sum(map(_waiting, procs)) >= REPLICAS - 1,
                deadline=40,
                what="one replica downloading and the others waiting",
            )
        except BaseException:
            for proc in procs:
                proc.kill()
            wait_all(procs)  # reap them and close their log files
            raise
        finally:
            gate.set()
        return wait_all(procs)


def _check_outcomes(runs: list[Run]) -> None:
    for result in runs:
        assert result.returncode == 0, result.describe()
    outcomes = collections.Counter(r.outcome() for r in runs)
    # The gate made every other replica wait for the one download.
    assert outcomes == {"downloaded": 1, "waited": REPLICAS - 1}, outcomes
    waiting = [e["message"] for r in runs for e in r.json_events() if "waiting for" in e["message"]]
    assert waiting, "no replica logged whom it waited for"
    downloader = next(r for r in runs if r.outcome() == "downloaded")
    assert downloader.json_events("summary")[-1]["bytes_from_origin"] == SIZE
    for result in runs:
        if result is not downloader:
            assert result.json_events("summary")[-1]["bytes_from_origin"] == 0


@pytest.mark.parametrize("chunk_size", ["32MiB", "128KiB"], ids=["whole-file", "chunked"])
def test_eight_replicas_one_directory_one_download(
    nginx: Nginx, tmp: Path, chunk_size: str
) -> None:
    folder = nginx.new_dir()
    data = pattern(SIZE, 40)
    nginx.put(f"{folder}/model.bin", data)
    dest = tmp / "shared"
    runs = _run_gated(
        nginx,
        folder,
        lambda url: [cli_argv("pull", "--chunk-size", chunk_size, url, dest)] * REPLICAS,
        tmp / "logs",
    )
    _check_outcomes(runs)

    chunks = 1 if chunk_size == "32MiB" else -(-SIZE // (128 * 1024))
    requests = nginx.wait_requests(folder, 1 + chunks)
    methods = collections.Counter(r.method for r in requests)
    assert methods == {"HEAD": 1, "GET": chunks}, requests
    ranges = [r.range for r in requests if r.method == "GET"]
    assert len(set(ranges)) == chunks  # no chunk fetched twice
    assert sum(r.bytes_sent for r in requests) == SIZE

    assert tree_digest(dest) == {"model.bin": sha256(data)}
    assert modes(dest) == {"model.bin": 0o444}
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()


def test_eight_replicas_cache_mode_eight_destinations(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    data = pattern(SIZE, 41)
    nginx.put(f"{folder}/model.bin", data)
    cache = tmp / "cache"
    dests = [tmp / f"pod-{i}" / "models" for i in range(REPLICAS)]
    runs = _run_gated(
        nginx,
        folder,
        lambda url: [cli_argv("pull", "--cache-dir", cache, url, dest) for dest in dests],
        tmp / "logs",
    )
    _check_outcomes(runs)

    requests = nginx.wait_requests(folder, 2)
    assert collections.Counter(r.method for r in requests) == {"HEAD": 1, "GET": 1}, requests
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries
    for dest in dests:
        assert tree_digest(dest) == {"model.bin": sha256(data)}
        assert modes(dest) == {"model.bin": 0o444}
        verify = cli("verify", dest)
        assert verify.returncode == 0, verify.describe()


# -- a holder killed mid-download ----------------------------------------------------------

KILL_SIZE = 384 * 1024
KILL_CHUNK = 128 * 1024


def _kill_holder_mid_download(nginx: Nginx, tmp: Path) -> tuple[str, bytes, Path, Run, int]:
    """Start a throttled chunked download (one chunk at a time), SIGKILL it once `status`
    shows progress, and run a second replica. Returns (folder, data, dest, second run, the
    bytes the dead holder had reported)."""
    folder = nginx.new_dir()
    data = pattern(KILL_SIZE, 42)
    nginx.put(f"{folder}/model.bin", data)
    # nginx lets the first second's worth of bytes through at once, then keeps the rate: at
    # 64 KiB/s each 128 KiB chunk takes one to two seconds.
    url = nginx.url(f"{folder}/model.bin", location=f"rate/{64 * 1024}")
    dest = tmp / "shared"
    # stale-after 120: a takeover within the test's timeout proves that the dead pid was
    # detected, not that the heartbeat aged out. The heartbeat runs every 5 s at that
    # setting, so progress is read from the lease that `status` shows after a chunk.
    argv = cli_argv(
        "pull", "--chunk-size", "128KiB", "--workers", "1", "--stale-after", "120", url, dest
    )
    holder = start(argv, clean_env(), tmp / "logs")
    try:
        info = poll_until(
            lambda: (
                (s := json.loads(cli("status", "--json", dest).stdout)).get("state")
                == "downloading"
                and s["lease"]["phase"] == "transfer"
                and s
            ),
            deadline=20,
            what="the holder to start transferring",
        )
        assert info["lease"]["pid"] == holder.pid
        # One whole chunk on disk before the kill (nginx logs each finished request).
        nginx.wait_requests(folder, 2)
        holder.popen.send_signal(signal.SIGKILL)
    finally:
        killed = holder.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (dest / "model.bin").exists()
    done_before = sum(
        r.bytes_sent for r in nginx.requests(folder) if r.method == "GET" and r.status == 206
    )
    second = run(argv, clean_env(), timeout=60)
    return folder, data, dest, second, done_before


def test_killed_holder_is_taken_over_and_its_chunks_are_not_fetched_again(
    nginx: Nginx, tmp: Path
) -> None:
    """DESIGN §4.3 and §5: a new owner takes over from a SIGKILLed one, adopts its staging and
    continues big files with range requests; the chunks finished before the kill are not
    fetched again. (One kill serves both checks: the scenario is the same.)"""
    folder, data, dest, second, _done = _kill_holder_mid_download(nginx, tmp)
    assert second.returncode == 0, second.describe()
    assert "taking over" in second.stderr or "resuming" in second.stderr, second.stderr
    assert (dest / "model.bin").read_bytes() == data
    assert modes(dest) == {"model.bin": 0o444}
    ranges = [r.range for r in nginx.requests(folder) if r.method == "GET"]
    first_chunk = f"bytes=0-{KILL_CHUNK - 1}"
    assert ranges.count(first_chunk) == 1, (ranges, second.stderr)
    total = sum(r.bytes_sent for r in nginx.requests(folder) if r.method == "GET")
    # At most the chunk in flight at the kill is fetched twice.
    assert total <= KILL_SIZE + KILL_CHUNK, (total, ranges)
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()
    status = json.loads(cli("status", "--json", dest).stdout)
    assert status["state"] == "complete"
    assert status.get("staging_areas", []) == []  # the dead owner's area was adopted
