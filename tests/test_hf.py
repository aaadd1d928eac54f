"""The Hugging Face provider against a local Hub-compatible server (tests/servers/hub.py).

What must hold: a revision is resolved once to a commit and everything is read at that commit
(the commit is the fingerprint); LFS files announce their sha256 and it matches the bytes;
ranged reads reassemble the file; tokens reach the Hub but never the CDN nor an error message;
Hub errors become the right permanent or transient error, naming the URI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from storage_initializer import uri as uri_module
from storage_initializer.errors import (
    AccessDeniedError,
    InitializerError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import open_source
from storage_initializer.providers.base import Listing
from storage_initializer.providers.hf import HfSource, parse_hf_uri
from storage_initializer.settings import Settings
from tests.helpers import NO_STOCK_REASON, read_all, stock_download, stock_python
from tests.servers.hub import HubFile, HubServer, git_blob_oid, start_hub

REPO_ROOT = Path(__file__).resolve().parent.parent
PRIVATE_TOKEN = "hf_privateReaderToken0123456789"
PUBLIC_TOKEN = "hf_publicOnlyToken0123456789abc"
GATED_TOKEN = "hf_gatedGrantedToken0123456789"


def _blob(seed: str, size: int) -> bytes:
    """Deterministic incompressible bytes: the same model in every run, no fixtures on disk."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


V1_FILES: dict[str, bytes | HubFile] = {
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": b"# tiny\n",
    "config.json": b'{"hidden_size": 8, "version": 1}\n',
    "model.safetensors": HubFile(_blob("weights-v1", 3 * 1024 * 1024 + 123), lfs=True),
    "sub/c.txt": b"c\n",
    "sub/dir/a.bin": HubFile(_blob("a", 70_001), lfs=True),
    "sub/dir/b.txt": b"b text\n",
    "sub dir/with space.txt": b"spaces are quoted\n",
}
V2_FILES = {**V1_FILES, "config.json": b'{"hidden_size": 8, "version": 2}\n'}
DEV_FILES = {"config.json": b'{"dev": true}\n', "extra.bin": HubFile(b"x" * 1000, lfs=True)}


class Hub:
    """The session's server and the commits the tests refer to."""

    def __init__(self, server: HubServer) -> None:
        self.server = server
        tiny = server.add_repo("acme/tiny")
        self.v1 = tiny.add_commit(V1_FILES, refs=("v1",))
        self.main = tiny.add_commit(V2_FILES, refs=("main",))
        self.dev = tiny.add_commit(DEV_FILES, refs=("dev",))
        private = server.add_repo("acme/private", readers=(PRIVATE_TOKEN,))
        self.private = private.add_commit(
            {"config.json": b"{}", "w.bin": HubFile(b"w" * 5000, lfs=True)}
        )
        gated = server.add_repo("acme/gated", readers=(GATED_TOKEN,), gated=True)
        gated.add_commit({"config.json": b'{"gated": 1}'})
        data = server.add_repo("acme/data", kind="datasets")
        self.data = data.add_commit({"train.csv": b"a,b\n1,2\n"})
        server.add_token(PUBLIC_TOKEN)


@pytest.fixture(scope="session")
def hub() -> Iterator[Hub]:
    server = start_hub()
    try:
        yield Hub(server)
    finally:
        server.stop()


