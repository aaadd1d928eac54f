"""Source changes: ``--revalidate`` fetches a new version while readers keep the old one.

Cache mode gives each version its own immutable directory and switches ``<key>/current`` with
one atomic rename; a pod's links name the concrete version, so a running pod keeps consistent
old content while a new pod gets the new one. Direct mode replaces in place under the lease,
and refuses a model of another source unless ``--replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.concurrency_helpers import object_gets, s3_env
from tests.helpers import clean_env, cli, digests, marker_path, pattern, tree_digest
from tests.servers.hub import HubFile, HubServer, start_hub
from tests.servers.proxy import CountingProxy
from tests.servers.s3 import S3Server, proxy, s3_server

__all__ = ["proxy", "s3_server"]

OLD = {"model/config.json": b'{"v": 1}', "model/weights.bin": pattern(300_000, 71)}
NEW = {"model/config.json": b'{"v": 2}', "model/weights.bin": pattern(310_000, 72)}


def _local(files: dict[str, bytes]) -> dict[str, str]:
    return digests({k.split("/", 1)[1]: v for k, v in files.items()})


def test_cache_mode_new_version_beside_the_old_one(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, cache = f"s3://{bucket}/model", tmp / "cache"
    old_pod = tmp / "pod-old" / "models"
    first = cli("pull", "--cache-dir", cache, uri, old_pod, env=env)
    assert first.returncode == 0, first.describe()
    assert tree_digest(old_pod) == _local(OLD)

    # A running model server: an open file, and a reader re-reading the tree by path.
    held = open(old_pod / "weights.bin", "rb")  # noqa: SIM115 - closed below
    stop = threading.Event()
    seen: list[dict[str, str]] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(tree_digest(old_pod))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        s3_server.upload(bucket, NEW)
        unchanged = cli("pull", "--cache-dir", cache, uri, tmp / "pod-same" / "models", env=env)
        assert unchanged.returncode == 0
        # Without --revalidate, a complete entry is trusted: still the old version.
        assert tree_digest(tmp / "pod-same" / "models") == _local(OLD)

        proxy.reset()
        new_pod = tmp / "pod-new" / "models"
        again = cli("pull", "--revalidate", "--cache-dir", cache, uri, new_pod, env=env)
        assert again.returncode == 0, again.describe()
        assert again.outcome() == "downloaded"
        assert tree_digest(new_pod) == _local(NEW)
        assert sum(r.bytes for r in object_gets(proxy, bucket)) == sum(map(len, NEW.values()))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert held.read() == OLD["model/weights.bin"]
    held.close()
    assert seen and all(s == _local(OLD) for s in seen), "the running pod saw another version"
    assert tree_digest(old_pod) == _local(OLD)

    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    versions = sorted(p.name for p in entry.iterdir() if p.name.startswith("v"))
    assert len(versions) == 2, versions  # the old one stays until garbage collection
    current = os.readlink(entry / "current")
    assert current in versions
    assert os.path.realpath(new_pod / "weights.bin").startswith(str(entry / current))
    assert not os.path.realpath(old_pod / "weights.bin").startswith(str(entry / current))

    # A pod starting now gets the new version from the fast path, without any request.
    proxy.reset()
    late_pod = tmp / "pod-late" / "models"
    late = cli("pull", "--cache-dir", cache, uri, late_pod, env=env)
    assert late.returncode == 0 and late.outcome() == "complete"
    assert tree_digest(late_pod) == _local(NEW)
    assert proxy.requests == []
    for pod in (old_pod, new_pod, late_pod):
        verify = cli("verify", pod)
        assert verify.returncode == 0, verify.describe()


def test_revalidate_without_change_downloads_nothing(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, cache = f"s3://{bucket}/model", tmp / "cache"
    assert cli("pull", "--cache-dir", cache, uri, tmp / "a", env=env).returncode == 0
    proxy.reset()
    again = cli("pull", "--revalidate", "--cache-dir", cache, uri, tmp / "b", env=env)
    assert again.returncode == 0, again.describe()
    assert again.outcome() == "complete"
    assert object_gets(proxy, bucket) == []
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    assert len([p for p in entry.iterdir() if p.name.startswith("v")]) == 1


def test_source_going_back_switches_without_download(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """A version directory of the listed fingerprint already complete: switch to it."""
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy, STORAGE_INITIALIZER_REVALIDATE="true")
    uri, cache = f"s3://{bucket}/model", tmp / "cache"
    assert cli("pull", "--cache-dir", cache, uri, tmp / "a", env=env).returncode == 0
    s3_server.upload(bucket, NEW)
    assert cli("pull", "--cache-dir", cache, uri, tmp / "b", env=env).returncode == 0
    # S3 versions differ by ETag only through content: put the old bytes back.
    s3_server.upload(bucket, OLD)
    proxy.reset()
    back = cli("pull", "--cache-dir", cache, uri, tmp / "c", env=env)
    assert back.returncode == 0, back.describe()
    assert tree_digest(tmp / "c") == _local(OLD)
    assert object_gets(proxy, bucket) == []
    assert back.outcome() == "complete"


def test_direct_mode_revalidate_replaces_in_place(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(OLD)
    env = s3_env(s3_server, proxy)
    uri, dest = f"s3://{bucket}/model", tmp / "models"
    assert cli("pull", uri, dest, env=env).returncode == 0
    s3_server.upload(bucket, NEW)
    assert tree_digest(dest) == _local(OLD)
    again = cli("pull", "--revalidate", uri, dest, env=env)
    assert again.returncode == 0, again.describe()
    assert tree_digest(dest) == _local(NEW)
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()


def test_direct_mode_refuses_another_source_without_replace(
    s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(
        {**OLD, **{"other/" + k.split("/", 1)[1]: v for k, v in NEW.items()}}
    )
    env = s3_env(s3_server, proxy)
    dest = tmp / "models"
    assert cli("pull", f"s3://{bucket}/model", dest, env=env).returncode == 0
    refused = cli("pull", f"s3://{bucket}/other", dest, env=env)
    assert refused.returncode == 1
    assert "--replace" in refused.last_line, refused.last_line
    assert tree_digest(dest) == _local(OLD)
    replaced = cli("pull", "--replace", f"s3://{bucket}/other", dest, env=env)
    assert replaced.returncode == 0, replaced.describe()
    assert tree_digest(dest) == _local(NEW)
    sha = hashlib.sha256(NEW["model/weights.bin"]).hexdigest()
    assert tree_digest(dest)["weights.bin"] == sha


# -- a Hugging Face revision that moves ------------------------------------------------------------

HF_OLD: dict[str, bytes | HubFile] = {
    "config.json": b'{"v": 1}',
    "model.safetensors": HubFile(pattern(200_000, 81), lfs=True),
    "old-only.txt": b"gone in the next commit\n",
}
HF_NEW: dict[str, bytes | HubFile] = {
    "config.json": b'{"v": 2}',
    "model.safetensors": HubFile(pattern(210_000, 82), lfs=True),
}


def _hf_local(files: dict[str, bytes | HubFile]) -> dict[str, str]:
    return digests({k: v.data if isinstance(v, HubFile) else v for k, v in files.items()})


@pytest.mark.parametrize("mode", ["direct", "cache"])
def test_hf_main_moving_is_seen_only_with_revalidate(tmp: Path, mode: str) -> None:
    """hf://owner/repo follows ``main``: the marker records the commit it resolved to. After a
    new commit on the server a plain pull is a no-op 'complete' (no Hub request at all); with
    --revalidate the new commit is resolved, downloaded, and recorded."""
    hub: HubServer = start_hub()
    try:
        repo = hub.add_repo("acme/moving")
        first = repo.add_commit(HF_OLD)
        env = clean_env(hub.env(home=str(tmp / "hf-home")), STORAGE_INITIALIZER_LOG_FORMAT="json")
        uri, dest = "hf://acme/moving", tmp / "pod" / "models"
        cache = ("--cache-dir", str(tmp / "cache")) if mode == "cache" else ()
        pulled = cli("pull", *cache, uri, dest, env=env)
        assert pulled.returncode == 0, pulled.describe()
        assert pulled.outcome() == "downloaded"
        assert tree_digest(dest) == _hf_local(HF_OLD)
        assert _marker(dest)["fingerprint"] == first

        second = repo.add_commit(HF_NEW)
        assert second != first and repo.resolve("main") == second
        hub.reset_counts()
        again = cli("pull", *cache, uri, dest, env=env)
        assert again.returncode == 0, again.describe()
        assert again.outcome() == "complete"
        assert hub.requests() == []  # not even the revision was asked for
        assert tree_digest(dest) == _hf_local(HF_OLD)
        assert _marker(dest)["fingerprint"] == first

        moved = cli("pull", "--revalidate", *cache, uri, dest, env=env)
        assert moved.returncode == 0, moved.describe()
        assert moved.outcome() == "downloaded"
        assert hub.count("GET", "/revision/main") == 1
        assert tree_digest(dest) == _hf_local(HF_NEW)  # old-only.txt is gone
        marker = _marker(dest)
        assert marker["fingerprint"] == second
        assert {f["path"] for f in marker["files"]} == set(HF_NEW)
        verify = cli("verify", dest, env=env)
        assert verify.returncode == 0, verify.describe()

        hub.reset_counts()
        settled = cli("pull", "--revalidate", *cache, uri, dest, env=env)
        assert settled.returncode == 0 and settled.outcome() == "complete"
        assert hub.count("GET", "/resolve/") == 0  # listed, unchanged, nothing downloaded
    finally:
        hub.stop()


def _marker(dest: Path) -> dict[str, Any]:
    """The marker of the model DEST shows: its own in direct mode; in cache mode that of the
    version directory its links point into."""
    root = dest if marker_path(dest).is_file() else (dest / "config.json").resolve().parent
    found = json.loads(marker_path(root).read_text())
    assert isinstance(found, dict)
    return found
