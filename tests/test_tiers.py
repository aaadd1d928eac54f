"""Tiered caches against a real S3 server, origin bytes counted at a proxy: a slow-tier hit
costs the origin nothing, a miss is downloaded once into the shared tier, a damaged fast-tier
copy is detected and replaced from the slower tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import tmpfs
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


def status_of(tier: Path) -> dict[str, dict[str, object]]:
    """The tier's entries by key, as ``status --cache-dir --json`` reports them."""
    run = subprocess.run(
        [sys.executable, "-m", "storage_initializer", "status", "--json", "--cache-dir", str(tier)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return {e["key"]: e for e in json.loads(run.stdout)["entries"]}


def age(tier: Path, key: str, seconds_ago: float) -> None:
    """A crafted access history: one use, long ago (the automatic gc spares entries used
    within its min-idle of 300 s, so a test that wants evictions must make them old)."""
    log = tier / key / ".storage-initializer" / "access.log"
    log.write_text(f"{time.time() - seconds_ago:.3f} complete pod\n")


def local_models(root: Path, count: int, size: int) -> list[Path]:
    models = []
    for i in range(count):
        model = root / "sources" / f"m{i}"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"m": i}))
        (model / "weights.bin").write_bytes(os.urandom(size))
        models.append(model)
    return models


def test_copy_up_counts_as_a_use_of_the_shared_tier(
    tmp_path: Path, origin: tuple[CountingProxy, str, dict[str, str]]
) -> None:
    """The shared PVC's LRU must see models that nodes use through their own tier."""
    _proxy, uri, env = origin
    shared = tmp_path / "shared"
    pull(uri, tmp_path / "seed", [shared], env)
    [(key, seeded)] = status_of(shared).items()
    assert seeded["hits"] == 1
    before = time.time()
    for node in ("node-a", "node-b"):
        result = pull(uri, tmp_path / f"pod-{node}", [tmp_path / node, shared], env)
        assert result["outcome"] == "copied-up"
    used = status_of(shared)[key]
    assert used["hits"] == 3
    assert before <= float(used["last_used"]) <= time.time()  # type: ignore[arg-type]


def test_each_tier_keeps_to_its_own_size_limit_after_a_pull(tmp_path: Path) -> None:
    """STORAGE_INITIALIZER_CACHE_MAX_SIZE as a list: the node tier holds 1.5 models, the shared
    tier 2.5; the automatic gc after each pull evicts the least recently used of each tier on
    its own."""
    size = 100_000
    models = local_models(tmp_path, 3, size)
    unit = size + len(json.dumps({"m": 0}))
    fast, shared = tmp_path / "node", tmp_path / "shared"
    env = {"STORAGE_INITIALIZER_CACHE_MAX_SIZE": f"{unit * 3 // 2},{unit * 5 // 2}"}
    keys = []
    for i, model in enumerate(models):
        result = pull(str(model), tmp_path / f"pod-{i}", [fast, shared], env)
        assert result["outcome"] == "downloaded"
        keys.append(str(result["key"]))
        for tier in (fast, shared):
            age(tier, keys[-1], 9000 - 1000 * i)  # older models were used longer ago
        if i == 1:
            assert set(status_of(fast)) == {keys[1]}
            assert set(status_of(shared)) == {keys[0], keys[1]}
    assert set(status_of(fast)) == {keys[2]}
    assert set(status_of(shared)) == {keys[1], keys[2]}
    # The pods of evicted entries were linked to them; a new pod pulls them back in.
    again = pull(str(models[1]), tmp_path / "pod-again", [fast, shared], env)
    assert again["outcome"] == "copied-up"
    weights = (tmp_path / "pod-again" / "weights.bin").read_bytes()
    assert weights == (models[1] / "weights.bin").read_bytes()


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 48 MiB tmpfs: a node tier whose free space only this test changes."""
    with tmpfs(tmp_path / "node", "48m") as mount:
        yield mount


def test_keep_free_evicts_from_a_node_tier_until_enough_is_free(
    tmp_path: Path, small_volume: Path
) -> None:
    models = local_models(tmp_path, 3, 4 << 20)
    shared = tmp_path / "shared"
    keys = []
    for i, model in enumerate(models):
        result = pull(str(model), tmp_path / f"pod-{i}", [small_volume, shared], {})
        keys.append(str(result["key"]))
        age(small_volume, keys[-1], 9000 - 1000 * i)
    stats = os.statvfs(small_volume)
    free = stats.f_bavail * stats.f_frsize
    want = free + (6 << 20)  # two models have to go, the oldest first
    args = [
        sys.executable, "-m", "storage_initializer", "gc", "--cache-dir", str(small_volume),
        "--keep-free", str(want), "--min-idle", "60",
    ]  # fmt: skip
    dry = subprocess.run([*args, "--dry-run"], capture_output=True, text=True)
    real = subprocess.run(args, capture_output=True, text=True)
    assert dry.returncode == 0 and real.returncode == 0, real.stderr
    evicted = [line.split()[1] for line in real.stdout.splitlines() if line.startswith("evict")]
    assert evicted == keys[:2]
    assert dry.stdout.count("would evict") == 2
    stats = os.statvfs(small_volume)
    assert stats.f_bavail * stats.f_frsize >= want
    assert set(status_of(small_volume)) == {keys[2]}
    assert set(status_of(shared)) == set(keys)  # another tier, untouched
    # Already enough free: nothing to do.
    calm = subprocess.run(
        [*args[:-4], "--keep-free", "1MiB", "--min-idle", "60"], capture_output=True, text=True
    )
    assert calm.returncode == 0 and calm.stdout.strip() == "freed 0 B in 0 actions"


def test_same_size_corruption_in_the_fast_tier_is_found_by_verify_and_repaired(
    tmp_path: Path, origin: tuple[CountingProxy, str, dict[str, str]]
) -> None:
    """The fast path checks sizes only (docs/cache.md): a same-size corruption in the node
    tier is served until ``verify --cache-dir`` re-hashes it; ``--repair`` then fetches that
    one file again, and new pods get the good bytes."""
    proxy, uri, env = origin
    fast, shared = tmp_path / "node", tmp_path / "shared"
    pull(uri, tmp_path / "pod-1", [fast, shared], env)
    [key] = status_of(fast)
    damaged = fast / key / "current" / "weights.bin"
    os.chmod(damaged, 0o644)
    good = MODEL["m/weights.bin"]
    damaged.write_bytes(bytes(b ^ 0xFF for b in good[:100]) + good[100:])  # same size
    unnoticed = pull(uri, tmp_path / "pod-2", [fast, shared], env)
    assert unnoticed["outcome"] == "complete"  # documented: not caught at start

    def verify(tier: Path, *more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "storage_initializer",
                "verify",
                "--cache-dir",
                str(tier),
                *more,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )

    found = verify(fast)
    assert found.returncode == 1 and "BAD weights.bin" in found.stdout
    assert verify(shared).returncode == 0
    proxy.reset()
    repaired = verify(fast, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "REPAIRED 1 file(s): weights.bin" in repaired.stdout
    assert origin_bytes(proxy) == len(good)  # that one file, nothing else
    assert verify(fast).returncode == 0
    fresh = pull(uri, tmp_path / "pod-3", [fast, shared], env)
    assert fresh["outcome"] == "complete"
    assert (tmp_path / "pod-3" / "weights.bin").read_bytes() == good
