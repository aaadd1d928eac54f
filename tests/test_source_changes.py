"""A source that changes while it is pulled never produces a stitched file.

Real servers, real processes: nginx and moto behind the counting proxy, whose request hook
replaces the model at the origin at an exact point (when a chosen ranged GET arrives, before it
is forwarded), so "the file changed between two chunks" is a state, not a race. Every pull must
end with the file all-new (or fail clearly after too many changes), never a mix of versions
that its own marker would then call verified. Also: presigned URLs (HEAD refused) against
SeaweedFS, a server that ignores ranges, and one that gives no validator.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from storage_initializer.errors import SourceChangedError
from storage_initializer.providers import open_source
from storage_initializer.settings import Settings
from storage_initializer.uri import parse
from tests.helpers import (
    clean_env,
    cli,
    cli_argv,
    marker_path,
    model_files,
    pattern,
    poll_until,
    sha256,
    start,
    tree_digest,
)
from tests.servers import azurite as azurite_server
from tests.servers.azurite import azurite
from tests.servers.bare_origin import BareOrigin, Seen
from tests.servers.gcs import GcsServer, gcs_server
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault, RequestRecord
from tests.servers.s3 import S3Server, s3_server
from tests.servers.seaweedfs import SeaweedFs, seaweedfs

__all__ = [
    "azurite",
    "gcs_server",
    "s3_server",
    "seaweedfs",
]  # fixtures, imported so that pytest finds them

CHUNK = 64 * 1024
SIZE = 4 * CHUNK + 100
#: Small chunks and one worker: chunks are read in order, one at a time.
ENV = {"STORAGE_INITIALIZER_CHUNK_SIZE": "64KiB", "STORAGE_INITIALIZER_WORKERS": "1"}
#: The conditional request headers a server that ignores them never sees.
CONDITIONS = ("If-Match", "If-Unmodified-Since", "If-Range", "If-None-Match")


def chunk_range(index: int, size: int = SIZE) -> str:
    start = index * CHUNK
    return f"bytes={start}-{min(start + CHUNK, size) - 1}"


class Replacer:
    """A proxy request hook: when a GET whose Range is ``at`` arrives (``times`` times at
    most), the file at the origin is replaced by the next version first. Returns ``answer``
    (whether the fault applies: a ``strip`` fault then removes headers from every GET)."""

    def __init__(
        self,
        replace: Callable[[bytes], None],
        versions: list[bytes],
        at: str,
        times: int = 1,
        answer: bool = False,
    ) -> None:
        self.replace = replace
        self.versions = list(versions)
        self.at = at
        self.times = times
        self.answer = answer
        self.done = 0

    def __call__(self, record: RequestRecord) -> bool:
        asked = record.range or record.headers.get("x-ms-range")  # Azure's own header
        if record.method == "GET" and asked == self.at and self.done < self.times:
            self.replace(self.versions[self.done % len(self.versions)])
            self.done += 1
        return self.answer


def nginx_replacer(nginx: Nginx, path: str) -> Callable[[bytes], None]:
    """Replace a docroot file the way an upload does: a new file renamed over the old one
    (nginx keeps serving open handles the old inode), with a later mtime (its ETag and
    Last-Modified are mtime and size)."""
    target = nginx.docroot / path

    def replace(data: bytes) -> None:
        before = target.stat().st_mtime
        fresh = target.with_name(target.name + ".upload")
        fresh.write_bytes(data)
        os.utime(fresh, (before + 10, before + 10))
        os.replace(fresh, target)

    return replace


def publish(nginx: Nginx, data: bytes) -> tuple[str, str]:
    folder = nginx.new_dir()
    return folder, nginx.put(f"{folder}/model.bin", data)


def proxied(proxy: CountingProxy, nginx: Nginx, path: str) -> str:
    return f"{proxy.url}/{path}"


def assert_true_content(dest: Path, data: bytes) -> None:
    """The destination holds exactly ``data``, its marker records that content, and
    ``verify`` agrees (it would also agree with a stitched file: the content check is the
    assertion that matters)."""
    assert tree_digest(dest) == {"model.bin": sha256(data)}
    marker = json.loads(marker_path(dest).read_text())
    recorded = {f["path"]: f["checksums"] for f in marker["files"]}
    if "sha256" in recorded["model.bin"]:
        assert recorded["model.bin"]["sha256"] == sha256(data)
    verify = cli("verify", dest)
    assert verify.returncode == 0, verify.describe()


# -- HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["honours-if-range", "ignores-conditions"])
def test_http_file_replaced_between_chunks_is_fetched_again_whole(
    nginx: Nginx, tmp: Path, server: str
) -> None:
    """Replaced when its second chunk is asked for: nginx answers the If-Range request with
    the whole new version (or, where the conditions are stripped, a part of it): either way the
    answer's ETag is not the listed one, and the pull lists again and fetches the new version
    whole. Before pinning, this committed a file made of
    chunk 1 of the old version and chunks 2-5 of the new one."""
    old, new = pattern(SIZE, 1), pattern(SIZE, 2)
    _folder, path = publish(nginx, old)
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        replacer = Replacer(nginx_replacer(nginx, path), [new], at=chunk_range(1))
        if server == "honours-if-range":
            proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        else:
            replacer.answer = True
            proxy.set_faults(Fault(kind="strip", strip_headers=CONDITIONS, predicate=replacer))
        result = cli("pull", proxied(proxy, nginx, path), tmp / "dest", env=clean_env(ENV))
        gets = [r for r in proxy.requests if r.method == "GET"]
    assert result.returncode == 0, result.describe()
    assert replacer.done == 1
    assert_true_content(tmp / "dest", new)
    assert "changed at the source during the download" in result.stderr
    replaced = next(r for r in gets if r.range == chunk_range(1))
    assert replaced.status == (200 if server == "honours-if-range" else 206)
    # The new version came whole, once, chunk by chunk, after the one failed request.
    last = [r.range for r in gets if r.range != "bytes=0-0"][-5:]
    assert last == [chunk_range(i) for i in range(5)]


def test_http_file_that_keeps_changing_fails_clearly(nginx: Nginx, tmp: Path) -> None:
    """A file replaced at every attempt: after 3 changes the pull gives up, naming the URI
    and the file; nothing is committed."""
    versions = [pattern(SIZE, seed) for seed in range(10, 16)]
    _folder, path = publish(nginx, pattern(SIZE, 9))
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        replacer = Replacer(nginx_replacer(nginx, path), versions, at=chunk_range(1), times=6)
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        url = proxied(proxy, nginx, path)
        result = cli("pull", url, tmp / "dest", env=clean_env(ENV))
    assert result.returncode != 0, result.describe()
    assert replacer.done == 4
    assert url in result.last_line
    assert "model.bin changed 4 times while it was downloading; gave up" in result.last_line
    assert model_files(tmp / "dest") == {}
    assert not marker_path(tmp / "dest").exists()


def test_resumed_chunks_are_pinned_to_the_staged_version(nginx: Nginx, tmp: Path) -> None:
    """A holder killed mid-file leaves two chunks of version 1 staged; its successor lists the
    same version, adopts them, and the file is replaced just before the successor's first
    read: the staged chunks are discarded with the rest, never joined to version 2."""
    old, new = pattern(SIZE, 21), pattern(SIZE, 22)
    _folder, path = publish(nginx, old)
    dest = tmp / "dest"
    hold = threading.Event()
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        url = proxied(proxy, nginx, path)
        gate = Fault(
            kind="gate",
            gate=hold,
            gate_timeout=300,
            predicate=lambda r: r.method == "GET" and r.range == chunk_range(2),
        )
        proxy.set_faults(gate)
        first = start(cli_argv("pull", url, dest), clean_env(ENV), tmp)
        poll_until(lambda: gate.hits >= 1, what="the first pull to reach its third chunk")
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait().returncode == -signal.SIGKILL
        hold.set()
        replacer = Replacer(nginx_replacer(nginx, path), [new], at=chunk_range(2))
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        second = cli("pull", url, dest, env=clean_env(ENV))
    assert second.returncode == 0, second.describe()
    assert "resuming the download left by a previous owner" in second.stderr
    assert replacer.done == 1
    assert_true_content(dest, new)


def test_http_without_validators_is_read_in_one_stream(tmp: Path) -> None:
    """No ETag, no Last-Modified: a change could not be detected between ranged reads, so the
    file is read in one request (and the log says why, once)."""
    data = pattern(SIZE, 31)
    with BareOrigin({"model.bin": data}) as origin:
        result = cli("pull", origin.url("model.bin"), tmp / "dest", env=clean_env(ENV))
        gets = [r for r in origin.requests if r.method == "GET"]
    assert result.returncode == 0, result.describe()
    assert (tmp / "dest" / "model.bin").read_bytes() == data
    assert [r.range for r in gets] == [None]
    assert result.stderr.count("gives no ETag or Last-Modified") == 1


def test_http_last_modified_only_and_conditions_ignored(tmp: Path) -> None:
    """A server with no ETag, only Last-Modified, that ignores If-Range: the file replaced
    before its third chunk is answered with a newer date, which the read refuses; the new
    version arrives whole."""
    old, new = pattern(SIZE, 33), pattern(SIZE, 34)
    dates = ["Mon, 07 Dec 2026 10:00:00 GMT", "Mon, 07 Dec 2026 10:05:00 GMT"]

    def replace(seen: Seen) -> None:
        if seen.range == chunk_range(2) and origin.files["model.bin"] is old:
            origin.files["model.bin"] = new
            origin.last_modified["model.bin"] = dates[1]

    origin = BareOrigin({"model.bin": old}, {"model.bin": dates[0]}, replace)
    with origin:
        result = cli("pull", origin.url("model.bin"), tmp / "dest", env=clean_env(ENV))
    assert result.returncode == 0, result.describe()
    assert_true_content(tmp / "dest", new)
    assert "changed at the source during the download" in result.stderr


def test_server_that_ignores_ranges_is_read_in_one_stream(nginx: Nginx, tmp: Path) -> None:
    """A server that advertises ranges (Accept-Ranges: bytes) but answers a ranged GET with 200
    and the whole body (here nginx behind a proxy that drops Range): the right bytes, no
    error; after the first such answer, one full read."""
    data = pattern(SIZE, 41)
    _folder, path = publish(nginx, data)
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        proxy.set_faults(Fault(kind="strip", strip_headers=("Range",), method="GET"))
        result = cli("pull", proxied(proxy, nginx, path), tmp / "dest", env=clean_env(ENV))
        gets = [r for r in proxy.requests if r.method == "GET"]
    assert result.returncode == 0, result.describe()
    assert (tmp / "dest" / "model.bin").read_bytes() == data
    assert result.stderr.count("answered a ranged request with 200") == 1
    # The first ranged read(s) answered 200 were dropped; then the file in one request.
    *ranged, whole = gets
    assert ranged and all(r.range is not None and r.status == 200 for r in ranged)
    assert (whole.range, whole.status, whole.bytes) == (None, 200, SIZE)


# -- presigned URLs ----------------------------------------------------------------------------


def test_presigned_url_is_listed_by_a_ranged_get(seaweedfs: SeaweedFs, tmp: Path) -> None:
    """A URL presigned for GET only is refused a HEAD (403): the size and ETag come from a
    one-byte ranged GET and the file is fetched in pinned chunks."""
    data = pattern(SIZE, 51)
    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key="models/model.bin", Body=data)
    url = seaweedfs.presigned_get(bucket, "models/model.bin")
    result = cli("pull", url, tmp / "dest", env=clean_env(ENV))
    assert result.returncode == 0, result.describe()
    assert_true_content(tmp / "dest", data)
    signature = url.split("X-Amz-Signature=", 1)[1].split("&", 1)[0]
    assert signature not in result.output  # the URL is logged redacted


def test_presigned_url_of_an_object_overwritten_mid_pull(seaweedfs: SeaweedFs, tmp: Path) -> None:
    """The same URL while SeaweedFS's object is overwritten between chunks: the answer to the
    next read names another ETag, and the new object arrives whole."""
    old, new = pattern(SIZE, 52), pattern(SIZE, 53)
    bucket = seaweedfs.new_bucket()
    client = seaweedfs.client()
    client.put_object(Bucket=bucket, Key="model.bin", Body=old)
    with CountingProxy(seaweedfs.endpoint) as proxy:
        url = seaweedfs.presigned_get(bucket, "model.bin", endpoint=proxy.url)

        def replace(data: bytes) -> None:
            client.put_object(Bucket=bucket, Key="model.bin", Body=data)

        replacer = Replacer(replace, [new], at=chunk_range(2))
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        result = cli("pull", url, tmp / "dest", env=clean_env(ENV))
    assert result.returncode == 0, result.describe()
    assert replacer.done == 1
    assert_true_content(tmp / "dest", new)


# -- S3 ---------------------------------------------------------------------------------------


def s3_env(server: S3Server, endpoint: str) -> dict[str, str]:
    env = clean_env(ENV)
    env.update(server.env(endpoint))
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def use_s3(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """This process's environment points at ``server`` (for in-process providers)."""
    for name, value in s3_env(server, server.endpoint).items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


