"""Benchmark scenario ``reuse`` (scripts/bench --backends reuse): content reuse on the volume.

1. An update where one small file changed: origin bytes (counted by a proxy in front of the
   S3 server) and wall time of ``--revalidate`` into the cache, against a full pull and against
   the stock initializer (which fetches everything again).
2. Two fine-tunes sharing their tokenizer and one weight shard: bytes on disk of the cache with
   reuse (``du``) against the sum of the two models (what a cache without reuse stores).

Printed, never asserted. Kept apart from bench.py so it has one job; bench.py calls it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _du(path: Path) -> int:
    out = subprocess.run(
        ["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=False
    )
    return int(out.stdout.split()[0]) if out.returncode == 0 else 0


def _pull(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """One pull through the CLI: wall time and its JSON summary."""
    cmd = [sys.executable, "-m", "storage_initializer", "pull", *args]
    started = time.monotonic()
    run = subprocess.run(
        cmd, env={**env, "STORAGE_INITIALIZER_LOG_FORMAT": "json"}, capture_output=True, text=True
    )
    seconds = time.monotonic() - started
    summary: dict[str, Any] = {}
    for line in run.stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "summary":
            summary = event
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"pull failed: {tail[0][:200]}")
    return seconds, summary


def scenario_reuse(bench: Any, servers: Any, files: dict[str, Path], bench_mod: Any) -> None:
    from tests.servers.proxy import CountingProxy

    endpoint, _weed = bench_mod.start_seaweedfs(servers)
    bench_mod.log(f"SeaweedFS S3 at {endpoint}; uploading")
    bench_mod.upload_s3(endpoint, files, "update")
    small = sorted(n for n in files if not n.endswith(".safetensors"))
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    work = bench.work / "reuse"
    work.mkdir(parents=True, exist_ok=True)
    human = bench_mod.human
    with CountingProxy(endpoint) as proxy:
        env = bench_mod.clean_env(bench_mod.s3_env(proxy.url))
        uri = f"s3://{bench_mod.BUCKET}/update"

        def origin() -> int:
            return sum(r.bytes for r in proxy.select(method="GET", path_contains="/update/"))

        # 1. one small file changed
        cache = work / "cache"
        full_s, _ = _pull(["--cache-dir", str(cache), uri, str(work / "pod-1")], env)
        full_bytes = origin()
        changed = work / "changed.json"
        changed.write_bytes(b'{"changed": true}' + os.urandom(64).hex().encode())
        bench_mod.upload_s3(endpoint, {small[0]: changed}, "update")
        proxy.reset()
        reval_s, summary = _pull(
            ["--revalidate", "--cache-dir", str(cache), uri, str(work / "pod-2")], env
        )
        reval_bytes = origin()
        text = (
            f"{bench.shape.describe()}, one small file changed: --revalidate fetched "
            f"{human(reval_bytes)} from the origin in {reval_s:.2f}s "
            f"({summary.get('files_fetched')} fetched, {summary.get('files_reused')} reused, "
            f"each reused file re-hashed); the first full pull: {human(full_bytes)} in "
            f"{full_s:.2f}s"
        )
        if bench_mod.stock_python():
            proxy.reset()
            dest = work / "stock"
            run = bench_mod.run_timed(bench_mod.stock_cmd(uri, dest), env)
            text += (
                f"; the stock initializer: {human(origin())} in {run.seconds:.2f}s"
                if run.ok
                else f"; stock failed: {run.tail[:100]}"
            )
            shutil.rmtree(dest, ignore_errors=True)
        bench.extra["reuse: update of one small file"] = text
        bench_mod.log(text)

    # 2. two fine-tunes sharing the tokenizer (the small files) and the first shard
    tune = work / "tunes"
    for name in ("tune-a", "tune-b"):
        own = tune / name / "own.safetensors"
        own.parent.mkdir(parents=True, exist_ok=True)
        own.write_bytes(os.urandom(bench.shape.shard_size))
        model = {n: files[n] for n in small} | {shards[0]: files[shards[0]]}
        model["own.safetensors"] = own
        bench_mod.upload_s3(endpoint, model, name)
    env = bench_mod.clean_env(bench_mod.s3_env(endpoint))
    cache = work / "tune-cache"
    sizes = 0
    for name in ("tune-a", "tune-b"):
        _s, summary = _pull(
            ["--cache-dir", str(cache), f"s3://{bench_mod.BUCKET}/{name}", str(work / name)], env
        )
        sizes += int(summary.get("bytes_from_origin", 0)) + int(summary.get("bytes_reused", 0))
    on_disk = _du(cache)
    text = (
        f"two fine-tunes sharing the tokenizer ({len(small)} files) and one "
        f"{human(bench.shape.shard_size)} shard: cache {human(on_disk)} on disk with reuse, "
        f"{human(sizes)} without (each model stored whole)"
    )
    bench.extra["reuse: two fine-tunes in one cache"] = text
    bench_mod.log(text)
    shutil.rmtree(work, ignore_errors=True)
