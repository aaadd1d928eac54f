"""Compatibility with the stock KServe initializer (``kserve-storage==0.21.0``), file by file.

For every (backend, layout) pair of :mod:`tests.compat_layouts`, the layout is uploaded to the
backend's real local server, then the stock initializer (``Storage.download(uri, dest)`` in its
own virtualenv) and ours (``python -m storage_initializer.entrypoint URI DEST``) run at the same
time, with the same environment, into two fresh directories. The trees are compared by relative
path, size and sha256 (our ``.storage-initializer/`` state directory aside; links followed, as a
model server would see them).

Every difference must be listed in :data:`EXPECTED` with the ids of :data:`DIFFERENCES`, which
say why (the same list is in docs/compatibility.md); an unlisted difference fails the test, and
so does a listed one that no longer happens. Set ``COMPAT_REPORT=<file>`` to append one JSON
line per case and render docs/compatibility.md's table with ``python -m tests.compat_layouts``.

How the stock initializer reaches the emulators: S3 through ``AWS_ENDPOINT_URL`` (moto), the Hub
through ``HF_ENDPOINT``, GCS through ``STORAGE_EMULATOR_HOST``; nginx and local paths directly.
For Azure Blob the stock code always builds ``https://<account>.blob.core.windows.net`` from the
URI, so both tools get ``HTTPS_PROXY`` pointing at a CONNECT proxy of this module that ends TLS
with a certificate for ``*.blob.core.windows.net`` (trusted through ``SSL_CERT_FILE``) and
forwards the plain requests to Azurite, which takes the account from the host name
("production-style" URLs). Ours ignores the proxy: ``AZURE_STORAGE_BLOB_ENDPOINT`` sends it to
Azurite directly (``NO_PROXY`` covers 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.compat_layouts import BY_NAME, LAYOUTS, Layout
from tests.helpers import NO_STOCK_REASON, STATE_DIR, clean_env, stock_python
from tests.servers.azurite import Azurite, azurite
from tests.servers.hub import HubServer, start_hub
from tests.servers.nginx import Nginx
from tests.servers.s3 import S3Server, s3_server

__all__ = ["azurite", "s3_server"]  # session fixtures used here

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0

try:  # the GCS emulator fixture, when it exists
    from tests.servers import gcs as gcs_module  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the checkout
    gcs_module = None
if gcs_module is not None and hasattr(gcs_module, "gcs_server"):  # pragma: no cover
    gcs_server = gcs_module.gcs_server  # the session fixture, visible to getfixturevalue


@pytest.fixture(scope="session")
def kpy() -> Path:
    found = stock_python()
    if found is None:
        pytest.skip(NO_STOCK_REASON)
    check = subprocess.run(
        [str(found), "-c", "import kserve_storage"], capture_output=True, text=True, timeout=60
    )
    if check.returncode != 0:
        pytest.skip(f"{found} cannot import kserve_storage: {check.stderr.strip()[-300:]}")
    return found


# -- deliberate differences -------------------------------------------------------------------

#: Every deliberate difference, by id, with the reason (mirrored in docs/compatibility.md).
DIFFERENCES: dict[str, str] = {
    "sibling-prefix": (
        "kserve#3776: the stock S3 and Azure handlers list every key starting with the prefix "
        "(`bucket.objects.filter(Prefix=path)`, `list_blobs(name_starts_with=prefix)`) and strip "
        "the prefix as a string, so `model` also pulls `model-v2/x` as `-v2/x`. We treat a prefix "
        "that does not name an object as a directory (`model/`)."
    ),
    "zero-byte": (
        "The stock S3 (`obj.size == 0`) and Azure (`blob.size > 0`) handlers skip zero-byte "
        "objects; we keep them (an empty `__init__.py` or marker file is part of a model)."
    ),
    "local-copy": (
        "For local paths and `file://` the stock initializer symlinks each top-level entry of "
        "the source into the destination (`_download_local`); we copy and verify, so the model "
        "cannot change under the server. Same bytes through the links. `/mnt/pvc` is still "
        "linked, as in KServe."
    ),
    "local-patterns": (
        "The stock `_download_local` matches allow/ignore patterns against the top-level entry "
        "name only (`_should_download(tail, ...)`, directories included), so `*.json` drops "
        "the whole `weights/` directory and `*.txt` never reaches `weights/extra/merges.txt`. "
        "We match every file's relative path, as the stock S3, GCS, Azure and Hugging Face "
        "handlers do."
    ),
    "http-content-type": (
        "The stock `_download_from_uri` refuses any response whose Content-Type is not "
        "`application/octet-stream` (or a zip/tar type for archives), so a `.json` served as "
        "`application/json` fails. We accept any non-HTML type (HTML means a login page)."
    ),
    "http-name-decoded": (
        "The stock `_download_from_uri` names the file `os.path.basename(urlparse(uri).path)` "
        "without percent-decoding, so `poids%20%C3%A9.bin` stays encoded on disk; we decode it "
        "to `poids é.bin`, the name the server published."
    ),
    "hf-subfolder": (
        "`hf://owner/model:rev/sub/dir` (a subfolder or one file of a repo) is our extension; "
        "the stock `_download_hf` requires exactly `owner/model[:revision]` and raises "
        "'Invalid Hugging Face URI format'."
    ),
    "hf-cache-dir": (
        "The stock initializer calls `snapshot_download(local_dir=dest)`, which leaves its "
        "bookkeeping in `dest/.cache/huggingface/` (locks, metadata) inside the model directory; "
        "we keep our state in `dest/.storage-initializer/` and nothing else."
    ),
}


@dataclass(frozen=True)
class Expect:
    """What the comparison of one case must show (default: identical trees)."""

    #: Ids of :data:`DIFFERENCES` that explain this case.
    differences: tuple[str, ...] = ()
    #: Relative paths (fnmatch patterns) only the stock tool writes / only ours writes.
    only_stock: frozenset[str] = frozenset()
    only_ours: frozenset[str] = frozenset()
    #: The stock tool fails; the regex its stderr must match.
    stock_fails: str | None = None
    #: The stock tree is made of symlinks into the source.
    stock_links: bool = False

    @property
    def result(self) -> str:
        if self.stock_fails:
            return "stock-fails"
        return "difference" if self.differences else "same"


def _paths(*items: str) -> frozenset[str]:
    return frozenset(items)


ZERO_BYTES = Expect(("zero-byte",), only_ours=_paths("empty.txt", "sub/also-empty"))
SIBLING = Expect(("sibling-prefix",), only_stock=_paths("-v2/config.json", "-v2/weights.bin"))
HF_CACHE = Expect(("hf-cache-dir",), only_stock=_paths(".cache/huggingface/*"))
HF_SUBFOLDER = Expect(("hf-subfolder",), stock_fails=r"Invalid Hugging Face URI format")
LOCAL = Expect(("local-copy",), stock_links=True)

#: (backend, layout) -> expectation, for every case that is not "same".
EXPECTED: dict[tuple[str, str], Expect] = {
    ("s3", "sibling-v2"): SIBLING,
    ("s3", "zero-byte"): ZERO_BYTES,
    ("azure-blob", "sibling-v2"): SIBLING,
    ("azure-blob", "single-object"): Expect(("sibling-prefix",), only_stock=_paths(".sha256")),
    ("azure-blob", "zero-byte"): ZERO_BYTES,
    ("http", "single-json"): Expect(
        ("http-content-type",), stock_fails=r"did not respond with 'Content-Type'"
    ),
    ("http", "unicode-spaces"): Expect(
        ("http-name-decoded",),
        only_stock=_paths("poids%20%C3%A9.bin"),
        only_ours=_paths("poids é.bin"),
    ),
    **{("hf", name): HF_CACHE for name in BY_NAME},
    **{("hf", name): HF_SUBFOLDER for name in ("single-object", "single-json", "sibling-v2")},
    **{
        (backend, name): LOCAL
        for backend in ("file", "path")
        for name in BY_NAME
        if name not in ("archive-tgz", "archive-zip")  # extracted, then the link is removed
    },
    **{
        (backend, name): Expect(
            ("local-copy", "local-patterns"),
            stock_links=True,
            only_ours=_paths(*only),
        )
        for backend in ("file", "path")
        for name, only in (
            ("allow-patterns", ("weights/extra/tokenizer.json", "weights/model.bin")),
        )
    },
    **{
        (backend, "ignore-patterns"): Expect(
            ("local-copy", "local-patterns"),
            stock_links=True,
            only_stock=_paths("weights/extra/merges.txt"),
        )
        for backend in ("file", "path")
    },
}


#: Differences that are bugs of ours, not decisions: the case is an expected failure (strict, so
#: it turns red once fixed, to be moved out of this table). Reported, not papered over.
#: Differences that are bugs of ours, tracked as strict expected failures until fixed. The Hub
#: single-archive extraction found by this suite is fixed (providers say whether a lone archive
#: is extracted; Hugging Face repositories never are, as in the stock initializer).
KNOWN_BUGS: dict[tuple[str, str], str] = {}


# -- backends ---------------------------------------------------------------------------------


@dataclass
class Backend:
    """Puts a layout on a server and names it with a URI; ``env`` reaches the server."""

    name: str
    place: Callable[[Layout], str]
    env: dict[str, str] = field(default_factory=dict)


#: Layouts each backend can express (HTTP serves one file per URI; the rest serve them all).
HTTP_TARGETS: dict[str, str] = {
    "single-object": "model/weights.bin",
    "single-json": "model/config.json",
    "archive-tgz": "model.tar.gz",
    "archive-zip": "model.zip",
    "unicode-spaces": "model/données/poids é.bin",
    "zero-byte": "model/empty.txt",
}
BACKENDS: dict[str, tuple[str, ...]] = {
    "s3": tuple(BY_NAME),
    "gcs": tuple(BY_NAME),
    "azure-blob": tuple(BY_NAME),
    "hf": tuple(BY_NAME),
    "http": tuple(HTTP_TARGETS),
    "file": tuple(BY_NAME),
    "path": tuple(BY_NAME),
}
CASES = [(b, name) for b, names in BACKENDS.items() for name in names]


def _s3(request: pytest.FixtureRequest) -> Backend:
    server: S3Server = request.getfixturevalue("s3_server")

    def place(layout: Layout) -> str:
        bucket = server.new_bucket(layout.files, prefix="compat")
        return f"s3://{bucket}/{layout.target}"

    return Backend("s3", place, server.env())


def _azure(request: pytest.FixtureRequest) -> Backend:
    server: Azurite = request.getfixturevalue("azurite")
    tunnel: TlsTunnel = request.getfixturevalue("blob_tunnel")

    def place(layout: Layout) -> str:
        container = server.new_container_name("compat")
        server.upload(container, layout.files)
        return server.uri(container, layout.target)

    env = {**server.env(), **tunnel.env()}
    return Backend("azure-blob", place, env)


def _hf(request: pytest.FixtureRequest) -> Backend:
    hub: HubServer = request.getfixturevalue("compat_hub")
    home = request.getfixturevalue("tmp_path") / "hf-home"

    def place(layout: Layout) -> str:
        repo_id = f"compat/{layout.name}-{uuid.uuid4().hex[:8]}"
        repo = hub.add_repo(repo_id)
        if layout.name in ("archive-tgz", "archive-zip"):
            # A repository holding one archive at its root: hf:// URIs cannot name a file.
            repo.add_commit({layout.target: layout.files[layout.target]})
            return f"hf://{repo_id}"
        if layout.target_is_file or layout.name == "sibling-v2":
            repo.add_commit(dict(layout.files))  # the URI names a part of the repo
            return f"hf://{repo_id}:main/{layout.target}"
        repo.add_commit(layout.below_target())
        return f"hf://{repo_id}"

    return Backend("hf", place, hub.env(home=str(home)))


def _http(request: pytest.FixtureRequest) -> Backend:
    server: Nginx = request.getfixturevalue("nginx")

    def place(layout: Layout) -> str:
        base = server.new_dir()
        for key, data in layout.files.items():
            server.put(f"{base}/{key}", data)
        return server.url(quote(f"{base}/{HTTP_TARGETS[layout.name]}"))

    return Backend("http", place)


def _local(scheme: str) -> Callable[[pytest.FixtureRequest], Backend]:
    def make(request: pytest.FixtureRequest) -> Backend:
        root: Path = request.getfixturevalue("tmp_path_factory").mktemp("compat-src")

        def place(layout: Layout) -> str:
            base = root / layout.name
            for key, data in layout.files.items():
                (base / key).parent.mkdir(parents=True, exist_ok=True)
                (base / key).write_bytes(data)
            return f"{scheme}{base / layout.target}"

        return Backend("file" if scheme else "path", place)

    return make


def _gcs(request: pytest.FixtureRequest) -> Backend:  # pragma: no cover - needs the fixture
    """fake-gcs-server (tests/servers/gcs.py); the stock client reaches it through
    ``STORAGE_EMULATOR_HOST``. Skips, saying why, in a checkout without the fixture."""
    if gcs_module is None:
        pytest.skip("no GCS emulator fixture (tests/servers/gcs.py) in this checkout")
    if importlib.util.find_spec("storage_initializer.providers.gcs") is None:
        pytest.skip("no GCS provider (storage_initializer/providers/gcs.py) in this checkout")
    if not hasattr(gcs_module, "gcs_server"):
        pytest.skip("tests/servers/gcs.py has no gcs_server fixture: adapt _gcs to its API")
    server = request.getfixturevalue("gcs_server")

    def place(layout: Layout) -> str:
        bucket = server.new_bucket(layout.files)
        return f"gs://{bucket}/{layout.target}"

    return Backend("gcs", place, server.env())


FACTORIES: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "s3": _s3,
    "gcs": _gcs,
    "azure-blob": _azure,
    "hf": _hf,
    "http": _http,
    "file": _local("file://"),
    "path": _local(""),
}


@pytest.fixture(scope="session")
def compat_hub() -> Iterator[HubServer]:
    server = start_hub()
    try:
        yield server
    finally:
        server.stop()


# -- a TLS-terminating CONNECT proxy in front of Azurite -----------------------------------------


class TlsTunnel:
    """Accepts ``CONNECT <account>.blob.core.windows.net:443``, answers 200, ends TLS with a
    certificate for ``*.blob.core.windows.net`` and forwards the plain bytes to Azurite."""

    def __init__(self, upstream_port: int, directory: Path) -> None:
        self.upstream_port = upstream_port
        self.ca = directory / "ca.pem"
        key = directory / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
             "-subj", "/CN=*.blob.core.windows.net", "-keyout", str(key), "-out", str(self.ca),
             "-addext", "subjectAltName=DNS:*.blob.core.windows.net",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
             "-addext", "extendedKeyUsage=serverAuth"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(self.ca, key)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-tunnel", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the TLS tunnel did not start")

    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.port}"
        return {
            "HTTPS_PROXY": proxy,
            "https_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "SSL_CERT_FILE": str(self.ca),
            "REQUESTS_CA_BUNDLE": str(self.ca),
        }

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"CONNECT "):
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await writer.start_tls(self.context)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@pytest.fixture(scope="session")
def blob_tunnel(azurite: Azurite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTunnel]:
    tunnel = TlsTunnel(azurite.port, tmp_path_factory.mktemp("tls-tunnel"))
    try:
        yield tunnel
    finally:
        tunnel.stop()


# -- running and comparing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    size: int
    sha256: str


def tree(dest: Path, *, ours: bool) -> dict[str, Entry]:
    """Relative path -> size and sha256 of every file in ``dest`` (links followed)."""
    found: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(dest, followlinks=True):
        if ours and Path(dirpath) == dest and STATE_DIR in dirnames:
            dirnames.remove(STATE_DIR)
        for name in filenames:
            full = Path(dirpath) / name
            data = full.read_bytes()
            found[full.relative_to(dest).as_posix()] = Entry(
                len(data), hashlib.sha256(data).hexdigest()
            )
    return found


def intended_tree(layout: Layout, target: str | None = None) -> dict[str, Entry]:
    """What a download of ``layout`` should give (no patterns, no archives: the cases where
    the stock tool fails and there is nothing else to compare with)."""
    target = target or layout.target
    if target in layout.files:
        files = {target.rsplit("/", 1)[-1]: layout.files[target]}
    else:
        files = layout.below_target()
    return {
        name: Entry(len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()
    }


def has_links(dest: Path) -> bool:
    return any(Path(d, n).is_symlink() for d, dirs, files in os.walk(dest) for n in dirs + files)


def _matches(path: str, patterns: frozenset[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass
class Comparison:
    only_stock: list[str]
    only_ours: list[str]
    changed: list[str]


def compare(stock: dict[str, Entry], ours: dict[str, Entry]) -> Comparison:
    return Comparison(
        sorted(set(stock) - set(ours)),
        sorted(set(ours) - set(stock)),
        sorted(p for p in set(stock) & set(ours) if stock[p] != ours[p]),
    )


def _start(argv: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:
        return subprocess.Popen(
            argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT
        )


def _wait(process: subprocess.Popen[bytes]) -> int:
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _report(line: dict[str, object]) -> None:
    target = os.environ.get("COMPAT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")


@pytest.mark.parametrize(("backend_name", "layout_name"), CASES, ids=[f"{b}-{n}" for b, n in CASES])
def test_same_tree_as_the_stock_initializer(
    backend_name: str,
    layout_name: str,
    kpy: Path,
    request: pytest.FixtureRequest,
    tmp: Path,
) -> None:
    layout = BY_NAME[layout_name]
    backend = FACTORIES[backend_name](request)
    uri = backend.place(layout)
    env = clean_env({**backend.env, **layout.env})
    stock_dest, our_dest = tmp / "stock", tmp / "ours"
    code = f"from kserve_storage import Storage; Storage.download({uri!r}, {str(stock_dest)!r})"
    stock_log, our_log = tmp / "stock.log", tmp / "ours.log"
    # Both at once: the case takes as long as the slower tool, not the sum.
    stock_proc = _start([str(kpy), "-c", code], env, stock_log)
    our_proc = _start(
        [sys.executable, "-m", "storage_initializer.entrypoint", uri, str(our_dest)], env, our_log
    )
    stock_code, our_code = _wait(stock_proc), _wait(our_proc)
    stock_out = stock_log.read_text(errors="replace")
    our_out = our_log.read_text(errors="replace")
    expect = EXPECTED.get((backend_name, layout_name), Expect())
    for ref in expect.differences:
        assert ref in DIFFERENCES, ref

    assert our_code == 0, f"ours failed on {uri}:\n{our_out[-3000:]}"
    ours = tree(our_dest, ours=True)
    line: dict[str, object] = {
        "backend": backend_name,
        "layout": layout_name,
        "uri": uri,
        "result": expect.result,
        "differences": list(expect.differences),
        "files": len(ours),
    }
    if expect.stock_fails:
        assert stock_code != 0, f"the stock initializer no longer fails on {uri}"
        assert re.search(expect.stock_fails, stock_out), stock_out[-3000:]
        line["stock_error"] = stock_out.strip().splitlines()[-1][-300:]
        # Nothing to compare with: ours must then match the layout itself.
        assert ours == intended_tree(
            layout, HTTP_TARGETS.get(layout.name) if backend_name == "http" else None
        )
        _report(line)
        return
    assert stock_code == 0, f"the stock initializer failed on {uri}:\n{stock_out[-3000:]}"
    stock = tree(stock_dest, ours=False)
    diff = compare(stock, ours)
    line.update(only_stock=diff.only_stock, only_ours=diff.only_ours, changed=diff.changed)
    unexplained = {
        "only in the stock tree": [
            p for p in diff.only_stock if not _matches(p, expect.only_stock)
        ],
        "only in ours": [p for p in diff.only_ours if not _matches(p, expect.only_ours)],
        "different content": diff.changed,
    }
    bug = KNOWN_BUGS.get((backend_name, layout_name))
    if bug is not None:
        assert any(unexplained.values()), f"fixed? remove it from KNOWN_BUGS: {bug}"
        line.update(result="bug", differences=[])
        _report(line)
        pytest.xfail(f"known bug: {bug}; {unexplained}")
    assert not any(unexplained.values()), (
        f"{backend_name}/{layout_name} ({uri}): undocumented differences {unexplained}"
    )
    for pattern_ in expect.only_stock:
        assert any(fnmatch.fnmatchcase(p, pattern_) for p in diff.only_stock), (
            f"documented difference {pattern_!r} (only in the stock tree) no longer happens"
        )
    for pattern_ in expect.only_ours:
        assert any(fnmatch.fnmatchcase(p, pattern_) for p in diff.only_ours), (
            f"documented difference {pattern_!r} (only in ours) no longer happens"
        )
    assert has_links(stock_dest) == expect.stock_links
    assert not has_links(our_dest)
    assert ours, "nothing downloaded"
    _report(line)


def test_every_expectation_names_a_case() -> None:
    cases = set(CASES)
    assert not [key for key in EXPECTED if key not in cases and key[0] != "gcs"]
    assert not [key for key in KNOWN_BUGS if key not in cases]
    assert {layout.name for layout in LAYOUTS} == set(BY_NAME)