def test_s3_multipart_object_overwritten_mid_pull(
    s3_server: S3Server, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart object has no MD5 ETag and, uploaded without x-amz-checksum, no checksum at
    all: nothing but pinning stands between an overwrite and a stitched file. The read of the
    third chunk is answered 412 (If-Match the listed ETag); the new object arrives whole."""
    old = [pattern(5 << 20, 61), pattern(CHUNK, 62)]
    new = [pattern(5 << 20, 63), pattern(CHUNK, 64)]
    size = sum(map(len, old))
    bucket = s3_server.new_bucket()
    s3_server.upload_multipart(bucket, "m/model.bin", old)
    with CountingProxy(s3_server.endpoint) as proxy:
        replacer = Replacer(
            lambda parts: s3_server.upload_multipart(bucket, "m/model.bin", parts),
            [new],  # type: ignore[list-item]
            at=chunk_range(2, size),
        )
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        result = cli("pull", f"s3://{bucket}/m", tmp / "dest", env=s3_env(s3_server, proxy.url))
        failed = [r for r in proxy.requests if r.status == 412]
    assert result.returncode == 0, result.describe()
    assert_true_content(tmp / "dest", b"".join(new))
    assert replacer.done == 1 and failed  # the chunk read next may fail the same way
    fingerprint = json.loads(marker_path(tmp / "dest").read_text())["fingerprint"]
    use_s3(monkeypatch, s3_server)
    source = open_source(parse(f"s3://{bucket}/m"), Settings())
    try:
        assert source.list().fingerprint == fingerprint  # the version fetched, not the first
    finally:
        source.close()


def test_s3_read_of_a_replaced_object_raises_source_changed(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider contract: read(file) pins to file.version and raises SourceChangedError
    once the object has another one."""
    use_s3(monkeypatch, s3_server)
    bucket = s3_server.new_bucket({"m/a.bin": b"one" * 1000})
    source = open_source(parse(f"s3://{bucket}/m"), Settings())
    try:
        (file,) = source.list().files
        assert b"".join(source.read(file, 10, 20)) == (b"one" * 1000)[10:20]
        s3_server.upload(bucket, {"m/a.bin": b"two" * 1000})
        with pytest.raises(SourceChangedError, match="changed"):
            b"".join(source.read(file, 10, 20))
    finally:
        source.close()


def test_s3_model_changed_mid_pull_is_committed_from_one_listing(
    s3_server: S3Server, tmp: Path
) -> None:
    """While the big file downloads, the whole model is re-uploaded: a small file that was
    already fetched and verified changes too, and a file appears. Every file ends up from the
    new listing: the verified old small file is discarded, not kept under the new marker."""
    old = {"m/a.json": b'{"v": 1}', "m/b.bin": [pattern(5 << 20, 71), pattern(CHUNK, 72)]}
    new_b = [pattern(5 << 20, 73), pattern(CHUNK, 74)]
    size = (5 << 20) + CHUNK
    bucket = s3_server.new_bucket({"m/a.json": old["m/a.json"]})  # type: ignore[dict-item]
    s3_server.upload_multipart(bucket, "m/b.bin", old["m/b.bin"])  # type: ignore[arg-type]

    def upload_new(_: bytes) -> None:
        s3_server.upload(bucket, {"m/a.json": b'{"v": 2}', "m/c.txt": b"new file"})
        s3_server.upload_multipart(bucket, "m/b.bin", new_b)

    with CountingProxy(s3_server.endpoint) as proxy:
        replacer = Replacer(upload_new, [b""], at=chunk_range(2, size))
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        result = cli("pull", f"s3://{bucket}/m", tmp / "dest", env=s3_env(s3_server, proxy.url))
    assert result.returncode == 0, result.describe()
    assert replacer.done == 1
    assert tree_digest(tmp / "dest") == {
        "a.json": sha256(b'{"v": 2}'),
        "b.bin": sha256(b"".join(new_b)),
        "c.txt": sha256(b"new file"),
    }
    verify = cli("verify", tmp / "dest")
    assert verify.returncode == 0, verify.describe()


def test_cache_mode_commits_the_version_fetched(nginx: Nginx, tmp: Path) -> None:
    """In cache mode too: the version directory holds the new file whole, and its marker the
    fingerprint of the listing it came from (a later --revalidate finds nothing to do)."""
    old, new = pattern(SIZE, 81), pattern(SIZE, 82)
    _folder, path = publish(nginx, old)
    cache = tmp / "cache"
    with CountingProxy(f"http://127.0.0.1:{nginx.http_port}") as proxy:
        replacer = Replacer(nginx_replacer(nginx, path), [new], at=chunk_range(3))
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        url = proxied(proxy, nginx, path)
        result = cli("pull", "--cache-dir", cache, url, tmp / "dest", env=clean_env(ENV))
        assert result.returncode == 0, result.describe()
        assert replacer.done == 1
        assert (tmp / "dest" / "model.bin").read_bytes() == new
        again = cli(
            "pull", "--cache-dir", cache, "--revalidate", url, tmp / "d2", env=clean_env(ENV)
        )
    assert again.returncode == 0, again.describe()
    assert "has not changed since it was downloaded" in again.stderr
    assert (tmp / "d2" / "model.bin").read_bytes() == new


# -- GCS --------------------------------------------------------------------------------------


def test_gcs_object_overwritten_mid_pull_is_fetched_whole(gcs_server: GcsServer, tmp: Path) -> None:
    """Reads pinned to the listed generation: once the object is overwritten, the next chunk
    read finds no such generation; the pull lists again and fetches the new one whole (before,
    that read failed the pull)."""
    old, new = pattern(SIZE, 91), pattern(SIZE, 92)
    bucket = gcs_server.new_bucket({"m/model.bin": old})
    with CountingProxy(gcs_server.endpoint) as proxy:
        replacer = Replacer(
            lambda data: gcs_server.upload(bucket, {"m/model.bin": data}), [new], at=chunk_range(2)
        )
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        env = clean_env(ENV)
        env.update(gcs_server.env(proxy.url))
        result = cli("pull", f"gs://{bucket}/m", tmp / "dest", env=env)
    assert result.returncode == 0, result.describe()
    assert replacer.done == 1
    assert_true_content(tmp / "dest", new)
    assert "changed at the source during the download" in result.stderr


# -- Azure Blob -------------------------------------------------------------------------------


def test_azure_blob_overwritten_mid_pull_is_fetched_whole(
    azurite: azurite_server.Azurite, tmp: Path
) -> None:
    """Reads carry If-Match with the listed ETag: Azurite answers 412 once the blob is
    overwritten, and the pull lists again and fetches the new blob whole (before, that 412
    failed the pull)."""
    old, new = pattern(SIZE, 95), pattern(SIZE, 96)
    container = azurite.new_container_name("change")
    azurite.upload(container, {"m/model.bin": old})
    with CountingProxy(f"http://127.0.0.1:{azurite.port}") as proxy:
        replacer = Replacer(
            lambda data: azurite.upload(container, {"m/model.bin": data}), [new], at=chunk_range(2)
        )
        proxy.set_faults(Fault(kind="status", status=599, predicate=replacer))
        env = clean_env(ENV)
        env.update(azurite.env(endpoint=f"{proxy.url}/{azurite.account}"))
        result = cli("pull", azurite.uri(container, "m"), tmp / "dest", env=env)
        failed = [r for r in proxy.requests if r.status == 412]
    assert result.returncode == 0, result.describe()
    assert replacer.done == 1 and failed
    assert_true_content(tmp / "dest", new)
