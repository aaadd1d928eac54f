"""Cache mode: entries at ``<cache>/<key>/``, destinations populated by symlink, hardlink or copy.

This is what lets pods with an emptyDir at /mnt/models share one download on a cache PVC: the
second destination of the same source must cost no origin request at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.helpers import (
    STATE_DIR,
    clean_env,
    cli,
    digests,
    marker_path,
    model_files,
    sample_model,
    sha256,
    tar_bytes,
    tree_digest,
)
from tests.servers.nginx import Nginx


def _key(uri: str) -> str:
    """DESIGN §4: the first 16 hex of sha256 of the canonical URI (no filters)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def _model_root(entry: Path) -> Path:
    """Where the entry's model files are: the entry itself, or the version directory its
    ``current`` link names (an entry may keep immutable versions side by side)."""
    current = entry / "current"
    return Path(os.path.realpath(current)) if current.is_symlink() else entry


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _publish_archive(nginx: Nginx, seed: int) -> tuple[str, str, dict[str, bytes]]:
    model = sample_model(seed)
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.tar.gz", tar_bytes(model, "w:gz"))
    return folder, nginx.url(f"{folder}/model.tar.gz"), model


@pytest.mark.parametrize("link_mode", ["symlink", "hardlink", "copy"])
def test_link_modes_populate_the_destination(nginx: Nginx, tmp: Path, link_mode: str) -> None:
    _folder, url, model = _publish_archive(nginx, 20)
    cache, dest = tmp / "cache", tmp / "pod" / "models"
    result = cli("pull", "--cache-dir", cache, "--link-mode", link_mode, url, dest)
    assert result.returncode == 0, result.describe()

    entry = cache / _key(url)
    assert _entries(cache) == [entry]
    root = _model_root(entry)
    assert root == entry or root.parent == entry
    assert marker_path(root).is_file()
    assert tree_digest(root) == digests(model)
    assert tree_digest(dest) == digests(model)
    # The model server sees the model and nothing else (the state lives in the cache entry).
    top = sorted(p.name for p in dest.iterdir() if p.name != STATE_DIR)
    assert top == ["config.json", "weights"]

    for rel, path in model_files(dest).items():
        cached = root / rel
        if link_mode == "symlink":
            assert Path(os.path.realpath(path)) == cached.resolve()
            assert Path(os.path.realpath(path)).is_relative_to(entry.resolve())
        else:
            assert not any(p.is_symlink() for p in [path, *path.parents] if p != dest.parent)
            same_inode = os.stat(path).st_ino == os.stat(cached).st_ino
            assert same_inode == (link_mode == "hardlink"), rel
    if link_mode == "symlink":
        assert all((dest / name).is_symlink() for name in top)

    verify = cli("verify", root)
    assert verify.returncode == 0, verify.describe()


@pytest.mark.parametrize("link_mode", ["symlink", "hardlink", "copy"])
def test_status_and_verify_accept_a_linked_destination(
    nginx: Nginx, tmp: Path, link_mode: str
) -> None:
    """An operator runs `status`/`verify` on the pod's path (/mnt/models), not on the cache
    entry whose key they do not know, whatever the link mode."""
    _folder, url, model = _publish_archive(nginx, 24)
    cache, dest = tmp / "cache", tmp / "pod" / "models"
    result = cli("pull", "--cache-dir", cache, "--link-mode", link_mode, url, dest)
    assert result.returncode == 0, result.describe()
    status = cli("status", "--json", dest)
    assert json.loads(status.stdout)["state"] == "complete", status.describe()
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()
    assert f"OK {len(model)} files" in verify.stdout


def test_second_destination_costs_no_request(nginx: Nginx, tmp: Path) -> None:
    folder, url, model = _publish_archive(nginx, 21)
    cache = tmp / "cache"
    first = cli("pull", "--cache-dir", cache, url, tmp / "a")
    assert first.returncode == 0, first.describe()
    before = nginx.wait_requests(folder, 2)
    assert [r.method for r in before] == ["HEAD", "GET"]

    for mode in ("symlink", "hardlink", "copy"):
        again = cli(
            "pull", "--cache-dir", cache, "--link-mode", mode, "--log-format", "json", url,
            tmp / f"b-{mode}",
        )  # fmt: skip
        assert again.returncode == 0, again.describe()
        assert again.outcome() == "complete"
        assert tree_digest(tmp / f"b-{mode}") == digests(model)
    assert nginx.requests(folder) == before
    assert len(_entries(cache)) == 1


def test_environment_variable_selects_cache_mode(nginx: Nginx, tmp: Path) -> None:
    _folder, url, model = _publish_archive(nginx, 22)
    env = clean_env(
        STORAGE_INITIALIZER_CACHE_DIR=str(tmp / "cache"),
        STORAGE_INITIALIZER_LINK_MODE="hardlink",
    )
    result = cli("pull", url, tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    root = _model_root(tmp / "cache" / _key(url))
    assert tree_digest(tmp / "dest") == digests(model)
    cfg = "config.json"
    assert os.stat(tmp / "dest" / cfg).st_ino == os.stat(root / cfg).st_ino


def test_filters_make_a_separate_entry(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", b"weights" * 100)
    url = nginx.url(f"{folder}/model.bin")
    cache = tmp / "cache"
    plain = cli("pull", "--cache-dir", cache, url, tmp / "plain")
    assert plain.returncode == 0, plain.describe()
    included = cli("pull", "--cache-dir", cache, "--include", "*.bin", url, tmp / "inc")
    assert included.returncode == 0, included.describe()
    excluded = cli("pull", "--cache-dir", cache, "--exclude", "*.txt", url, tmp / "exc")
    assert excluded.returncode == 0, excluded.describe()

    entries = _entries(cache)
    assert len(entries) == 3, entries
    assert cache / _key(url) in entries
    gets = [r for r in nginx.wait_requests(folder, 6) if r.method == "GET"]
    assert len(gets) == 3  # each entry is its own download
    for name in ("plain", "inc", "exc"):
        assert tree_digest(tmp / name) == {"model.bin": sha256(b"weights" * 100)}


def test_filters_select_files_of_a_directory_source(tmp: Path) -> None:
    source = tmp / "src"
    model = sample_model(23)
    for rel, data in model.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    cache = tmp / "cache"
    everything = cli("pull", "--cache-dir", cache, source, tmp / "all")
    only_json = cli("pull", "--cache-dir", cache, "--include", "*.json", source, tmp / "json")
    no_bin = cli("pull", "--cache-dir", cache, "--exclude", "*.bin", source, tmp / "nobin")
    for result in (everything, only_json, no_bin):
        assert result.returncode == 0, result.describe()
    assert len(_entries(cache)) == 3
    assert tree_digest(tmp / "all") == digests(model)
    assert tree_digest(tmp / "json") == digests({"config.json": model["config.json"]})
    assert tree_digest(tmp / "nobin") == digests(
        {k: v for k, v in model.items() if not k.endswith(".bin")}
    )
