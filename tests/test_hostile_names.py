"""Hostile names from a Hub listing and from an S3 bucket, end to end: refused with a clear
error, nothing written outside (or inside) the destination. (GCS and Azure have the same tests
in their modules.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import clean_env, entrypoint, model_files
from tests.servers.hub import HubServer, start_hub
from tests.servers.s3 import SECRET_KEY, S3Server, s3_server

__all__ = ["s3_server"]  # the session fixture, imported so that pytest finds it


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


#: Key below the model prefix → words the last line must hold (what is wrong with it).
S3_KEYS = {
    "../../etc/x": "leaves the model directory",
    "/abs": "absolute",
    "a/../../b": "leaves the model directory",
    "a\\b": "backslash",
    "a\x00b": "NUL",
}


@pytest.mark.parametrize(
    "name", list(S3_KEYS), ids=["climb", "absolute", "inner-climb", "bs", "nul"]
)
def test_s3_keys_that_escape_are_refused(s3_server: S3Server, tmp_path: Path, name: str) -> None:
    # moto stores and lists such keys verbatim, as real S3 does.
    bucket = s3_server.new_bucket({"model/config.json": b"{}", f"model/{name}": b"pwned"})
    listed = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"model/{name}" in listed
    dest = tmp_path / "deep" / "er" / "dest"
    env = clean_env(
        s3_server.env(),
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        STORAGE_INITIALIZER_RETRIES="0",
    )
    uri = f"s3://{bucket}/model"
    result = entrypoint(uri, dest, env=env)

    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert "ERROR" in last and uri in last, result.describe()
    assert repr(name) in last, result.describe()  # the bad key, as the listing gave it
    assert S3_KEYS[name] in last, result.describe()
    assert SECRET_KEY not in result.output
    # Nothing anywhere below the test's directory (DEST, its state dir, its parents) holds the
    # hostile object, and none of the places it would have landed exists.
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"pwned"]
    assert written == []
    if "\0" not in name:  # (a path with NUL cannot exist)
        staging = dest / ".storage-initializer" / "staging" / "owner"
        would_be = [os.path.normpath(f"{base}/{name}") for base in (dest, staging, "/")]
        assert [t for t in would_be if os.path.lexists(t)] == [], would_be
    if dest.exists():
        assert model_files(dest) == {}
