"""``verify --repair`` fetches only the bad files again, under the lock, against a real S3 server
with origin requests counted at a proxy — in direct mode and in cache mode."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.proxy import CountingProxy
from tests.servers.s3 import S3Server, s3_server  # noqa: F401 - session fixture

FILES = {
    "r/config.json": b'{"repair": true}',
    "r/a.bin": os.urandom(200_000),
    "r/b.bin": os.urandom(150_000),
}


@pytest.fixture
def origin(s3_server: S3Server) -> Iterator[tuple[CountingProxy, str, dict[str, str]]]:  # noqa: F811
    bucket = s3_server.new_bucket(FILES)
    with CountingProxy(s3_server.endpoint) as proxy:
        yield proxy, f"s3://{bucket}/r", {**os.environ, **s3_server.env(endpoint=proxy.url)}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storage_initializer", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def corrupt(path: Path) -> None:
    """Same size, other bytes: only a re-hash can tell."""
    os.chmod(path, 0o644)
    path.write_bytes(b"\0" * path.stat().st_size)


@pytest.mark.parametrize("mode", ["direct", "cache"])
def test_repair_fetches_only_the_bad_file(
    tmp_path: Path, origin: tuple[CountingProxy, str, dict[str, str]], mode: str
) -> None:
    proxy, uri, env = origin
    dest = tmp_path / "dest"
    extra = ["--cache-dir", str(tmp_path / "cache")] if mode == "cache" else []
    assert cli(env, "pull", uri, str(dest), *extra).returncode == 0
    corrupt((dest / "a.bin").resolve())
    before = cli(env, "verify", str(dest))
    assert before.returncode == 1 and "a.bin" in before.stdout
    proxy.reset()
    fixed = cli(env, "verify", str(dest), "--repair")
    assert fixed.returncode == 0, fixed.stderr
    assert "REPAIRED 1 file(s): a.bin" in fixed.stdout
    fetched = [r.path for r in proxy.select(method="GET") if "/r/" in r.path]
    assert fetched and all(path.endswith("/r/a.bin") for path in fetched), fetched
    if mode == "cache":  # the damaged version stays for its readers; new pulls get the repair
        again = tmp_path / "dest2"
        assert cli(env, "pull", uri, str(again), *extra).returncode == 0
        assert (again / "a.bin").read_bytes() == FILES["r/a.bin"]
    else:
        assert (dest / "a.bin").read_bytes() == FILES["r/a.bin"]
    assert cli(env, "verify", str(dest if mode == "direct" else tmp_path / "dest2")).returncode == 0


def test_repair_refuses_another_source(
    tmp_path: Path, origin: tuple[CountingProxy, str, dict[str, str]]
) -> None:
    _proxy, uri, env = origin
    dest = tmp_path / "dest"
    assert cli(env, "pull", uri, str(dest)).returncode == 0
    corrupt(dest / "b.bin")
    run = cli(env, "verify", str(dest), "--repair", "--source", uri + "-other")
    assert run.returncode == 1 and "is not the source of" in run.stderr
