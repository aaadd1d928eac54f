"""``storage-initializer status`` and ``verify``: what an operator runs when a pod hangs or a
model looks wrong. Status reads without side effects (complete, absent, downloading with the
holder and its progress); verify re-hashes every file against the marker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.helpers import (
    Run,
    clean_env,
    cli,
    cli_argv,
    pattern,
    poll_until,
    sample_model,
    start,
    tar_bytes,
)
from tests.servers.nginx import Nginx


def _status(dest: Path) -> dict:  # type: ignore[type-arg]
    result = cli("status", "--json", dest)
    return json.loads(result.stdout)


def _pull_model(nginx: Nginx, tmp: Path, seed: int) -> tuple[Path, dict[str, bytes], str]:
    model = sample_model(seed)
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.tar", tar_bytes(model))
    url = nginx.url(f"{folder}/model.tar")
    dest = tmp / "dest"
    result = cli("pull", url, dest)
    assert result.returncode == 0, result.describe()
    return dest, model, url


def test_status_of_a_complete_model(nginx: Nginx, tmp: Path) -> None:
    dest, model, url = _pull_model(nginx, tmp, 30)
    info = _status(dest)
    assert info["state"] == "complete"
    assert info["files"] == len(model)
    assert info["size"] == sum(len(v) for v in model.values())
    assert info["source"] == url
    assert info["problems"] == []
    assert "lease" not in info
    text = cli("status", dest)
    assert text.returncode == 0
    assert f"{dest}: complete" in text.stdout


def test_status_of_an_absent_model(tmp: Path) -> None:
    for path in (tmp / "never-created", tmp):
        result = cli("status", "--json", path)
        assert result.returncode == 1, result.describe()
        assert json.loads(result.stdout)["state"] == "absent"
    text = cli("status", tmp / "never-created")
    assert "absent" in text.stdout


def test_status_of_a_damaged_model(nginx: Nginx, tmp: Path) -> None:
    dest, _model, _url = _pull_model(nginx, tmp, 31)
    victim = dest / "config.json"
    os.chmod(victim, 0o644)
    victim.write_bytes(b"{}")
    info = _status(dest)
    assert info["state"] == "damaged"
    assert any("config.json" in p for p in info["problems"])


def test_status_during_a_download_shows_holder_and_progress(nginx: Nginx, tmp: Path) -> None:
    # The HTTP provider counts progress per 1 MiB block it reads: 3 MiB at 1 MiB/s shows
    # progress after about a second and finishes after about three.
    size = 3 * 1024 * 1024
    data = pattern(size, 32)
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", data)
    url = nginx.url(f"{folder}/model.bin", location=f"rate/{1024 * 1024}")
    dest = tmp / "dest"
    # A short stale-after makes the heartbeat (and so the published progress) frequent.
    proc = start(cli_argv("pull", "--stale-after", "2", url, dest), clean_env(), tmp / "logs")
    try:
        info = poll_until(
            lambda: (
                (s := _status(dest)).get("state") == "downloading"
                and s["lease"]["bytes_done"] > 0
                and s
            ),
            deadline=20,
            what="status to report progress of the download",
        )
        lease = info["lease"]
        assert lease["pid"] == proc.pid
        assert lease["phase"] == "transfer"
        assert lease["bytes_total"] == size
        assert 0 < lease["bytes_done"] <= size
        assert lease["stale"] is False
        text = cli("status", dest)
        assert "downloading" in text.stdout
        assert f"pid {proc.pid}" in text.stdout
    finally:
        result = proc.wait()
    assert result.returncode == 0, result.describe()
    after = _status(dest)
    assert after["state"] == "complete"
    assert "lease" not in after


def test_verify_passes_on_a_fresh_tree(nginx: Nginx, tmp: Path) -> None:
    dest, model, _url = _pull_model(nginx, tmp, 33)
    result = cli("verify", dest)
    assert result.returncode == 0, result.describe()
    assert f"OK {len(model)} files" in result.stdout


def _alter(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


def test_verify_lists_an_altered_file(nginx: Nginx, tmp: Path) -> None:
    dest, model, _url = _pull_model(nginx, tmp, 34)
    name = "weights/model.bin"
    original = model[name]
    os.chmod(dest / "weights", 0o755)
    # Same size, different content: only a checksum can tell.
    _alter(dest / name, bytes([original[0] ^ 0xFF]) + original[1:])
    result: Run = cli("verify", dest)
    assert result.returncode == 1, result.describe()
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1, result.stdout
    assert name in bad[0]


def test_verify_lists_every_bad_file(nginx: Nginx, tmp: Path) -> None:
    dest, _model, _url = _pull_model(nginx, tmp, 35)
    _alter(dest / "config.json", b"short")
    os.chmod(dest / "weights" / "extra", 0o755)
    os.unlink(dest / "weights" / "extra" / "tokenizer.txt")
    result = cli("verify", dest)
    assert result.returncode == 1, result.describe()
    assert "config.json" in result.stdout
    assert "weights/extra/tokenizer.txt" in result.stdout
    assert "weights/model.bin" not in result.stdout


def test_verify_of_a_directory_without_a_model(tmp: Path) -> None:
    result = cli("verify", tmp)
    assert result.returncode == 1
    assert str(tmp) in result.output


def test_status_measures_usage_and_flags_growth_over_the_quota(nginx: Nginx, tmp: Path) -> None:
    """The marker records the size at commit; a writable entry can grow after (a model server
    writing caches into it). status measures what is on disk now, against the quota."""
    model = sample_model(36)
    size = sum(len(v) for v in model.values())
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.tar", tar_bytes(model))
    dest = tmp / "dest"
    pulled = cli("pull", "--writable", nginx.url(f"{folder}/model.tar"), dest)
    assert pulled.returncode == 0, pulled.describe()
    quota = clean_env(STORAGE_INITIALIZER_MAX_SIZE=str(size + 10_000))

    info = json.loads(cli("status", "--json", dest, env=quota).stdout)
    # The state directory (marker, lease) is not counted: usage is the model, byte for byte.
    assert info["usage"]["bytes"] == info["size"] == size
    assert info["usage"]["files"] == len(model)
    assert (info["max_size"], info["over_quota"]) == (size + 10_000, False)
    assert "WARNING" not in cli("status", dest, env=quota).stdout

    (dest / "weights" / "cache.bin").write_bytes(b"c" * 50_000)
    info = json.loads(cli("status", "--json", dest, env=quota).stdout)
    assert info["size"] == size  # the marker's record does not move
    assert info["usage"]["bytes"] == size + 50_000
    assert info["usage"]["files"] == len(model) + 1
    assert info["over_quota"] is True
    text = cli("status", dest, env=quota)
    assert text.returncode == 0, text.describe()
    assert "+48.8 KiB since the download" in text.stdout
    assert "quota: " in text.stdout and "env STORAGE_INITIALIZER_MAX_SIZE" in text.stdout
    warning = [line for line in text.stdout.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "exceeds the quota" in warning[0], text.stdout
    # A flag sets the quota too, and without one there is no quota and no warning.
    flagged = json.loads(cli("status", "--json", "--max-size", "1MiB", dest).stdout)
    assert (flagged["max_size"], flagged["over_quota"]) == (1 << 20, False)
    plain = json.loads(cli("status", "--json", dest).stdout)
    assert "max_size" not in plain and "over_quota" not in plain


def test_status_with_a_bad_quota_is_a_one_line_error(tmp: Path) -> None:
    result = cli("status", "--max-size", "lots", tmp)
    assert result.returncode == 2, result.describe()
    assert result.stderr.strip().count("\n") == 0
    assert "--max-size: 'lots' is not a size" in result.stderr
