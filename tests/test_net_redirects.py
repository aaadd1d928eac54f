"""Redirects (providers/redirects.py), against real servers on two ports: the ``<host>-headers``
go to the URI's own origin only — every one of them, not only Authorization — a redirect to
another scheme is refused, and a loop stops after 10 hops with a clear last line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import clean_env, entrypoint, model_files, pattern
from tests.servers.hostile import FileServer

PRIVATE = {"Authorization": "Bearer tok-a-0123456789", "X-Api-Key": "key-a-0123456789"}


@pytest.fixture
def origin_a() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture
def origin_b() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def _env(**more: str) -> dict[str, str]:
    return clean_env({"127.0.0.1-headers": json.dumps(PRIVATE), **more})


def _private(headers: dict[str, str]) -> set[str]:
    present = {name.lower() for name in headers}
    return {name for name in PRIVATE if name.lower() in present}


def test_configured_headers_never_reach_another_origin(
    origin_a: FileServer, origin_b: FileServer, tmp_path: Path
) -> None:
    data = pattern(100_000, 7)
    target = origin_b.add("cdn/model.bin", data)
    uri = origin_a.redirect("m/model.bin", target)
    dest = tmp_path / "dest"
    result = entrypoint(uri, dest, env=_env())
    assert result.returncode == 0, result.describe()
    assert (dest / "model.bin").read_bytes() == data
    assert origin_a.seen() and all(_private(s.headers) == set(PRIVATE) for s in origin_a.seen())
    assert origin_b.seen(), "the redirect was not followed"
    for seen in origin_b.seen():
        assert _private(seen.headers) == set(), (seen.method, seen.headers)
    assert "tok-a" not in result.output and "key-a" not in result.output


def test_a_redirect_within_the_origin_keeps_the_headers(
    origin_a: FileServer, tmp_path: Path
) -> None:
    data = pattern(10_000, 8)
    origin_a.add("real/model.bin", data)
    uri = origin_a.redirect("m/model.bin", "/real/model.bin", status=301)
    result = entrypoint(uri, tmp_path / "dest", env=_env())
    assert result.returncode == 0, result.describe()
    served = [s for s in origin_a.seen() if s.path == "/real/model.bin"]
    assert served and all(_private(s.headers) == set(PRIVATE) for s in served)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/model.bin"])
def test_a_redirect_to_another_scheme_is_refused(
    location: str, origin_a: FileServer, tmp_path: Path
) -> None:
    uri = origin_a.redirect("m/model.bin", location)
    dest = tmp_path / "dest"
    result = entrypoint(uri, dest, env=_env(STORAGE_INITIALIZER_RETRIES="0"))
    assert result.returncode == 1, result.describe()
    scheme = location.split(":", 1)[0]
    assert f"failed to download {uri}" in result.last_line
    assert f"redirected to a {scheme}: URL, which is refused" in result.last_line
    assert model_files(dest) == {}


def test_a_redirect_loop_stops_after_ten_hops(origin_a: FileServer, tmp_path: Path) -> None:
    uri = origin_a.redirect("m/model.bin", "/m/model.bin")
    dest = tmp_path / "dest"
    result = entrypoint(uri, dest, env=_env(STORAGE_INITIALIZER_RETRIES="0"))
    assert result.returncode == 1, result.describe()
    assert "more than 10 redirects" in result.last_line, result.last_line
    assert len(origin_a.seen()) == 11  # the request and ten redirects followed
    assert model_files(dest) == {}
