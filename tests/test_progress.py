"""Progress and summary, as a user sees them: a throttled pull run as a separate process.

* ``--log-format json``: progress events with bytes, total, files, rate and ETA fields, and one
  summary line with source, dest, outcome, bytes from origin, bytes reused, files and seconds;
  a second pull of the same model says ``complete`` and fetched nothing;
* text: newline-delimited progress lines (bytes, percentage, files, rate, ETA);
* a terminal (a pty): a live bar redrawn in place (carriage return, erase line) instead of
  progress log lines.

The origin is nginx throttled to :data:`RATE`, so a transfer lasts several progress intervals.
"""

from __future__ import annotations

import errno
import os
import pty
import re
import subprocess
from pathlib import Path

from tests.helpers import clean_env, cli, cli_argv, pattern, sha256, tree_digest
from tests.servers.nginx import Nginx

SIZE = 400_000
#: Bytes per second: the transfer takes about three seconds (nginx sends the first second's
#: worth at once), many times the progress interval.
RATE = 100_000
INTERVAL = "0.2"


def _slow_url(nginx: Nginx, seed: int) -> tuple[str, bytes]:
    folder = nginx.new_dir()
    data = pattern(SIZE, seed)
    nginx.put(f"{folder}/model.bin", data)
    return nginx.url(f"{folder}/model.bin", location=f"rate/{RATE}"), data


def test_json_progress_events_and_summary(nginx: Nginx, tmp: Path) -> None:
    url, data = _slow_url(nginx, 90)
    dest = tmp / "dest"
    args = ("pull", "--progress-interval", INTERVAL, "--log-format", "json", url, dest)
    first = cli(*args, env=clean_env())
    assert first.returncode == 0, first.describe()
    assert tree_digest(dest) == {"model.bin": sha256(data)}

    events = first.json_events("progress")
    assert events, first.describe()
    for event in events:
        for name in ("bytes_done", "bytes_total", "files_done", "files_total", "rate", "eta"):
            assert name in event, (name, event)
        assert event["bytes_total"] == SIZE and event["files_total"] == 1, event
        assert 0 <= event["bytes_done"] <= SIZE, event
        assert url in event["message"], event
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done), done  # progress never goes backwards
    # While bytes are still to come, a line has a rate and an ETA consistent with it.
    moving = [e for e in events if e["bytes_done"] < SIZE and e["rate"]]
    assert moving, events
    for event in moving:
        assert event["rate"] > 0 and event["eta"] is not None, event
        expected_eta = (SIZE - event["bytes_done"]) / event["rate"]
        assert abs(event["eta"] - expected_eta) < 1e-6, event
        assert "/s" in event["message"] and "ETA" in event["message"], event

    (summary,) = first.json_events("summary")
    assert summary["source"] == url
    assert summary["dest"] == str(dest)
    assert summary["outcome"] == "downloaded"
    assert summary["bytes_from_origin"] == SIZE
    assert summary["bytes_reused"] == 0
    assert summary["files"] == 1
    assert summary["seconds"] > 0
    assert first.last_line == first.stderr.strip().splitlines()[-1]
    assert '"event": "summary"' in first.last_line  # the summary is the last line

    again = cli(*args, env=clean_env())
    assert again.returncode == 0, again.describe()
    (second,) = again.json_events("summary")
    assert second["outcome"] == "complete"
    assert second["bytes_from_origin"] == 0
    assert second["files"] == 1
    assert again.json_events("progress") == []  # nothing transferred, nothing to report


#: "INFO progress <url>: 195.3 KiB / 390.6 KiB (50%), 0/1 files, 97.7 KiB/s, ETA 2s"
TEXT_PROGRESS = re.compile(
    r" INFO progress (?P<url>\S+): [\d.]+ (?:B|KiB|MiB) / [\d.]+ KiB \(\d+%\), \d/1 files"
    r"(?:, [\d.]+ (?:B|KiB|MiB)/s(?:, ETA \d+s)?)?$"
)


def test_text_progress_lines(nginx: Nginx, tmp: Path) -> None:
    url, _data = _slow_url(nginx, 91)
    result = cli("pull", "--progress-interval", INTERVAL, url, tmp / "dest", env=clean_env())
    assert result.returncode == 0, result.describe()
    lines = [m for m in map(TEXT_PROGRESS.search, result.stderr.splitlines()) if m]
    assert lines, result.describe()
    assert all(m["url"] == url for m in lines)
    assert any("ETA" in m.group(0) for m in lines), result.stderr
    assert "\r" not in result.stderr  # not a terminal: no bar
    assert "summary: downloaded" in result.last_line and url in result.last_line


def _run_on_a_pty(argv: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run ``argv`` with stderr on a pseudo-terminal; returns (exit code, what it wrote)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave
        )
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: every writer of the terminal has gone
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        code = proc.wait(timeout=120)
    return code, b"".join(chunks)


def test_a_terminal_gets_a_live_bar(nginx: Nginx, tmp: Path) -> None:
    url, data = _slow_url(nginx, 92)
    dest = tmp / "dest"
    argv = cli_argv("pull", "--progress-interval", INTERVAL, url, dest)
    code, raw = _run_on_a_pty(argv, clean_env())
    text = raw.decode("utf-8", "replace")
    assert code == 0, text
    assert tree_digest(dest) == {"model.bin": sha256(data)}
    # The bar is redrawn in place: carriage return + erase line, then the label and figures.
    redraws = re.findall(r"\r\x1b\[K([^\r\n]+)", text)
    bars = [r for r in redraws if r.startswith(f"{url}: ") and "files" in r]
    assert bars, repr(text)
    assert any("/s" in bar for bar in bars), repr(text)
    # ... instead of newline-delimited progress log lines.
    assert " INFO progress " not in text, repr(text)
    assert "summary: downloaded" in text