@pytest.fixture
def hf_env(hub: Hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Point this process at the server, with no token, not offline, a private HF_HOME."""
    env = hub.server.env(home=str(tmp_path / "hf-home"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    hub.server.clear_faults()
    return env


def source(text: str) -> HfSource:
    opened = open_source(uri_module.parse(text), Settings())
    assert isinstance(opened, HfSource)
    return opened


def contents(files: dict[str, bytes | HubFile], prefix: str = "") -> dict[str, bytes]:
    out = {}
    for path, value in files.items():
        if path.startswith(prefix):
            out[path[len(prefix) :]] = value.data if isinstance(value, HubFile) else value
    return out


def download(text: str) -> tuple[Listing, dict[str, bytes]]:
    src = source(text)
    try:
        listing = src.list()
        return listing, {f.path: read_all(src, f) for f in listing.files}
    finally:
        src.close()


# -- URI forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://acme/tiny", ("model", "acme/tiny", "main", "")),
        ("hf://acme/tiny:v1", ("model", "acme/tiny", "v1", "")),
        ("hf://acme/tiny:v1/sub/dir", ("model", "acme/tiny", "v1", "sub/dir")),
        ("hf://acme/tiny/sub/dir/", ("model", "acme/tiny", "main", "sub/dir")),
        ("hf://acme/tiny:refs%2Fpr%2F1", ("model", "acme/tiny", "refs/pr/1", "")),
        ("hf://datasets/acme/data:main", ("dataset", "acme/data", "main", "")),
    ],
)
def test_uri_forms(text: str, expected: tuple[str, str, str, str]) -> None:
    ref = parse_hf_uri(text, text)
    assert (ref.repo_type, ref.repo_id, ref.revision, ref.subpath) == expected


@pytest.mark.parametrize(
    "text", ["hf://acme", "hf://acme/", "hf:///tiny", "hf://acme/tiny:", "hf://acme/tiny/../x"]
)
def test_bad_uris_are_usage_errors(text: str) -> None:
    with pytest.raises((UsageError, InitializerError)) as caught:
        parse_hf_uri(text, text)
    assert not isinstance(caught.value, TransientError)


# -- listing and reading ------------------------------------------------------------------------


def test_listing_is_at_the_resolved_commit(hub: Hub, hf_env: dict[str, str]) -> None:
    src = source("hf://acme/tiny")
    listing = src.list()
    src.close()
    assert listing.fingerprint == hub.main
    by_path = {f.path: f for f in listing.files}
    expected = contents(V2_FILES)
    assert set(by_path) == set(expected)
    for path, data in expected.items():
        item = by_path[path]
        assert item.size == len(data), path
        assert "sha1" not in item.checksums  # the git blob id is not a sha1 of the content
        value = V2_FILES[path]
        if isinstance(value, HubFile) and value.lfs:
            assert item.checksums == {"sha256": hashlib.sha256(data).hexdigest()}
            assert item.version == item.checksums["sha256"]
        else:
            # The blob id identifies the content for reuse (store.content), under its own name.
            assert item.checksums == {"gitsha1": git_blob_oid(data)}
            assert item.version == git_blob_oid(data)


@pytest.mark.parametrize(
    ("revision", "commit_attr", "files"),
    [("v1", "v1", V1_FILES), ("dev", "dev", DEV_FILES), ("main", "main", V2_FILES)],
)
def test_revision_by_name_and_by_sha(
    hub: Hub, hf_env: dict[str, str], revision: str, commit_attr: str, files: dict
) -> None:
    commit = getattr(hub, commit_attr)
    for text in (f"hf://acme/tiny:{revision}", f"hf://acme/tiny:{commit}"):
        listing, got = download(text)
        assert listing.fingerprint == commit, text
        assert got == contents(files), text


def test_reads_use_the_commit_not_the_branch(hub: Hub, hf_env: dict[str, str]) -> None:
    """A branch that moves after list() must not change what read() returns."""
    repo = hub.server.add_repo("acme/moving")
    first = repo.add_commit({"config.json": b"first"})
    src = source("hf://acme/moving")
    listing = src.list()
    repo.add_commit({"config.json": b"second"})  # main moves on
    assert listing.fingerprint == first
    assert read_all(src, listing.files[0]) == b"first"
    src.close()


def test_lfs_sha256_matches_content_and_ranges_reassemble(hub: Hub, hf_env: dict[str, str]) -> None:
    src = source("hf://acme/tiny:v1")
    listing = src.list()
    weights = next(f for f in listing.files if f.path == "model.safetensors")
    hub.server.reset_counts()
    whole = read_all(src, weights)
    assert hashlib.sha256(whole).hexdigest() == weights.checksums["sha256"]
    assert len(whole) == weights.size
    # Odd chunk sizes cross the 1 MiB block boundary and leave a short tail.
    assert read_all(src, weights, chunk=1_000_003) == whole
    assert b"".join(src.read(weights, 5, 17)) == whole[5:17]
    assert b"".join(src.read(weights, weights.size - 3)) == whole[-3:]
    assert b"".join(src.read(weights, 10, 10)) == b""
    small = next(f for f in listing.files if f.path == "config.json")
    assert b"".join(src.read(small, 2, 9)) == b'{"hidden_size": 8, "version": 1}\n'[2:9]
    src.close()
    # LFS bytes came from the CDN via the redirect, at the commit, never at the branch; the
    # lean path asks the Hub once and reads the CDN location it gave for the other ranges.
    assert hub.server.count("GET", "/cdn/") >= 6
    resolved = hub.server.count("GET", f"/resolve/{hub.v1}/model.safetensors")
    assert resolved == (1 if src._lean is not None else hub.server.count("GET", "/cdn/"))
    assert hub.server.count("GET", "/resolve/v1/") == 0


def test_blocks_are_bounded(hub: Hub, hf_env: dict[str, str]) -> None:
    src = source("hf://acme/tiny:v1")
    weights = next(f for f in src.list().files if f.path == "model.safetensors")
    sizes = [len(block) for block in src.read(weights)]
    src.close()
    assert sum(sizes) == weights.size
    assert max(sizes) <= 1 << 20


def test_listing_follows_pagination(hub: Hub, hf_env: dict[str, str]) -> None:
    _, unpaginated = download("hf://acme/tiny:v1")
    hub.server.page_size = 2
    try:
        hub.server.reset_counts()
        listing, paginated = download("hf://acme/tiny:v1")
        pages = hub.server.count("GET", "/api/models/acme/tiny/tree/")
    finally:
        hub.server.page_size = 1000
    assert paginated == unpaginated == contents(V1_FILES)
    assert len(listing.files) == len(V1_FILES)
    assert pages >= 5  # 8 files and 3 directories in pages of 2


def test_a_listing_whose_pages_link_back_is_refused_not_followed_forever(
    hub: Hub, hf_env: dict[str, str]
) -> None:
    """A broken mirror whose last page links to the first: followed, the listing would never
    end (and its entries would fill memory)."""
    hub.server.page_size = 2
    hub.server.cycle_pages = True
    try:
        with pytest.raises(SourceError, match="leads back to a page it sent already"):
            download("hf://acme/tiny:v1")
    finally:
        hub.server.page_size = 1000
        hub.server.cycle_pages = False


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        ("hf://acme/tiny:v1/sub/dir", "sub/dir/"),
        ("hf://acme/tiny/sub", "sub/"),
        ("hf://acme/tiny:v1/sub%20dir", "sub dir/"),
    ],
)
def test_subfolder(hub: Hub, hf_env: dict[str, str], text: str, prefix: str) -> None:
    listing, got = download(text)
    assert got == contents(V1_FILES, prefix)
    assert listing.fingerprint == (hub.v1 if ":v1" in text else hub.main)


def test_subpath_naming_a_file_downloads_it_under_its_name(
    hub: Hub, hf_env: dict[str, str]
) -> None:
    listing, got = download("hf://acme/tiny:v1/sub/dir/a.bin")
    assert got == {"a.bin": V1_FILES["sub/dir/a.bin"].data}  # type: ignore[union-attr]
    assert listing.files[0].checksums["sha256"] == hashlib.sha256(got["a.bin"]).hexdigest()


def test_missing_subfolder_is_not_found(hub: Hub, hf_env: dict[str, str]) -> None:
    with pytest.raises(NotFoundError) as caught:
        source("hf://acme/tiny:v1/no/such").list()
    assert "hf://acme/tiny:v1/no/such" in str(caught.value)


def test_dataset_repos(hub: Hub, hf_env: dict[str, str]) -> None:
    listing, got = download("hf://datasets/acme/data")
    assert listing.fingerprint == hub.data
    assert got == {"train.csv": b"a,b\n1,2\n"}


# -- access and errors --------------------------------------------------------------------------


def test_private_repo_needs_the_token(
    hub: Hub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AccessDeniedError) as caught:
        source("hf://acme/private").list()
    assert "hf://acme/private" in str(caught.value)
    assert "HF_TOKEN" in caught.value.describe()

    monkeypatch.setenv("HF_TOKEN", PRIVATE_TOKEN)
    hub.server.reset_counts()
    listing, got = download("hf://acme/private")
    assert listing.fingerprint == hub.private
    assert got == {"config.json": b"{}", "w.bin": b"w" * 5000}
    # The LFS file was redirected to the CDN host, and the bearer token stayed on the Hub.
    assert hub.server.count("GET", "/cdn/") == 1
    assert hub.server.cdn_authorization_seen == 0


@pytest.mark.parametrize(
    ("token", "error"), [(PUBLIC_TOKEN, NotFoundError), ("hf_notAValidToken42", AccessDeniedError)]
)
def test_tokens_never_appear_in_errors(
    hub: Hub,
    hf_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    token: str,
    error: type[Exception],
) -> None:
    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(error) as caught:
        source("hf://acme/private").list()
    assert isinstance(caught.value, InitializerError)
    text = f"{caught.value} {caught.value.describe()} {caught.value!r}"
    assert token not in text
    assert "hf://acme/private" in text


def test_gated_repo_without_grant_is_denied(
    hub: Hub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", PUBLIC_TOKEN)
    with pytest.raises(AccessDeniedError) as caught:
        source("hf://acme/gated").list()
    assert "gated" in str(caught.value)
    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    _, got = download("hf://acme/gated")
    assert got == {"config.json": b'{"gated": 1}'}


def test_missing_repo(hub: Hub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Anonymous: the Hub answers 401 for a repo that is missing or private alike.
    with pytest.raises(AccessDeniedError) as anonymous:
        source("hf://acme/nothing").list()
    assert "does not exist" in str(anonymous.value)
    monkeypatch.setenv("HF_TOKEN", PUBLIC_TOKEN)
    with pytest.raises(NotFoundError) as caught:
        source("hf://acme/nothing:main").list()
    assert "hf://acme/nothing:main" in str(caught.value)


def test_missing_revision(hub: Hub, hf_env: dict[str, str]) -> None:
    with pytest.raises(NotFoundError) as caught:
        source("hf://acme/tiny:no-such-branch").list()
    assert "hf://acme/tiny:no-such-branch" in str(caught.value)
    assert "no-such-branch" in str(caught.value).split(":", 2)[-1]


def test_server_errors_on_read_are_transient_with_retry_after(
    hub: Hub, hf_env: dict[str, str]
) -> None:
    src = source("hf://acme/tiny:v1")
    listing = src.list()
    config = next(f for f in listing.files if f.path == "config.json")
    hub.server.inject("/resolve/", 503, headers={"Retry-After": "7"})
    with pytest.raises(TransientError) as caught:
        b"".join(src.read(config))
    assert caught.value.retry_after == 7
    hub.server.inject("/cdn/", 429)
    weights = next(f for f in listing.files if f.path == "model.safetensors")
    with pytest.raises(TransientError):
        b"".join(src.read(weights, 0, 10))
    assert b"".join(src.read(config)) == contents(V1_FILES)["config.json"]  # then it recovers
    src.close()


@pytest.mark.parametrize("ranged", [False, True])
def test_short_body_is_transient(hub: Hub, hf_env: dict[str, str], ranged: bool) -> None:
    src = source("hf://acme/tiny:v1")
    weights = next(f for f in src.list().files if f.path == "model.safetensors")
    assert weights.size is not None
    hub.server.truncate("/cdn/", after=100_000)
    with pytest.raises(TransientError) as caught:
        b"".join(src.read(weights, 0, weights.size) if ranged else src.read(weights))
    assert "hf://acme/tiny:v1" in str(caught.value)
    src.close()


# -- the lean read (providers/hf_lean.py) ---------------------------------------------------------


def test_file_reads_take_the_lean_path_and_the_token_stays_on_the_hub(
    hub: Hub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", PRIVATE_TOKEN)
    src = source("hf://acme/private")
    try:
        files = {f.path: f for f in src.list().files}
        assert src._lean is not None, "the lean path is not in use"

        def refused() -> None:
            raise AssertionError("a file read went through requests")

        monkeypatch.setattr(src, "_session", refused)
        hub.server.reset_counts()
        # The private repo answers only with the token: the Hub got it. The LFS file is a
        # redirect to the CDN host, which must not get it.
        assert read_all(src, files["config.json"]) == b"{}"
        assert read_all(src, files["w.bin"], 100, 4000) == b"w" * 3900
        assert read_all(src, files["w.bin"]) == b"w" * 5000
        assert hub.server.count("GET", "/cdn/") == 2
        assert hub.server.cdn_authorization_seen == 0
    finally:
        src.close()


def test_a_file_s_ranges_ask_the_hub_once_then_go_to_the_cdn(
    hub: Hub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks of one LFS file: one ``resolve`` at the Hub, then the CDN location it gave;
    a location the CDN refuses (an expired signature) is resolved again, and the bytes are
    right either way."""
    monkeypatch.setenv("HF_TOKEN", PRIVATE_TOKEN)
    src = source("hf://acme/private")
    try:
        weights = {f.path: f for f in src.list().files}["w.bin"]
        assert src._lean is not None, "the lean path is not in use"
        hub.server.reset_counts()
        for start in range(0, 5000, 1000):
            assert read_all(src, weights, start, start + 1000) == b"w" * 1000
        assert hub.server.count("GET", "/resolve/") == 1
        assert hub.server.count("GET", "/cdn/") == 5
        hub.server.inject("/cdn/", 403)  # the signed URL expired
        assert read_all(src, weights, 1000, 4000) == b"w" * 3000
        assert hub.server.count("GET", "/resolve/") == 2
        assert hub.server.count("GET", "/cdn/") == 7  # the refused one, then the new location
        assert hub.server.cdn_authorization_seen == 0
    finally:
        src.close()


def test_the_lean_read_is_off_by_switch_or_behind_a_proxy(
    hub: Hub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert source("hf://acme/tiny")._lean is not None
    monkeypatch.setenv("STORAGE_INITIALIZER_HF_LEAN", "false")
    assert source("hf://acme/tiny")._lean is None
    monkeypatch.delenv("STORAGE_INITIALIZER_HF_LEAN")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "")
    assert source("hf://acme/tiny")._lean is None
    # And the requests path still reads (switched off, no proxy).
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("STORAGE_INITIALIZER_HF_LEAN", "false")
    _listing, got = download("hf://acme/tiny:v1")
    assert got == contents(V1_FILES)


def test_listing_retries_transient_hub_errors(hub: Hub, hf_env: dict[str, str]) -> None:
    hub.server.inject("/revision/", 429, headers={"Retry-After": "0"})
    hub.server.inject("/tree/", 502, headers={"Retry-After": "0"})
    hub.server.reset_counts()
    listing = source("hf://acme/tiny:v1").list()
    assert listing.fingerprint == hub.v1
    assert hub.server.count("GET", "/revision/") == 2
    assert hub.server.count("GET", "/tree/") == 2


def test_unreachable_endpoint_is_transient(
    hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr("storage_initializer.providers.hf.METADATA_ATTEMPTS", 1)
    with pytest.raises(TransientError) as caught:
        source("hf://acme/tiny").list()
    text = caught.value.describe()
    assert "hf://acme/tiny" in text
    assert f"cannot connect to the Hub at http://127.0.0.1:{port} (connection refused)" in text
    assert "gave up after 1 attempt" in text and "Check HF_ENDPOINT" in text, text


# -- environment --------------------------------------------------------------------------------


def _run(code: str, env: Mapping[str, str | None]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; ``None`` in ``env`` unsets a variable."""
    merged = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}
    full = {name: value for name, value in merged.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60
    )


def test_env_set_before_the_process_starts(hub: Hub, hf_env: dict[str, str]) -> None:
    """HF_ENDPOINT is read by huggingface_hub at import: a fresh process must use it."""
    code = (
        "import huggingface_hub\n"  # imported first, as a user's sitecustomize might
        "from storage_initializer import uri\n"
        "from storage_initializer.providers import open_source\n"
        "from storage_initializer.settings import Settings\n"
        "s = open_source(uri.parse('hf://acme/tiny:v1'), Settings())\n"
        "print(s.list().fingerprint)\n"
    )
    result = _run(code, hf_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hub.v1


def test_token_file_of_hf_home_is_used(hub: Hub, hf_env: dict[str, str], tmp_path: Path) -> None:
    """Without HF_TOKEN, huggingface_hub's token file (`hf auth login`) is used, unless
    HF_HUB_DISABLE_IMPLICIT_TOKEN forbids it."""
    home = tmp_path / "login-home"
    home.mkdir()
    (home / "token").write_text(PRIVATE_TOKEN + "\n")
    env: dict[str, str | None] = {**hf_env, "HF_HOME": str(home)}
    env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = None
    code = (
        "from storage_initializer import uri\n"
        "from storage_initializer.providers import open_source\n"
        "from storage_initializer.settings import Settings\n"
        "print(open_source(uri.parse('hf://acme/private'), Settings()).list().fingerprint)\n"
    )
    allowed = _run(code, env)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == hub.private
    refused = _run(code, {**env, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"})
    assert refused.returncode != 0
    assert "AccessDeniedError" in refused.stderr
    assert PRIVATE_TOKEN not in refused.stderr


def test_hf_home_moves_to_tmp_when_home_is_not_writable(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "missing-home"), "TMPDIR": str(tmp_path)}
    code = (
        "import os, storage_initializer.providers.hf\n"
        "from huggingface_hub import constants\n"
        "print(os.environ['HF_HOME']); print(constants.HF_HOME)\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "XDG_CACHE_HOME")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split()
    assert first == second == str(tmp_path / "storage-initializer-hf-home")


def test_offline_serves_from_the_huggingface_cache(
    hub: Hub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HF_HUB_OFFLINE=1: no request at all, the model comes from huggingface_hub's cache."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hub-cache"
    snapshot_download("acme/tiny", revision="v1", cache_dir=cache, endpoint=hub.server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.server.reset_counts()
    listing, got = download("hf://acme/tiny:v1")
    assert hub.server.requests() == []
    assert listing.fingerprint == hub.v1
    assert got == contents(V1_FILES)
    weights = next(f for f in listing.files if f.path == "model.safetensors")
    assert weights.checksums["sha256"] == hashlib.sha256(got["model.safetensors"]).hexdigest()
    with pytest.raises(InitializerError) as caught:
        source("hf://acme/tiny:dev").list()
    assert "HF_HUB_OFFLINE" in str(caught.value)


# -- the server speaks the protocol huggingface_hub parses ---------------------------------------


def test_huggingface_hub_parses_the_test_server(hub: Hub, hf_env: dict[str, str]) -> None:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    api = HfApi(endpoint=hub.server.url, token=False)
    assert api.model_info("acme/tiny", revision="v1").sha == hub.v1
    assert api.model_info("acme/tiny").sha == hub.main
    paths = {f.path for f in api.list_repo_tree("acme/tiny", revision=hub.v1, recursive=True)}
    assert paths == set(V1_FILES) | {"sub", "sub/dir", "sub dir"}
    url = hf_hub_url("acme/tiny", "model.safetensors", revision="v1", endpoint=hub.server.url)
    meta = get_hf_file_metadata(url, token=False)
    weights = V1_FILES["model.safetensors"]
    assert isinstance(weights, HubFile)
    assert meta.etag == weights.sha256
    assert meta.size == len(weights.data)
    assert meta.commit_hash == hub.v1


# -- whole pulls through the CLI (once the lead's pipeline exists) ------------------------------

HAVE_PULL = all(
    importlib.util.find_spec(name) is not None
    for name in ("storage_initializer.pull", "storage_initializer.cli")
)
needs_pull = pytest.mark.skipif(not HAVE_PULL, reason="pull.py/cli.py not written yet")


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and not any(
            part.startswith(".") and part != ".gitattributes" for part in p.relative_to(root).parts
        )
    }


@needs_pull
def test_cli_pull(hub: Hub, hf_env: dict[str, str], tmp_path: Path) -> None:
    dest = tmp_path / "model"
    command = [sys.executable, "-m", "storage_initializer", "pull", "hf://acme/tiny:v1", str(dest)]
    env = {**os.environ, **hf_env, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _tree(dest) == contents(V1_FILES)
    # A replica that finds the model complete asks the Hub nothing.
    hub.server.reset_counts()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert hub.server.requests() == []


@needs_pull
def test_cli_pull_resumes_a_cut_download(hub: Hub, hf_env: dict[str, str], tmp_path: Path) -> None:
    """A body cut short is retried from the last byte received, with a Range request."""
    dest = tmp_path / "model"
    hub.server.reset_counts()
    weights = V1_FILES["model.safetensors"]
    assert isinstance(weights, HubFile)
    hub.server.truncate(f"/cdn/{weights.sha256}", after=1_500_000)
    result = subprocess.run(
        [sys.executable, "-m", "storage_initializer", "pull", "hf://acme/tiny:v1", str(dest)],
        env={**os.environ, **hf_env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert _tree(dest) == contents(V1_FILES)
    resumed = [r for path, r in hub.server.ranges if path == f"/cdn/{weights.sha256}"]
    assert any(not r.startswith("bytes=0-") for r in resumed), resumed


@needs_pull
def test_eight_processes_download_once(hub: Hub, hf_env: dict[str, str], tmp_path: Path) -> None:
    dest = tmp_path / "shared"
    env = {**os.environ, **hf_env, "PYTHONPATH": str(REPO_ROOT)}
    hub.server.reset_counts()
    command = [sys.executable, "-m", "storage_initializer", "pull", "hf://acme/tiny:v1", str(dest)]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(8)
    ]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    assert _tree(dest) == contents(V1_FILES)
    for path in V1_FILES:
        from urllib.parse import quote

        assert hub.server.count("GET", f"/resolve/{hub.v1}/{quote(path)}") == 1, path


# -- compatibility with the stock KServe initializer ---------------------------------------------


@pytest.mark.skipif(stock_python() is None, reason=NO_STOCK_REASON)
def test_stock_initializer_downloads_the_same_tree(
    hub: Hub, hf_env: dict[str, str], tmp_path: Path
) -> None:
    """The stock initializer works against the test server and yields the tree we list."""
    dest = tmp_path / "stock"
    result = stock_download("hf://acme/tiny:v1", dest, {**os.environ, **hf_env}, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    stock = _tree(dest)
    _, ours = download("hf://acme/tiny:v1")
    assert stock == ours
    # A documented difference: snapshot_download leaves its bookkeeping (locks, metadata, tree
    # cache) in <dest>/.cache/huggingface, which a model server then sees in its model directory.
    assert (dest / ".cache" / "huggingface").is_dir()
