"""Nobody ever sees a partial model.

A throttled download runs in a child process while this test polls the destination (and, in
cache mode, the cache entry) in a tight loop, as a model server or a second replica would:

* no model file is visible before the origin has sent the whole download (nginx's access log
  says when: it logs a request once its last byte is sent);
* every visible file has its full, correct content, at every poll;
* the completion marker appears only once every file of the model is in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import (
    STATE_DIR,
    clean_env,
    cli,
    cli_argv,
    pattern,
    start,
    tar_bytes,
)
from tests.servers.nginx import Nginx

MIN_POLLS_WHILE_RUNNING = 20


@dataclass
class Observation:
    polls: int = 0
    polls_before_any_file: int = 0
    first_file_seen_before_origin_done: list[str] = field(default_factory=list)
    wrong_content: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    marker_seen_with_missing: list[str] = field(default_factory=list)
    marker_seen: bool = False


def _visible(root: Path) -> dict[str, Path]:
    """Model files visible below ``root`` (links followed, our state directory skipped)."""
    found: dict[str, Path] = {}
    try:
        walker = list(os.walk(root, followlinks=True))
    except OSError:
        return found
    for dirpath, dirnames, filenames in walker:
        if Path(dirpath) == root and STATE_DIR in dirnames:
            dirnames.remove(STATE_DIR)
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts and rel_dir.parts[0] == STATE_DIR:
            continue
        for name in filenames:
            found[(rel_dir / name).as_posix()] = Path(dirpath) / name
    return found


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # replaced by a rename between listing and reading
        return None


def _entries(dest: Path, cache: Path | None) -> list[Path]:
    """Where model files may appear: DEST itself, and every cache entry."""
    roots = [dest]
    if cache is not None and cache.is_dir():
        roots += [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return roots


def _watch(
    nginx: Nginx,
    folder: str,
    archive_size: int,
    expected: dict[str, bytes],
    dest: Path,
    cache: Path | None,
    running: object,
) -> Observation:
    """Poll until the process ``running`` (a Popen) exits; record every violation."""
    seen = Observation()
    any_file = False
    while True:
        alive = running.poll() is None  # type: ignore[attr-defined]
        seen.polls += 1
        for root in _entries(dest, cache):
            visible = _visible(root)
            if visible and not any_file:
                any_file = True
                done = [r for r in nginx.requests(folder) if r.method == "GET"]
                if sum(r.bytes_sent for r in done) < archive_size:
                    seen.first_file_seen_before_origin_done.append(f"{root}: {sorted(visible)}")
            if not visible and not any_file:
                seen.polls_before_any_file += 1
            for rel, path in visible.items():
                if rel not in expected:
                    seen.unexpected.append(rel)
                    continue
                content = _read(path)
                if content is not None and content != expected[rel]:
                    seen.wrong_content.append(f"{root}/{rel}: {len(content)} bytes")
            if (root / STATE_DIR / "marker.json").exists():
                seen.marker_seen = True
                # The marker is there: every file must be, with its content (re-read now).
                now_visible = _visible(root)
                for rel, data in expected.items():
                    path = now_visible.get(rel)
                    if path is None or _read(path) != data:
                        seen.marker_seen_with_missing.append(f"{root}/{rel}")
        if not alive:
            return seen


def _model() -> dict[str, bytes]:
    return {
        "config.json": pattern(2_000, 60),
        "weights/model-00001.bin": pattern(120_000, 61),
        "weights/model-00002.bin": pattern(120_000, 62),
        "tokenizer/vocab.txt": pattern(40_000, 63),
    }


@pytest.mark.parametrize("mode", ["direct", "cache"])
def test_throttled_archive_is_never_partly_visible(nginx: Nginx, tmp: Path, mode: str) -> None:
    model = _model()
    archive = tar_bytes(model)
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.tar", archive)
    url = nginx.url(f"{folder}/model.tar", location="slow")
    dest = tmp / "dest"
    cache = tmp / "cache" if mode == "cache" else None
    args = ["pull", url, dest] if cache is None else ["pull", "--cache-dir", cache, url, dest]
    proc = start(cli_argv(*args), clean_env(), tmp / "logs")
    seen = _watch(nginx, folder, len(archive), model, dest, cache, proc.popen)
    result = proc.wait()
    assert result.returncode == 0, result.describe()

    assert seen.polls_before_any_file >= MIN_POLLS_WHILE_RUNNING, seen  # we did watch it run
    assert seen.first_file_seen_before_origin_done == []
    assert seen.wrong_content == []
    assert seen.unexpected == []
    assert seen.marker_seen_with_missing == []
    assert seen.marker_seen
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()


def test_throttled_chunked_file_is_never_partly_visible(nginx: Nginx, tmp: Path) -> None:
    """A big file is written by several ranged requests at once, preallocated to its full size
    in staging: a reader must never see it, not even at the right size with holes."""
    data = pattern(600_000, 64)
    folder = nginx.new_dir()
    nginx.put(f"{folder}/big.bin", data)
    url = nginx.url(f"{folder}/big.bin", location="rate/100000")
    dest = tmp / "dest"
    argv = cli_argv("pull", "--chunk-size", "128KiB", url, dest)
    proc = start(argv, clean_env(), tmp / "logs")
    seen = _watch(nginx, folder, len(data), {"big.bin": data}, dest, None, proc.popen)
    result = proc.wait()
    assert result.returncode == 0, result.describe()

    assert seen.polls_before_any_file >= MIN_POLLS_WHILE_RUNNING, seen
    assert seen.first_file_seen_before_origin_done == []
    assert seen.wrong_content == []
    assert seen.marker_seen_with_missing == []
    assert seen.marker_seen
    assert (dest / "big.bin").read_bytes() == data
