"""Tiered caches against a real S3 server, origin bytes counted at a proxy: a slow-tier hit
costs the origin nothing, a miss is downloaded once into the shared tier, a damaged fast-tier
copy is detected and replaced from the slower tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.proxy import CountingProxy
from tests.servers.s3 import S3Server, s3_server  # noqa: F401 - session fixture

MODEL = {"m/config.json": b'{"tiers": 2}', "m/weights.bin": os.urandom(300_000)}
MODEL_SIZE = sum(len(v) for v in MODEL.values())


@pytest.fixture
def origin(s3_server: S3Server) -> Iterator[tuple[CountingProxy, str, dict[str, str]]]:  # noqa: F811
    bucket = s3_server.new_bucket(MODEL)
    with CountingProxy(s3_server.endpoint) as proxy:
        yield proxy, f"s3://{bucket}/m", s3_server.env(endpoint=proxy.url)


def pull(uri: str, dest: Path, tiers: list[Path], env: dict[str, str]) -> dict[str, object]:
    args = [sys.executable, "-m", "storage_initializer", "pull", uri, str(dest)]
    for tier in tiers:
        args += ["--cache-dir", str(tier)]
    run = subprocess.run(
        [*args, "--log-format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    return next(line for line in lines if line.get("event") == "summary")


def origin_bytes(proxy: CountingProxy) -> int:
    """Bytes of model objects served (listings are GETs too, of XML)."""
    return proxy.bytes_served(method="GET", path_contains="/m/")


def test_miss_everywhere_downloads_once_into_the_shared_tier(
    tmp_path: Path, origin: tuple[CountingProxy, str, dict[str, str]]
) -> None:
    proxy, uri, env = origin
    fast_a, fast_b, shared = tmp_path / "node-a", tmp_path / "node-b", tmp_path / "shared"
    first = pull(uri, tmp_path / "pod-a", [fast_a, shared], env)
    second = pull(uri, tmp_path / "pod-b", [fast_b, shared], env)  # another node, same PVC
    assert first["outcome"] == "downloaded" and first["bytes_from_origin"] == MODEL_SIZE
    assert second["outcome"] == "copied-up" and second["bytes_from_origin"] == 0
    assert origin_bytes(proxy) == MODEL_SIZE
    for pod in ("pod-a", "pod-b"):
        assert (tmp_path / pod / "weights.bin").read_bytes() == MODEL["m/weights.bin"]
    # Each tier holds a complete, verifiable entry of its own.
    for tier in (fast_a, fast_b, shared):
        check = subprocess.run(
            [sys.executable, "-m", "storage_initializer", "verify", "--cache-dir", str(tier)],
            capture_output=True,
        )
        assert check.returncode == 0


def test_slow_tier_hit_does_not_touch_the_origin(
    tmp_path: Path, origin: tuple[CountingProxy, str, dict[str, str]]
) -> None:
    proxy, uri, env = origin
    shared = tmp_path / "shared"
    pull(uri, tmp_path / "seed", [shared], env)  # the pre-seeded shared PVC
    proxy.reset()
    result = pull(uri, tmp_path / "pod", [tmp_path / "node", shared], env)
    assert result["outcome"] == "copied-up"
    assert proxy.requests == []  # not even a listing
    assert (tmp_path / "pod" / "weights.bin").read_bytes() == MODEL["m/weights.bin"]


def test_damaged_fast_copy_is_replaced_from_the_slow_tier(
    tmp_path: Path, origin: tuple[CountingProxy, str, dict[str, str]]
) -> None:
    proxy, uri, env = origin
    fast, shared = tmp_path / "node", tmp_path / "shared"
    pull(uri, tmp_path / "pod-1", [fast, shared], env)
    status = subprocess.run(
        [sys.executable, "-m", "storage_initializer", "status", "--json", "--cache-dir", str(fast)],
        capture_output=True,
        text=True,
    )
    key = json.loads(status.stdout)["entries"][0]["key"]
    damaged = fast / key / "current" / "weights.bin"
    os.chmod(damaged, 0o644)
    damaged.write_bytes(b"bit rot")  # wrong size: the fast path notices
    proxy.reset()
    result = pull(uri, tmp_path / "pod-2", [fast, shared], env)
    assert result["outcome"] == "copied-up"
    assert origin_bytes(proxy) == 0
    assert (tmp_path / "pod-2" / "weights.bin").read_bytes() == MODEL["m/weights.bin"]
