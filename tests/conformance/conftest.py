"""One fixture, ``backend``, parametrized over every provider with a real local server: S3
(moto), GCS (fake-gcs-server), Azure Blob (Azurite), plain HTTP (nginx), the Hugging Face Hub and
ModelScope (their test servers), WebHDFS and OCI (the CNCF registry), each behind a fresh
counting proxy. The servers are session-scoped and started on first use, so ``-k s3`` starts
moto alone.

A new backend is a :class:`~tests.conformance.backends.Backend` subclass and a row in
:data:`BACKENDS` (docs/providers/adding-a-backend.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conformance.backends import S3, AzureBlob, Backend, Gcs, Http, ProxyPair, WebHdfsBackend
from tests.conformance.hubs import Hub, ModelScope
from tests.conformance.registries import Oci
from tests.servers.azurite import Azurite, azurite
from tests.servers.gcs import GcsServer, gcs_server
from tests.servers.hub import HubServer, start_hub
from tests.servers.modelscope_hub import ModelScopeHub, start_modelscope_hub
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy
from tests.servers.registry import Registry, registry
from tests.servers.s3 import S3Server, s3_server
from tests.servers.webhdfs import start_webhdfs

#: Session fixtures, started only when asked.
__all__ = ["azurite", "gcs_server", "registry", "s3_server"]


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    server = start_hub()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def modelscope_server() -> Iterator[ModelScopeHub]:
    server = start_modelscope_hub()
    try:
        yield server
    finally:
        server.stop()


def _s3(request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]) -> Backend:
    server: S3Server = request.getfixturevalue("s3_server")
    return S3(server, proxy_for(server.endpoint))


def _gcs(request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]) -> Backend:
    server: GcsServer = request.getfixturevalue("gcs_server")
    return Gcs(server, proxy_for(server.endpoint))


def _azure(request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]) -> Backend:
    server: Azurite = request.getfixturevalue("azurite")
    return AzureBlob(server, proxy_for(f"http://127.0.0.1:{server.port}"))


def _http(request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]) -> Backend:
    server: Nginx = request.getfixturevalue("nginx")
    return Http(server, proxy_for(f"http://127.0.0.1:{server.http_port}"))


def _hub(request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]) -> Backend:
    server: HubServer = request.getfixturevalue("hub_server")
    home: Path = request.getfixturevalue("tmp_path") / "hf-home"
    return Hub(server, proxy_for(server.url), home)


def _modelscope(
    request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]
) -> Backend:
    server: ModelScopeHub = request.getfixturevalue("modelscope_server")
    return ModelScope(server, proxy_for(server.url))


def _webhdfs(request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]) -> Backend:
    server = start_webhdfs()  # per test: the datanode's address is pointed at its proxy
    request.addfinalizer(server.stop)
    namenode = proxy_for(f"http://127.0.0.1:{server.namenode_ports[0]}")
    datanode = proxy_for(f"http://127.0.0.1:{server.datanode_port}")
    server.datanode_port = int(datanode.url.rsplit(":", 1)[1])  # redirects go to the proxy
    home: Path = request.getfixturevalue("tmp_path")
    return WebHdfsBackend(server, ProxyPair(namenode, datanode), home)


def _oci(request: pytest.FixtureRequest, proxy_for: Callable[[str], CountingProxy]) -> Backend:
    server: Registry = request.getfixturevalue("registry")
    home: Path = request.getfixturevalue("tmp_path")
    return Oci(server, proxy_for(server.url), str(home))


#: One row per backend: how to build it from its (session-scoped) server and a fresh proxy.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Callable[[str], CountingProxy]], Backend]] = {
    "s3": _s3,
    "gcs": _gcs,
    "azure-blob": _azure,
    "http": _http,
    "hf": _hub,
    "modelscope": _modelscope,
    "webhdfs": _webhdfs,
    "oci": _oci,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each backend in turn, behind a fresh counting proxy (its server is started on first use
    and shared by the session)."""
    proxies: list[CountingProxy] = []

    def proxy_for(upstream: str) -> CountingProxy:
        proxies.append(CountingProxy(upstream).start())
        return proxies[-1]

    try:
        yield BACKENDS[request.param](request, proxy_for)
    finally:
        for proxy in proxies:
            proxy.stop()
