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
    digests,
    pattern,
    start,
    tar_bytes,
    tree_digest,
)
from tests.servers.nginx import Nginx

MIN_POLLS_WHILE_RUNNING = 20


@dataclass
class Observation:
    polls: int = 0
    polls_before_any_file: int = 0
    first_file_seen_before_origin_done: list[str] = field(default_factory=list)
    wrong_content: list[str] = field(default_factory=list)
    #: Visible files outside the model whose content is not a whole model file.
    unexpected: list[str] = field(default_factory=list)
    marker_seen_with_missing: list[str] = field(default_factory=list)
    marker_seen: bool = False


def _visible(root: Path, follow: bool) -> dict[str, Path]:
    """Model files visible below ``root``: our state directories are skipped, and so are
    nested entries (a cache entry's version directories), which are roots of their own."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow):
        here = Path(dirpath)
        for name in list(dirnames):
            if (
                name == STATE_DIR
                or (here / name / STATE_DIR).is_dir()
                or (not follow and (here / name).is_symlink())
            ):
                dirnames.remove(name)
        for name in filenames:
            if follow or not (here / name).is_symlink():
                found[(here / name).relative_to(root).as_posix()] = here / name
    return found


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # replaced by a rename between listing and reading
        return None


def _roots(dest: Path, cache: Path | None) -> list[tuple[Path, bool]]:
    """Where model files may appear, and whether to follow links there: DEST (as the model
    server sees it), and in cache mode every directory of the cache that holds our state
    (an entry, or a version directory of an entry)."""
    roots = [(dest, True)]
    if cache is not None:
        for dirpath, dirnames, _files in os.walk(cache):
            if STATE_DIR in dirnames:
                roots.append((Path(dirpath), False))
                dirnames.remove(STATE_DIR)
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
    contents = set(expected.values())
    while True:
        alive = running.poll() is None  # type: ignore[attr-defined]
        seen.polls += 1
        for root, follow in _roots(dest, cache):
            visible = _visible(root, follow)
            if visible and not any_file:
                any_file = True
                done = [r for r in nginx.requests(folder) if r.method == "GET"]
                if sum(r.bytes_sent for r in done) < archive_size:
                    seen.first_file_seen_before_origin_done.append(f"{root}: {sorted(visible)}")
            if not visible and not any_file:
                seen.polls_before_any_file += 1
            for rel, path in visible.items():
                content = _read(path)
                if content is None:
                    continue
                if rel in expected:
                    if content != expected[rel]:
                        seen.wrong_content.append(f"{root}/{rel}: {len(content)} bytes")
                elif content not in contents:
                    # A name outside the model (a link being swapped in under a temporary
                    # name, say) is harmless only if it holds a whole file of the model.
                    seen.unexpected.append(f"{root}/{rel}: {len(content)} bytes")
            if (root / STATE_DIR / "marker.json").exists():
                seen.marker_seen = True
                # The marker is there: every file must be, with its content (re-read now).
                now_visible = _visible(root, follow)
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
    assert tree_digest(dest) == digests(model)
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
