"""Reuse by content: a file the volume already holds is linked (or copied), never fetched again.

Origin bytes are counted at the origin (the counting proxy in front of S3, the Hub's request
counters), inode sharing is read from ``stat``, and every destination is checked by ``verify``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.concurrency_helpers import object_gets, s3_env
from tests.helpers import (
    clean_env,
    cli,
    cli_argv,
    digests,
    pattern,
    poll_until,
    sha256,
    start,
    tree_digest,
)
from tests.servers import azurite as azurite_server
from tests.servers.azurite import azurite
from tests.servers.gcs import GcsServer, gcs_server
from tests.servers.hub import HubFile, HubServer, start_hub
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, proxy, s3_server
from tests.test_cache_ops import du

__all__ = ["azurite", "gcs_server", "proxy", "s3_server"]

SHARD = pattern(400_000, 11)
TOKENIZER = pattern(50_000, 12)
OLD = {
    "model/config.json": b'{"v": 1}',
    "model/tokenizer.json": TOKENIZER,
    "model/weights/shard-1.bin": SHARD,
}
NEW = {**OLD, "model/config.json": b'{"v": 22}'}


def _local(files: dict[str, bytes]) -> dict[str, str]:
    return digests({k.split("/", 1)[1]: v for k, v in files.items()})


def _fetched(proxy: CountingProxy, bucket: str) -> int:
    return sum(r.bytes for r in object_gets(proxy, bucket))


def _summary(run: object) -> dict[str, object]:
    events = run.json_events("summary")  # type: ignore[attr-defined]
    assert events, run.describe()  # type: ignore[attr-defined]
    return events[-1]


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def test_cache_revalidate_fetches_only_the_changed_file(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, cache = f"s3://{bucket}/model", tmp / "cache"
    old_pod = tmp / "old" / "models"
    assert cli("pull", "--cache-dir", cache, uri, old_pod, env=env).returncode == 0

    s3_server.upload(bucket, {"model/config.json": NEW["model/config.json"]})
    proxy.reset()
    new_pod = tmp / "new" / "models"
    again = cli("pull", "--revalidate", "--cache-dir", cache, uri, new_pod, env=env)
    assert again.returncode == 0, again.describe()
    assert again.outcome() == "downloaded"
    # Only the changed file's bytes crossed the network.
    assert _fetched(proxy, bucket) == len(NEW["model/config.json"])
    summary = _summary(again)
    assert summary["files_fetched"] == 1 and summary["files_reused"] == 2
    assert summary["bytes_from_origin"] == len(NEW["model/config.json"])
    assert summary["bytes_reused"] == len(SHARD) + len(TOKENIZER)
    assert tree_digest(new_pod) == _local(NEW)
    assert tree_digest(old_pod) == _local(OLD)  # the old version is untouched
    # The unchanged files are one inode shared by both versions.
    (entry,) = _entries(cache)
    versions = sorted(p for p in entry.iterdir() if p.name.startswith("v"))
    assert len(versions) == 2
    old_v, new_v = versions
    assert _inode(old_v / "weights/shard-1.bin") == _inode(new_v / "weights/shard-1.bin")
    assert _inode(old_v / "config.json") != _inode(new_v / "config.json")
    for pod in (old_pod, new_pod):
        assert cli("verify", pod).returncode == 0
    assert cli("verify", "--cache-dir", cache).returncode == 0


def test_direct_revalidate_fetches_only_the_changed_file(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, dest = f"s3://{bucket}/model", tmp / "models"
    assert cli("pull", uri, dest, env=env).returncode == 0
    shard_inode = _inode(dest / "weights/shard-1.bin")

    s3_server.upload(bucket, {"model/config.json": NEW["model/config.json"]})
    proxy.reset()
    again = cli("pull", "--revalidate", uri, dest, env=env)
    assert again.returncode == 0, again.describe()
    assert _fetched(proxy, bucket) == len(NEW["model/config.json"])
    assert _summary(again)["files_reused"] == 2
    assert tree_digest(dest) == _local(NEW)
    assert _inode(dest / "weights/shard-1.bin") == shard_inode  # kept, not rewritten
    assert cli("verify", dest).returncode == 0


def test_a_rotted_copy_on_the_volume_is_fetched_not_reused(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """The marker says sha/md5 X; the bytes on disk no longer are X: re-hashing catches it."""
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, dest = f"s3://{bucket}/model", tmp / "models"
    assert cli("pull", uri, dest, env=env).returncode == 0
    shard = dest / "weights/shard-1.bin"
    os.chmod(shard, 0o644)
    with open(shard, "r+b") as handle:  # same size, other content
        handle.write(b"\0" * 16)
    s3_server.upload(bucket, {"model/config.json": NEW["model/config.json"]})
    proxy.reset()
    again = cli("pull", "--revalidate", uri, dest, env=env)
    assert again.returncode == 0, again.describe()
    assert _fetched(proxy, bucket) == len(NEW["model/config.json"]) + len(SHARD)
    assert tree_digest(dest) == _local(NEW)
    assert cli("verify", dest).returncode == 0


def test_two_models_share_a_tokenizer_and_a_shard(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """Different buckets, different entries: the second fetches only what the first lacks."""
    base = s3_server.new_bucket(OLD)
    tuned = {**OLD, "model/config.json": b'{"tuned": true}', "model/adapter.bin": pattern(9_000, 5)}
    other = s3_server.new_bucket(tuned)
    env = s3_env(s3_server, proxy)
    cache = tmp / "cache"
    assert (
        cli("pull", "--cache-dir", cache, f"s3://{base}/model", tmp / "a", env=env).returncode == 0
    )
    proxy.reset()
    second = cli("pull", "--cache-dir", cache, f"s3://{other}/model", tmp / "b", env=env)
    assert second.returncode == 0, second.describe()
    unique = len(tuned["model/config.json"]) + len(tuned["model/adapter.bin"])
    assert _fetched(proxy, other) == unique
    assert tree_digest(tmp / "b") == _local(tuned)
    first_entry, second_entry = (
        next(p for p in e.iterdir() if p.name.startswith("v")) for e in _entries(cache)
    )
    assert _inode(first_entry / "tokenizer.json") == _inode(second_entry / "tokenizer.json")
    assert cli("verify", "--cache-dir", cache).returncode == 0
    # status: each entry shares the tokenizer and the shard with the other.
    status = cli("status", "--json", "--cache-dir", cache)
    assert status.returncode == 0, status.describe()
    shared = [e["shared_bytes"] for e in json.loads(status.stdout)["entries"]]
    assert shared == [len(TOKENIZER) + len(SHARD)] * 2
    # gc evicting both frees the shared files once, with the second eviction, and says so.
    from storage_initializer.cache import eviction

    before = du(cache)
    planned, _ = eviction.run(cache, eviction.Policy(max_size=1, min_idle=0), dry_run=True)
    _planned, done = eviction.run(cache, eviction.Policy(max_size=1, min_idle=0), dry_run=False)
    assert [a.kind for a in done] == ["evict", "evict"]
    assert sum(a.bytes for a in planned) == sum(a.bytes for a in done) == before - du(cache)


def test_filtered_pull_then_full_pull_fetches_only_the_rest(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, cache = f"s3://{bucket}/model", tmp / "cache"
    some = cli("pull", "--include", "*.json", "--cache-dir", cache, uri, tmp / "a", env=env)
    assert some.returncode == 0, some.describe()
    assert _fetched(proxy, bucket) == len(OLD["model/config.json"]) + len(TOKENIZER)
    proxy.reset()
    full = cli("pull", "--cache-dir", cache, uri, tmp / "b", env=env)
    assert full.returncode == 0, full.describe()
    assert _fetched(proxy, bucket) == len(SHARD)
    assert tree_digest(tmp / "b") == _local(OLD)


def test_writable_replica_cannot_alter_the_shared_copy(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, cache = f"s3://{bucket}/model", tmp / "cache"
    writer, reader = tmp / "writer" / "models", tmp / "reader" / "models"
    for mode in ("symlink", "hardlink"):
        for pod in (writer, reader):
            run = cli(
                "pull", "--writable", "--link-mode", mode, "--cache-dir", cache, uri, pod, env=env
            )
            assert run.returncode == 0, run.describe()
        # The writer's model server rewrites a file in place, as a writable volume allows.
        target = writer / "weights" / "shard-1.bin"
        with open(target, "r+b") as handle:
            handle.write(b"overwritten")
        with open(writer / "config.json", "w") as handle:
            handle.write("{}")
        assert tree_digest(reader) == _local(OLD), mode
        assert cli("verify", "--cache-dir", cache).returncode == 0, mode
        late = tmp / f"late-{mode}" / "models"
        assert cli("pull", "--cache-dir", cache, uri, late, env=env).returncode == 0
        assert tree_digest(late) == _local(OLD), mode
    # A pod that first linked read-only (symlinks into the cache), then restarts writable.
    switched = tmp / "switched" / "models"
    assert cli("pull", "--cache-dir", cache, uri, switched, env=env).returncode == 0
    again = cli("pull", "--writable", "--cache-dir", cache, uri, switched, env=env)
    assert again.returncode == 0, again.describe()
    assert not (switched / "weights").is_symlink()
    with open(switched / "weights" / "shard-1.bin", "r+b") as handle:
        handle.write(b"overwritten")
    assert tree_digest(reader) == _local(OLD)
    assert cli("verify", "--cache-dir", cache).returncode == 0


# -- HTTP: a pinned digest is an identity across URLs; no pin, no identity --------------------


def test_http_same_pinned_file_at_two_urls_is_fetched_once(nginx: Nginx, tmp: Path) -> None:
    data = pattern(200_000, 21)
    folder = nginx.new_dir()
    nginx.put(f"{folder}/a/model.bin", data)
    nginx.put(f"{folder}/b/model.bin", data)
    pin = f"#sha256={sha256(data)}"
    cache = tmp / "cache"
    with CountingProxy(nginx.url("").rstrip("/")) as proxy:
        env = clean_env(STORAGE_INITIALIZER_LOG_FORMAT="json")
        first = cli(
            "pull",
            "--cache-dir",
            cache,
            f"{proxy.url}/{folder}/a/model.bin{pin}",
            tmp / "a",
            env=env,
        )
        assert first.returncode == 0, first.describe()
        proxy.reset()
        second = cli(
            "pull",
            "--cache-dir",
            cache,
            f"{proxy.url}/{folder}/b/model.bin{pin}",
            tmp / "b",
            env=env,
        )
        assert second.returncode == 0, second.describe()
        assert sum(r.bytes for r in proxy.select(method="GET")) == 0
        assert _summary(second)["files_reused"] == 1
        # Unpinned, the same bytes have no identity the source vouches for: fetched in full.
        proxy.reset()
        third = cli(
            "pull", "--cache-dir", cache, f"{proxy.url}/{folder}/b/model.bin", tmp / "c", env=env
        )
        assert third.returncode == 0, third.describe()
        assert sum(r.bytes for r in proxy.select(method="GET")) == len(data)
    for pod in ("a", "b", "c"):
        assert (tmp / pod / "model.bin").read_bytes() == data


# -- Hugging Face: LFS sha256 and git blob ids -------------------------------------------------


@pytest.fixture
def hub() -> Iterator[HubServer]:
    server = start_hub()
    try:
        yield server
    finally:
        server.stop()


def _hub_env(hub: HubServer, tmp: Path) -> dict[str, str]:
    return clean_env(hub.env(str(tmp / "hf-home")), STORAGE_INITIALIZER_LOG_FORMAT="json")


def _resolved(hub: HubServer) -> list[str]:
    """The files whose content was fetched (GETs of /resolve/, LFS ones redirect to the CDN)."""
    return sorted(
        {
            path.rsplit("/", 1)[-1]
            for method, path, _n in hub.requests()
            if method == "GET" and "/resolve/" in path
        }
    )


HUB_FILES = {
    "config.json": HubFile(b'{"hidden": 8}'),
    "tokenizer.json": HubFile(pattern(30_000, 31)),
    "model.safetensors": HubFile(pattern(500_000, 32), lfs=True),
}


def test_hub_new_commit_fetches_only_the_changed_file(hub: HubServer, tmp: Path) -> None:
    repo = hub.add_repo("acme/update")
    repo.add_commit(HUB_FILES)
    env, cache = _hub_env(hub, tmp), tmp / "cache"
    assert cli("pull", "--cache-dir", cache, "hf://acme/update", tmp / "a", env=env).returncode == 0
    repo.add_commit({**HUB_FILES, "config.json": HubFile(b'{"hidden": 16}')})
    hub.reset_counts()
    again = cli(
        "pull", "--revalidate", "--cache-dir", cache, "hf://acme/update", tmp / "b", env=env
    )
    assert again.returncode == 0, again.describe()
    assert _resolved(hub) == ["config.json"]
    assert _summary(again)["files_reused"] == 2
    assert (tmp / "b" / "config.json").read_bytes() == b'{"hidden": 16}'
    assert cli("verify", tmp / "b").returncode == 0


def test_hub_fine_tune_reuses_the_base_models_files(hub: HubServer, tmp: Path) -> None:
    """Another repository (another entry): the shared LFS shard (sha256) and the shared small
    tokenizer (git blob id) are linked; only the fine-tune's own files are fetched."""
    hub.add_repo("acme/base").add_commit(HUB_FILES)
    tuned = {
        **HUB_FILES,
        "config.json": HubFile(b'{"tuned": 1}'),
        "adapter.safetensors": HubFile(pattern(20_000, 33), lfs=True),
    }
    hub.add_repo("acme/tuned").add_commit(tuned)
    env, cache = _hub_env(hub, tmp), tmp / "cache"
    assert cli("pull", "--cache-dir", cache, "hf://acme/base", tmp / "a", env=env).returncode == 0
    hub.reset_counts()
    second = cli("pull", "--cache-dir", cache, "hf://acme/tuned", tmp / "b", env=env)
    assert second.returncode == 0, second.describe()
    assert _resolved(hub) == ["adapter.safetensors", "config.json"]
    for name, item in tuned.items():
        assert (tmp / "b" / name).read_bytes() == item.data
    assert cli("verify", "--cache-dir", cache).returncode == 0


