"""The benchmark's Hub (tests/servers/hub_process.py): the test Hub in a process of its own,
redirecting LFS files to nginx serving them from disk.

What must hold, or the benchmark's ``hf://`` rows measure something else than a pull from a
Hub: this tool and the stock initializer (huggingface_hub) both get every file byte for byte;
the LFS bytes come from the CDN (nginx's access log has them), never from the Hub process; and
small files come from the Hub itself.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    NO_STOCK_REASON,
    clean_env,
    entrypoint,
    payload,
    poll_until,
    stock_download,
    stock_python,
    tree,
)
from tests.servers import hub_process
from tests.servers.hub import client_env
from tests.servers.nginx import Nginx
from tests.servers.process import end_process, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LFS_MIN = 64 * 1024


MODEL = {
    "config.json": b'{"hidden_size": 8}\n',
    "tokenizer.json": payload(20_000, "tokenizer"),
    "model-00001-of-00002.safetensors": payload(3 * 1024 * 1024 + 7, "w1"),
    "sub/model-00002-of-00002.safetensors": payload(1024 * 1024, "w2"),
}


class ProcessHub:
    def __init__(self, url: str, cdn_dir: str, digests: dict[str, str]) -> None:
        self.url, self.cdn_dir, self.digests = url, cdn_dir, digests


@pytest.fixture(scope="module")
def process_hub(nginx: Nginx, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessHub]:
    model = tmp_path_factory.mktemp("model")
    files = {}
    for name, data in MODEL.items():
        path = model / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[name] = path
    cdn_dir = nginx.new_dir()
    manifest = hub_process.layout(
        "bench/model", files, nginx.docroot / cdn_dir, nginx.url(cdn_dir).rstrip("/"), LFS_MIN
    )
    path = model.parent / "hub.json"
    path.write_text(json.dumps(manifest))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.hub_process", str(path), str(port)],
        cwd=REPO_ROOT,
        env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        poll_until(lambda: process.poll() is not None or _answers(port), 20, "the Hub process")
        assert process.poll() is None, "the Hub process exited"
        digests = {
            name: hashlib.sha256(data).hexdigest()
            for name, data in MODEL.items()
            if len(data) >= LFS_MIN
        }
        yield ProcessHub(url, cdn_dir, digests)
    finally:
        end_process(process)


def _answers(port: int) -> bool:
    import http.client

    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/api/models/bench/model")
        ok = connection.getresponse().status == 200
        connection.close()
        return ok
    except OSError:
        return False


def test_manifest_holds_no_lfs_bytes(process_hub: ProcessHub, nginx: Nginx) -> None:
    """LFS files are known to the Hub by digest and size; their bytes sit in the CDN's docroot."""
    for name, digest in process_hub.digests.items():
        stored = nginx.docroot / process_hub.cdn_dir / "cdn" / digest
        assert stored.read_bytes() == MODEL[name]


def test_this_tool_pulls_lfs_files_from_the_cdn(
    process_hub: ProcessHub, nginx: Nginx, tmp_path: Path
) -> None:
    before = len(nginx.requests(f"/{process_hub.cdn_dir}/cdn/"))
    dest = tmp_path / "model"
    env = clean_env(client_env(process_hub.url, str(tmp_path / "hf-home")))
    result = entrypoint("hf://bench/model", dest, env=env)
    assert result.returncode == 0, result.describe()
    assert tree(dest) == MODEL
    served = nginx.wait_requests(f"/{process_hub.cdn_dir}/cdn/", before + 2)[before:]
    assert {r.uri.rsplit("/", 1)[1] for r in served} == set(process_hub.digests.values())
    assert sum(r.bytes_sent for r in served if r.method == "GET") == sum(
        len(MODEL[name]) for name in process_hub.digests
    )


def test_stock_initializer_pulls_through_the_redirect(
    process_hub: ProcessHub, nginx: Nginx, tmp_path: Path
) -> None:
    """huggingface_hub reads X-Linked-Etag/X-Linked-Size/X-Repo-Commit from the Hub's 302 and
    downloads from the CDN: the stock initializer must work against this Hub unchanged."""
    if stock_python() is None:
        pytest.skip(NO_STOCK_REASON)
    before = len(nginx.requests(f"/{process_hub.cdn_dir}/cdn/"))
    dest = tmp_path / "model"
    env = clean_env(client_env(process_hub.url, str(tmp_path / "hf-home")))
    result = stock_download("hf://bench/model", dest, env, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    got = {k: v for k, v in tree(dest).items() if not k.startswith(".cache/")}
    assert got == MODEL
    served = nginx.wait_requests(f"/{process_hub.cdn_dir}/cdn/", before + 2)[before:]
    fetched = {r.uri.rsplit("/", 1)[1] for r in served if r.method == "GET" and r.status < 300}
    assert fetched == set(process_hub.digests.values())
