"""Nothing hangs on the network path: a server that trickles one byte at a time is cut by the
stall guard and the chunk resumed from its last byte; one that never recovers fails with a
clear last line; ``--timeout`` ends a pull that cannot finish, naming the URI and the deadline.
Real servers (nginx, moto, fake-gcs-server, Azurite, the Hub) behind the trickling proxy, the
entrypoint and the CLI as processes, short settings.
Without the guard, each of these runs for hours."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    clean_env,
    cli,
    entrypoint,
    entrypoint_argv,
    model_files,
    pattern,
    poll_until,
    sha256,
    start,
)
from tests.servers.azurite import Azurite, azurite
from tests.servers.gcs import GcsServer, gcs_server
from tests.servers.hub import start_hub
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, s3_server

__all__ = ["azurite", "gcs_server", "s3_server"]

SIZE = 200_000
#: Bytes sent at full speed before a trickle starts.
HEAD = 50_000


@pytest.fixture
def server(nginx: Nginx) -> Iterator[CountingProxy]:
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        yield proxy


def _serve(nginx: Nginx, proxy: CountingProxy, data: bytes) -> str:
    """``data`` as this test's own file on nginx; its URL through ``proxy``."""
    return f"{proxy.url}/{nginx.put(f'{nginx.new_dir()}/m/model.bin', data)}"


def _trickle(
    proxy: CountingProxy, after: int, interval: float = 1.0, times: int = 1, step: int = 1
) -> Fault:
    """The first ``times`` GETs of the model: ``after`` bytes at once (of the SIZE-byte file),
    then ``step`` bytes every ``interval`` seconds."""
    fault = Fault(
        kind="trickle",
        method="GET",
        path_contains="/m/model.bin",
        truncate_fraction=after / SIZE,
        delay=interval,
        step=step,
        times=times,
    )
    proxy.set_faults(fault)
    return fault


def test_a_trickling_server_is_cut_and_resumed_from_the_last_byte(
    nginx: Nginx, server: CountingProxy, tmp_path: Path
) -> None:
    data = pattern(SIZE, 1)
    url = _serve(nginx, server, data)
    _trickle(server, after=HEAD, interval=1.0, times=1)
    dest = tmp_path / "dest"
    result = entrypoint(url, dest, env=clean_env(STORAGE_INITIALIZER_STALL_TIMEOUT="3"))
    assert result.returncode == 0, result.describe()
    assert sha256((dest / "model.bin").read_bytes()) == sha256(data)
    gets = server.select(method="GET")
    assert len(gets) == 2, gets
    # The second request starts where the trickle left the file, not at byte 0.
    assert gets[0].range is None
    assert gets[1].range is not None
    resumed_at = int(gets[1].range.removeprefix("bytes=").split("-")[0])
    assert HEAD <= resumed_at < SIZE, gets[1].range
    assert "stalled" in result.stderr and f"at byte {resumed_at}" in result.stderr


def test_a_slow_transfer_above_the_minimum_rate_is_not_cut(
    nginx: Nginx, server: CountingProxy, tmp_path: Path
) -> None:
    data = pattern(40_000, 6)
    url = _serve(nginx, server, data)
    # 4000 bytes every 0.25 s (about 16 KB/s) for 2.5 s: slow, above 4 KiB/s over each second.
    _trickle(server, after=0, interval=0.25, times=1, step=4000)
    dest = tmp_path / "dest"
    env = clean_env(STORAGE_INITIALIZER_STALL_TIMEOUT="1", STORAGE_INITIALIZER_MIN_RATE="4KiB")
    result = entrypoint(url, dest, env=env)
    assert result.returncode == 0, result.describe()
    assert (dest / "model.bin").read_bytes() == data
    assert len(server.select(method="GET")) == 1 and "stalled" not in result.stderr, result.stderr


def test_a_server_that_never_recovers_fails_with_a_clear_last_line(
    nginx: Nginx, server: CountingProxy, tmp_path: Path
) -> None:
    url = _serve(nginx, server, pattern(SIZE, 2))
    _trickle(server, after=HEAD, interval=1.0, times=100)
    dest = tmp_path / "dest"
    result = entrypoint(
        url,
        dest,
        env=clean_env(STORAGE_INITIALIZER_STALL_TIMEOUT="2", STORAGE_INITIALIZER_RETRIES="1"),
    )
    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert f"failed to download {url}" in last and "stalled" in last, last
    assert "gave up after 2 attempts" in last, last
    assert model_files(dest) == {}


