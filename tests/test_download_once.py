"""Download once: 8 replicas started at the same moment, one origin download.

nginx's access log is the proof: exactly one HEAD (the listing) and one GET per file (or per
chunk) however many replicas ask. The download is throttled so that the replicas really overlap,
which the summaries confirm (one ``downloaded``, the others ``waited`` or ``complete``).
"""

from __future__ import annotations

import collections
import json
import signal
from pathlib import Path

import pytest

from tests.helpers import (
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

REPLICAS = 8
#: Bytes per second per connection: the download lasts about two seconds, much longer than
#: the time it takes to start the eight processes.
RATE = 200_000
SIZE = 420_000


def _env() -> dict[str, str]:
    return clean_env(
        STORAGE_INITIALIZER_LOG_FORMAT="json",
        STORAGE_INITIALIZER_PROGRESS_INTERVAL="0.5",
    )


def _check_outcomes(runs: list[Run]) -> None:
    for result in runs:
        assert result.returncode == 0, result.describe()
    outcomes = collections.Counter(r.outcome() for r in runs)
    assert outcomes["downloaded"] == 1, outcomes
    assert outcomes["waited"] + outcomes["complete"] == REPLICAS - 1, outcomes
    # The replicas overlapped: at least one waited for the download (rather than starting
    # after it had finished), and it said whom it was waiting for.
    assert outcomes["waited"] >= 1, outcomes
    waiting = [e["message"] for r in runs for e in r.json_events() if "waiting for" in e["message"]]
    assert waiting, "no replica logged whom it waited for"
    downloader = next(r for r in runs if r.outcome() == "downloaded")
    assert downloader.json_events("summary")[-1]["bytes_from_origin"] == SIZE


@pytest.mark.parametrize(
    ("chunk_size", "rate"),
    [("32MiB", RATE), ("128KiB", RATE // 4)],  # four chunks in parallel: a quarter each
    ids=["whole-file", "chunked"],
)
def test_eight_replicas_one_directory_one_download(
    nginx: Nginx, tmp: Path, chunk_size: str, rate: int
) -> None:
    folder = nginx.new_dir()
    data = pattern(SIZE, 40)
    nginx.put(f"{folder}/model.bin", data)
    url = nginx.url(f"{folder}/model.bin", location=f"rate/{rate}")
    dest = tmp / "shared"
    argv = cli_argv("pull", "--chunk-size", chunk_size, url, dest)
    procs = start_all([argv] * REPLICAS, _env(), tmp / "logs")
    runs = wait_all(procs)
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
    url = nginx.url(f"{folder}/model.bin", location=f"rate/{RATE}")
    cache = tmp / "cache"
    dests = [tmp / f"pod-{i}" / "models" for i in range(REPLICAS)]
    argvs = [cli_argv("pull", "--cache-dir", cache, url, dest) for dest in dests]
    runs = wait_all(start_all(argvs, _env(), tmp / "logs"))
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


def test_killed_holder_is_taken_over(nginx: Nginx, tmp: Path) -> None:
    _folder, data, dest, second, _done = _kill_holder_mid_download(nginx, tmp)
    assert second.returncode == 0, second.describe()
    assert "taking over" in second.stderr or "resuming" in second.stderr, second.stderr
    assert (dest / "model.bin").read_bytes() == data
    assert modes(dest) == {"model.bin": 0o444}
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()
    status = json.loads(cli("status", "--json", dest).stdout)
    assert status["state"] == "complete"
    assert status.get("staging_areas", []) == []  # the dead owner's area was adopted


def test_takeover_resumes_the_chunks_already_fetched(nginx: Nginx, tmp: Path) -> None:
    """DESIGN §4.3 and §5: a new owner adopts the dead owner's staging and continues big files
    with range requests; the chunks finished before the kill are not fetched again."""
    folder, data, dest, second, _done = _kill_holder_mid_download(nginx, tmp)
    assert second.returncode == 0, second.describe()
    assert (dest / "model.bin").read_bytes() == data
    ranges = [r.range for r in nginx.requests(folder) if r.method == "GET"]
    first_chunk = f"bytes=0-{KILL_CHUNK - 1}"
    assert ranges.count(first_chunk) == 1, (ranges, second.stderr)
    total = sum(r.bytes_sent for r in nginx.requests(folder) if r.method == "GET")
    # At most the chunk in flight at the kill is fetched twice.
    assert total <= KILL_SIZE + KILL_CHUNK, (total, ranges)
