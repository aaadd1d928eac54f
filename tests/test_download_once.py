"""Download once: 8 replicas started at the same moment, one origin download.

nginx's access log is the proof: exactly one HEAD (the listing) and one GET per file (or per
chunk) however many replicas ask. The download is throttled so that the replicas really overlap,
which the summaries confirm (one ``downloaded``, the others ``waited`` or ``complete``).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tests.helpers import (
    Run,
    clean_env,
    cli,
    cli_argv,
    modes,
    pattern,
    sha256,
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
    waiting = [
        e["message"] for r in runs for e in r.json_events() if "waiting for" in e["message"]
    ]
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
