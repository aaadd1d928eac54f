"""The shared HTTP layer (providers/httpcommon.py), checked through real answers of a small
HTTP server on 127.0.0.1: the Retry-After parser in both forms, the status → error table,
the per-thread sessions and the metadata backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from storage_initializer import __version__
from storage_initializer.errors import (
    AccessDeniedError,
    NotFoundError,
    SourceError,
    TransientError,
)
from storage_initializer.providers import httpcommon

URI = "https://example.com/model.bin"


class StatusServer:
    """Answers ``GET /<status>?retry_after=<value>`` with that status and header, and records
    each request's User-Agent."""

    def __init__(self) -> None:
        self.agents: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                owner.agents.append(self.headers.get("User-Agent", ""))
                self.send_response(int(parts.path.strip("/")))
                for value in query.get("retry_after", []):
                    self.send_header("Retry-After", value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def get(self, status: int, retry_after: str | None = None) -> requests.Response:
        params = {"retry_after": retry_after} if retry_after is not None else None
        return requests.get(f"{self.url}/{status}", params=params, timeout=10)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[StatusServer]:
    status_server = StatusServer()
    yield status_server
    status_server.stop()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("86400", httpcommon.MAX_RETRY_AFTER),
        ("Fri, 31 Dec 2100 23:59:59 GMT", httpcommon.MAX_RETRY_AFTER),  # far ahead: clamped
        (formatdate(0, usegmt=True), 0.0),  # a date in the past: now
        ("soon", None),
        (None, None),
    ],
)
def test_retry_after_in_both_forms_from_a_real_429(
    server: StatusServer, header: str | None, expected: float | None
) -> None:
    response = server.get(429, header)
    assert httpcommon.retry_after(response.headers) == expected
    error = httpcommon.status_error(response, f"{URI}: busy")
    assert isinstance(error, TransientError)
    assert error.retry_after == expected


def test_an_http_date_ahead_is_the_seconds_until_it_read_as_utc_without_a_zone() -> None:
    """The HTTP-date form is parsed by the standard library (no urllib3 on the lean paths)."""
    ahead = formatdate(time.time() + 120, usegmt=True)
    for header in (ahead, ahead.removesuffix(" GMT")):  # no zone: UTC, as urllib3 reads it
        waited = httpcommon.retry_after({"Retry-After": header})
        assert waited is not None and 117 <= waited <= 120, (header, waited)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, AccessDeniedError),
        (403, AccessDeniedError),
        (404, NotFoundError),
        (410, NotFoundError),
        (408, TransientError),
        (429, TransientError),
        (500, TransientError),
        (503, TransientError),
        (400, SourceError),
        (418, SourceError),
    ],
)
def test_status_table_through_real_answers(
    server: StatusServer, status: int, kind: type[Exception]
) -> None:
    response = server.get(status, "4")
    with pytest.raises(kind) as caught:
        httpcommon.raise_for_status(response, URI, "the origin", hints={403: "Ask for access"})
    error = caught.value
    assert type(error) is kind  # 4xx refusals are exactly SourceError, not a subclass
    text = error.describe()
    assert text.startswith(f"{URI}: the origin answered {status} ")
    if status == 403:
        assert text.endswith("Ask for access")
    if kind is AccessDeniedError and status != 403:
        assert "credentials" in text  # the error kind's own hint when the provider gives none
    if kind is TransientError:
        assert error.retry_after == 4.0


def test_success_and_redirect_are_not_errors(server: StatusServer) -> None:
    for status in (200, 204, 304):
        response = server.get(status)
        httpcommon.raise_for_status(response, URI)
        assert httpcommon.status_error(response, URI) is None


@pytest.mark.parametrize(
    ("status", "kind", "message"),
    [
        (503, TransientError, f"{URI}: HTTP 503"),
        (429, TransientError, f"{URI}: HTTP 429"),
        (400, SourceError, f"{URI}: unexpected answer HTTP 400"),
        (404, NotFoundError, f"{URI}: unexpected answer HTTP 404"),
        # Not an error status, but not what the provider asked for either.
        (200, SourceError, f"{URI}: unexpected answer HTTP 200"),
    ],
)
def test_unexpected_answer_words_and_classifies(
    server: StatusServer, status: int, kind: type[Exception], message: str
) -> None:
    response = server.get(status, "3")
    error = httpcommon.unexpected_answer(response, URI, f"HTTP {status}")
    assert type(error) is kind
    assert str(error).startswith(message)
    if isinstance(error, TransientError):
        assert error.retry_after == 3.0


def test_sessions_are_per_thread_with_our_user_agent_and_closed(server: StatusServer) -> None:
    configured: list[requests.Session] = []
    pool = httpcommon.SessionPool(configured.append)
    mine = pool.get()
    assert pool.get() is mine
    theirs: list[requests.Session] = []
    thread = threading.Thread(target=lambda: theirs.append(pool.get()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine
    assert configured == [mine, theirs[0]]
    server.agents.clear()
    mine.get(f"{server.url}/200", timeout=10).close()
    assert server.agents == [f"storage-initializer/{__version__}"]
    pool.close()
    assert pool.get() is not mine  # a fresh session after close


def test_backoff_honours_retry_after_then_gives_up(server: StatusServer) -> None:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        response = server.get(429 if len(calls) < 3 else 200, "0")
        httpcommon.raise_for_status(response, URI)
        return "ok"

    assert httpcommon.with_backoff(call, attempts=3) == "ok"
    assert len(calls) == 3

    def always() -> str:
        httpcommon.raise_for_status(server.get(503, "0"), URI)
        return "never"

    with pytest.raises(TransientError, match="gave up after 2"):
        httpcommon.with_backoff(
            always, 2, give_up=lambda e, n: TransientError(f"{e} (gave up after {n})")
        )
    with pytest.raises(NotFoundError):  # not transient: no second attempt
        httpcommon.with_backoff(lambda: httpcommon.raise_for_status(server.get(404), URI), 5)
