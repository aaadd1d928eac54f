"""Running a cache: status table, verify across entries, gc (LRU/LFU, dry run, never an entry in
use), the metrics file and bulk prefetch — real processes on real directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage_initializer.store import layout
from storage_initializer.store.lease import Owner, try_claim


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storage_initializer", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def make_model(root: Path, name: str, size: int) -> Path:
    model = root / "sources" / name
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"name": name}))
    (model / "weights.bin").write_bytes(os.urandom(size))
    return model


def seed(tmp_path: Path, cache: Path, names_sizes: dict[str, int]) -> dict[str, str]:
    """Pull each model into the cache; returns name -> key."""
    keys = {}
    for name, size in names_sizes.items():
        source = make_model(tmp_path, name, size)
        run = cli("pull", "--cache-dir", str(cache), str(source), str(tmp_path / "dest" / name))
        assert run.returncode == 0, run.stderr
        status = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)
        keys[name] = next(e["key"] for e in status["entries"] if e["source"] == str(source))
    return keys


def set_history(cache: Path, key: str, hits: int, last_used: float) -> None:
    """A crafted access history: ``hits`` uses, the last at ``last_used``."""
    log = cache / key / ".storage-initializer" / "access.log"
    lines = [f"{last_used - 1000 - i:.3f} complete pod\n" for i in range(hits - 1)]
    lines.append(f"{last_used:.3f} complete pod\n")
    log.write_text("".join(lines))


def test_status_table_and_json(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    seed(tmp_path, cache, {"a": 1000, "b": 2000})
    table = cli("status", "--cache-dir", str(cache))
    assert table.returncode == 0
    assert table.stdout.count("complete") == 2
    assert "free" in table.stdout
    data = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)
    sizes = sorted(e["size"] for e in data["entries"])
    assert sizes == [1000 + len('{"name": "a"}'), 2000 + len('{"name": "b"}')]
    assert data["volume"]["free"] > 0


def test_verify_across_a_cache_finds_the_damaged_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"good": 500, "bad": 500})
    assert cli("verify", "--cache-dir", str(cache)).returncode == 0
    victim = cache / keys["bad"] / "current" / "weights.bin"
    os.chmod(victim, 0o644)
    victim.write_bytes(b"x" * 500)  # same size, other bytes: only a re-hash can tell
    run = cli("verify", "--cache-dir", str(cache))
    assert run.returncode == 1
    assert "weights.bin" in run.stdout and str(cache / keys["bad"]) in run.stderr
    assert cli("verify", "--cache-dir", str(cache), "--entry", keys["good"]).returncode == 0


def test_lru_and_lfu_pick_different_victims(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"old-popular": 3000, "new-rare": 3000, "mid": 3000})
    now = time.time()
    set_history(cache, keys["old-popular"], hits=50, last_used=now - 7200)
    set_history(cache, keys["new-rare"], hits=1, last_used=now - 3600)
    set_history(cache, keys["mid"], hits=10, last_used=now - 5400)
    limit = str(2 * 3100)  # room for two of the three
    lru = cli("gc", "--cache-dir", str(cache), "--max-size", limit, "--policy", "lru", "--dry-run")
    lfu = cli("gc", "--cache-dir", str(cache), "--max-size", limit, "--policy", "lfu", "--dry-run")
    assert lru.returncode == 0 and lfu.returncode == 0
    assert keys["old-popular"] in lru.stdout and keys["new-rare"] not in lru.stdout
    assert keys["new-rare"] in lfu.stdout and keys["old-popular"] not in lfu.stdout


def test_gc_frees_exactly_what_the_dry_run_announced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"x": 4000, "y": 4000, "z": 4000})
    now = time.time()
    for age, name in enumerate(("x", "y", "z")):
        set_history(cache, keys[name], hits=1, last_used=now - 1000 * (3 - age))
    args = ["gc", "--cache-dir", str(cache), "--max-size", "5000", "--min-idle", "60"]
    dry = cli(*args, "--dry-run")
    real = cli(*args)
    assert dry.returncode == 0 and real.returncode == 0
    announced = [
        line.split()[2] for line in dry.stdout.splitlines() if line.startswith("would evict")
    ]
    evicted = [line.split()[1] for line in real.stdout.splitlines() if line.startswith("evict")]
    assert announced == evicted == [keys["x"], keys["y"]]
    assert (
        dry.stdout.splitlines()[-1].replace("would free", "freed") == real.stdout.splitlines()[-1]
    )
    assert (
        not (cache / keys["x"]).exists()
        and (cache / keys["z"] / "current" / "weights.bin").exists()
    )


def test_gc_spares_entries_in_use_or_recently_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = seed(tmp_path, cache, {"held": 2000, "recent": 2000, "idle": 2000})
    now = time.time()
    set_history(cache, keys["held"], hits=1, last_used=now - 9000)
    set_history(cache, keys["recent"], hits=1, last_used=now - 5)
    set_history(cache, keys["idle"], hits=1, last_used=now - 9000)
    entry = layout.cached(cache, keys["held"])
    from storage_initializer.store.lease import current

    holder = try_claim(entry, Owner.this_process(), current(entry)[0], {"phase": "transfer"})
    assert holder is not None
    holder.start_heartbeat(0.1, dict)
    try:
        run = cli(
            "gc",
            "--cache-dir",
            str(cache),
            "--max-size",
            "0",
            "--max-idle",
            "1",
            "--min-idle",
            "60",
        )
    finally:
        holder.release("done")
    assert run.returncode == 0
    assert (cache / keys["held"] / "current" / "weights.bin").exists()
    assert (cache / keys["recent"] / "current" / "weights.bin").exists()
    assert not (cache / keys["idle"]).exists()


def test_metrics_file_parses(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    source = make_model(tmp_path, "m", 1234)
    metrics = tmp_path / "metrics" / "si.prom"
    run = subprocess.run(
        [sys.executable, "-m", "storage_initializer.entrypoint", str(source), str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env={**os.environ, "STORAGE_INITIALIZER_METRICS_FILE": str(metrics)},
    )
    assert run.returncode == 0, run.stderr
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    origin = families["storage_initializer_bytes_from_origin"].samples
    assert sum(s.value for s in origin if s.name.endswith("_total")) == 1234 + len('{"name": "m"}')
    assert families["storage_initializer_success"].samples[0].value == 1
    failing = subprocess.run(
        [
            sys.executable,
            "-m",
            "storage_initializer.entrypoint",
            str(tmp_path / "nope"),
            str(tmp_path / "d2"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "STORAGE_INITIALIZER_METRICS_FILE": str(metrics)},
    )
    assert failing.returncode == 1
    assert "failed to download" in failing.stderr.strip().splitlines()[-1]
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    assert families["storage_initializer_success"].samples[0].value == 0


def test_prefetch_reports_the_one_bad_model(tmp_path: Path) -> None:
    sources = [make_model(tmp_path, f"m{i}", 300 * (i + 1)) for i in range(4)]
    listing = tmp_path / "models.yaml"
    listing.write_text(
        "parallel: 3\n"
        "models:\n"
        + "".join(f"  - uri: {s}\n    dest: {tmp_path / 'out' / s.name}\n" for s in sources)
        + f"  - uri: {tmp_path / 'missing-model'}\n    dest: {tmp_path / 'out' / 'missing'}\n"
    )
    run = cli("prefetch", "--from-file", str(listing))
    assert run.returncode == 1
    assert "4 of 5 models ready, 1 failed" in run.stdout
    bad_row = next(line for line in run.stdout.splitlines() if "missing-model" in line)
    assert "failed" in bad_row
    for source in sources:
        assert (tmp_path / "out" / source.name / "weights.bin").exists()


@pytest.mark.parametrize("content", ["models: 3\n", "- {dest: /x}\n"])
def test_prefetch_rejects_a_malformed_file(tmp_path: Path, content: str) -> None:
    listing = tmp_path / "models.yaml"
    listing.write_text(content)
    run = cli("prefetch", "--from-file", str(listing))
    assert run.returncode == 1 and "prefetch:" in run.stderr


def test_concurrent_pulls_record_hits_and_last_use(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = make_model(tmp_path, "popular", 50_000)
    before = time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "storage_initializer",
                "pull",
                "--cache-dir",
                str(cache),
                str(source),
                str(tmp_path / "pods" / str(i)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(6)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    entry = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)["entries"][0]
    # O_APPEND lines on a local filesystem do not get lost: every pull counted once.
    assert entry["hits"] == 6
    assert before <= entry["last_used"] <= time.time()


def test_prefetch_into_a_cache_without_destinations(tmp_path: Path) -> None:
    sources = [make_model(tmp_path, f"c{i}", 1000) for i in range(3)]
    cache = tmp_path / "cache"
    listing = tmp_path / "models.yaml"
    listing.write_text(
        f"defaults:\n  cache_dir: {cache}\nmodels:\n" + "".join(f"  - {s}\n" for s in sources)
    )
    run = cli("prefetch", "--from-file", str(listing))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 of 3 models ready" in run.stdout
    entries = json.loads(cli("status", "--json", "--cache-dir", str(cache)).stdout)["entries"]
    assert sorted(e["state"] for e in entries) == ["complete"] * 3
