"""hdfs:// and webhdfs:// against a protocol-faithful WebHDFS test server (servers/webhdfs.py).

There is no HDFS in the registries this project reaches, so the namenode and datanode are ours,
speaking WebHDFS as Hadoop 3 does (GETFILESTATUS, LISTSTATUS, OPEN with a 307 to a datanode on
another port, RemoteException errors). What must hold: the URI's text after the scheme is the
HDFS path; configuration comes from HDFS_SECRET_DIR files or a STORAGE_CONFIG entry (keytab and
TLS files base64-decoded); directories keep their layout, a file is saved under its name; ranged
reads reassemble; errors map to not-found / denied / transient; nothing secret leaks; eight
processes download each file once; and the stock initializer, pointed at the same server, yields
the same tree.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from storage_initializer import storage_config
from storage_initializer import uri as uri_module
from storage_initializer.errors import (
    AccessDeniedError,
    NotFoundError,
    SourceError,
    TransientError,
    UsageError,
)
from storage_initializer.providers import open_source
from storage_initializer.providers.hdfs import HdfsSource, load_config
from storage_initializer.redact import redact
from storage_initializer.settings import Settings
from tests.helpers import clean_env, cli_argv, pattern, read_all, run, start_all, wait_all
from tests.servers.nginx import make_certificate
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.webhdfs import WebHdfs, start_webhdfs

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = {
    "config.json": b'{"layers": 2}\n',
    "weights/model.bin": pattern(2_500_001, 1),
    "weights/extra/tokenizer.txt": pattern(3, 2),
    "données/été.txt": "unicode path ✓\n".encode(),
    "with space.txt": b"spaces\n",
    "empty.bin": b"",
}
GATEWAY_TOKEN = "Bearer knoxGatewayToken0123456789secret"


@pytest.fixture(scope="module")
def server() -> Iterator[WebHdfs]:
    hdfs = start_webhdfs()
    hdfs.put_tree("/models/m1", MODEL)
    hdfs.put("/models/single/model.joblib", b"joblib bytes")
    hdfs.put("/models/archive/model.tar.gz", _tgz({"a.txt": b"A", "d/b.txt": b"B"}))
    hdfs.mkdir("/models/empty")
    hdfs.put("/models/versions/1/v.txt", b"one", mtime=1_000)
    hdfs.put("/models/versions/2/v.txt", b"two", mtime=2_000)
    hdfs.put("/secure/m/config.json", b"secret model")
    hdfs.restrict("/secure", ("alice",))
    try:
        yield hdfs
    finally:
        hdfs.stop()


def _tgz(files: dict[str, bytes]) -> bytes:
    from tests.helpers import tar_bytes

    return tar_bytes(files, "w:gz")


def secret_dir(tmp_path: Path, namenode: str, **values: str | bytes) -> Path:
    directory = tmp_path / "hdfscreds"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "HDFS_NAMENODE").write_text(namenode)
    for name, value in values.items():
        path = directory / name
        path.write_bytes(value) if isinstance(value, bytes) else path.write_text(value)
    return directory


@pytest.fixture
def hdfs_env(server: WebHdfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process points at the server through a secret directory."""
    directory = secret_dir(tmp_path, server.namenode + "\n")  # a trailing newline is tolerated
    for name in ("STORAGE_CONFIG", "STORAGE_OVERRIDE_CONFIG", "CA_BUNDLE_CONFIGMAP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server.clear_faults()
    server.required_header = None
    server.standby = [False] * len(server.standby)
    return {"HDFS_SECRET_DIR": str(directory), "NO_PROXY": "127.0.0.1,localhost"}


def source(text: str) -> HdfsSource:
    opened = open_source(uri_module.parse(text), Settings())
    assert isinstance(opened, HdfsSource)
    return opened


def download(text: str) -> dict[str, bytes]:
    src = source(text)
    try:
        return {f.path: read_all(src, f) for f in src.list().files}
    finally:
        src.close()


# -- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["hdfs", "webhdfs"])
def test_directory_keeps_its_layout(server: WebHdfs, hdfs_env: dict, scheme: str) -> None:
    """The host part is the first path component: hdfs://models/m1 is /models/m1."""
    src = source(f"{scheme}://models/m1/")
    listing = src.list()
    src.close()
    assert {f.path: f.size for f in listing.files} == {k: len(v) for k, v in MODEL.items()}
    assert all(f.checksums == {} for f in listing.files)  # HDFS has no content digest
    assert download(f"{scheme}://models/m1") == MODEL


def test_single_file_is_saved_under_its_name(server: WebHdfs, hdfs_env: dict) -> None:
    assert download("hdfs://models/single/model.joblib") == {"model.joblib": b"joblib bytes"}


@pytest.mark.parametrize("name", [".", "..", "x/y"])
def test_a_listed_entry_that_is_no_plain_name_is_refused_not_walked(
    server: WebHdfs, hdfs_env: dict, name: str
) -> None:
    """A namenode (or a gateway in front of it) listing a directory entry "." or "..": walked,
    the listing never ends; "x/y" would reach a directory the URI did not name."""
    server.phantom_directories = [name]
    try:
        with pytest.raises(SourceError, match="names an entry") as caught:
            source("hdfs://models/m1").list()
    finally:
        server.phantom_directories = []
    assert "HDFS_NAMENODE" in caught.value.describe()


def test_root_path_prefixes_the_uri_path(
    server: WebHdfs, hdfs_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = secret_dir(tmp_path / "r", server.namenode, HDFS_ROOTPATH="/models")
    monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
    assert download("hdfs://m1") == MODEL
    # A relative root is below the user's home directory, as the hdfs package resolves it.
    server.put("/user/bob/models/x.txt", b"home")
    directory = secret_dir(
        tmp_path / "h", server.namenode, HDFS_ROOTPATH="models", USER_PROXY="bob"
    )
    monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
    assert download("hdfs://x.txt") == {"x.txt": b"home"}


def test_latest_marker(server: WebHdfs, hdfs_env: dict) -> None:
    """The hdfs package's #LATEST marker, which the stock resolves through that package."""
    assert download("hdfs://models/versions/#LATEST") == {"v.txt": b"two"}


def test_fingerprint_follows_sizes_and_modification_times(server: WebHdfs, hdfs_env: dict) -> None:
    server.put("/fp/a.txt", b"one", mtime=5)
    first = source("hdfs://fp").list().fingerprint
    assert source("hdfs://fp").list().fingerprint == first
    server.put("/fp/a.txt", b"one", mtime=6)  # rewritten in place, same size
    assert source("hdfs://fp").list().fingerprint != first


def test_ranged_reads_reassemble(server: WebHdfs, hdfs_env: dict) -> None:
    src = source("hdfs://models/m1")
    weights = next(f for f in src.list().files if f.path == "weights/model.bin")
    data = MODEL["weights/model.bin"]
    server.reset_counts()
    assert read_all(src, weights) == data
    assert read_all(src, weights, chunk=1_000_003) == data
    assert b"".join(src.read(weights, 5, 17)) == data[5:17]
    assert b"".join(src.read(weights, len(data) - 3)) == data[-3:]
    assert b"".join(src.read(weights, 10, 10)) == b""
    blocks = [len(b) for b in src.read(weights)]
    src.close()
    assert max(blocks) <= 1 << 20
    # Every read went namenode → 307 → datanode with the offset and length asked for.
    assert ("/models/m1/weights/model.bin", "5", "12") in server.reads
    assert server.count("OPEN", role="namenode") == server.count("OPEN", role="datanode")


def test_unicode_and_spaces_are_quoted_once(server: WebHdfs, hdfs_env: dict) -> None:
    server.reset_counts()
    got = download("hdfs://models/m1")
    assert got["données/été.txt"] == MODEL["données/été.txt"]
    assert server.count("OPEN", "/models/m1/données/été.txt", role="datanode") == 1


# -- configuration ------------------------------------------------------------------------------


def test_config_files(tmp_path: Path) -> None:
    directory = secret_dir(
        tmp_path,
        "nn1:9870;https://nn2:9871/",
        USER_PROXY="alice\n",
        HDFS_ROOTPATH="/data",
        N_THREADS="3",
        TLS_SKIP_VERIFY="TRUE",
        HEADERS='{"X-Gateway": "abc"}',
        TLS_CA=b"ca",
        TLS_CERT=b"cert",
        TLS_KEY=b"key",
        KERBEROS_KEYTAB=b"\x05\x02keytab",
        UNKNOWN="ignored",
    )
    config = load_config({"HDFS_SECRET_DIR": str(directory)})
    assert config.namenodes == ("http://nn1:9870", "https://nn2:9871")
    assert (config.user_proxy, config.root, config.n_threads) == ("alice", "/data", 3)
    assert config.tls_skip_verify is True
    assert config.headers == {"X-Gateway": "abc"}
    # File secrets are used by path, as the stock does.
    assert config.tls_ca == str(directory / "TLS_CA")
    assert config.kerberos_keytab == str(directory / "KERBEROS_KEYTAB")


@pytest.mark.parametrize("value", [None, "false", "1", "yes", ""])
def test_tls_verification_is_skipped_only_for_true(tmp_path: Path, value: str | None) -> None:
    extra = {} if value is None else {"TLS_SKIP_VERIFY": value}
    directory = secret_dir(tmp_path, "http://nn:9870", **extra)
    assert load_config({"HDFS_SECRET_DIR": str(directory)}).tls_skip_verify is False


def test_missing_namenode_is_a_clear_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        load_config({"HDFS_SECRET_DIR": str(tmp_path / "nowhere")})
    assert "HDFS_NAMENODE" in str(caught.value)
    assert "storage-config" in caught.value.describe()


@pytest.mark.parametrize(("name", "value"), [("HEADERS", "[1]"), ("N_THREADS", "zero")])
def test_bad_settings_are_usage_errors(tmp_path: Path, name: str, value: str) -> None:
    directory = secret_dir(tmp_path, "http://nn:9870", **{name: value})
    with pytest.raises(UsageError) as caught:
        load_config({"HDFS_SECRET_DIR": str(directory)})
    assert name in str(caught.value)


def test_storage_config_writes_a_secret_dir(tmp_path: Path) -> None:
    """type: hdfs → one file per key, the keytab and TLS files base64-decoded (stock behaviour)."""
    keytab = b"\x05\x02\x00\x00binary keytab\xff"
    spec = {
        "type": "hdfs",
        "HDFS_NAMENODE": "http://nn:9870",
        "USER_PROXY": "alice",
        "N_THREADS": 4,
        "TLS_SKIP_VERIFY": False,
        "HEADERS": {"X-Gateway": "abc"},
        "KERBEROS_PRINCIPAL": "alice@EXAMPLE.COM",
        "KERBEROS_KEYTAB": base64.b64encode(keytab).decode(),
        "TLS_CA": base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode(),
    }
    environ = {"STORAGE_CONFIG": json.dumps(spec)}
    storage_config.apply(environ)
    directory = Path(environ["HDFS_SECRET_DIR"])
    assert (directory / "KERBEROS_KEYTAB").read_bytes() == keytab
    assert (directory / "TLS_CA").read_bytes() == b"-----BEGIN CERTIFICATE-----\n"
    assert (directory / "HDFS_NAMENODE").read_text() == "http://nn:9870"
    assert (directory / "type").read_text() == "hdfs"
    assert oct((directory / "KERBEROS_KEYTAB").stat().st_mode & 0o777) == "0o600"
    config = load_config(environ)
    assert (config.n_threads, config.tls_skip_verify, config.headers) == (
        4,
        False,
        {"X-Gateway": "abc"},
    )
    # An override entry wins, and s3 keys are untouched by an hdfs entry.
    environ = {
        "STORAGE_CONFIG": json.dumps(spec),
        "STORAGE_OVERRIDE_CONFIG": json.dumps({"USER_PROXY": "bob", "type": "webhdfs"}),
    }
    storage_config.apply(environ)
    assert Path(environ["HDFS_SECRET_DIR"], "USER_PROXY").read_text() == "bob"
    assert "AWS_ENDPOINT_URL" not in environ


def test_storage_config_with_bad_base64_names_the_key() -> None:
    spec = {"type": "hdfs", "HDFS_NAMENODE": "http://nn", "TLS_KEY": "not base64!"}
    with pytest.raises(UsageError) as caught:
        storage_config.apply({"STORAGE_CONFIG": json.dumps(spec)})
    assert "TLS_KEY" in str(caught.value)
    assert "not base64!" not in str(caught.value)


def test_user_proxy_is_sent_as_doas(server: WebHdfs, hdfs_env: dict, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    with pytest.raises(AccessDeniedError) as denied:
        source("hdfs://secure/m").list()
    assert "AccessControlException" in str(denied.value)
    directory = secret_dir(tmp_path / "p", server.namenode, USER_PROXY="alice")
    monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
    server.reset_counts()
    assert download("hdfs://secure/m") == {"config.json": b"secret model"}
    assert set(server.users_seen) == {("alice", None)}


def test_headers_reach_the_namenode_and_authorization_not_the_datanode(
    server: WebHdfs, hdfs_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.required_header = ("Authorization", GATEWAY_TOKEN)
    try:
        with pytest.raises(AccessDeniedError) as caught:
            source("hdfs://models/single").list()
        assert "SecurityException" in str(caught.value)
        directory = secret_dir(
            tmp_path / "g", server.namenode, HEADERS=json.dumps({"Authorization": GATEWAY_TOKEN})
        )
        monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
        server.reset_counts()
        src = source("hdfs://models/single/model.joblib")
        assert download("hdfs://models/single/model.joblib") == {"model.joblib": b"joblib bytes"}
        assert server.datanode_authorization_seen == 0  # another host: never forwarded
        # The token is a secret from now on, in any message.
        assert "knoxGatewayToken0123456789secret" not in redact(f"header {GATEWAY_TOKEN}")
        src.close()
    finally:
        server.required_header = None


def test_n_threads_sets_the_default_parallelism(
    server: WebHdfs, hdfs_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert source("hdfs://models/m1").default_workers == 4
    directory = secret_dir(tmp_path / "t", server.namenode, N_THREADS="2")
    monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
    assert source("hdfs://models/m1").default_workers == 2


def test_ha_pair_skips_a_standby_namenode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = start_webhdfs(namenodes=2)
    try:
        pair.put_tree("/ha", {"a.txt": b"active"})
        monkeypatch.setenv("HDFS_SECRET_DIR", str(secret_dir(tmp_path, pair.namenode)))
        for standby in (0, 1):
            pair.standby = [index == standby for index in range(2)]
            assert download("hdfs://ha") == {"a.txt": b"active"}
        pair.standby = [True, True]
        with pytest.raises(TransientError) as caught:
            source("hdfs://ha").list()
        assert "StandbyException" in str(caught.value)
    finally:
        pair.stop()


# -- TLS ----------------------------------------------------------------------------------------


def _client_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "client.pem", directory / "client.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            "-subj", "/CN=kserve-client", "-keyout", str(key), "-out", str(cert),
            "-addext", "extendedKeyUsage=clientAuth",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebHdfs, Path]]:
    """An HTTPS namenode and datanode that require a client certificate (mutual TLS)."""
    directory = tmp_path_factory.mktemp("hdfs-tls")
    cert, key = make_certificate(directory)
    client_cert, _client_key = _client_certificate(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client_cert)
    hdfs = start_webhdfs(ssl_context=context)
    hdfs.put_tree("/tls/m", {"config.json": b"over tls", "w.bin": pattern(70_000, 9)})
    try:
        yield hdfs, directory
    finally:
        hdfs.stop()


def test_tls_from_storage_config(
    tls_server: tuple[WebHdfs, Path], hdfs_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE_CONFIG with base64 TLS_CA/TLS_CERT/TLS_KEY → a verified mutual-TLS session."""
    server, directory = tls_server

    def b64(name: str) -> str:
        return base64.b64encode((directory / name).read_bytes()).decode()

    spec = {"type": "webhdfs", "HDFS_NAMENODE": server.namenode}
    with_client = {**spec, "TLS_CERT": b64("client.pem"), "TLS_KEY": b64("client.key")}
    monkeypatch.setenv("STORAGE_CONFIG", json.dumps({**with_client, "TLS_CA": b64("cert.pem")}))
    storage_config.apply()
    expected = {"config.json": b"over tls", "w.bin": pattern(70_000, 9)}
    assert download("webhdfs://tls/m") == expected
    # Without the CA the server's certificate is refused, unless TLS_SKIP_VERIFY=true.
    monkeypatch.setenv("STORAGE_CONFIG", json.dumps(with_client))
    storage_config.apply()
    with pytest.raises(SourceError) as caught:
        source("webhdfs://tls/m").list()
    assert "TLS" in str(caught.value) and "TLS_CA" in caught.value.describe()
    monkeypatch.setenv("STORAGE_CONFIG", json.dumps({**with_client, "TLS_SKIP_VERIFY": "true"}))
    storage_config.apply()
    assert download("webhdfs://tls/m") == expected
    # Without the client certificate the server refuses the handshake.
    monkeypatch.setenv("STORAGE_CONFIG", json.dumps({**spec, "TLS_SKIP_VERIFY": "true"}))
    storage_config.apply()
    with pytest.raises(SourceError):
        source("webhdfs://tls/m").list()


# -- errors -------------------------------------------------------------------------------------


def test_missing_path_is_not_found_with_a_hint(server: WebHdfs, hdfs_env: dict) -> None:
    with pytest.raises(NotFoundError) as caught:
        source("hdfs://models/nothing").list()
    assert "hdfs://models/nothing" in str(caught.value)
    assert "FileNotFoundException" in str(caught.value)
    with pytest.raises(NotFoundError) as namenode_in_uri:
        source("hdfs://namenode.example.com:8020/models/m1").list()
    assert "HDFS_NAMENODE" in namenode_in_uri.value.describe()


def test_unreachable_namenode_is_a_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = secret_dir(tmp_path, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
    with pytest.raises(SourceError) as caught:
        source("hdfs://models/m1").list()
    assert not isinstance(caught.value, TransientError)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "HDFS_NAMENODE" in caught.value.describe()


@pytest.mark.parametrize(
    ("status", "exception", "error"),
    [
        (500, "IOException", TransientError),
        (503, "IOException", TransientError),
        (403, "RetriableException", TransientError),
        (403, "AccessControlException", AccessDeniedError),
        (401, "SecurityException", AccessDeniedError),
        (404, "FileNotFoundException", NotFoundError),
    ],
)
def test_error_mapping(
    server: WebHdfs, hdfs_env: dict, status: int, exception: str, error: type[Exception]
) -> None:
    src = source("hdfs://models/single/model.joblib")
    [item] = src.list().files
    server.inject("GETFILESTATUS /models/single", status, exception)
    with pytest.raises(error):
        source("hdfs://models/single").list()
    server.inject("OPEN /models/single", status, exception, role="namenode")
    with pytest.raises(error):
        b"".join(src.read(item))
    server.inject("OPEN /models/single", status, exception, role="datanode")
    with pytest.raises(error):
        b"".join(src.read(item))
    assert b"".join(src.read(item)) == b"joblib bytes"  # and then it recovers
    src.close()


def test_a_429_carries_the_retry_after_in_both_forms(
    server: WebHdfs, hdfs_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A throttling gateway in front of the namenode: its Retry-After reaches the engine's
    backoff (it was dropped before the shared HTTP layer)."""
    with CountingProxy(server.namenode) as proxy:
        monkeypatch.setenv("HDFS_SECRET_DIR", str(secret_dir(tmp_path / "proxied", proxy.url)))
        proxy.set_faults(Fault(status=429, headers={"Retry-After": "7"}, times=1))
        with pytest.raises(TransientError) as caught:
            source("hdfs://models/single").list()
        assert caught.value.retry_after == 7.0
        assert "hdfs://models/single" in str(caught.value)
        src = source("hdfs://models/single/model.joblib")
        [item] = src.list().files
        past = formatdate(0, usegmt=True)  # an HTTP-date already past: retry now
        proxy.set_faults(Fault(status=503, headers={"Retry-After": past}, times=1))
        with pytest.raises(TransientError) as caught:
            b"".join(src.read(item))
        assert caught.value.retry_after == 0.0
        assert b"".join(src.read(item)) == b"joblib bytes"
        src.close()


def test_short_body_is_transient(server: WebHdfs, hdfs_env: dict) -> None:
    src = source("hdfs://models/m1")
    weights = next(f for f in src.list().files if f.path == "weights/model.bin")
    for ranged in (False, True):
        server.truncate("OPEN /models/m1/weights/model.bin", after=100_000)
        with pytest.raises(TransientError) as caught:
            b"".join(src.read(weights, 0, weights.size) if ranged else src.read(weights))
        assert "hdfs://models/m1" in str(caught.value)
    src.close()


def test_kerberos_without_the_extra_is_a_clear_error(
    server: WebHdfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = secret_dir(
        tmp_path, server.namenode, KERBEROS_PRINCIPAL="svc@EXAMPLE.COM", KERBEROS_KEYTAB=b"kt"
    )
    monkeypatch.setenv("HDFS_SECRET_DIR", str(directory))
    monkeypatch.setitem(sys.modules, "requests_gssapi", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "gssapi", None)
    with pytest.raises(UsageError) as caught:
        source("hdfs://models/m1")
    assert "storage-initializer[kerberos]" in caught.value.describe()


def test_missing_hdfs_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "storage_initializer.providers.hdfs", None)
    with pytest.raises(UsageError) as caught:
        open_source(uri_module.parse("webhdfs://models/m1"), Settings())
    assert "storage-initializer[hdfs]" in caught.value.describe()


# -- whole pulls --------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_cli_pull_from_storage_config(server: WebHdfs, tmp_path: Path) -> None:
    """End to end through the CLI, configured only by STORAGE_CONFIG; the gateway token given
    in HEADERS never appears in the output, even on failure."""
    server.required_header = ("Authorization", GATEWAY_TOKEN)
    try:
        spec = {
            "type": "hdfs",
            "HDFS_NAMENODE": server.namenode,
            "HEADERS": json.dumps({"Authorization": GATEWAY_TOKEN}),
        }
        env = clean_env(STORAGE_CONFIG=json.dumps(spec), NO_PROXY="127.0.0.1,localhost")
        env.pop("HDFS_SECRET_DIR", None)
        dest = tmp_path / "model"
        result = run(cli_argv("pull", "hdfs://models/m1", dest), env)
        assert result.returncode == 0, result.describe()
        assert _tree(dest) == MODEL
        archive = run(cli_argv("pull", "hdfs://models/archive/model.tar.gz", tmp_path / "a"), env)
        assert archive.returncode == 0, archive.describe()
        assert _tree(tmp_path / "a") == {"a.txt": b"A", "d/b.txt": b"B"}
        failed = run(cli_argv("pull", "hdfs://models/nothing", tmp_path / "n"), env)
        assert failed.returncode != 0
        assert "hdfs://models/nothing" in failed.last_line
        assert "knoxGatewayToken" not in failed.output + result.output
    finally:
        server.required_header = None


def test_eight_processes_open_each_file_once(server: WebHdfs, hdfs_env: dict,
                                             tmp_path: Path) -> None:  # fmt: skip
    dest = tmp_path / "shared"
    env = clean_env(hdfs_env)
    server.reset_counts()
    argv = cli_argv("pull", "--log-format", "json", "hdfs://models/m1", dest)
    runs = wait_all(start_all([argv] * 8, env, tmp_path / "logs"), timeout=180)
    for result in runs:
        assert result.returncode == 0, result.describe()
    assert _tree(dest) == MODEL
    for name, data in MODEL.items():
        if data:  # an empty file needs no OPEN
            opened = server.count("OPEN", f"/models/m1/{name}", role="namenode")
            assert opened == 1, (name, server.requests())


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


def _stock_hdfs_path(tmp_path: Path) -> Path:
    """A directory to put on the stock interpreter's path: the ``hdfs`` package (from our test
    extra) and stubs for ``krbcontext``/``requests_kerberos``, which the stock imports even
    without Kerberos and which need a Kerberos toolchain to build (never called here)."""
    hdfs_pkg = pytest.importorskip("hdfs")
    docopt = pytest.importorskip("docopt")
    root = tmp_path / "stock-path"
    shutil.copytree(Path(hdfs_pkg.__file__).parent, root / "hdfs")
    shutil.copy(docopt.__file__, root / "docopt.py")
    (root / "krbcontext").mkdir()
    (root / "krbcontext" / "__init__.py").write_text("")
    (root / "krbcontext" / "context.py").write_text(
        "class krbContext:\n    def __init__(self, **kw):\n        raise RuntimeError('stub')\n"
    )
    (root / "requests_kerberos.py").write_text(
        "import requests\nOPTIONAL = 2\nREQUIRED = 1\nDISABLED = 3\n"
        "class HTTPKerberosAuth(requests.auth.AuthBase):\n"
        "    def __init__(self, *a, **kw):\n        raise RuntimeError('stub')\n"
    )
    return root


@pytest.mark.skipif(_stock_python() is None, reason="no stock initializer (kserve-storage)")
def test_stock_initializer_downloads_the_same_tree(
    server: WebHdfs, hdfs_env: dict, tmp_path: Path
) -> None:
    stock_path = _stock_hdfs_path(tmp_path)
    # The stock sends HDFS_NAMENODE as read, a trailing newline included (InvalidURL): we strip
    # it (a documented difference), so the stock gets a file without one.
    secrets = secret_dir(tmp_path / "stock", server.namenode)
    env = {**os.environ, **hdfs_env, "HDFS_SECRET_DIR": str(secrets)}
    env["PYTHONPATH"] = str(stock_path)
    for uri, expected in (
        ("hdfs://models/m1", MODEL),
        ("webhdfs://models/single/model.joblib", {"model.joblib": b"joblib bytes"}),
    ):
        dest = tmp_path / ("stock-" + uri.split("/")[-1])
        code = f"from kserve_storage import Storage; Storage.download({uri!r}, {str(dest)!r})"
        result = subprocess.run(
            [str(_stock_python()), "-c", code], env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert _tree(dest) == expected == download(uri)
