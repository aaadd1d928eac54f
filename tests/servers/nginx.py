"""Real nginx on 127.0.0.1 for the HTTP(S) tests.

Why real nginx and not a Python test server: the "download once" proof is the origin's own
access log, and Range, HEAD, keep-alive, throttling and TLS must behave exactly as they do in
front of a real model store. nginx runs as the current user in the foreground
(``-g 'daemon off;'``), with every pid, temp and log path inside one temporary directory, so
several instances (and several test sessions) never collide.

Locations served by the default configuration (``DOCROOT`` is :attr:`Nginx.docroot`):

* ``/<path>``: plain files, ``application/octet-stream`` unless the extension says otherwise;
* ``/slow/<path>``: the same files, throttled to :data:`SLOW_RATE` per connection, so that
  concurrent downloads overlap and can be observed;
* ``/rate/<bytes-per-second>/<path>``: the same files at a rate chosen by the test;
* ``/private/<path>``: the same files, only with ``Authorization: Bearer <token>`` (401 else);
* ``/forbidden/<path>``: always 403;
* ``/html/<path>``: always an HTML page (a login page where a ``.bin`` was expected).

The access log has one line per request: ``METHOD URI STATUS BYTES "RANGE"``; see
:meth:`Nginx.requests`.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers.process import end_process, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STARTUP_DEADLINE = 20.0
#: Throttle of ``/slow/``: bytes per second per connection.
SLOW_RATE = 256 * 1024
LOG_FORMAT = '$request_method $uri $status $body_bytes_sent "$http_range"'
LOG_RE = re.compile(
    r'^(?P<method>\S+) (?P<uri>\S+) (?P<status>\d{3}) (?P<bytes>\d+) "(?P<range>.*)"$'
)
HTML_PAGE = "<!doctype html><html><head><title>Sign in</title></head><body>Sign in</body></html>"


@dataclass(frozen=True)
class Request:
    """One parsed access-log line."""

    method: str
    uri: str
    status: int
    bytes_sent: int
    range: str  # "-" when the request had no Range header


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (it is its own CA)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
            "-days", "2", "-subj", "/CN=localhost",
            "-keyout", str(key), "-out", str(cert),
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
            "-addext", "extendedKeyUsage=serverAuth",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def default_locations(docroot: Path, token: str) -> str:
    """The location blocks described in the module docstring."""
    return f"""
        location / {{
            root {docroot};
        }}
        location /slow/ {{
            alias {docroot}/;
            limit_rate {SLOW_RATE};
        }}
        location ~ ^/rate/(?<rate>[0-9]+)/(?<rest>.*)$ {{
            alias {docroot}/$rest;
            limit_rate $rate;
        }}
        location /private/ {{
            alias {docroot}/;
            if ($http_authorization != "Bearer {token}") {{
                return 401;
            }}
        }}
        location /forbidden/ {{
            return 403;
        }}
        location /html/ {{
            default_type text/html;
            return 200 "{HTML_PAGE}";
        }}
    """


def render_config(
    prefix: Path, http_port: int, https_port: int, cert: Path, key: Path, locations: str
) -> str:
    """A complete nginx.conf whose every path lies inside ``prefix``."""
    user = ""
    if os.geteuid() == 0:
        # As root the workers would switch to "nobody", who cannot read our private tmp dir.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
    return f"""
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 512;
}}
http {{
    types {{
        text/html html htm;
        application/json json;
        application/zip zip;
        application/gzip gz tgz;
        application/x-tar tar;
    }}
    default_type application/octet-stream;
    log_format si '{LOG_FORMAT}';
    access_log {prefix}/access.log si;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    keepalive_timeout 30;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        {locations}
    }}
}}
"""


class Nginx:
    """A running nginx; :meth:`stop` ends it."""

    def __init__(self, prefix: Path, locations: Callable[[Path, str], str] | None = None):
        self.prefix = prefix
        self.docroot = prefix / "docroot"
        self.token = secrets.token_hex(16)
        self.access_log = prefix / "access.log"
        self.cert, self.key = make_certificate(prefix)
        self._locations = locations or default_locations
        self.process: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.https_port = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Nginx:
        """Start on free ports; retry with new ports if another process took one meanwhile."""
        self.docroot.mkdir(parents=True, exist_ok=True)
        (self.prefix / "tmp").mkdir(exist_ok=True)
        last_error = ""
        for _attempt in range(5):
            self.http_port, self.https_port = free_port(), free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(
                render_config(
                    self.prefix,
                    self.http_port,
                    self.https_port,
                    self.cert,
                    self.key,
                    self._locations(self.docroot, self.token),
                )
            )
            self.process = subprocess.Popen(
                [NGINX, "-c", str(conf), "-p", str(self.prefix), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready():
                return self
            self.process.wait(timeout=5)
            assert self.process.stderr is not None
            last_error = self.process.stderr.read().decode(errors="replace")
            if "Address already in use" not in last_error:
                break
        raise RuntimeError(f"nginx did not start: {last_error}")

    def _wait_ready(self) -> bool:
        """Poll a TCP connect to both ports until it succeeds, nginx exits, or the deadline."""
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_DEADLINE
        pending = [self.http_port, self.https_port]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                    pending.pop(0)
                if not pending:
                    return True
            except OSError:
                time.sleep(0.02)  # readiness-probe interval
        raise RuntimeError("nginx did not accept connections before the deadline")

    def stop(self) -> None:
        end_process(self.process)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    # -- content ----------------------------------------------------------------------------

    def url(self, path: str, *, https: bool = False, location: str = "") -> str:
        """URL of ``path`` (relative to the docroot) under ``location`` ("slow", "private"…)."""
        scheme, port = ("https", self.https_port) if https else ("http", self.http_port)
        prefix = f"/{location.strip('/')}" if location else ""
        return f"{scheme}://127.0.0.1:{port}{prefix}/{path.lstrip('/')}"

    def new_dir(self) -> str:
        """A fresh directory under the docroot, so tests never see each other's files or log
        lines (they filter the access log by this prefix)."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        (self.docroot / name).mkdir()
        return name

    def put(self, path: str, data: bytes) -> str:
        """Write ``data`` at ``path`` below the docroot; returns ``path``."""
        target = self.docroot / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return path

    # -- the access log ---------------------------------------------------------------------

    def requests(self, contains: str = "") -> list[Request]:
        """Every request logged so far whose URI contains ``contains``."""
        try:
            text = self.access_log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            match = LOG_RE.match(line)
            if match and contains in match["uri"]:
                found.append(
                    Request(
                        match["method"],
                        match["uri"],
                        int(match["status"]),
                        int(match["bytes"]),
                        match["range"],
                    )
                )
        return found

    def wait_requests(self, contains: str, at_least: int, deadline: float = 10.0) -> list[Request]:
        """The matching requests once at least ``at_least`` are logged.

        nginx writes a request's log line when the response is finished, which may be a moment
        after the client has closed its side; poll instead of assuming it is already there."""
        end = time.monotonic() + deadline
        while True:
            found = self.requests(contains)
            if len(found) >= at_least or time.monotonic() > end:
                return found
            time.sleep(0.02)  # polling interval


def start_nginx(
    prefix: Path | None = None, locations: Callable[[Path, str], str] | None = None
) -> Nginx:
    """Start another instance, e.g. with custom ``locations`` (a function of docroot, token)."""
    prefix = prefix or Path(tempfile.mkdtemp(prefix="si-nginx-"))
    return Nginx(prefix, locations).start()


@pytest.fixture(scope="session")
def nginx() -> Iterator[Nginx]:
    """One nginx for the whole session; tests isolate themselves with :meth:`Nginx.new_dir`."""
    server = start_nginx()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.prefix, ignore_errors=True)
