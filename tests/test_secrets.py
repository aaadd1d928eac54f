"""Secrets never leak: a secret planted in every credential variable, in a SAS URI, in a URL's
password and in a ``<host>-headers`` value is searched for in everything the tool prints and
everything it writes on the volume, for successful and failing pulls of every backend."""

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

from tests.servers.azurite import Azurite, azurite  # noqa: F401 - session fixture
from tests.servers.hub import HubServer, start_hub
from tests.servers.s3 import S3Server, s3_server  # noqa: F401 - session fixture

PLANTED = {
    "AWS_SECRET_ACCESS_KEY": "awsSecretPLANTED0001",
    "AWS_SESSION_TOKEN": "awsSessionPLANTED0002",
    "AZURE_CLIENT_SECRET": "azClientPLANTED0003",
    "AZ_CLIENT_SECRET": "azLegacyPLANTED0004",
    "GIT_PASSWORD": "gitPassPLANTED0005",
    "MODELSCOPE_API_TOKEN": "msTokenPLANTED0006",
}
HF_TOKEN = "hfTokenPLANTED0007"
HEADER_TOKEN = "headerPLANTED0008"
URL_PASSWORD = "urlPassPLANTED0009"


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
    yield server
    server.stop()


class Recorder:
    """Runs the CLI and keeps everything it printed."""

    def __init__(self, base_env: dict[str, str]) -> None:
        self.base_env = base_env
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
            self.run(["storage_initializer", "status", "--json", str(target)])
            if ok:
                self.run(["storage_initializer", "verify", str(target)])


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
    hub: HubServer,
    http_server: str,
) -> None:
    base = {**os.environ, **PLANTED}
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        base.pop(name, None)
    recorder = Recorder(base)

    # S3: the secret key and session token are planted in the credentials themselves.
    bucket = s3_server.new_bucket({"model/config.json": b"{}", "model/w.bin": b"w" * 3000})
    s3_env = {**s3_server.env(), **PLANTED}
    recorder.pull(f"s3://{bucket}/model", tmp_path / "s3", True, **s3_env)
    recorder.pull(f"s3://{bucket}-missing/model", tmp_path / "s3-missing", False, **s3_env)
    storage_config = json.dumps(
        {
            "type": "s3",
            "secret_access_key": PLANTED["AWS_SECRET_ACCESS_KEY"],
            "access_key_id": "AKIAPLANTED00010",
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

    # HTTP: a bearer token in <host>-headers and a password in the URL.
    host = http_server.split(":")[0]
    headers = {f"{host}-headers": json.dumps({"Authorization": f"Bearer {HEADER_TOKEN}"})}
    recorder.pull(f"http://{http_server}/model.bin", tmp_path / "http", True, **headers)
    recorder.pull(f"http://{http_server}/missing.bin", tmp_path / "http-missing", False, **headers)
    recorder.pull(f"http://user:{URL_PASSWORD}@{http_server}/model.bin", tmp_path / "http-pw", True)
    recorder.pull(
        f"http://user:{URL_PASSWORD}@{http_server}/gone.bin", tmp_path / "http-pw-x", False
    )

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
    }
    from urllib.parse import unquote

    leaks = {
        name: value
        for name, value in secrets.items()
        if value in haystack or unquote(value) in haystack
    }
    assert not leaks, f"secrets leaked: {sorted(leaks)}"
