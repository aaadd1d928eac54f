"""Failures leave a clean, resumable state (issue 14, item 6).

* A volume that fills up while the verified model is being committed (the commit journal or
  the marker cannot be written): once space is freed, the next run reuses every verified file
  — nothing fetched from the origin, counted in nginx's access log — and does not demand the
  free-space margin again for bytes already on disk. Uses a real tmpfs: its inode limit makes
  the commit fail exactly there, and a remount frees space.
* A first pull of a source that does not exist leaves nothing that ``status`` reports as an
  incomplete download.
* ``verify --repair`` says what it does, not that it resumes "a previous owner".
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import STATE_DIR
from tests.servers.nginx import Nginx

WEIGHTS = helpers.pattern(8 << 20, 61)


def _env() -> dict[str, str]:
    # stale-after 600: heartbeats every 5 s, so none writes a lease file mid-run and the
    # inode count at the commit is the same in every run.
    return helpers.clean_env(STORAGE_INITIALIZER_RETRIES="0", STORAGE_INITIALIZER_STALE_AFTER="600")


def _remount(mount: Path, **options: str) -> None:
    text = ",".join(f"{k}={v}" for k, v in options.items())
    subprocess.run(["mount", "-o", f"remount,{text}", str(mount)], check=True)


def _gets(nginx: Nginx, folder: str) -> list[int]:
    return [r.bytes_sent for r in nginx.requests(folder) if r.method == "GET"]


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    with helpers.tmpfs(tmp_path / "volume", "64m") as mount:
        yield mount


def _inodes_for_a_pull(volume: Path, uri: str) -> int:
    """The fewest inodes with which a pull of ``uri`` into ``volume`` succeeds (the tmpfs root
    counts one). Measured, so that the test does not hard-code how many state files a pull
    makes; the last inodes a pull takes are the commit journal's and the marker's."""
    low, high = 2, 64
    while low < high:
        middle = (low + high) // 2
        _remount(volume, nr_inodes=str(middle))
        run = helpers.entrypoint(uri, volume / "probe", env=_env())
        subprocess.run(["rm", "-rf", str(volume / "probe")], check=True)
        if run.returncode == 0:
            high = middle
        else:
            low = middle + 1
    return low


@pytest.mark.parametrize(("fails_at", "short_by"), [("marker", 1), ("commit journal", 2)])
def test_disk_full_at_commit_then_freed_fetches_nothing_again(
    nginx: Nginx, volume: Path, fails_at: str, short_by: int
) -> None:
    folder = nginx.new_dir()
    nginx.put(f"{folder}/weights.bin", WEIGHTS)
    uri = nginx.url(f"{folder}/weights.bin")
    enough = _inodes_for_a_pull(volume, uri)
    _remount(volume, nr_inodes=str(enough - short_by))
    fetched = len(_gets(nginx, folder))
    dest = volume / "dest"

    full = helpers.entrypoint(uri, dest, env=_env())
    assert full.returncode == 1, full.describe()
    assert sum(_gets(nginx, folder)[fetched:]) == len(WEIGHTS)
    assert not helpers.marker_path(dest).exists()

    # Space is freed, but less than the model plus the margin: only what is on disk is left.
    stats = os.statvfs(volume)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    _remount(volume, nr_inodes="1000", size=f"{(used >> 10) + 4096}k")
    fetched = len(_gets(nginx, folder))
    again = helpers.entrypoint(uri, dest, env=_env())
    assert again.returncode == 0, again.describe()
    assert _gets(nginx, folder)[fetched:] == []
    assert (dest / "weights.bin").read_bytes() == WEIGHTS
    assert "0 B from origin" in again.stderr and "8.0 MiB reused" in again.stderr
    assert helpers.cli("verify", dest).returncode == 0
    # The failure said what happened and that the verified files are kept.
    assert "filled up while committing" in full.last_line, full.last_line
    assert "will not be downloaded again" in full.last_line


def test_a_failed_first_pull_of_a_missing_source_leaves_no_state(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    uri = nginx.url(f"{folder}/no-such-model.bin")
    dest = tmp / "dest"
    run = helpers.entrypoint(uri, dest, env=_env())
    assert run.returncode == 1, run.describe()
    assert not (dest / STATE_DIR).exists(), os.listdir(dest / STATE_DIR)
    status = helpers.cli("status", "--json", dest)
    assert json.loads(status.stdout)["state"] == "absent", status.describe()
    # Cache mode: no entry left behind either.
    cache = tmp / "cache"
    cached = helpers.cli("pull", "--cache-dir", cache, uri, tmp / "pod", env=_env())
    assert cached.returncode == 1
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    listing = helpers.cli("status", "--cache-dir", cache, "--json")
    assert "incomplete" not in listing.stdout, listing.describe()


def test_a_failed_pull_keeps_the_state_of_a_model_in_place(nginx: Nginx, tmp: Path) -> None:
    """The clean-up is only for an entry that never held anything: a complete model whose
    source has gone (a revalidation gets a 404) keeps its marker and state."""
    folder = nginx.new_dir()
    nginx.put(f"{folder}/weights.bin", WEIGHTS)
    uri = nginx.url(f"{folder}/weights.bin")
    dest = tmp / "dest"
    assert helpers.entrypoint(uri, dest, env=_env()).returncode == 0
    (nginx.docroot / folder / "weights.bin").unlink()
    env = {**_env(), "STORAGE_INITIALIZER_REVALIDATE": "true"}
    assert helpers.entrypoint(uri, dest, env=env).returncode == 1
    status = helpers.cli("status", "--json", dest)
    assert json.loads(status.stdout)["state"] == "complete", status.describe()


def test_verify_repair_says_what_it_resumes(nginx: Nginx, tmp: Path) -> None:
    folder = nginx.new_dir()
    model = {"config.json": b'{"a": 1}', "weights.bin": helpers.pattern(200_000, 3)}
    nginx.put(f"{folder}/model.tar", helpers.tar_bytes(model))
    uri = nginx.url(f"{folder}/model.tar")
    dest = tmp / "dest"
    assert helpers.cli("pull", uri, dest, env=_env()).returncode == 0
    os.chmod(dest / "weights.bin", 0o644)
    (dest / "weights.bin").write_bytes(b"\0" * len(model["weights.bin"]))
    repaired = helpers.cli("verify", "--repair", dest, env=_env())
    assert repaired.returncode == 0, repaired.describe()
    assert "previous owner" not in repaired.output, repaired.output
    assert "verify --repair found bad" in repaired.output
    assert (dest / "weights.bin").read_bytes() == model["weights.bin"]
