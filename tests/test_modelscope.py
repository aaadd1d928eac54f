"""modelscope:// against a protocol-faithful ModelScope Hub test server (servers/modelscope_hub.py).

ModelScope publishes no server, so the Hub is ours, answering the ``/api/v1`` requests that
``modelscope_hub`` (the stock initializer's client) sends; the stock initializer is pointed at it
too. What must hold: the revision is checked and its commit is the fingerprint; every file has
its size and sha256; ranged reads reassemble, through the redirect to object storage; the token
reaches the Hub, never the storage host nor a message; Hub errors become the right errors; the
pipeline's allow/ignore patterns select files; eight processes download each file once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
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
from storage_initializer.providers import modelscope, open_source
from storage_initializer.providers.modelscope import (
    ModelScopeSource,
    configured_endpoint,
    parse_modelscope_uri,
)
from storage_initializer.settings import Settings
from tests.helpers import (
    clean_env,
    cli_argv,
    pattern,
    read_all,
    run,
    start_all,
    tar_bytes,
    wait_all,
)
from tests.servers.modelscope_hub import ModelScopeHub, MsFile, start_modelscope_hub

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ms-privateReaderToken-0123456789abcdef"
OTHER_TOKEN = "ms-otherAccountToken-0123456789abcdef"
V1 = {
    "configuration.json": b'{"framework": "pytorch"}\n',
    "config.json": b'{"hidden_size": 8}\n',
    "model.safetensors": MsFile(pattern(2_300_007, 3), lfs=True),
    "tokenizer/vocab.txt": b"a\nb\nc\n",
    "onnx/model.onnx": MsFile(pattern(80_001, 4), lfs=True),
    "中文/说明.md": "模型\n".encode(),
}
ARCHIVE = tar_bytes({"inner.txt": b"inside"}, "w:gz")
MASTER = {**V1, "config.json": b'{"hidden_size": 16}\n'}


def contents(files: dict[str, bytes | MsFile]) -> dict[str, bytes]:
    return {p: v.data if isinstance(v, MsFile) else v for p, v in files.items()}


class Hub:
    def __init__(self, server: ModelScopeHub) -> None:
        self.server = server
        tiny = server.add_repo("acme/tiny")
        self.v1 = tiny.add_commit(V1, branches=(), tags=("v1.0",))
        self.master = tiny.add_commit(MASTER, branches=("master",))
        private = server.add_repo("acme/private", readers=(TOKEN,))
        self.private = private.add_commit(
            {"config.json": b"{}", "w.bin": MsFile(b"w" * 5000, True)}
        )
        server.add_token(OTHER_TOKEN)
        server.add_repo("acme/archive").add_commit({"model.tar.gz": ARCHIVE})


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    server = start_modelscope_hub()
    try:
        yield Hub(server)
    finally:
        server.stop()


@pytest.fixture
def ms_env(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("MODELSCOPE_API_TOKEN", "MODELSCOPE_DOMAIN", "MODELSCOPE_PREFER_AI_SITE"):
        monkeypatch.delenv(name, raising=False)
    env = hub.server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    hub.server.clear_faults()
    return env


def source(text: str) -> ModelScopeSource:
    opened = open_source(uri_module.parse(text), Settings())
    assert isinstance(opened, ModelScopeSource)
    return opened


def download(text: str) -> dict[str, bytes]:
    src = source(text)
    try:
        return {f.path: read_all(src, f) for f in src.list().files}
    finally:
        src.close()


# -- URIs and configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("modelscope://acme/tiny", ("acme/tiny", "master")),
        ("modelscope://acme/tiny:v1.0", ("acme/tiny", "v1.0")),
        (
            "modelscope://Qwen/Qwen2.5-0.5B-Instruct:master",
            ("Qwen/Qwen2.5-0.5B-Instruct", "master"),
        ),
    ],
)
def test_uri_forms(text: str, expected: tuple[str, str]) -> None:
    ref = parse_modelscope_uri(text, text)
    assert (ref.repo_id, ref.revision) == expected


@pytest.mark.parametrize(
    "text",
    [
        "modelscope://acme",
        "modelscope://acme/",
        "modelscope://acme/tiny/sub",
        "modelscope://acme/tiny:",
    ],
)
def test_bad_uris_are_usage_errors(text: str) -> None:
    """Exactly owner/model[:revision], as the stock checks (two components)."""
    with pytest.raises(UsageError):
        parse_modelscope_uri(text, text)


def test_endpoint_variables() -> None:
    assert configured_endpoint({}) is None
    assert configured_endpoint({"MODELSCOPE_DOMAIN": "ms.example.com/"}) == "https://ms.example.com"
    both = {"MODELSCOPE_DOMAIN": "a.example", "MODELSCOPE_ENDPOINT": "http://b.example:8080/"}
    assert configured_endpoint(both) == "http://b.example:8080"


def test_default_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "MODELSCOPE_PREFER_AI_SITE"):
        monkeypatch.delenv(name, raising=False)
    assert source("modelscope://acme/tiny").endpoints == [
        "https://modelscope.cn",
        "https://www.modelscope.ai",
    ]
    monkeypatch.setenv("MODELSCOPE_PREFER_AI_SITE", "true")
    assert source("modelscope://acme/tiny").endpoints[0] == "https://www.modelscope.ai"


# -- listing and reading ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("revision", "attr", "files"), [("", "master", MASTER), (":v1.0", "v1", V1)]
)
def test_listing_sizes_sha256_and_commit(
    hub: Hub, ms_env: dict, revision: str, attr: str, files: dict
) -> None:
    src = source(f"modelscope://acme/tiny{revision}")
    listing = src.list()
    src.close()
    assert listing.fingerprint == getattr(hub, attr)
    expected = contents(files)
    by_path = {f.path: f for f in listing.files}
    assert set(by_path) == set(expected)
    for path, data in expected.items():
        assert by_path[path].size == len(data)
        assert by_path[path].checksums == {"sha256": hashlib.sha256(data).hexdigest()}
    assert download(f"modelscope://acme/tiny{revision}") == expected


def test_ranges_reassemble_through_the_storage_redirect(hub: Hub, ms_env: dict) -> None:
    src = source("modelscope://acme/tiny:v1.0")
    weights = next(f for f in src.list().files if f.path == "model.safetensors")
    data = contents(V1)["model.safetensors"]
    hub.server.reset_counts()
    assert read_all(src, weights) == data
    assert read_all(src, weights, chunk=1_000_003) == data
    assert b"".join(src.read(weights, 5, 17)) == data[5:17]
    assert b"".join(src.read(weights, len(data) - 3)) == data[-3:]
    assert max(len(b) for b in src.read(weights)) <= 1 << 20
    small = next(f for f in src.list().files if f.path == "config.json")
    assert b"".join(src.read(small, 2, 9)) == V1["config.json"][2:9]  # type: ignore[index]
    src.close()
    assert hub.server.count("GET", "/oss/") >= 6
    # Ranges reached the storage host, not only the Hub.
    assert any(key.startswith("/oss/") for key, _ in hub.server.ranges)


DEEP = {"a/1.txt": b"a1", "a/2.txt": b"a2", "b/1.txt": b"b1", "b/2.txt": b"b2", "c/x/1.txt": b"x"}


@pytest.fixture
def truncating_hub(hub: Hub, ms_env: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    """The Hub cuts listings at 5 entries, as the real one does at 3000: acme/deep's recursive
    listing (4 directories, 5 files) is cut, so the model is walked directory by directory."""
    hub.server.add_repo("acme/deep").add_commit(DEEP, branches=("master",))
    monkeypatch.setattr(modelscope, "TRUNCATION_LIMIT", 5)
    hub.server.list_limit = 5
    try:
        yield hub
    finally:
        hub.server.list_limit = None
        hub.server.phantom_trees = []


def test_a_truncated_listing_is_walked_directory_by_directory(truncating_hub: Hub) -> None:
    assert download("modelscope://acme/deep") == DEEP


@pytest.mark.parametrize("phantom", ["a", ".", "a/..", "", "a/b/../.."])
def test_a_walk_that_would_never_end_is_refused(truncating_hub: Hub, phantom: str) -> None:
    """A listing that names a directory already walked ("a" in the listing of "a"), the
    directory itself or one above it: followed, the walk would never end."""
    truncating_hub.server.phantom_trees = [phantom]
    with pytest.raises(SourceError, match="not a new directory below it") as caught:
        source("modelscope://acme/deep").list()
    assert "MODELSCOPE_ENDPOINT" in caught.value.describe()


def test_missing_revision_lists_the_valid_ones(hub: Hub, ms_env: dict) -> None:
    with pytest.raises(NotFoundError) as caught:
        source("modelscope://acme/tiny:v9").list()
    assert "v9" in str(caught.value)
    assert "master" in caught.value.describe() and "v1.0" in caught.value.describe()


def test_missing_model(hub: Hub, ms_env: dict) -> None:
    with pytest.raises(NotFoundError) as caught:
        source("modelscope://acme/nothing").list()
    assert "modelscope://acme/nothing" in str(caught.value)


def test_private_model_needs_the_token(
    hub: Hub, ms_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AccessDeniedError) as anonymous:
        source("modelscope://acme/private").list()
    assert "MODELSCOPE_API_TOKEN" in anonymous.value.describe()
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", TOKEN)
    hub.server.reset_counts()
    assert download("modelscope://acme/private") == {"config.json": b"{}", "w.bin": b"w" * 5000}
    assert hub.server.count("GET", "/oss/") == 1
    assert hub.server.oss_credentials_seen == 0  # the token stays on the Hub


@pytest.mark.parametrize("token", [OTHER_TOKEN, "ms-notAValidToken-0123456789"])
def test_tokens_never_appear_in_errors(
    hub: Hub, ms_env: dict, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", token)
    with pytest.raises(AccessDeniedError) as caught:
        source("modelscope://acme/private").list()
    text = f"{caught.value} {caught.value.describe()} {caught.value!r}"
    assert token not in text
    assert "modelscope://acme/private" in text


def test_transient_errors(hub: Hub, ms_env: dict) -> None:
    hub.server.inject("/revisions", 503, headers={"Retry-After": "0"})
    hub.server.inject("/repo/files", 429, headers={"Retry-After": "0"})
    hub.server.reset_counts()
    src = source("modelscope://acme/tiny:v1.0")
    listing = src.list()
    assert hub.server.count("GET", "/revisions") == 2
    config = next(f for f in listing.files if f.path == "config.json")
    hub.server.inject("FilePath=config.json", 502, headers={"Retry-After": "4"})
    with pytest.raises(TransientError) as caught:
        b"".join(src.read(config))
    assert caught.value.retry_after == 4
    weights = next(f for f in listing.files if f.path == "model.safetensors")
    hub.server.truncate("/oss/", after=100_000)
    with pytest.raises(TransientError):
        b"".join(src.read(weights))
    assert b"".join(src.read(config)) == V1["config.json"]
    src.close()


def test_unreachable_endpoint_is_transient(ms_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr("storage_initializer.providers.modelscope.METADATA_ATTEMPTS", 1)
    with pytest.raises(TransientError):
        source("modelscope://acme/tiny").list()


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "storage_initializer.providers.modelscope", None)
    with pytest.raises(UsageError) as caught:
        open_source(uri_module.parse("modelscope://acme/tiny"), Settings())
    assert "storage-initializer[modelscope]" in caught.value.describe()


# -- whole pulls --------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_cli_pull_with_patterns_and_token(hub: Hub, ms_env: dict, tmp_path: Path) -> None:
    env = clean_env(ms_env, MODELSCOPE_API_TOKEN=TOKEN)
    dest = tmp_path / "all"
    result = run(cli_argv("pull", "modelscope://acme/tiny:v1.0", dest), env)
    assert result.returncode == 0, result.describe()
    assert _tree(dest) == contents(V1)
    filtered = run(
        cli_argv("pull", "modelscope://acme/tiny:v1.0", tmp_path / "f"),
        {**env, "STORAGE_ALLOW_PATTERNS": '["*.json", "tokenizer/*"]',
         "STORAGE_IGNORE_PATTERNS": "configuration.json"},
    )  # fmt: skip
    assert filtered.returncode == 0, filtered.describe()
    assert set(_tree(tmp_path / "f")) == {"config.json", "tokenizer/vocab.txt"}
    failed = run(cli_argv("pull", "modelscope://acme/private:v2", tmp_path / "p"), env)
    assert failed.returncode != 0
    assert "modelscope://acme/private" in failed.last_line
    assert TOKEN not in failed.output + result.output + filtered.output


def test_a_lone_archive_is_kept_as_the_stock_keeps_it(
    hub: Hub, ms_env: dict, tmp_path: Path
) -> None:
    result = run(cli_argv("pull", "modelscope://acme/archive", tmp_path / "a"), clean_env(ms_env))
    assert result.returncode == 0, result.describe()
    assert _tree(tmp_path / "a") == {"model.tar.gz": ARCHIVE}


def test_eight_processes_download_each_file_once(hub: Hub, ms_env: dict, tmp_path: Path) -> None:
    dest = tmp_path / "shared"
    env = clean_env(ms_env)
    hub.server.reset_counts()
    argv = cli_argv("pull", "--log-format", "json", "modelscope://acme/tiny:v1.0", dest)
    runs = wait_all(start_all([argv] * 8, env, tmp_path / "logs"), timeout=180)
    for result in runs:
        assert result.returncode == 0, result.describe()
    assert _tree(dest) == contents(V1)
    for path in V1:
        assert hub.server.count("GET", f"repo?FilePath={path}") == 1, (path, hub.server.requests())


# -- the stock initializer against the same server ----------------------------------------------


def _stock_python() -> str | None:
    for candidate in (
        os.environ.get("KSERVE_STORAGE_PYTHON", ""),
        str(REPO_ROOT / ".work" / "kserve-venv" / "bin" / "python"),
        "/opt/kserve-venv/bin/python",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.skipif(_stock_python() is None, reason="no stock initializer (kserve-storage)")
def test_stock_initializer_downloads_the_same_tree(hub: Hub, ms_env: dict, tmp_path: Path) -> None:
    stock = str(_stock_python())
    probe = subprocess.run([stock, "-c", "import modelscope_hub"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("modelscope-hub is not installed beside the stock initializer")
    dest = tmp_path / "stock"
    code = (
        "from kserve_storage import Storage; "
        f"Storage.download('modelscope://acme/tiny:v1.0', {str(dest)!r})"
    )
    env = {**os.environ, **ms_env, "HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [stock, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tree(dest) == download("modelscope://acme/tiny:v1.0") == contents(V1)


def test_error_type_is_initializer_error(hub: Hub, ms_env: dict) -> None:
    with pytest.raises(InitializerError):
        source("modelscope://acme/nothing:v1").list()
