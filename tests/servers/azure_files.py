"""A small Azure Files REST server for tests: Azurite has no File service.

Protocol-faithful for exactly the calls azure-storage-file-share makes when downloading, and
nothing else:

- ``GET /{account}/{share}/{dir}?restype=directory&comp=list[&marker=…]`` (List Directories and
  Files, paged: ``page_size`` entries per page with ``NextMarker``),
- ``HEAD /{account}/{share}/{path}`` (Get File Properties: Content-Length, Content-MD5, ETag),
- ``GET /{account}/{share}/{path}`` with ``x-ms-range``/``Range`` (Get File, 206 + Content-Range).

Requests are authenticated like the service does: Shared Key signatures are recomputed from the
canonicalised request (as documented in "Authorize with Shared Key") and compared; SAS tokens
are accepted when their ``sig`` is one this server issued (:meth:`FileShareServer.issue_sas`)
or when they are service SAS tokens signed with the account key (recomputed and compared);
no credential is refused. Errors carry the service's XML body and ``x-ms-error-code``.
Path-style addressing only (``http://127.0.0.1:P/<account>``), as with Azurite.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import posixpath
import secrets
import threading
from collections.abc import Iterator, Mapping
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)
API_VERSION = "2025-05-05"
SAS_TIME = "%Y-%m-%dT%H:%M:%SZ"


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FileShareServer:
    """Shares in memory: ``{share: {path: bytes}}``; directories are implied by file paths."""

    def __init__(self, page_size: int = 1000) -> None:
        self.shares: dict[str, dict[str, bytes]] = {}
        self.md5: dict[tuple[str, str], bool] = {}
        self.page_size = page_size
        #: Hostile listings: with ``cycle_pages`` N > 0, the last page of a directory links back
        #: to its first page, N times (a broken proxy's pagination); ``phantom_directories``
        #: are entry names every listing adds as directories (".", "..", "a/b"), and a listed
        #: directory path is normalised as a careless server would (so "m/." lists "m").
        self.cycle_pages = 0
        self.phantom_directories: list[str] = []
        self.requests: list[tuple[str, str]] = []
        #: path from the share root -> bytes sent in file bodies (to prove a download happened once)
        self.bytes_served: dict[str, int] = {}
        self._sas: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileShareServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- content ------------------------------------------------------------------------------
    def put(self, share: str, files: Mapping[str, bytes], *, content_md5: bool = True) -> None:
        with self._lock:
            store = self.shares.setdefault(share, {})
            for path, data in files.items():
                store[path.strip("/")] = data
                self.md5[(share, path.strip("/"))] = content_md5

    def issue_sas(self) -> str:
        """A SAS query string this server accepts (the signature is random, not HMAC-derived)."""
        sig = base64.b64encode(secrets.token_bytes(32)).decode()
        self._sas.add(sig)
        from urllib.parse import quote

        expiry = "2099-01-01T00%3A00%3A00Z"
        return f"sv={API_VERSION}&ss=f&srt=sco&sp=rl&se={expiry}&sig={quote(sig, safe='')}"

    def count(self, method: str, path_contains: str = "") -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and path_contains in p)

    # -- protocol -----------------------------------------------------------------------------
    def _authorize(self, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        if "sig" in query:
            if query["sig"] in self._sas or self._service_sas_valid(handler, query):
                return
            raise _ApiError(403, "AuthenticationFailed", "Signature did not match")
        header = handler.headers.get("Authorization", "")
        if not header:
            raise _ApiError(401, "NoAuthenticationInformation", "No authentication information")
        scheme, _, rest = header.partition(" ")
        account, _, signature = rest.partition(":")
        if scheme != "SharedKey" or account != ACCOUNT:
            raise _ApiError(403, "AuthenticationFailed", "Unsupported authorization")
        expected = base64.b64encode(
            hmac.new(
                base64.b64decode(ACCOUNT_KEY),
                self._string_to_sign(handler).encode(),
                hashlib.sha256,
            ).digest()
        ).decode()
        if not hmac.compare_digest(expected, signature):
            raise _ApiError(403, "AuthenticationFailed", "Signature did not match")

    @staticmethod
    def _service_sas_valid(handler: BaseHTTPRequestHandler, query: dict[str, str]) -> bool:
        """A service SAS signed with the account key ("Create a service SAS": the fields in
        their documented order, HMAC-SHA256), for reads, unexpired, of this share or file."""
        resource = query.get("sr")
        if resource not in ("s", "f") or "r" not in query.get("sp", ""):
            return False
        if query.get("se", "") < datetime.datetime.now(datetime.UTC).strftime(SAS_TIME):
            return False  # ISO 8601 in UTC compares as text
        segments = [unquote(part) for part in urlsplit(handler.path).path.split("/")[1:]]
        path = "/".join(segments[1:2] if resource == "s" else segments[1:])
        fields = ["sp", "st", "se"]
        text = "\n".join(query.get(name, "") for name in fields)
        text += f"\n/file/{ACCOUNT}/{path}\n"
        text += "\n".join(
            query.get(name, "")
            for name in ("si", "sip", "spr", "sv", "rscc", "rscd", "rsce", "rscl", "rsct")
        )
        key = base64.b64decode(ACCOUNT_KEY)
        expected = base64.b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest())
        return hmac.compare_digest(expected.decode(), query["sig"])

    @staticmethod
    def _string_to_sign(handler: BaseHTTPRequestHandler) -> str:
        headers = {k.lower(): v for k, v in handler.headers.items() if v}
        if headers.get("content-length") == "0":
            del headers["content-length"]
        parts = [handler.command]
        # The SDK signs Range through x-ms-range and leaves the plain Range slot empty.
        parts += [headers.get(name, "") if name != "range" else "" for name in SIGNED_HEADERS]
        text = "\n".join(parts) + "\n"
        text += "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()) if k.startswith("x-ms-"))
        split = urlsplit(handler.path)
        text += "/" + ACCOUNT + split.path
        for key, value in sorted(parse_qsl(split.query, keep_blank_values=True)):
            text += f"\n{key.lower()}:{value}"
        return text

    def _handle(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        split = urlsplit(handler.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        with self._lock:
            self.requests.append((handler.command, unquote(split.path)))
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        if len(segments) < 2 or segments[0] != ACCOUNT:
            raise _ApiError(400, "InvalidUri", "Path-style URIs only: /account/share/path")
        self._authorize(handler, query)
        share_name, path = segments[1], "/".join(s for s in segments[2:] if s)
        with self._lock:
            share = dict(self.shares.get(share_name) or {})
        if share_name not in self.shares:
            raise _ApiError(404, "ShareNotFound", "The specified share does not exist.")
        if query.get("restype") == "directory" and query.get("comp") == "list":
            return self._list(handler, share_name, share, path, query)
        if handler.command in ("GET", "HEAD") and not query.get("comp"):
            return self._file(handler, share_name, share, path)
        raise _ApiError(400, "UnsupportedHttpVerb", "This test server implements reads only")

    def _list(
        self,
        handler: BaseHTTPRequestHandler,
        share_name: str,
        share: dict[str, bytes],
        directory: str,
        query: dict[str, str],
    ) -> tuple[int, dict[str, str], bytes]:
        directory = posixpath.normpath(directory).lstrip("/") if directory else ""
        directory = "" if directory in (".", "..") else directory
        below = f"{directory}/" if directory else ""
        if directory and not any(p.startswith(below) for p in share):
            raise _ApiError(404, "ResourceNotFound", "The specified resource does not exist.")
        entries: dict[str, int | None] = {}
        for path, data in share.items():
            if not path.startswith(below):
                continue
            head, sep, _ = path[len(below) :].partition("/")
            entries[head] = None if sep else len(data)
        entries.update(dict.fromkeys(self.phantom_directories))
        names = sorted(entries)
        start = int(query.get("marker") or 0)
        page_size = min(self.page_size, int(query.get("maxresults") or self.page_size))
        page = names[start : start + page_size]
        next_marker = str(start + page_size) if start + page_size < len(names) else ""
        if not next_marker and self.cycle_pages > 0 and start > 0:
            with self._lock:
                self.cycle_pages -= 1
            next_marker = "0"
        items = []
        for index, name in enumerate(page):
            file_id = str(start + index + 1)
            if entries[name] is None:
                items.append(
                    f"<Directory><FileId>{file_id}</FileId><Name>{escape(name)}</Name>"
                    "<Properties /></Directory>"
                )
            else:
                items.append(
                    f"<File><FileId>{file_id}</FileId><Name>{escape(name)}</Name><Properties>"
                    f"<Content-Length>{entries[name]}</Content-Length></Properties></File>"
                )
        body = (
            '<?xml version="1.0" encoding="utf-8"?>'
            f'<EnumerationResults ServiceEndpoint="{escape(self.endpoint)}/" '
            f'ShareName="{escape(share_name)}" DirectoryPath="{escape(directory)}">'
            f"<Marker>{escape(query.get('marker', ''))}</Marker>"
            f"<MaxResults>{page_size}</MaxResults><Entries>{''.join(items)}</Entries>"
            f"<NextMarker>{next_marker}</NextMarker></EnumerationResults>"
        ).encode()
        return 200, {"Content-Type": "application/xml"}, body

    def _file(
        self, handler: BaseHTTPRequestHandler, share_name: str, share: dict[str, bytes], path: str
    ) -> tuple[int, dict[str, str], bytes]:
        if path not in share:
            raise _ApiError(404, "ResourceNotFound", "The specified resource does not exist.")
        data = share[path]
        etag = '"0x' + hashlib.sha256(data).hexdigest()[:15].upper() + '"'
        headers = {
            "ETag": etag,
            "Last-Modified": formatdate(0, usegmt=True),
            "x-ms-type": "File",
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "x-ms-server-encrypted": "true",
        }
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        has_md5 = self.md5.get((share_name, path), True)
        spec = handler.headers.get("x-ms-range") or handler.headers.get("Range")
        if handler.command == "HEAD" or not spec:
            if has_md5:
                headers["Content-MD5"] = md5
            headers["Content-Length"] = str(len(data))
            if handler.command == "GET":
                with self._lock:
                    self.bytes_served[path] = self.bytes_served.get(path, 0) + len(data)
            return 200, headers, data
        first_text, _, last_text = spec.removeprefix("bytes=").partition("-")
        first = int(first_text)
        last = min(int(last_text), len(data) - 1) if last_text else len(data) - 1
        if first >= len(data) or last < first:
            raise _ApiError(416, "InvalidRange", "The range specified is invalid.")
        if has_md5:
            headers["x-ms-content-md5"] = md5  # whole-file MD5 on ranged reads
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        with self._lock:
            self.bytes_served[path] = self.bytes_served.get(path, 0) + last - first + 1
        headers["Content-Length"] = str(last - first + 1)
        return 206, headers, data[first : last + 1]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _respond(self) -> None:
                try:
                    status, headers, body = server._handle(self)
                except _ApiError as exc:
                    status = exc.status
                    headers = {"x-ms-error-code": exc.code, "Content-Type": "application/xml"}
                    body = (
                        '<?xml version="1.0" encoding="utf-8"?><Error>'
                        f"<Code>{exc.code}</Code><Message>{escape(exc.message)}</Message></Error>"
                    ).encode()
                headers.setdefault("Content-Length", str(len(body)))
                headers["x-ms-version"] = API_VERSION
                headers["x-ms-request-id"] = secrets.token_hex(8)
                headers["Date"] = formatdate(usegmt=True)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = _respond
            do_HEAD = _respond

        return Handler


def serve() -> Iterator[FileShareServer]:
    """Generator for a pytest fixture: ``yield from serve()``."""
    with FileShareServer() as server:
        yield server
