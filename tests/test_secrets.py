"""Secrets never leak: a secret planted in every credential variable, in a SAS URI, in a URL's
password, in a ``<host>-headers`` value and in a GCS service account key is searched for in
everything the tool prints (logs, progress lines, ``status`` in text and JSON, also while a
download runs) and everything it writes on the volume, for successful and failing pulls of
every backend."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import poll_until
from tests.servers.azurite import Azurite, azurite  # noqa: F401 - session fixture
from tests.servers.gcs import GcsServer, TokenServer, gcs_server, service_account_key  # noqa: F401 - session fixture
from tests.servers.hub import HubServer, start_hub
from tests.servers.nginx import Nginx
from tests.servers.s3 import S3Server, s3_server  # noqa: F401 - session fixture

#: In the environment of every run (moto accepts any access key id and secret).
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED000000012",
    "AWS_SECRET_ACCESS_KEY": "awsSecretPLANTED0001",
    "AWS_SESSION_TOKEN": "awsSessionPLANTED0002",
    "AWS_SECURITY_TOKEN": "awsSecurityPLANTED0013",
    "AZURE_CLIENT_SECRET": "azClientPLANTED0003",
    "AZ_CLIENT_SECRET": "azLegacyPLANTED0004",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD": "azCertPassPLANTED0014",
    "AZURE_PASSWORD": "azPasswordPLANTED0015",
    "AZURE_STORAGE_KEY": "azStorageKeyPLANTED0016",
    "AZURE_STORAGE_SAS_TOKEN": "sv=2024-01-01&sig=azSasEnvPLANTED0017",
    "AZURE_STORAGE_CONNECTION_STRING": (
        "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=azConnPLANTED0018"
    ),
    "GIT_PASSWORD": "gitPassPLANTED0005",
    "MODELSCOPE_API_TOKEN": "msTokenPLANTED0006",
}
HF_TOKEN = "hfTokenPLANTED0007"
HUB_TOKEN = "hubTokenPLANTED0019"
HEADER_TOKEN = "headerPLANTED0008"
URL_PASSWORD = "urlPassPLANTED0009"
CONFIG_ACCESS_KEY = "AKIAPLANTED00010"
CONFIG_SECRET_KEY = "configSecretPLANTED0020"
GCS_BAD_KEY = "gcsKeyPLANTED0011"


class _Model(http.server.BaseHTTPRequestHandler):
    body = b"model-bytes" * 100

    def do_HEAD(self) -> None:
        if not self.path.startswith("/model.bin"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()
        if self.path.startswith("/model.bin"):
            self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Model)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    server = start_hub()
    repo = server.add_repo("acme/secret-model", readers=(HF_TOKEN,))
    repo.add_commit({"config.json": b'{"a": 1}'})
    other = server.add_repo("acme/secret-model-2", readers=(HUB_TOKEN,))
    other.add_commit({"config.json": b'{"b": 2}'})
    yield server
    server.stop()


class Recorder:
    """Runs the CLI and keeps everything it printed."""

    def __init__(self, base_env: dict[str, str], workdir: Path) -> None:
        self.base_env = base_env
        self.workdir = workdir
        self.outputs: list[str] = []

    def run(self, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", *args],
            env={**self.base_env, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.outputs += [result.stdout, result.stderr]
        return result

    def status(self, target: Path) -> None:
        self.run(["storage_initializer", "status", str(target)])
        self.run(["storage_initializer", "status", "--json", str(target)])

    def pull(self, uri: str, dest: Path, ok: bool, **env: str) -> None:
        for log_format in ("text", "json"):
            target = dest.with_name(f"{dest.name}-{log_format}")
            result = self.run(
                ["storage_initializer.entrypoint", uri, str(target)],
                STORAGE_INITIALIZER_LOG_FORMAT=log_format,
                STORAGE_INITIALIZER_RETRIES="0",
                **env,
            )
            assert (result.returncode == 0) is ok, result.stderr
            self.status(target)
            if ok:
                self.run(["storage_initializer", "verify", str(target)])

    def slow_pull(self, uri: str, dest: Path, **env: str) -> str:
        """A pull long enough for progress lines, with ``status`` read while it runs; returns
        its stderr."""
        out, err = self.workdir / f"{dest.name}.out", self.workdir / f"{dest.name}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "storage_initializer.entrypoint", uri, str(dest)],
                env={
                    **self.base_env,
                    "STORAGE_INITIALIZER_PROGRESS_INTERVAL": "0.2",
                    "STORAGE_INITIALIZER_RETRIES": "0",
                    **env,
                },
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
            )
            try:

                def downloading() -> bool:
                    answer = self.run(["storage_initializer", "status", "--json", str(dest)])
                    try:
                        info = json.loads(answer.stdout)
                    except ValueError:
                        return False
                    return info.get("state") == "downloading" and bool(info.get("lease"))

                poll_until(downloading, deadline=30, what="the download's lease in status")
                self.run(["storage_initializer", "status", str(dest)])
                assert proc.wait(timeout=120) == 0, err.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        self.outputs += [out.read_text(), err.read_text()]
        self.status(dest)
        return err.read_text()


def written_text(root: Path) -> str:
    chunks = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            chunks.append(path.read_bytes().decode("utf-8", "replace"))
            chunks.append(str(path))
    return "\n".join(chunks)


def test_no_secret_in_output_markers_or_state(
    tmp_path: Path,
    s3_server: S3Server,  # noqa: F811
    azurite: Azurite,  # noqa: F811
    gcs_server: GcsServer,  # noqa: F811
    hub: HubServer,
    http_server: str,
    nginx: Nginx,
) -> None:
    base = {**os.environ, **PLANTED}
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"):
        base.pop(name, None)
    logs = tmp_path.parent / f"{tmp_path.name}-logs"  # outside the searched tree: raw outputs
    logs.mkdir()
    recorder = Recorder(base, logs)

    # S3: the secret key and session token are planted in the credentials themselves.
    bucket = s3_server.new_bucket({"model/config.json": b"{}", "model/w.bin": b"w" * 3000})
    s3_env = {**s3_server.env(), **PLANTED}
    recorder.pull(f"s3://{bucket}/model", tmp_path / "s3", True, **s3_env)
    recorder.pull(f"s3://{bucket}-missing/model", tmp_path / "s3-missing", False, **s3_env)
    storage_config = json.dumps(
        {
            "type": "s3",
            "secret_access_key": CONFIG_SECRET_KEY,
            "access_key_id": CONFIG_ACCESS_KEY,
            "endpoint_url": s3_server.env()["AWS_ENDPOINT_URL"],
        }
    )
    recorder.pull(
        f"s3://{bucket}/model", tmp_path / "s3-config", True, STORAGE_CONFIG=storage_config
    )

    # Azure: a SAS in the URI, and the account key in the environment.
    container = azurite.new_container_name("secret")
    azurite.upload(container, {"model/config.json": b"{}"})
    sas = azurite.sas(container)
    sas_uri = azurite.uri(container, "model", sas=sas)
    azure_env = azurite.env(key=False)
    recorder.pull(sas_uri, tmp_path / "azure", True, **azure_env)
    recorder.pull(
        azurite.uri("nope-container", "model", sas=sas),
        tmp_path / "azure-missing",
        False,
        **azure_env,
    )
    key_env = azurite.env(key=True)
    recorder.pull(azurite.uri(container, "model"), tmp_path / "azure-key", True, **key_env)

    # Hugging Face: a token for a private repo.
    hf_env = {**hub.env(home=str(tmp_path / "hf-home")), "HF_TOKEN": HF_TOKEN}
    recorder.pull("hf://acme/secret-model", tmp_path / "hf", True, **hf_env)
    recorder.pull("hf://acme/no-such-model", tmp_path / "hf-missing", False, **hf_env)
    hub_env = {**hub.env(home=str(tmp_path / "hf-home2")), "HUGGING_FACE_HUB_TOKEN": HUB_TOKEN}
    recorder.pull("hf://acme/secret-model-2", tmp_path / "hf2", True, **hub_env)
    recorder.pull("hf://acme/no-such-model-2", tmp_path / "hf2-missing", False, **hub_env)

    # GCS: a service account key file (its token endpoint is local), and a broken one.
    gcs_bucket = gcs_server.new_bucket({"model/config.json": b"{}"})
    tokens = TokenServer()
    try:
        keyfile = logs / "key.json"
        private_key = service_account_key(keyfile, tokens.url)
        gcs_env = {
            "API_ENDPOINT_OVERRIDE": gcs_server.endpoint,
            "GOOGLE_APPLICATION_CREDENTIALS": str(keyfile),
            "GOOGLE_CLOUD_PROJECT": "si-test",
        }
        recorder.pull(f"gs://{gcs_bucket}/model", tmp_path / "gcs", True, **gcs_env)
        recorder.pull(f"gs://{gcs_bucket}-missing/model", tmp_path / "gcs-x", False, **gcs_env)
        broken = logs / "broken-key.json"
        bad_pem = f"-----BEGIN PRIVATE KEY-----\n{GCS_BAD_KEY}\n-----END PRIVATE KEY-----\n"
        service_account_key(broken, tokens.url, pem=bad_pem)
        gcs_env["GOOGLE_APPLICATION_CREDENTIALS"] = str(broken)
        recorder.pull(f"gs://{gcs_bucket}/model", tmp_path / "gcs-broken", False, **gcs_env)
    finally:
        tokens.close()

    # HTTP: a bearer token in <host>-headers and a password in the URL.
    host = http_server.split(":")[0]
    headers = {f"{host}-headers": json.dumps({"Authorization": f"Bearer {HEADER_TOKEN}"})}
    recorder.pull(f"http://{http_server}/model.bin", tmp_path / "http", True, **headers)
    recorder.pull(f"http://{http_server}/missing.bin", tmp_path / "http-missing", False, **headers)
    recorder.pull(f"http://user:{URL_PASSWORD}@{http_server}/model.bin", tmp_path / "http-pw", True)
    recorder.pull(
        f"http://user:{URL_PASSWORD}@{http_server}/gone.bin", tmp_path / "http-pw-x", False
    )

    # A throttled pull (about 2 s) with a password in the URL and a header token: progress
    # lines in both formats, and `status` while the lease is held.
    folder = nginx.new_dir()
    nginx.put(f"{folder}/model.bin", b"p" * 300_000)
    slow = nginx.url(f"{folder}/model.bin", location="rate/100000")
    slow = slow.replace("://", f"://user:{URL_PASSWORD}@", 1)
    progress_lines = 0
    for log_format in ("text", "json"):
        stderr = recorder.slow_pull(
            slow,
            tmp_path / f"slow-{log_format}",
            STORAGE_INITIALIZER_LOG_FORMAT=log_format,
            **headers,
        )
        progress_lines += sum(
            '"event": "progress"' in line or " INFO progress " in line
            for line in stderr.splitlines()
        )
    assert progress_lines >= 2, "the slow pulls printed no progress lines to search"

    haystack = "\n".join(recorder.outputs) + written_text(tmp_path)
    assert "summary" in haystack  # the runs did produce output to search
    secrets = {
        **PLANTED,
        "HF_TOKEN": HF_TOKEN,
        "header": HEADER_TOKEN,
        "url password": URL_PASSWORD,
        "SAS signature": next(
            v for k, v in (p.split("=", 1) for p in sas.split("&")) if k == "sig"
        ),
        "Azure account key": key_env["AZURE_STORAGE_ACCESS_KEY"],
        "HUGGING_FACE_HUB_TOKEN": HUB_TOKEN,
        "STORAGE_CONFIG access_key_id": CONFIG_ACCESS_KEY,
        "STORAGE_CONFIG secret_access_key": CONFIG_SECRET_KEY,
        "GCS private key (broken)": GCS_BAD_KEY,
        **{
            f"GCS private key, line {n}": line
            for n, line in enumerate(private_key.splitlines())
            if "PRIVATE KEY" not in line
        },
    }
    from urllib.parse import unquote

    leaks = {
        name: value
        for name, value in secrets.items()
        if value in haystack or unquote(value) in haystack
    }
    assert not leaks, f"secrets leaked: {sorted(leaks)}"


def test_status_masks_a_credential_found_in_a_marker(tmp_path: Path) -> None:
    """`status` prints what a marker says; a marker written by another version (or by hand)
    that holds a URL password or a SAS signature must not print them, in text or JSON."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    dest = tmp_path / "dest"
    env = {**os.environ, "STORAGE_INITIALIZER_CONFIG": os.devnull}
    pulled = subprocess.run(
        [sys.executable, "-m", "storage_initializer.entrypoint", str(source), str(dest)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pulled.returncode == 0, pulled.stderr
    marker = dest / ".storage-initializer" / "marker.json"
    data = json.loads(marker.read_text())
    data["source"] = f"https://user:{URL_PASSWORD}@host.example/m.bin?sig={HEADER_TOKEN}"
    marker.chmod(0o644)
    marker.write_text(json.dumps(data))
    for args in (["status"], ["status", "--json"]):
        shown = subprocess.run(
            [sys.executable, "-m", "storage_initializer", *args, str(dest)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "host.example/m.bin" in shown.stdout, shown.stdout + shown.stderr
        assert URL_PASSWORD not in shown.stdout + shown.stderr
        assert HEADER_TOKEN not in shown.stdout + shown.stderr


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_every_planted_variable_is_masked_wherever_it_appears(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end-to-end test above only sees a secret that something printed; this pins that each
    variable is on the redaction list, so a library printing its value later is masked."""
    from storage_initializer.redact import redact

    monkeypatch.setenv(name, PLANTED[name])
    assert PLANTED[name] not in redact(f"the library said: {PLANTED[name]}!")


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_hub_token_variables_are_masked(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from storage_initializer.redact import redact

    monkeypatch.setenv(name, HUB_TOKEN)
    assert HUB_TOKEN not in redact(f"token {HUB_TOKEN}")
