"""The real OCI registry (CNCF distribution, Debian's ``docker-registry``) on 127.0.0.1.

Why the real one: manifest negotiation (Accept headers, index vs manifest media types), the
``WWW-Authenticate`` challenges of basic (htpasswd) and bearer-token auth, and how blobs are
served are exactly what a client meets in front of a real registry. Three flavours:

* ``auth="none"``: anonymous pull and push;
* ``auth="htpasswd"``: basic auth against a bcrypt htpasswd file (``htpasswd -B``, Debian
  ``apache2-utils``);
* ``auth="token"``: the registry's token auth, with a small token service in this module (the
  registry does not ship one): it checks basic credentials and issues an RS256 JWT whose ``x5c``
  header carries a self-signed certificate the registry trusts through ``rootcertbundle``.

Content is pushed with the registry HTTP API v2 (monolithic blob uploads, manifest PUT), so the
fixture needs nothing beyond requests. Blobs live on disk under :attr:`Registry.storage`, so a
test can tamper with one (:meth:`Registry.blob_path`). Request counts come from the
:class:`tests.servers.proxy.CountingProxy` put in front of it.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.servers.process import end_process, free_port

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"
DEADLINE = 20.0
USER = "puller"
SERVICE = "test-registry"
ISSUER = "si-test-token-service"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_TAR_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_layer(
    files: Mapping[str, bytes],
    *,
    compress: bool = True,
    symlinks: Mapping[str, str] | None = None,
    hardlinks: Mapping[str, str] | None = None,
    dirs: tuple[str, ...] = (),
) -> bytes:
    """A layer tarball: ``files`` (archive path → bytes), then links; gzip unless told not."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
        for name, target in (hardlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.LNKTYPE
            info.linkname = target
            tar.addfile(info)
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


class TokenService:
    """A minimal registry token service: basic auth in, RS256 JWT out (docker token spec)."""

    def __init__(self, directory: Path, password: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.password = password
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "si-token-signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = directory / "token-ca.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.issued = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                service.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> TokenService:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        import jwt

        query = parse_qs(urlsplit(request.path).query)
        header = request.headers.get("Authorization", "")
        account = ""
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if user != USER or password != self.password:
                request.send_response(401)
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
            account = user
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if account:  # anonymous callers get a token that grants nothing
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": account,
            "aud": query.get("service", [""])[0],
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        token = jwt.encode(
            claims,
            self.key,
            algorithm="RS256",
            headers={"x5c": [base64.b64encode(self.cert_der).decode()]},
        )
        self.issued += 1
        body = json.dumps({"token": token, "access_token": token}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


class Registry:
    """One running ``docker-registry``; push helpers speak the v2 API."""

    def __init__(self, prefix: Path, auth: str = "none") -> None:
        self.prefix = prefix
        self.auth = auth
        self.storage = prefix / "storage"
        self.password = "reg-" + secrets.token_hex(12)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.tokens: TokenService | None = None
        self.session = requests.Session()
        self._push_token: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def _config(self) -> str:
        auth = ""
        if self.auth == "htpasswd":
            auth = f"""
auth:
  htpasswd:
    realm: si-test
    path: {self.prefix / "htpasswd"}
"""
        elif self.auth == "token":
            assert self.tokens is not None
            auth = f"""
auth:
  token:
    realm: {self.tokens.realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {self.tokens.bundle}
"""
        return f"""
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
  redirect:
    disable: true
http:
  addr: 127.0.0.1:{self.port}
  secret: {secrets.token_hex(16)}
{auth}
"""

    def start(self) -> Registry:
        self.storage.mkdir(parents=True, exist_ok=True)
        if self.auth == "htpasswd":
            subprocess.run(
                [HTPASSWD, "-Bbc", str(self.prefix / "htpasswd"), USER, self.password],
                check=True,
                capture_output=True,
            )
        elif self.auth == "token":
            self.tokens = TokenService(self.prefix, self.password).start()
        last = ""
        for _attempt in range(5):
            self.port = free_port()
            config = self.prefix / "config.yml"
            config.write_text(self._config())
            log = open(self.prefix / "registry.log", "wb")  # noqa: SIM115 - closed by the process
            self.process = subprocess.Popen(
                [REGISTRY, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready():
                return self
            last = (self.prefix / "registry.log").read_text(errors="replace")
            if "address already in use" not in last:
                break
        raise RuntimeError(f"docker-registry did not start: {last[-2000:]}")

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                answer = requests.get(f"{self.url}/v2/", timeout=1)
                if answer.status_code in (200, 401):
                    return True
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.02)  # readiness-probe interval
        raise RuntimeError("docker-registry did not answer before the deadline")

    def stop(self) -> None:
        end_process(self.process)
        if self.tokens is not None:
            self.tokens.stop()

    # -- addresses and credentials -------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def docker_config(self, path: Path, password: str | None = None, host: str = "") -> Path:
        """A docker config.json with this registry's credentials (``password`` to get it wrong)."""
        auth = base64.b64encode(f"{USER}:{password or self.password}".encode()).decode()
        path.write_text(json.dumps({"auths": {host or self.host: {"auth": auth}}}))
        return path

    def blob_path(self, digest: str) -> Path:
        hexa = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    # -- pushing --------------------------------------------------------------------------------

    def _headers(self, repo: str) -> dict[str, str]:
        if self.auth == "htpasswd":
            token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        if self.auth == "token":
            assert self.tokens is not None
            answer = requests.get(
                self.tokens.realm,
                params={"service": SERVICE, "scope": f"repository:{repo}:pull,push"},
                auth=(USER, self.password),
                timeout=10,
            )
            answer.raise_for_status()
            return {"Authorization": f"Bearer {answer.json()['token']}"}
        return {}

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        headers = self._headers(repo)
        start = self.session.post(f"{self.url}/v2/{repo}/blobs/uploads/", headers=headers)
        assert start.status_code == 202, start.text
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        sep = "&" if "?" in location else "?"
        done = self.session.put(
            f"{location}{sep}digest={digest}",
            data=data,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        assert done.status_code == 201, done.text
        return digest

    def push_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        answer = self.session.put(
            f"{self.url}/v2/{repo}/manifests/{reference}",
            data=body,
            headers={**self._headers(repo), "Content-Type": media_type},
        )
        assert answer.status_code == 201, answer.text
        return digest_of(body)

    def push_image(
        self,
        repo: str,
        tag: str,
        layers: list[tuple[bytes, str]],
        *,
        media_type: str = OCI_MANIFEST,
        arch: str = "amd64",
    ) -> str:
        """Push ``layers`` (bytes, media type) and a config; return the manifest digest."""
        config = json.dumps(
            {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        config_type = (
            OCI_CONFIG
            if media_type == OCI_MANIFEST
            else "application/vnd.docker.container.image.v1+json"
        )
        descriptors = [
            {"mediaType": layer_type, "digest": self.push_blob(repo, data), "size": len(data)}
            for data, layer_type in layers
        ]
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": config_type,
                "digest": self.push_blob(repo, config),
                "size": len(config),
            },
            "layers": descriptors,
        }
        body = json.dumps(manifest, indent=2).encode()
        return self.push_manifest(repo, tag, body, media_type)

    def push_index(
        self, repo: str, tag: str, platforms: Mapping[str, str], media_type: str = OCI_INDEX
    ) -> str:
        """An index of ``{"linux/amd64": manifest digest, …}`` (sizes read back)."""
        entries = []
        for name, digest in platforms.items():
            os_name, _, arch = name.partition("/")
            head = self.session.head(
                f"{self.url}/v2/{repo}/manifests/{digest}",
                headers={**self._headers(repo), "Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
            )
            assert head.status_code == 200, head.status_code
            entries.append(
                {
                    "mediaType": head.headers["Content-Type"],
                    "digest": digest,
                    "size": int(head.headers["Content-Length"]),
                    "platform": {"architecture": arch, "os": os_name},
                }
            )
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries})
        return self.push_manifest(repo, tag, body.encode(), media_type)


def start_registry(auth: str = "none") -> Registry:
    return Registry(Path(tempfile.mkdtemp(prefix=f"si-registry-{auth}-")), auth).start()


def _fixture(auth: str) -> Iterator[Registry]:
    server = start_registry(auth)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.prefix, ignore_errors=True)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """An anonymous registry (reached with KSERVE_OCI_INSECURE_REGISTRY=true)."""
    yield from _fixture("none")


@pytest.fixture(scope="session")
def htpasswd_registry() -> Iterator[Registry]:
    yield from _fixture("htpasswd")


@pytest.fixture(scope="session")
def token_registry() -> Iterator[Registry]:
    yield from _fixture("token")