# -- concurrency: real processes, held by gates in the proxy -----------------------------------


def _gate(bucket: str, name: str) -> Fault:
    return Fault(
        kind="gate",
        method="GET",
        path_contains=f"/{bucket}/model/{name}",
        gate=threading.Event(),
        gate_timeout=300,
    )


def test_two_models_pulled_at_once_store_their_shared_file_once(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """Both pulls list and start fetching before either commits (gates hold both shards): the
    second to commit finds the first's copy and links to it instead of keeping its own."""
    one = s3_server.new_bucket(OLD)
    two = s3_server.new_bucket({**OLD, "model/config.json": b'{"other": 1}'})
    gates = [_gate(one, "weights"), _gate(two, "weights")]
    proxy.set_faults(*gates)
    env, cache = s3_env(s3_server, proxy), tmp / "cache"
    procs = [
        start(cli_argv("pull", "--cache-dir", cache, f"s3://{b}/model", tmp / b), env, tmp)
        for b in (one, two)
    ]
    try:
        poll_until(
            lambda: all(g.hits for g in gates), deadline=120, what="both pulls fetching the shard"
        )
        gates[0].gate.set()  # type: ignore[union-attr]
        first = procs[0].wait()
        assert first.returncode == 0, first.describe()
        gates[1].gate.set()  # type: ignore[union-attr]
        second = procs[1].wait()
        assert second.returncode == 0, second.describe()
    finally:
        for gate in gates:
            gate.gate.set()  # type: ignore[union-attr]
        for proc in procs:
            proc.kill()
    versions = [next(p for p in e.iterdir() if p.name.startswith("v")) for e in _entries(cache)]
    shards = {_inode(v / "weights/shard-1.bin") for v in versions}
    assert len(shards) == 1, "the shared shard is stored twice"
    assert tree_digest(tmp / two) == _local({**OLD, "model/config.json": b'{"other": 1}'})
    assert cli("verify", "--cache-dir", cache).returncode == 0


def test_gc_during_a_pull_never_frees_what_the_pull_linked(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """A pull has linked the shared files of entry A into its staging and waits for its own
    file; gc evicts A meanwhile. The pull completes with intact bytes, and what gc reports as
    freed is exactly what du of the cache lost (the shared files were not freed)."""
    from storage_initializer.cache import eviction

    base = s3_server.new_bucket(OLD)
    tuned = {**OLD, "model/config.json": b'{"tuned": 2}'}
    other = s3_server.new_bucket(tuned)
    env, cache = s3_env(s3_server, proxy), tmp / "cache"
    assert (
        cli("pull", "--cache-dir", cache, f"s3://{base}/model", tmp / "a", env=env).returncode == 0
    )
    held = _gate(other, "config.json")
    proxy.set_faults(held)
    proxy.reset()
    pulling = start(
        cli_argv("pull", "--cache-dir", cache, f"s3://{other}/model", tmp / "b"), env, tmp
    )
    try:
        poll_until(lambda: held.hits, deadline=120, what="the pull waiting for its own file")
        before = du(cache)
        _planned, done = eviction.run(cache, eviction.Policy(max_size=1, min_idle=0), dry_run=False)
        after = du(cache)
        assert [a.kind for a in done] == ["evict"], done
        assert before - after == sum(a.bytes for a in done)
        assert sum(a.bytes for a in done) < len(SHARD)  # the shared shard stayed
        held.gate.set()  # type: ignore[union-attr]
        result = pulling.wait()
        assert result.returncode == 0, result.describe()
    finally:
        held.gate.set()  # type: ignore[union-attr]
        pulling.kill()
    assert _fetched(proxy, other) == len(tuned["model/config.json"])
    assert tree_digest(tmp / "b") == _local(tuned)
    assert cli("verify", "--cache-dir", cache).returncode == 0


# -- GCS and Azure Blob: MD5 (and CRC32C within one source) as identity --------------------------


def test_gcs_revalidate_fetches_only_the_changed_file(gcs_server: GcsServer, tmp: Path) -> None:
    bucket = gcs_server.new_bucket(OLD)
    cache = tmp / "cache"
    with CountingProxy(gcs_server.endpoint) as proxy:
        env = clean_env(gcs_server.env(proxy.url), STORAGE_INITIALIZER_LOG_FORMAT="json")
        uri = f"gs://{bucket}/model"
        assert cli("pull", "--cache-dir", cache, uri, tmp / "a", env=env).returncode == 0
        gcs_server.upload(bucket, {"model/config.json": NEW["model/config.json"]})
        proxy.reset()
        again = cli("pull", "--revalidate", "--cache-dir", cache, uri, tmp / "b", env=env)
        assert again.returncode == 0, again.describe()
        assert proxy.bytes_served(method="GET", path_contains="/download/") == len(
            NEW["model/config.json"]
        )
    assert _summary(again)["files_reused"] == 2
    assert tree_digest(tmp / "b") == _local(NEW)
    assert cli("verify", "--cache-dir", cache).returncode == 0


def test_azure_revalidate_fetches_only_the_changed_file(
    azurite: azurite_server.Azurite, tmp: Path
) -> None:
    container = azurite.new_container_name("reuse")
    azurite.upload(container, OLD)
    cache = tmp / "cache"
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        env = clean_env(
            azurite.env(endpoint=f"{proxy.url}/{azurite.account}"),
            STORAGE_INITIALIZER_LOG_FORMAT="json",
        )
        uri = azurite.uri(container, "model")
        first = cli("pull", "--cache-dir", cache, uri, tmp / "a", env=env)
        assert first.returncode == 0, first.describe()
        azurite.upload(container, {"model/config.json": NEW["model/config.json"]})
        proxy.reset()
        again = cli("pull", "--revalidate", "--cache-dir", cache, uri, tmp / "b", env=env)
        assert again.returncode == 0, again.describe()
        fetched = proxy.bytes_served(method="GET", path_contains=f"/{container}/model/")
        assert fetched == len(NEW["model/config.json"])
    assert _summary(again)["files_reused"] == 2
    assert tree_digest(tmp / "b") == _local(NEW)
    assert cli("verify", "--cache-dir", cache).returncode == 0


def test_direct_filtered_pull_then_full_pull_fetches_only_the_rest(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """Direct mode: the full pull replaces the filtered model in DEST (--replace) and reuses
    its files."""
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, dest = f"s3://{bucket}/model", tmp / "models"
    assert cli("pull", "--include", "*.json", uri, dest, env=env).returncode == 0
    proxy.reset()
    full = cli("pull", "--replace", uri, dest, env=env)
    assert full.returncode == 0, full.describe()
    assert _fetched(proxy, bucket) == len(SHARD)
    assert tree_digest(dest) == _local(OLD)
    assert cli("verify", dest).returncode == 0


# -- the identity rules themselves -----------------------------------------------------------


def test_identity_rules_crc_only_within_one_source_weak_never(tmp: Path) -> None:
    """Which announced checksums make two files "the same" (docs/store.md, Content reuse)."""
    from storage_initializer.store.content import Candidate, Index

    def candidate(name: str, source: str, sums: dict[str, str]) -> Candidate:
        return Candidate(tmp / name, 10, sums, source, True)

    index = Index(
        [
            candidate("crc", "s3://a/m", {"crc32c": "0badf00d"}),
            candidate("md5", "s3://a/m", {"md5": "0" * 32}),
        ]
    )

    def found(sums: dict[str, str], source: str) -> list[str]:
        return [c.path.name for c, _k, _v in index.matches(10, sums, source)]

    assert found({"crc32c": "0badf00d"}, "s3://a/m") == ["crc"]  # same source: a CRC counts
    assert found({"crc32c": "0badf00d"}, "gs://b/m") == []  # another source: never
    assert found({"md5": "0" * 32}, "gs://b/m") == ["md5"]  # a digest counts across sources
    assert [c.path.name for c, _k, _v in index.matches(11, {"md5": "0" * 32}, "x")] == []
    # A multipart ETag is no md5 (providers never announce it as one), nor is a version.
    assert found({"etag": "abc-3", "version": "0" * 32}, "s3://a/m") == []


def test_writable_direct_revalidate_copies_and_rehashes(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """A writable DEST's files may have been rewritten by the model server: they are copied
    (never linked) into the new version and re-hashed; a rewritten one is fetched again."""
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, dest = f"s3://{bucket}/model", tmp / "models"
    assert cli("pull", "--writable", uri, dest, env=env).returncode == 0
    with open(dest / "tokenizer.json", "r+b") as handle:
        handle.write(b"rewritten by the server")
    shard_inode = _inode(dest / "weights/shard-1.bin")
    s3_server.upload(bucket, {"model/config.json": NEW["model/config.json"]})
    proxy.reset()
    again = cli("pull", "--writable", "--revalidate", uri, dest, env=env)
    assert again.returncode == 0, again.describe()
    assert _fetched(proxy, bucket) == len(NEW["model/config.json"]) + len(TOKENIZER)
    assert tree_digest(dest) == _local(NEW)
    assert _inode(dest / "weights/shard-1.bin") != shard_inode  # a copy, not the old inode
    assert cli("verify", dest).returncode == 0


def test_models_from_two_sources_share_a_file_verified_by_crc(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """An S3 object with an additional CRC (current SDKs' default) is verified, and recorded, by
    its CRC alone. A CRC is no identity across sources, but it points at the file worth
    hashing, and the MD5 ETag the second source announces confirms it: the shard is linked."""
    # The first key is the one the provider HEADs (for its CRC) in each bucket.
    files = {"model/a-shard.bin": SHARD, "model/config.json": b'{"v": 1}'}
    tuned = {**files, "model/config.json": b'{"tuned": 1}'}
    base, other = s3_server.new_bucket(), s3_server.new_bucket()
    s3_server.upload(base, files, ChecksumAlgorithm="CRC32")
    s3_server.upload(other, tuned, ChecksumAlgorithm="CRC32")
    env = s3_env(s3_server, proxy)
    cache = tmp / "cache"
    first = cli("pull", "--cache-dir", cache, f"s3://{base}/model", tmp / "a", env=env)
    assert first.returncode == 0, first.describe()
    (marker,) = cache.glob("*/v*/.storage-initializer*/marker.json") or cache.rglob("marker.json")
    recorded = {f["path"]: f["checksums"] for f in json.loads(marker.read_text())["files"]}
    assert set(recorded["a-shard.bin"]) == {"crc32"}, recorded  # what makes this case
    proxy.reset()
    second = cli("pull", "--cache-dir", cache, f"s3://{other}/model", tmp / "b", env=env)
    assert second.returncode == 0, second.describe()
    assert _fetched(proxy, other) == len(tuned["model/config.json"])
    assert tree_digest(tmp / "b") == _local(tuned)
    assert _inode(tmp / "a" / "a-shard.bin") == _inode(tmp / "b" / "a-shard.bin")
