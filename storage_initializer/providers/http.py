"""Plain ``http(s)://`` URLs: one file, streamed with ranged requests when the server allows.

Extra request headers come from the environment variable ``<hostname>-headers`` (a JSON object),
as in the stock initializer; their values are secrets and are redacted. A fragment such as
``#sha256=<hex>`` (or ``md5=``) pins the file's checksum. Archives (.zip, .tar, .tar.gz, .tgz)
are extracted by the pipeline. An HTML page where a model was expected (a login page, a wrong
link) is refused.

Every read is pinned to the version listed (ETag or Last-Modified, If-Range; see http_pin), so
a file replaced during the download is fetched again whole, never stitched. A URL whose HEAD is
refused (a presigned GET URL answers 403) is listed with a one-byte ranged GET instead.

The listing and the reads take the lean path (http_lean: one ``http.client`` connection per
worker, blocks of ``read_size``) unless a proxy is configured, ``STORAGE_INITIALIZER_HTTP_LEAN``
is false, or the server redirects: then they go through requests, which is imported only then
(with urllib3 it costs ~80 ms of CPU, a tenth of a 512 MiB pull on one CPU).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from storage_initializer import tls
from storage_initializer.errors import (
    SourceChangedError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import http_lean, http_pin, httpcommon, lean_http, redirects
from storage_initializer.providers.base import Listing, RemoteFile, Source

if TYPE_CHECKING:
    import requests

    from storage_initializer.settings import Settings
    from storage_initializer.uri import SourceUri

log = logging.getLogger(__name__)

BLOCK = 1 << 20
TIMEOUT = (15, 60)
PIN_RE = re.compile(r"^(sha256|md5|sha1)[=:]([0-9a-fA-F]+)$")
HTML_TYPES = ("text/html", "application/xhtml+xml")
#: Answers to HEAD that make the listing ask for one byte by GET instead.
REFUSED_HEAD = (403, 405, 501)
_CREDENTIALS_HINT = (
    "Provide credentials with the <hostname>-headers environment variable, or check them"
)
HINTS = {401: _CREDENTIALS_HINT, 403: _CREDENTIALS_HINT}


def raise_for_status(response: requests.Response, what: str) -> None:
    """Turn an HTTP error status into the error a user can act on (httpcommon's table)."""
    httpcommon.raise_for_status(response, what, hints=HINTS)


class HttpSource(Source):
    default_workers = 8
    #: Per instance here: whether the server honours ranges is learnt by list() and read().
    supports_ranges: bool  # type: ignore[misc]

    def __init__(self, uri: SourceUri, settings: Settings) -> None:
        super().__init__(uri, settings)
        parts = urlsplit(uri.raw)
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
        self.name = posixpath.basename(unquote(parts.path))
        if not self.name:
            raise UsageError(
                f"{uri.redacted} names no file",
                "Point the URI at a file (a model file or an archive such as model.tar.gz)",
            )
        self.pin: dict[str, str] = {}
        if parts.fragment:
            match = PIN_RE.match(parts.fragment)
            if not match:
                raise UsageError(
                    f"{uri.redacted}: unknown fragment #{parts.fragment}",
                    "Use #sha256=<hex> (or #md5=<hex>) to pin the file's checksum",
                )
            self.pin[match.group(1).lower()] = match.group(2).lower()
        self.headers = self._headers(parts.hostname or "")
        #: Sent to the URI's own origin only, never after a redirect elsewhere (redirects.py).
        self.private_headers = tuple(self.headers)
        self.headers["Accept-Encoding"] = "identity"
        self.verify = tls.requests_verify()
        self._sessions = httpcommon.SessionPool(self._configure, pool_size=10)
        self._peer = httpcommon.Peer(
            name="the server",
            address=http_lean.host_port(self.url),
            tls_hint=http_lean.TLS_HINT,
            connect_hint=http_lean.CONNECT_HINT,
            reason=_reason,
            unreachable=_is_refused_or_dns,
        )
        #: The lean read path; None when not wanted, behind a proxy, or once a read was
        #: redirected (the requests path follows redirects without leaking credentials).
        self._lean: http_lean.LeanReader | None = None
        if http_lean.wanted(self.url):
            self._lean = http_lean.LeanReader(self.url, self.headers, self.verify, TIMEOUT)
        self.supports_ranges = False  # decided by list()
        #: A ranged read was answered with the whole file: never ask for ranges again.
        self._ranges_ignored = False

    def _headers(self, host: str) -> dict[str, str]:
        raw = os.environ.get(f"{host}-headers")
        if not raw:
            return {}
        return httpcommon.secret_headers(raw, f"the environment variable {host}-headers")

    def _configure(self, session: requests.Session) -> None:
        session.headers.update(self.headers)
        session.verify = self.verify

    @property
    def session(self) -> requests.Session:
        return self._sessions.get()

    def close(self) -> None:
        self._sessions.close()
        if self._lean is not None:
            self._lean.close()

    def _request(self, method: str, headers: dict[str, str] | None = None) -> requests.Response:
        import requests  # only when the requests path is taken (lean_http otherwise)

        what = self.uri.redacted
        try:
            return redirects.request(
                self.session,
                method,
                self.url,
                what=what,
                headers=headers,
                private=self.private_headers,
                stream=True,
                timeout=TIMEOUT,
            )
        except requests.RequestException as exc:
            raise httpcommon.transport_error(exc, what, self._peer) from None

    def list(self) -> Listing:
        status, headers, head = self._probe()
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in HTML_TYPES and not self.name.lower().endswith((".html", ".htm")):
            raise SourceError(
                f"{self.uri.redacted} returned an HTML page instead of a model file",
                "The URL may lead to a login or error page; check it, and the "
                "<hostname>-headers credentials",
            )
        size, ranges = http_pin.size_and_ranges(status, headers, head)
        version = http_pin.validator(headers)
        if ranges and not version:
            if size is not None and size > self.settings.chunk_size:
                log.info(
                    "%s: the server gives no ETag or Last-Modified, so a change during the "
                    "download could not be detected: fetching it in one stream",
                    self.uri.redacted,
                )
            ranges = False
        self.supports_ranges = ranges and not self._ranges_ignored
        file = RemoteFile(self.name, size, dict(self.pin), version, self.url)
        fingerprint = f"{version}:{size}" if version else f"unversioned:{size}"
        return Listing([file], fingerprint)

    def _probe(self) -> tuple[int, Mapping[str, str], bool]:
        """Status and headers of the listing's HEAD, or of a one-byte GET where HEAD is refused
        (a presigned URL is signed for GET only, some servers refuse HEAD; one byte tells the
        size by Content-Range and the validators as well), and whether it was the HEAD. Error
        statuses are raised. On the lean path unless the server redirects."""
        if self._lean is not None:
            try:
                return self._probe_lean(self._lean)
            except http_lean.Redirected:
                log.info(
                    "%s: the server redirects requests: reading through requests",
                    self.uri.redacted,
                )
                self._lean = None
        response = self._request("HEAD")
        head = True
        if response.status_code in REFUSED_HEAD:
            response.close()
            response = self._request("GET", {"Range": "bytes=0-0"})
            head = False
        with response:
            raise_for_status(response, self.uri.redacted)
            return response.status_code, response.headers, head

    def _probe_lean(self, lean: http_lean.LeanReader) -> tuple[int, Mapping[str, str], bool]:
        where = self.uri.redacted
        answer = lean.get({}, where, method="HEAD")
        head = True
        if answer.status in REFUSED_HEAD:
            lean_http.error_answer(answer)
            answer = lean.get({"Range": "bytes=0-0"}, where)
            head = False
        # One byte, or nothing (HEAD), or an error page: read (at most 64 KiB) so that the
        # connection carries the reads; a server that answers the byte with the whole file
        # loses its connection instead.
        lean_http.error_answer(answer)
        headers = cast("Mapping[str, str]", answer.response.headers)
        reason = f" {answer.response.reason}" if answer.response.reason else ""
        message = f"{where}: the server answered {answer.status}{reason}"
        error = httpcommon.error_for(answer.status, headers, message, HINTS)
        if error is not None:
            raise error
        return answer.status, headers, head

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the version of ``file`` that was listed: an answer from
        another version (another ETag/Last-Modified, a 412) is SourceChangedError (http_pin)."""
        ranged = bool(start or (end is not None and end != file.size))
        headers = http_pin.conditions(file.version, ranged)
        if ranged:
            if self._ranges_ignored:  # a chunk planned before another one found out
                raise http_pin.ranges_ignored(self.uri.redacted, file, 200)
            if not self.supports_ranges:
                raise SourceError(f"{self.uri.redacted}: the server does not support ranges")
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        lean = self._lean
        if lean is not None:
            try:
                answer = lean.get(headers, self.uri.redacted)
            except http_lean.Redirected:
                log.info(
                    "%s: the server redirects reads: reading through requests", self.uri.redacted
                )
                self._lean = None
            else:
                yield from self._read_lean(answer, file, start, end, ranged)
                return
        yield from self._read_requests(file, headers, start, end, ranged)

    def _read_requests(
        self,
        file: RemoteFile,
        headers: dict[str, str],
        start: int,
        end: int | None,
        ranged: bool,
    ) -> Iterator[bytes]:
        """A read through requests (behind a proxy, after a redirect, or asked for)."""
        import requests
        import urllib3.exceptions

        response = self._request("GET", headers)
        with response:
            self._check(
                file, ranged, start, response.status_code, response.reason, response.headers
            )
            # read1 (urllib3 2) returns what has arrived, up to a block: progress, cancellation
            # and resume points then move with the bytes even on a slow link.
            raw = response.raw
            read = getattr(raw, "read1", None) or raw.read
            left = None if end is None else end - start
            try:
                while left is None or left > 0:
                    block = read(BLOCK, decode_content=False)
                    if not block:
                        return
                    if left is not None:
                        block = block[:left]
                        left -= len(block)
                    yield block
            except (
                requests.exceptions.RequestException,
                OSError,
                urllib3.exceptions.HTTPError,
            ) as exc:
                raise TransientError(
                    f"{self.uri.redacted}: the transfer broke ({_reason(exc)})"
                ) from None

    def _read_lean(
        self,
        answer: lean_http.Answer,
        file: RemoteFile,
        start: int,
        end: int | None,
        ranged: bool,
    ) -> Iterator[bytes]:
        """The body of a lean answer, checked as the requests path checks its answers."""
        try:
            response = answer.response
            # An HTTPMessage: .get() is case-insensitive, all that the checks use of it.
            headers = cast("Mapping[str, str]", response.headers)
            self._check(file, ranged, start, answer.status, response.reason, headers)
        except BaseException:
            if answer.status >= 400:
                lean_http.error_answer(answer)  # a short error body: the connection stays
            else:
                answer.discard()
            raise
        left = None if end is None else end - start
        where = self.uri.redacted
        block = self.settings.read_size
        yield from lean_http.read_body(answer, 0, left, block, where, eager=True)

    def _check(
        self,
        file: RemoteFile,
        ranged: bool,
        start: int,
        status: int,
        reason: str | None,
        headers: Mapping[str, str],
    ) -> None:
        """Raise what an answer to a read means when it is not the listed version's bytes
        from ``start``: a change (412, 416, another validator: http_pin), an error status
        (httpcommon's table), ranges ignored, or a range that starts elsewhere."""
        where = self.uri.redacted
        if status in (412, 416):  # 416: the range is past its new end
            raise SourceChangedError(
                f"{where}: {file.path} changed since it was listed (the server answered "
                f"{status} to a read of version {file.version or 'unknown'})"
            )
        message = f"{where}: the server answered {status}{f' {reason}' if reason else ''}"
        error = httpcommon.error_for(status, headers, message, HINTS)
        if error is not None:
            raise error
        http_pin.check_same_version(where, file, headers)
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            raise lean_http.framing_error(where, coding)  # e.g. gzip: not the file's bytes
        if ranged and status != 206:
            # Ranges advertised but ignored: the file is fetched again in one stream.
            self._ranges_ignored = True
            self.supports_ranges = False
            raise http_pin.ranges_ignored(where, file, status)
        if ranged:
            http_pin.check_content_range(where, headers, start)
        elif status == 200 and file.size is not None:
            # One stream for the whole file: its length must be the listed one (a compressed
            # answer, which requests inflates, is checked by its written length instead).
            length = (headers.get("Content-Length") or "").strip()
            coding = (headers.get("Content-Encoding") or "identity").strip().lower()
            if coding == "identity" and length.isdigit() and int(length) != file.size:
                raise lean_http.other_length(f"{where}: {file.path}", int(length), file.size)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for inner in (getattr(exc, "args", None) or [])[:1]:
        reason = getattr(inner, "reason", None)
        if reason is not None:
            text = str(reason)
    return text.split(": ", 1)[-1][:200] if len(text) > 200 else text


def _is_refused_or_dns(exc: BaseException) -> bool:
    text = repr(exc)
    return any(
        marker in text
        for marker in (
            "Connection refused",
            "Name or service not known",
            "NameResolutionError",
            "nodename nor servname",
            "No route to host",
            "Errno 111",
            "Errno -2",
        )
    )
