"""Redirects (providers/redirects.py), against nginx behind two counting proxies (two origins,
the redirects answered by the proxies): the ``<host>-headers``
go to the URI's own origin only — every one of them, not only Authorization — a redirect to
another scheme is refused, and a loop stops after 10 hops with a clear last line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import clean_env, entrypoint, model_files, pattern
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault

PRIVATE = {"Authorization": "Bearer tok-a-0123456789", "X-Api-Key": "key-a-0123456789"}


@pytest.fixture
def root(nginx: Nginx) -> str:
    """This test's directory on nginx: every path below is in it."""
    return nginx.new_dir()


@pytest.fixture
def origin_a(nginx: Nginx) -> Iterator[CountingProxy]:
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        yield proxy


@pytest.fixture
def origin_b(nginx: Nginx) -> Iterator[CountingProxy]:
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        yield proxy


def _redirect(origin: CountingProxy, path: str, location: str, status: int = 302) -> str:
    """Make ``origin`` answer ``path`` (and only it) with a redirect; returns its URL."""
    origin.add_fault(
        Fault(
            status=status,
            headers={"Location": location},
            predicate=lambda record: record.path == path,
        )
    )
    return origin.url + path


def _env(**more: str) -> dict[str, str]:
    return clean_env({"127.0.0.1-headers": json.dumps(PRIVATE), **more})


def _private(headers: dict[str, str]) -> set[str]:
    present = {name.lower() for name in headers}
    return {name for name in PRIVATE if name.lower() in present}


def test_configured_headers_never_reach_another_origin(
    nginx: Nginx, root: str, origin_a: CountingProxy, origin_b: CountingProxy, tmp_path: Path
) -> None:
    data = pattern(100_000, 7)
    target = f"{origin_b.url}/{nginx.put(f'{root}/cdn/model.bin', data)}"
    uri = _redirect(origin_a, f"/{root}/m/model.bin", target)
    dest = tmp_path / "dest"
    result = entrypoint(uri, dest, env=_env())
    assert result.returncode == 0, result.describe()
    assert (dest / "model.bin").read_bytes() == data
    assert origin_a.requests and all(_private(s.headers) == set(PRIVATE) for s in origin_a.requests)
    assert origin_b.requests, "the redirect was not followed"
    for seen in origin_b.requests:
        assert _private(seen.headers) == set(), (seen.method, seen.headers)
    assert "tok-a" not in result.output and "key-a" not in result.output


def test_a_redirect_within_the_origin_keeps_the_headers(
    nginx: Nginx, root: str, origin_a: CountingProxy, tmp_path: Path
) -> None:
    data = pattern(10_000, 8)
    nginx.put(f"{root}/real/model.bin", data)
    uri = _redirect(origin_a, f"/{root}/m/model.bin", f"/{root}/real/model.bin", status=301)
    result = entrypoint(uri, tmp_path / "dest", env=_env())
    assert result.returncode == 0, result.describe()
    served = [s for s in origin_a.requests if s.path == f"/{root}/real/model.bin"]
    assert served and all(_private(s.headers) == set(PRIVATE) for s in served)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/model.bin"])
def test_a_redirect_to_another_scheme_is_refused(
    location: str, root: str, origin_a: CountingProxy, tmp_path: Path
) -> None:
    uri = _redirect(origin_a, f"/{root}/m/model.bin", location)
    dest = tmp_path / "dest"
    result = entrypoint(uri, dest, env=_env(STORAGE_INITIALIZER_RETRIES="0"))
    assert result.returncode == 1, result.describe()
    scheme = location.split(":", 1)[0]
    assert f"failed to download {uri}" in result.last_line
    assert f"redirected to a {scheme}: URL, which is refused" in result.last_line
    assert model_files(dest) == {}


def test_a_redirect_loop_stops_after_ten_hops(
    root: str, origin_a: CountingProxy, tmp_path: Path
) -> None:
    uri = _redirect(origin_a, f"/{root}/m/model.bin", f"/{root}/m/model.bin")
    dest = tmp_path / "dest"
    result = entrypoint(uri, dest, env=_env(STORAGE_INITIALIZER_RETRIES="0"))
    assert result.returncode == 1, result.describe()
    assert "more than 10 redirects" in result.last_line, result.last_line
    # The lean listing's HEAD, answered with the redirect, hands over to requests: then the
    # request and ten redirects followed, no more.
    assert len(origin_a.requests) == 1 + 11
    assert model_files(dest) == {}
