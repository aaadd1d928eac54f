"""Pods with several ``src dest`` pairs and overlapping sources on one shared cache.

The entrypoint processes its pairs one after another and releases each entry's lease (and
file lock) before it starts the next, and a waiter holds no lease while it waits: no process
ever holds one entry while waiting for another, so there is no lock-ordering cycle however the
pods order their pairs. Each shared source still leaves the origin once.
"""

from __future__ import annotations

import collections
from pathlib import Path

from tests.concurrency_helpers import object_gets, s3_env
from tests.helpers import cli, digests, entrypoint_argv, pattern, start, tree_digest, wait_all
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, proxy, s3_server

__all__ = ["proxy", "s3_server"]

SOURCES = {
    name: {
        f"{name}/config.json": pattern(1_500, 50 + i),
        f"{name}/weights.bin": pattern(200_000 + 5_000 * i, 60 + i),
    }
    for i, name in enumerate(("llm", "embedder", "reranker", "guard"))
}
#: Each pod's pairs, in its own order: every source is shared, orders conflict on purpose
#: (a lock-ordering deadlock would show up as A waiting for B while B waits for A).
PODS = [
    ["llm", "embedder"],
    ["embedder", "llm"],
    ["reranker", "llm", "guard"],
    ["guard", "reranker", "embedder"],
    ["llm", "guard", "reranker", "embedder"],
    ["embedder", "reranker"],
]


def test_overlapping_multi_source_pods_share_one_cache(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket({k: v for files in SOURCES.values() for k, v in files.items()})
    proxy.set_faults(
        Fault(
            kind="delay",
            delay=0.05,
            method="GET",
            path_contains=f"/{bucket}/",
            predicate=lambda r: "list-type" not in r.query,
        )
    )
    cache = tmp / "cache"
    env = s3_env(
        s3_server,
        proxy,
        STORAGE_INITIALIZER_CACHE_DIR=str(cache),
        STORAGE_INITIALIZER_CHUNK_SIZE="64KiB",
    )
    argvs = []
    for index, names in enumerate(PODS):
        pairs: list[str] = []
        for name in names:
            pairs += [f"s3://{bucket}/{name}", str(tmp / f"pod-{index}" / name)]
        argvs.append(entrypoint_argv(*pairs))
    # A deadlock would hang: the deadline turns it into a failure.
    runs = wait_all([start(argv, env, tmp / "logs") for argv in argvs], timeout=180)
    for result in runs:
        assert result.returncode == 0, result.describe()
    outcomes = collections.Counter(e["outcome"] for r in runs for e in r.json_events("summary"))
    assert outcomes["downloaded"] == len(SOURCES), outcomes

    for name, files in SOURCES.items():
        served = sum(r.bytes for r in object_gets(proxy, bucket, f"{name}/"))
        assert served == sum(len(v) for v in files.values()), name
    for index, names in enumerate(PODS):
        for name in names:
            dest = tmp / f"pod-{index}" / name
            local = {k.split("/", 1)[1]: v for k, v in SOURCES[name].items()}
            assert tree_digest(dest) == digests(local), dest
            verify = cli("verify", dest)
            assert verify.returncode == 0, verify.describe()
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == len(SOURCES)
