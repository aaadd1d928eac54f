"""oci:// sources against the real registry (Debian ``docker-registry``, CNCF distribution
2.8): anonymous over plain HTTP (``KSERVE_OCI_INSECURE_REGISTRY``), htpasswd basic auth, and
bearer-token auth with a token service from tests/servers/registry.py. Images are pushed in the
fixture through the registry's v2 API.

What is proved: only ``models/`` is kept, layers overlay in order with whiteouts, links become
copies, the manifest digest is the fingerprint, platform selection from an index, refusals
(zstd, unsafe links, no models/), credentials right/wrong/missing and never printed, a tampered
blob is caught, end-to-end through the CLI, eight replicas fetch each blob once, and the stock
initializer gets the same tree from the same registry.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from storage_initializer.errors import (
    AccessDeniedError,
    IntegrityError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.paths import UnsafePathError
from storage_initializer.providers import open_source
from storage_initializer.providers.oci import detect_goarch, parse_reference
from storage_initializer.settings import Settings
from storage_initializer.uri import parse
from tests.helpers import (
    NO_STOCK_REASON,
    clean_env,
    cli,
    cli_argv,
    marker_path,
    start_all,
    stock_download,
    stock_python,
    tree_digest,
    wait_all,
)
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_TAR_GZ,
    TAR,
    TAR_GZ,
    Registry,
    htpasswd_registry,
    registry,
    tar_layer,
    token_registry,
)

__all__ = ["htpasswd_registry", "registry", "token_registry"]

ARCH = detect_goarch()
OTHER_ARCH = "arm64" if ARCH != "arm64" else "amd64"


@pytest.fixture(autouse=True)
def _oci_env(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.setenv("KSERVE_OCI_INSECURE_REGISTRY", "true")
    monkeypatch.setenv("KSERVE_OCI_DOCKER_CONFIG", str(tmp / "no-such-config.json"))
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)


def unique_repo() -> str:
    return f"models/m-{secrets.token_hex(4)}"


def fetch(uri: str) -> tuple[str, dict[str, bytes]]:
    source = open_source(parse(uri), Settings())
    try:
        found = source.list()
        files = {f.path: b"".join(source.read(f)) for f in found.files}
        for f in found.files:
            assert f.size == len(files[f.path]) and f.checksums["sha256"]
        return found.fingerprint, files
    finally:
        source.close()


def modelcar(salt: str) -> list[tuple[bytes, str]]:
    """A modelcar-like image: a base layer outside models/, then two model layers."""
    base = tar_layer({"etc/os-release": b"ID=test\n", "usr/bin/tool": b"\x7fELF" + salt.encode()})
    first = tar_layer(
        {
            "models/config.json": b'{"v": 1}',
            "models/weights/a.bin": b"A" * 5000 + salt.encode(),
            "models/old.bin": b"old" + salt.encode(),
            "models/dir/gone.txt": b"gone",
        },
        dirs=("models", "models/weights", "models/dir"),
    )
    second = tar_layer(
        {
            "./models/config.json": b'{"v": 2}',
            "models/.wh.old.bin": b"",
            "models/dir/.wh..wh..opq": b"",
            "models/dir/new.txt": b"new",
        },
        compress=False,
        symlinks={"models/latest.bin": "weights/a.bin", "models/current": "weights"},
        hardlinks={"models/hard.bin": "models/weights/a.bin"},
    )
    return [(base, DOCKER_TAR_GZ), (first, TAR_GZ), (second, TAR)]


EXPECTED = {
    "config.json": b'{"v": 2}',
    "weights/a.bin": b"A" * 5000,
    "dir/new.txt": b"new",
    "latest.bin": b"A" * 5000,
    "current/a.bin": b"A" * 5000,
    "hard.bin": b"A" * 5000,
}


def expected(salt: str) -> dict[str, bytes]:
    return {k: v + salt.encode() if v.startswith(b"AAAA") else v for k, v in EXPECTED.items()}


# -- layout --------------------------------------------------------------------------------------


def test_models_dir_layers_whiteouts_and_links(registry: Registry) -> None:
    repo, salt = unique_repo(), secrets.token_hex(4)
    digest = registry.push_image(repo, "v1", modelcar(salt))
    fingerprint, files = fetch(f"oci://{registry.host}/{repo}:v1")
    assert fingerprint == digest
    assert files == expected(salt)
    assert fetch(f"oci://{registry.host}/{repo}@{digest}") == (digest, expected(salt))


def test_docker_media_types_and_default_tag(registry: Registry) -> None:
    repo = unique_repo()
    layer = tar_layer({"models/m.bin": b"docker"})
    digest = registry.push_image(
        repo, "latest", [(layer, DOCKER_TAR_GZ)], media_type=DOCKER_MANIFEST
    )
    assert fetch(f"oci://{registry.host}/{repo}") == (digest, {"m.bin": b"docker"})


@pytest.mark.parametrize("index_type", ["oci", "docker"])
def test_index_picks_this_machines_platform(registry: Registry, index_type: str) -> None:
    repo = unique_repo()
    media = DOCKER_MANIFEST if index_type == "docker" else None
    kwargs = {"media_type": media} if media else {}
    layer_type = DOCKER_TAR_GZ if media else TAR_GZ
    ours = registry.push_image(
        repo, "ours", [(tar_layer({"models/arch.txt": ARCH.encode()}), layer_type)], **kwargs
    )
    other = registry.push_image(
        repo, "other", [(tar_layer({"models/arch.txt": b"other"}), layer_type)], **kwargs
    )
    index_kwargs = {"media_type": DOCKER_LIST} if media else {}
    registry.push_index(
        repo,
        "multi",
        {f"linux/{OTHER_ARCH}": other, f"linux/{ARCH}": ours},
        **index_kwargs,
    )
    assert fetch(f"oci://{registry.host}/{repo}:multi") == (ours, {"arch.txt": ARCH.encode()})
    registry.push_index(repo, "foreign", {f"linux/{OTHER_ARCH}": other, f"windows/{ARCH}": ours})
    with pytest.raises(NotFoundError, match=f"no manifest for linux/{ARCH}") as caught:
        fetch(f"oci://{registry.host}/{repo}:foreign")
    assert f"linux/{OTHER_ARCH}" in caught.value.describe()


def test_refusals(registry: Registry, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    repo = unique_repo()
    registry.push_image(
        repo, "zstd", [(b"not really zstd", "application/vnd.oci.image.layer.v1.tar+zstd")]
    )
    with pytest.raises(UsageError, match="zstd"):
        fetch(f"oci://{registry.host}/{repo}:zstd")
    registry.push_image(
        repo,
        "nomodels",
        [(tar_layer({"app/main.py": b"x"}), TAR_GZ), (b"plain file", "application/octet-stream")],
    )
    with pytest.raises(NotFoundError, match=r"no files under /models/.*'app'"):
        fetch(f"oci://{registry.host}/{repo}:nomodels")
    registry.push_image(
        repo, "escape", [(tar_layer({}, symlinks={"models/x": "../etc/passwd"}), TAR_GZ)]
    )
    with pytest.raises(UnsafePathError, match="outside models"):
        fetch(f"oci://{registry.host}/{repo}:escape")
    registry.push_image(
        repo, "absolute", [(tar_layer({}, symlinks={"models/x": "/etc/passwd"}), TAR_GZ)]
    )
    with pytest.raises(UnsafePathError, match="absolute"):
        fetch(f"oci://{registry.host}/{repo}:absolute")
    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
        fetch(f"oci://{registry.host}/{repo}:no-such-tag")
    assert list(scratch.iterdir()) == []  # failed listings leave nothing in $TMPDIR


def test_a_layer_that_is_an_archive_bomb_is_refused(registry: Registry, tmp: Path) -> None:
    """A layer is an archive under archive.py's budget: 16 MiB of zeros in a 16 KiB gzip layer,
    with the ratio lowered to 100× and a 1 MiB floor, is refused before a byte of it is written;
    the last line names the URI, the bomb and the setting. Default limits let it through, so
    the refusal is the budget's."""
    repo = unique_repo()
    registry.push_image(repo, "bomb", [(tar_layer({"models/zeros.bin": bytes(16 << 20)}), TAR_GZ)])
    uri = f"oci://{registry.host}/{repo}:bomb"
    scratch = tmp / "scratch"
    scratch.mkdir()
    env = clean_env(KSERVE_OCI_INSECURE_REGISTRY="true", TMPDIR=str(scratch))
    limited = dict(
        env,
        STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO="100",
        STORAGE_INITIALIZER_ARCHIVE_RATIO_FLOOR="1048576",
    )
    refused = cli("pull", uri, tmp / "refused", env=limited)
    assert refused.returncode == 1, refused.describe()
    assert "archive bomb" in refused.last_line and repo in refused.last_line, refused.describe()
    assert "STORAGE_INITIALIZER_ARCHIVE_MAX_RATIO" in refused.last_line
    assert not (tmp / "refused").exists() or not any((tmp / "refused").iterdir())
    assert list(scratch.iterdir()) == []
    done = cli("pull", uri, tmp / "model", env=env)
    assert done.returncode == 0, done.describe()
    assert (tmp / "model" / "zeros.bin").stat().st_size == 16 << 20


