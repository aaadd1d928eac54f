"""A protocol-faithful WebHDFS test server: namenode(s) and a datanode on separate ports.

Why a server of our own: there is no HDFS or WebHDFS server in the registries this project can
reach (Hadoop is not packaged for Debian or PyPI). This one speaks the WebHDFS REST protocol as
Hadoop 3 answers it and as the ``hdfs`` package (the stock KServe initializer's client) and our
provider parse it:

- ``GET /webhdfs/v1/<path>?op=GETFILESTATUS`` → ``{"FileStatus": {...}}`` with ``type``
  (``FILE``/``DIRECTORY``), ``length``, ``modificationTime``, ``fileId``, ``pathSuffix: ""``...
- ``GET ...?op=LISTSTATUS`` → ``{"FileStatuses": {"FileStatus": [...]}}`` (a file lists itself).
- ``GET ...?op=GETHOMEDIRECTORY`` → ``{"Path": "/user/<user>"}``.
- ``GET ...?op=OPEN[&offset=N][&length=M]`` → ``307 Temporary Redirect`` to the datanode
  (``http://localhost:<dn-port>/webhdfs/v1/<path>?op=OPEN&namenoderpcaddress=...&offset=N``),
  which answers 200 with exactly those bytes (WebHDFS never answers 206).
- Errors are ``{"RemoteException": {"exception", "javaClassName", "message"}}`` with Hadoop's
  status mapping: FileNotFoundException 404, AccessControlException/StandbyException (IOExceptions)
  403, SecurityException 401.

Options: ``required_header`` (e.g. a gateway's Authorization; 401 without it), per-path
``readers`` checked against ``doas``/``user.name`` (AccessControlException), standby namenodes
for HA, TLS with an optional required client certificate, fault injection (status + exception,
or a body cut short) and thread-safe request counting per (role, op, path) for the download-once
tests. The datanode records any ``Authorization`` header it receives.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import ssl
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

PREFIX = "/webhdfs/v1"
#: Hadoop's status for each RemoteException class (ExceptionHandler.toResponse).
STATUS = {
    "FileNotFoundException": 404,
    "AccessControlException": 403,
    "StandbyException": 403,
    "RetriableException": 403,
    "IOException": 403,
    "SecurityException": 401,
    "IllegalArgumentException": 400,
}
JAVA = {
    "FileNotFoundException": "java.io.FileNotFoundException",
    "AccessControlException": "org.apache.hadoop.security.AccessControlException",
    "StandbyException": "org.apache.hadoop.ipc.StandbyException",
    "RetriableException": "org.apache.hadoop.ipc.RetriableException",
    "IOException": "java.io.IOException",
    "SecurityException": "java.lang.SecurityException",
    "IllegalArgumentException": "java.lang.IllegalArgumentException",
}


class _Remote(Exception):
    def __init__(self, exception: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.exception, self.message = exception, message
        self.status = status or STATUS.get(exception, 500)


@dataclass
class Fault:
    """Answer the next ``count`` requests of ``role`` whose "op path" contains ``match``."""

    match: str
    role: str | None
    count: int
    status: int
    exception: str
    truncate_after: int | None = None


class WebHdfs:
    """An in-memory HDFS: files (path → bytes, mtime, id) and empty directories."""

    def __init__(
        self,
        namenodes: int = 1,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.files: dict[str, tuple[bytes, int, int]] = {}
        self.dirs: set[str] = {"/"}
        self.readers: dict[str, frozenset[str]] = {}
        self.required_header: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._faults: list[Fault] = []
        self._next_id = 16386
        #: Every doas/user.name value seen by a namenode (for USER_PROXY tests).
        self.users_seen: list[tuple[str | None, str | None]] = []
        self.datanode_authorization_seen = 0
        #: A hostile namenode: names every directory listing adds as DIRECTORY entries (".",
        #: "..", "a/b"), with the asked path normalised as a careless server would ("m/." is "m").
        self.phantom_directories: list[str] = []
        #: (offset, length) of every datanode read, as query strings gave them.
        self.reads: list[tuple[str, str | None, str | None]] = []
        self.scheme = "https" if ssl_context else "http"
        self.standby: list[bool] = [False] * namenodes
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        for index in range(namenodes):
            self._servers.append(self._make(self._namenode_handler(index), ssl_context))
        self._datanode = self._make(self._datanode_handler(), ssl_context)
        self.namenode_ports = [s.server_address[1] for s in self._servers]
        self.datanode_port = self._datanode.server_address[1]

    @staticmethod
    def _make(
        handler: type[BaseHTTPRequestHandler], ssl_context: ssl.SSLContext | None
    ) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        if ssl_context is not None:
            httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
        return httpd

    # -- setup --------------------------------------------------------------------------------

    @property
    def namenode(self) -> str:
        """HDFS_NAMENODE for this server (all namenodes, ``;``-separated, when HA)."""
        return ";".join(f"{self.scheme}://127.0.0.1:{port}" for port in self.namenode_ports)

    def put(self, path: str, data: bytes, mtime: int | None = None) -> None:
        path = "/" + path.strip("/")
        with self._lock:
            self._next_id += 1
            stamp = mtime if mtime is not None else int(time.time() * 1000)
            self.files[path] = (data, stamp, self._next_id)
            parts = path.split("/")[1:-1]
            for depth in range(1, len(parts) + 1):
                self.dirs.add("/" + "/".join(parts[:depth]))

    def put_tree(self, root: str, files: Mapping[str, bytes]) -> None:
        for relative, data in files.items():
            self.put(f"{root.rstrip('/')}/{relative}", data)

    def mkdir(self, path: str) -> None:
        path = "/" + path.strip("/")
        with self._lock:
            parts = path.split("/")[1:]
            for depth in range(1, len(parts) + 1):
                self.dirs.add("/" + "/".join(parts[:depth]))

    def restrict(self, prefix: str, users: tuple[str, ...]) -> None:
        """Only ``users`` (doas, else user.name) may read below ``prefix``."""
        with self._lock:
            self.readers["/" + prefix.strip("/")] = frozenset(users)

    def inject(
        self,
        match: str,
        status: int = 500,
        exception: str = "IOException",
        count: int = 1,
        role: str | None = None,
    ) -> None:
        """``match`` is tested against ``"<OP> <path>"``; ``role`` is namenode or datanode."""
        with self._lock:
            self._faults.append(Fault(match, role, count, status, exception))

    def truncate(self, match: str, after: int, count: int = 1) -> None:
        """Cut the next ``count`` matching datanode bodies after ``after`` bytes."""
        with self._lock:
            self._faults.append(Fault(match, "datanode", count, 200, "", truncate_after=after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- counters -----------------------------------------------------------------------------

    def count(self, op: str | None = None, contains: str = "", role: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (r, o, p), n in self._counts.items()
                if (op is None or o == op) and contains in p and (role is None or r == role)
            )

    def requests(self) -> list[tuple[str, str, str, int]]:
        with self._lock:
            return [(r, o, p, n) for (r, o, p), n in sorted(self._counts.items())]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.users_seen.clear()
            self.reads.clear()
            self.datanode_authorization_seen = 0

    def _record(self, role: str, op: str, path: str) -> Fault | None:
        with self._lock:
            self._counts[(role, op, path)] += 1
            for fault in self._faults:
                if fault.count > 0 and fault.match in f"{op} {path}" and fault.role in (None, role):
                    fault.count -= 1
                    return fault
        return None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> WebHdfs:
        for httpd in [*self._servers, self._datanode]:
            thread = threading.Thread(target=httpd.serve_forever, name="webhdfs", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for httpd in [*self._servers, self._datanode]:
            httpd.shutdown()
            httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    # -- the filesystem -----------------------------------------------------------------------

    def _status(self, path: str, suffix: str) -> dict[str, object]:
        if path in self.files:
            data, mtime, file_id = self.files[path]
            return {
                "accessTime": mtime,
                "blockSize": 134217728,
                "childrenNum": 0,
                "fileId": file_id,
                "group": "supergroup",
                "length": len(data),
                "modificationTime": mtime,
                "owner": "hdfs",
                "pathSuffix": suffix,
                "permission": "644",
                "replication": 1,
                "storagePolicy": 0,
                "type": "FILE",
            }
        if path in self.dirs:
            children = self._children(path)
            prefix = path.rstrip("/") + "/"
            # As on HDFS, creating an entry below a directory updates its modification time.
            stamps = [m for p, (_, m, _) in self.files.items() if p.startswith(prefix)]
            return {
                "accessTime": 0,
                "blockSize": 0,
                "childrenNum": len(children),
                "fileId": int(hashlib.sha1(path.encode()).hexdigest()[:6], 16),
                "group": "supergroup",
                "length": 0,
                "modificationTime": max(stamps, default=1700000000000),
                "owner": "hdfs",
                "pathSuffix": suffix,
                "permission": "755",
                "replication": 0,
                "storagePolicy": 0,
                "type": "DIRECTORY",
            }
        raise _Remote("FileNotFoundException", f"File does not exist: {path}")

    def _children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = set()
        for candidate in [*self.files, *self.dirs]:
            if candidate.startswith(prefix) and candidate != prefix:
                names.add(candidate[len(prefix) :].split("/", 1)[0])
        return sorted(names)

    def _check_access(self, path: str, user: str) -> None:
        for prefix, users in self.readers.items():
            if (path == prefix or path.startswith(prefix + "/")) and user not in users:
                raise _Remote(
                    "AccessControlException",
                    f'Permission denied: user={user}, access=READ_EXECUTE, inode="{prefix}"',
                )

    # -- handlers -----------------------------------------------------------------------------

    def _namenode_handler(self, index: int) -> type[BaseHTTPRequestHandler]:
        server = self

        class Namenode(_Base):
            role = "namenode"
            owner = server

            def handle_op(self, op: str, path: str, query: dict[str, str]) -> None:
                if server.standby[index]:
                    raise _Remote(
                        "StandbyException",
                        "Operation category READ is not supported in state standby",
                    )
                if server.required_header is not None:
                    name, value = server.required_header
                    if self.headers.get(name) != value:
                        raise _Remote("SecurityException", "Failed to obtain user group info")
                user = query.get("doas") or query.get("user.name") or "dr.who"
                with server._lock:
                    server.users_seen.append((query.get("doas"), query.get("user.name")))
                if op == "GETHOMEDIRECTORY":
                    return self.send_json({"Path": f"/user/{user}"})
                with server._lock:
                    if server.phantom_directories:
                        path = posixpath.normpath(path)
                    server._check_access(path, user)
                    status = server._status(path, "")
                    if op == "GETFILESTATUS":
                        return self.send_json({"FileStatus": status})
                    if op == "LISTSTATUS":
                        if status["type"] == "FILE":
                            entries = [status]
                        else:
                            entries = [
                                server._status(f"{path.rstrip('/')}/{name}", name)
                                for name in server._children(path)
                            ]
                            phantom = server._status(path, "")
                            entries += [
                                {**phantom, "pathSuffix": name}
                                for name in server.phantom_directories
                            ]
                        return self.send_json({"FileStatuses": {"FileStatus": entries}})
                if op == "OPEN":
                    if status["type"] != "FILE":
                        raise _Remote("FileNotFoundException", f"Path is not a file: {path}")
                    params = {"op": "OPEN", "namenoderpcaddress": "127.0.0.1:8020"}
                    params["user.name"] = user
                    for key in ("offset", "length", "buffersize"):
                        if key in query:
                            params[key] = query[key]
                    location = (
                        f"{server.scheme}://localhost:{server.datanode_port}{PREFIX}"
                        f"{quote(path)}?{urlencode(params)}"
                    )
                    self.send_response(307)
                    self.send_header("Location", location)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                raise _Remote("IllegalArgumentException", f"Invalid value for webhdfs op: {op}")

        return Namenode

    def _datanode_handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Datanode(_Base):
            role = "datanode"
            owner = server

            def handle_op(self, op: str, path: str, query: dict[str, str]) -> None:
                if self.headers.get("Authorization"):
                    with server._lock:
                        server.datanode_authorization_seen += 1
                if op != "OPEN" or "namenoderpcaddress" not in query:
                    raise _Remote("IllegalArgumentException", "namenoderpcaddress is not set")
                with server._lock:
                    entry = server.files.get(path)
                    server.reads.append((path, query.get("offset"), query.get("length")))
                if entry is None:
                    raise _Remote("FileNotFoundException", f"File does not exist: {path}")
                data = entry[0]
                offset = int(query.get("offset", "0") or 0)
                if offset > len(data) or offset < 0:
                    raise _Remote(
                        "IOException", f"Offset={offset} out of the range [0, {len(data)})"
                    )
                end = len(data)
                if query.get("length"):
                    end = min(end, offset + int(query["length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - offset))
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                if self.truncate_after is not None:
                    end = min(end, offset + self.truncate_after)
                    self.close_connection = True
                self.wfile.write(data[offset:end])

        return Datanode


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    role = ""
    owner: WebHdfs

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet

    def handle_op(self, op: str, path: str, query: dict[str, str]) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        op = query.get("op", "").upper()
        raw = parts.path
        self.truncate_after: int | None = None
        try:
            if not raw.startswith(PREFIX):
                raise _Remote("IllegalArgumentException", "not a WebHDFS path", 404)
            path = "/" + unquote(raw[len(PREFIX) :]).strip("/")
            fault = self.owner._record(self.role, op, path)
            if fault is not None and fault.truncate_after is not None:
                self.truncate_after = fault.truncate_after
            elif fault is not None:
                raise _Remote(fault.exception, "injected fault", fault.status)
            self.handle_op(op, path, query)
        except _Remote as error:
            body = json.dumps(
                {
                    "RemoteException": {
                        "exception": error.exception,
                        "javaClassName": JAVA.get(error.exception, "java.io.IOException"),
                        "message": error.message,
                    }
                }
            ).encode()
            self.send_response(error.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass

    def send_json(self, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def start_webhdfs(namenodes: int = 1, ssl_context: ssl.SSLContext | None = None) -> WebHdfs:
    """Start a server and return once every port answers (polled, with a deadline)."""
    import http.client

    server = WebHdfs(namenodes, ssl_context).start()
    deadline = time.monotonic() + 10
    context = None
    if ssl_context is not None:
        context = ssl._create_unverified_context()
    for port in [*server.namenode_ports, server.datanode_port]:
        while True:
            try:
                if context is not None:
                    conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                        "127.0.0.1", port, timeout=1, context=context
                    )
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/ready")
                conn.getresponse().read()  # any HTTP answer means the loop is serving
                conn.close()
                break
            except OSError as exc:
                # A server requiring a client certificate refuses us: it is up all the same.
                refused = isinstance(exc, ConnectionRefusedError)
                mutual = ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED
                if mutual and not refused:
                    break
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError("webhdfs test server did not answer within 10s") from None
                threading.Event().wait(0.02)  # poll interval, not synchronisation
    return server


__all__ = ["WebHdfs", "start_webhdfs"]