@pytest.mark.parametrize("how", ["env", "flag", "config"])
def test_timeout_ends_a_pull_that_cannot_finish(
    how: str, nginx: Nginx, server: CountingProxy, tmp_path: Path
) -> None:
    url = _serve(nginx, server, pattern(SIZE, 3))
    _trickle(server, after=HEAD, interval=1.0, times=100)
    dest = tmp_path / "dest"
    log = tmp_path / "termination-log"
    # The stall guard is off: only the deadline can end this pull.
    env = clean_env(
        STORAGE_INITIALIZER_STALL_TIMEOUT="0", STORAGE_INITIALIZER_TERMINATION_LOG=str(log)
    )
    if how == "env":
        result = entrypoint(url, dest, env={**env, "STORAGE_INITIALIZER_TIMEOUT": "3"})
    elif how == "flag":
        result = cli("pull", "--timeout", "3", url, dest, env=env)
    else:
        config = tmp_path / "config.yaml"
        config.write_text("timeout: 3\n")
        result = entrypoint(url, dest, env={**env, "STORAGE_INITIALIZER_CONFIG": str(config)})
    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert f"failed to download {url}: the --timeout deadline of 3s passed" in last, last
    assert json.loads(log.read_text())["reason"].startswith(f"failed to download {url}")
    assert model_files(dest) == {}


@pytest.mark.parametrize("backend", ["s3", "gcs", "azure", "hf"])
def test_every_backend_through_a_trickling_proxy_resumes_after_the_last_block(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Providers hand the engine blocks of up to 1 MiB: the trickle starts inside the second
    # one, so the first block is the last byte received and the retry asks from there.
    size, head = 3 << 20, (3 << 20) // 2
    data = pattern(size, 4)
    files = {"model/weights.bin": data, "model/config.json": b"{}"}
    hub = None
    # Only the backend under test is started (session fixtures, shared with other modules).
    s3: S3Server | None = request.getfixturevalue("s3_server") if backend == "s3" else None
    gcs: GcsServer | None = request.getfixturevalue("gcs_server") if backend == "gcs" else None
    blob: Azurite | None = request.getfixturevalue("azurite") if backend == "azure" else None
    if s3 is not None:
        upstream, uri = s3.endpoint, f"s3://{s3.new_bucket(files)}/model"
    elif gcs is not None:
        upstream, uri = gcs.endpoint, f"gs://{gcs.new_bucket(files)}/model"
    elif blob is not None:
        container = blob.new_container_name("stall")
        blob.upload(container, files)
        upstream, uri = f"http://127.0.0.1:{blob.port}", blob.uri(container, "model")
    else:
        hub = start_hub()
        hub.add_repo("org/stall").add_commit(
            {k.removeprefix("model/"): v for k, v in files.items()}
        )
        upstream, uri = hub.url, "hf://org/stall"
    try:
        with CountingProxy(upstream) as proxy:
            proxy.set_faults(
                Fault(
                    kind="trickle",
                    method="GET",
                    path_contains="weights.bin",
                    truncate_fraction=head / size,
                    delay=1.0,
                    times=1,
                )
            )
            if s3 is not None:
                env = {**s3.env(proxy.url), "AWS_EC2_METADATA_DISABLED": "true"}
            elif gcs is not None:
                env = gcs.env(proxy.url)
            elif blob is not None:
                env = blob.env(endpoint=f"{proxy.url}/{blob.account}")
            else:
                assert hub is not None
                env = {**hub.env(home=str(tmp_path / "hf")), "HF_ENDPOINT": proxy.url}
            dest = tmp_path / "dest"
            result = entrypoint(
                uri, dest, env=clean_env(env, STORAGE_INITIALIZER_STALL_TIMEOUT="3")
            )
            assert result.returncode == 0, result.describe()
            gets = proxy.select(method="GET", path_contains="weights.bin")
    finally:
        if hub is not None:
            hub.stop()
    assert sha256((dest / "weights.bin").read_bytes()) == sha256(data)
    assert "stalled" in result.stderr, result.stderr
    assert len(gets) == 2, gets
    ranges = [v for k, v in gets[1].headers.items() if k.lower() in ("range", "x-ms-range")]
    # Resumed after the last whole block the provider handed over (1 MiB for the SDK paths,
    # the write size for the lean S3, GCS and Azure GETs, what had arrived for the lean HTTP
    # and Hub reads), never from the start, never past what the proxy sent.
    assert len(ranges) == 1 and ranges[0].endswith(f"-{size - 1}"), gets[1].headers
    resumed_at = int(ranges[0].removeprefix("bytes=").split("-")[0])
    assert 1 << 20 <= resumed_at <= gets[0].bytes, (ranges, gets[0].bytes)


def test_timeout_also_ends_waiting_for_a_stuck_replica(
    nginx: Nginx, server: CountingProxy, tmp_path: Path
) -> None:
    url = _serve(nginx, server, pattern(SIZE, 5))
    trickle = _trickle(server, after=HEAD, interval=1.0, times=100)
    dest = tmp_path / "shared"
    quiet = clean_env(STORAGE_INITIALIZER_STALL_TIMEOUT="0")
    holder = start(entrypoint_argv(url, dest), quiet, tmp_path / "logs")
    try:
        poll_until(lambda: trickle.hits, what="the holder's download")
        waiter = entrypoint(url, dest, env={**quiet, "STORAGE_INITIALIZER_TIMEOUT": "3"})
    finally:
        holder.kill()
    assert waiter.returncode == 1, waiter.describe()
    assert "waiting for" in waiter.stderr, waiter.stderr
    assert "the --timeout deadline of 3s passed" in waiter.last_line, waiter.last_line
    assert model_files(dest) == {}