@pytest.mark.parametrize(
    ("layer", "said"),
    [
        (tar_layer({"models/../../../escaped.txt": b"x"}), "leaves the model directory"),
        # Kept by no check of ours before the tree is merged: the data filter refuses it at once.
        (
            tar_layer({}, symlinks={"models/a/b": "../../../../escaped.txt"}),
            "is a link that leaves the model directory",
        ),
    ],
    ids=["traversal-name", "traversal-link"],
)
def test_a_layer_with_a_path_traversal_member_is_refused(
    registry: Registry, tmp: Path, layer: bytes, said: str
) -> None:
    repo = unique_repo()
    registry.push_image(repo, "evil", [(layer, TAR_GZ)])
    scratch = tmp / "scratch"
    scratch.mkdir()
    env = clean_env(KSERVE_OCI_INSECURE_REGISTRY="true", TMPDIR=str(scratch))
    refused = cli("pull", f"oci://{registry.host}/{repo}:evil", tmp / "a" / "b" / "model", env=env)
    assert refused.returncode == 1, refused.describe()
    assert said in refused.last_line and repo in refused.last_line, refused.describe()
    assert list(tmp.rglob("escaped.txt")) == []
    assert list(scratch.iterdir()) == []


def test_reference_parsing() -> None:
    ref = parse_reference("oci://host:5000/a/b/c:v1.2")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "host:5000",
        "a/b/c",
        "v1.2",
        None,
    )
    digest = "sha256:" + "a" * 64
    ref = parse_reference(f"oci://host/a@{digest}")
    assert (ref.registry, ref.repository, ref.reference) == ("host", "a", digest)
    assert parse_reference("oci://docker.io/ubuntu").repository == "library/ubuntu"
    assert parse_reference("oci://docker.io/ubuntu").registry == "registry-1.docker.io"
    for bad in ("oci://host", "oci://host/a@sha256:abc", "oci://host/UPPER"):
        with pytest.raises(UsageError):
            parse_reference(bad)


