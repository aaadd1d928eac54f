"""What a hostile URI or server cannot make us print: a URL's password (connection refused, DNS
failure, TLS failure), a forged log line (control characters in a URI or a file name), or a
200 KB last line (a huge URI). End to end: the KServe entrypoint as a process against real
sockets and servers; stdout, stderr and the termination log are all checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import clean_env, entrypoint
from tests.servers.base import closed_port
from tests.servers.hub import start_hub
from tests.servers.nginx import Nginx

SECRET = "s3cr3t-pw-4711"
#: Every line we print starts like this (report.TEXT_FORMAT): a forged line does not.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \d+ (DEBUG|INFO|WARNING|ERROR) ")


def _run(uri: str, tmp_path: Path, **env: str) -> tuple[object, str]:
    log = tmp_path / "termination-log"
    result = entrypoint(
        uri,
        tmp_path / "dest",
        env=clean_env(
            STORAGE_INITIALIZER_TERMINATION_LOG=str(log), STORAGE_INITIALIZER_RETRIES="0", **env
        ),
    )
    return result, log.read_text() if log.exists() else ""


def _assert_one_line_per_record(stderr: str) -> None:
    for line in stderr.splitlines():
        assert LOG_LINE.match(line), f"a line that is not a log record: {line!r}\n{stderr}"


@pytest.mark.parametrize("failure", ["refused", "dns", "tls"])
def test_a_url_password_never_appears(failure: str, nginx: Nginx, tmp_path: Path) -> None:
    with closed_port() as port:
        if failure == "refused":
            uri = f"https://user:{SECRET}@127.0.0.1:{port}/models/model.bin"
        elif failure == "dns":
            uri = f"http://user:{SECRET}@no-such-host.invalid/models/model.bin"
        else:  # TLS spoken to a plain HTTP server: the handshake fails
            uri = f"https://user:{SECRET}@127.0.0.1:{nginx.http_port}/models/model.bin"
        result, message = _run(uri, tmp_path)
    assert result.returncode == 1, result.describe()
    for where, text in (("stdout", result.stdout), ("stderr", result.stderr), ("log", message)):
        assert SECRET not in text, f"{where}: {text}"
    assert "user:***@" in result.last_line, result.last_line
    assert json.loads(message)["outcome"] == "failed"


def test_control_characters_in_a_uri_cannot_forge_a_log_line(tmp_path: Path) -> None:
    with closed_port() as port:
        uri = f"http://127.0.0.1:{port}/models/a\nERROR fake\x1b[2J.bin"
        result, message = _run(uri, tmp_path)
    assert result.returncode == 1, result.describe()
    _assert_one_line_per_record(result.stderr)
    assert "a\\nERROR fake\\x1b[2J.bin" in result.stderr  # "Initializing", "listing"
    assert "ERROR fake\\x1b[2J.bin" in result.last_line
    assert "\x1b" not in result.stderr and "\x1b" not in message


def test_a_file_name_with_a_newline_cannot_forge_a_log_line(tmp_path: Path) -> None:
    name = "a\nERROR fake\u2028line.bin"
    hub = start_hub()
    try:
        hub.add_repo("evil/names").add_commit({"config.json": b"{}", name: b"weights" * 100})
        for log_format in ("text", "json"):
            # The hostile file fails once: the engine logs that it retries it, naming it.
            hub.inject("ERROR", 503, count=1, method="GET")
            dest = tmp_path / log_format
            result = entrypoint(
                "hf://evil/names",
                dest,
                env=clean_env(
                    hub.env(home=str(tmp_path / "hf")),
                    STORAGE_INITIALIZER_RETRIES="1",
                    STORAGE_INITIALIZER_LOG_FORMAT=log_format,
                ),
            )
            assert result.returncode == 0, result.describe()
            assert (dest / name).read_bytes() == b"weights" * 100
            if log_format == "text":
                _assert_one_line_per_record(result.stderr)
                assert "a\\nERROR fake\\u2028line.bin" in result.stderr, result.stderr
            else:
                lines = result.stderr.split("\n")
                assert all(json.loads(line) for line in lines if line), result.stderr
                assert "\u2028" not in result.stderr
                assert any("ERROR fake" in line for line in lines), result.stderr
    finally:
        hub.stop()


def test_a_huge_uri_is_shortened_in_every_message(tmp_path: Path) -> None:
    with closed_port() as port:
        uri = f"http://127.0.0.1:{port}/{'x' * 100_000}/model.bin"
        result, message = _run(uri, tmp_path)
    assert result.returncode == 1, result.describe()
    last = result.last_line
    assert len(last) < 1500, len(last)
    assert f"http://127.0.0.1:{port}/xxx" in last and "…" in last
    assert len(result.stderr) < 5000, len(result.stderr)
    assert len(message) < 2000
