"""Hostile names from a Hub listing, end to end: refused with a clear error, nothing written
outside (or inside) the destination. (S3, GCS and Azure have the same tests in their modules.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.hub import HubServer, start_hub


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    server = start_hub()
    yield server
    server.stop()


@pytest.mark.parametrize("name", ["../../etc/x", "/abs", "a/../../b"])
def test_hub_paths_that_escape_are_refused(hub: HubServer, tmp_path: Path, name: str) -> None:
    repo_id = f"evil/repo-{abs(hash(name)) % 10**8}"
    hub.add_repo(repo_id).add_commit({"config.json": b"{}", name: b"pwned"})
    dest = tmp_path / "deep" / "dest"
    run = subprocess.run(
        [sys.executable, "-m", "storage_initializer.entrypoint", f"hf://{repo_id}", str(dest)],
        capture_output=True,
        text=True,
        env={**os.environ, **hub.env(home=str(tmp_path / "hf"))},
        timeout=60,
    )
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert f"hf://{repo_id}" in last and (
        "leaves the model directory" in last or "absolute" in last
    )
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"pwned"]
    assert written == []
    assert not Path("/etc/x").exists() and not Path("/abs").exists()