def test_tampered_blob_is_caught(registry: Registry) -> None:
    repo, salt = unique_repo(), secrets.token_hex(8)
    layer = tar_layer({"models/w.bin": b"W" * 4000 + salt.encode()}, compress=False)
    registry.push_image(repo, "v1", [(layer, TAR)])
    blob = registry.blob_path("sha256:" + hashlib.sha256(layer).hexdigest())
    data = bytearray(blob.read_bytes())
    data[data.index(b"WWWW") + 10] = ord("X")  # same size, one byte changed
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        fetch(f"oci://{registry.host}/{repo}:v1")


def test_plain_http_registry_without_the_insecure_flag(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KSERVE_OCI_INSECURE_REGISTRY")
    with pytest.raises(SourceError, match="TLS") as caught:
        fetch(f"oci://{registry.host}/{unique_repo()}:v1")
    assert "KSERVE_OCI_INSECURE_REGISTRY=true" in caught.value.describe()


# -- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["htpasswd", "token"])
def test_credentials_right_wrong_missing(
    request: pytest.FixtureRequest, flavour: str, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: Registry = request.getfixturevalue(f"{flavour}_registry")
    repo = unique_repo()
    digest = server.push_image(repo, "v1", [(tar_layer({"models/p.bin": b"private"}), TAR_GZ)])
    uri = f"oci://{server.host}/{repo}:v1"
    with pytest.raises(AccessDeniedError, match="none were found"):
        fetch(uri)
    config = tmp / "config.json"
    monkeypatch.setenv("KSERVE_OCI_DOCKER_CONFIG", str(config))
    server.docker_config(config, password="wrong-password-123")
    with pytest.raises(AccessDeniedError, match="refused the credentials"):
        fetch(uri)
    server.docker_config(config)
    assert fetch(uri) == (digest, {"p.bin": b"private"})
    server.docker_config(config, host=f"https://{server.host}")  # the stock lookup keys
    assert fetch(uri)[0] == digest


def test_secrets_never_in_output_or_marker(htpasswd_registry: Registry, tmp: Path) -> None:
    server = htpasswd_registry
    repo = unique_repo()
    server.push_image(repo, "v1", [(tar_layer({"models/p.bin": b"private"}), TAR_GZ)])
    uri = f"oci://{server.host}/{repo}:v1"
    config = tmp / "config.json"
    env = clean_env(KSERVE_OCI_INSECURE_REGISTRY="true", KSERVE_OCI_DOCKER_CONFIG=str(config))
    server.docker_config(config, password="wrong-password-123")
    wrong = cli("pull", uri, tmp / "a", env=env)
    assert wrong.returncode == 1
    assert "refused the credentials" in wrong.last_line and repo in wrong.last_line
    assert "wrong-password-123" not in wrong.output
    server.docker_config(config)
    done = cli("pull", uri, tmp / "b", "--log-format", "json", env=env)
    assert done.returncode == 0, done.describe()
    assert server.password not in done.output
    assert server.password not in marker_path(tmp / "b").read_text()


# -- end to end ----------------------------------------------------------------------------------


def test_cli_pull_end_to_end(registry: Registry, tmp: Path) -> None:
    repo, salt = unique_repo(), secrets.token_hex(4)
    digest = registry.push_image(repo, "v1", modelcar(salt))
    env = clean_env(KSERVE_OCI_INSECURE_REGISTRY="true", STORAGE_INITIALIZER_LOG_FORMAT="json")
    dest = tmp / "model"
    done = cli("pull", f"oci://{registry.host}/{repo}:v1", dest, env=env)
    assert done.returncode == 0, done.describe()
    assert tree_digest(dest) == {
        k: hashlib.sha256(v).hexdigest() for k, v in expected(salt).items()
    }
    marker = json.loads(marker_path(dest).read_text())
    assert marker["fingerprint"] == digest
    assert (dest / "config.json").stat().st_mode & 0o777 == 0o444
    again = cli("pull", f"oci://{registry.host}/{repo}:v1", dest, env=env)
    assert again.returncode == 0 and again.outcome() == "complete"
    missing = cli("pull", f"oci://{registry.host}/{repo}:nope", tmp / "x", env=env)
    assert missing.returncode == 1 and "MANIFEST_UNKNOWN" in missing.last_line


def test_a_throttled_registry_is_asked_again_after_its_retry_after(registry: Registry) -> None:
    """429 with Retry-After from a throttling proxy in front of the registry: the manifest is
    asked again (it was not retried before the shared HTTP layer), a layer is retried by the
    layer loop, and the Retry-After the registry gave is carried by the last error."""
    repo, salt = unique_repo(), secrets.token_hex(4)
    registry.push_image(repo, "v1", modelcar(salt))
    with CountingProxy(registry.url) as proxy:
        uri = f"oci://{proxy.url.split('://', 1)[1].rstrip('/')}/{repo}:v1"
        throttle = {"status": 429, "headers": {"Retry-After": "0"}}
        proxy.set_faults(Fault(**throttle, path_contains="/manifests/", times=1))
        assert fetch(uri)[1] == expected(salt)
        assert proxy.count(method="GET", path_contains="/manifests/") == 2
        proxy.reset()
        proxy.set_faults(Fault(**throttle, path_contains="/blobs/"))
        with pytest.raises(TransientError) as caught:
            fetch(uri)
        assert caught.value.retry_after == 0.0
        assert "429" in str(caught.value) and repo in str(caught.value)
        assert len(proxy.select(method="GET", path_contains="/blobs/")) == 3  # ATTEMPTS


def test_eight_replicas_fetch_each_blob_once(registry: Registry, tmp: Path) -> None:
    repo, salt = unique_repo(), secrets.token_hex(4)
    layers = [*modelcar(salt), (tar_layer({"models/big.bin": os.urandom(1_500_000)}), TAR_GZ)]
    registry.push_image(repo, "v1", layers)
    with CountingProxy(registry.url) as proxy:
        host = proxy.url.split("://", 1)[1].rstrip("/")
        env = clean_env(KSERVE_OCI_INSECURE_REGISTRY="true", STORAGE_INITIALIZER_LOG_FORMAT="json")
        procs = start_all(
            [cli_argv("pull", f"oci://{host}/{repo}:v1", tmp / "shared") for _ in range(8)],
            env,
            tmp / "logs",
        )
        runs = wait_all(procs)
        for result in runs:
            assert result.returncode == 0, result.describe()
        outcomes = collections.Counter(r.outcome() for r in runs)
        assert outcomes["downloaded"] == 1, outcomes
        blobs = collections.Counter(
            r.path for r in proxy.select(method="GET", path_contains="/blobs/")
        )
        assert len(blobs) == len(layers) and set(blobs.values()) == {1}, blobs
        assert proxy.count(method="GET", path_contains="/manifests/") == 1


# -- packaging -----------------------------------------------------------------------------------


def test_missing_extra_names_it(tmp: Path) -> None:
    """The provider module made unimportable in a child: the error names the pip extra."""
    code = (
        "import sys; sys.modules['storage_initializer.providers.oci'] = None\n"
        "from storage_initializer.providers import open_source\n"
        "from storage_initializer.settings import Settings\n"
        "from storage_initializer.uri import parse\n"
        "from storage_initializer.errors import UsageError\n"
        "try:\n"
        "    open_source(parse('oci://registry.example.com/a/b:v1'), Settings())\n"
        "except UsageError as exc:\n"
        "    print(exc.describe())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'storage-initializer[oci]'" in done.stdout, done.stderr


# -- the stock initializer on the same registry --------------------------------------------------


def _stock(uri: str, dest: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return stock_download(uri, dest, env)


@pytest.mark.skipif(stock_python() is None, reason=NO_STOCK_REASON)
def test_stock_initializer_gets_the_same_tree(
    registry: Registry, token_registry: Registry, tmp: Path
) -> None:
    """Plain files in several layers, an index, anonymous and token auth: identical trees.
    (Whiteouts and links are where we differ on purpose; see docs/providers/oci.md. Against the
    htpasswd registry the stock one cannot pull at all: oras-py answers a ``Basic`` challenge
    with a token request to the realm name and retries for minutes, so it is not run here.)"""
    for index, server in enumerate((registry, token_registry)):
        repo = unique_repo()
        one = tar_layer({"models/config.json": b"{}", "models/w/a.bin": os.urandom(3000)})
        two = tar_layer({"models/config.json": b'{"v": 2}', "other/x": b"x"}, compress=False)
        image = server.push_image(repo, "img", [(one, TAR_GZ), (two, TAR)])
        server.push_index(repo, "v1", {f"linux/{ARCH}": image})
        config = server.docker_config(tmp / f"config-{index}.json")
        env = clean_env(KSERVE_OCI_INSECURE_REGISTRY="true", KSERVE_OCI_DOCKER_CONFIG=str(config))
        uri = f"oci://{server.host}/{repo}:v1"
        stock = _stock(uri, tmp / f"stock-{index}", env)
        assert stock.returncode == 0, stock.stderr[-3000:]
        ours = cli("pull", uri, tmp / f"ours-{index}", env=env)
        assert ours.returncode == 0, ours.describe()
        assert tree_digest(tmp / f"ours-{index}") == tree_digest(tmp / f"stock-{index}")
