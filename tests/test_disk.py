"""A full disk: refused before downloading when sizes are known, a clear error and no leftovers
when it fills up mid-download. Uses a real 64 MiB tmpfs (needs root to mount)."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    with helpers.tmpfs(tmp_path / "volume", "64m") as mount:
        yield mount


class _EndlessModel(http.server.BaseHTTPRequestHandler):
    """Streams 100 MiB with no Content-Length: the size is unknown until the disk is full."""

    protocol_version = "HTTP/1.0"

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()
        block = b"\1" * (1 << 20)
        try:
            for _ in range(100):
                self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


def model_files(dest: Path) -> list[str]:
    return [
        p.name
        for p in dest.rglob("*")
        if p.is_file() and ".storage-initializer" not in p.relative_to(dest).parts
    ]


def pull(source: str, dest: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STORAGE_INITIALIZER_RETRIES": "0"}
    return subprocess.run(
        [sys.executable, "-m", "storage_initializer.entrypoint", source, str(dest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_known_size_that_cannot_fit_is_refused_before_downloading(
    small_volume: Path, tmp_path: Path
) -> None:
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.bin").write_bytes(os.urandom(80 << 20))
    dest = small_volume / "model"
    run = pull(str(source), dest)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert "not enough space" in last and str(source) in last
    # Named: the destination and the volume's mount point, not our state directory below it.
    assert f"on the volume mounted at {small_volume} for {dest}:" in last, last
    assert ".storage-initializer" not in last
    assert model_files(dest) == []
    staging = dest / ".storage-initializer" / "staging"
    assert not any(staging.glob("*/data/*"))


def test_disk_full_mid_download_is_explained_and_cleaned_up(small_volume: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EndlessModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/weights.bin"
        dest = small_volume / "model"
        run = pull(uri, dest)
    finally:
        server.shutdown()
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert "filled up during the download" in last and uri in last
    assert f"the volume mounted at {small_volume} filled up during the download into {dest}" in last
    # No Content-Length: the size is unknown, so no "0 B needed", but what was written.
    assert "0 B needed" not in last
    written = re.search(r"at least ([0-9.]+) MiB written so far", last)
    assert written is not None, last
    assert 32 <= float(written.group(1)) <= 64
    assert model_files(dest) == []
    # The partial download was removed: the volume is (nearly) empty again.
    stats = os.statvfs(small_volume)
    assert stats.f_bavail * stats.f_frsize > 60 << 20


# -- the per-entry quota (--max-size) end to end --------------------------------------------


def _three_mib_model(tmp_path: Path) -> Path:
    source = tmp_path / "model"
    (source / "weights").mkdir(parents=True)
    (source / "config.json").write_bytes(b"{}")
    (source / "weights" / "a.bin").write_bytes(os.urandom(2 << 20))
    (source / "weights" / "b.bin").write_bytes(os.urandom(1 << 20))
    return source


@pytest.mark.parametrize("how", ["entrypoint-env", "cli-flag"])
def test_model_over_max_size_is_refused(tmp_path: Path, how: str) -> None:
    source = _three_mib_model(tmp_path)
    dest = tmp_path / "dest"
    if how == "entrypoint-env":
        run = helpers.entrypoint(
            source, dest, env=helpers.clean_env(STORAGE_INITIALIZER_MAX_SIZE="2MiB")
        )
    else:
        run = helpers.cli("pull", "--max-size", "2MiB", source, dest)
    assert run.returncode == 1, run.describe()
    last = run.last_line
    assert f"failed to download {source}" in last, last
    assert "more than the 2.0 MiB allowed per entry (--max-size)" in last
    assert "Raise --max-size (STORAGE_INITIALIZER_MAX_SIZE)" in last
    assert model_files(dest) == []


def test_model_under_max_size_is_pulled(tmp_path: Path) -> None:
    source = _three_mib_model(tmp_path)
    dest = tmp_path / "dest"
    run = helpers.entrypoint(
        source, dest, env=helpers.clean_env(STORAGE_INITIALIZER_MAX_SIZE="4MiB")
    )
    assert run.returncode == 0, run.describe()
    assert sorted(model_files(dest)) == ["a.bin", "b.bin", "config.json"]
    assert (dest / "weights" / "a.bin").read_bytes() == (source / "weights" / "a.bin").read_bytes()
