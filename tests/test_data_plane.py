"""The data plane against a real S3 server (moto) on 127.0.0.1: checksum ranking (combinable CRCs
before MD5), CRC64NVME end to end, write sizes and direct I/O, the lean ranged GET.

Every pull runs ``python -m storage_initializer pull`` as its own process with a small chunk
size, so large files are fetched in concurrent ranged chunks and reassembled on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest

from storage_initializer import checksums, crcmath, writer
from storage_initializer.errors import (
    AccessDeniedError,
    SourceChangedError,
    TransientError,
)
from storage_initializer.providers import s3 as s3mod
from tests.helpers import clean_env, cli_argv, run
from tests.object_store import MiB, read_until_broken
from tests.servers.nginx import Nginx
from tests.servers.proxy import CountingProxy, Fault, s3_error
from tests.servers.s3 import S3Server, proxy, s3_server
from tests.test_s3 import (
    _crc64nvme,
    cli_env,
    payload,
    put_with_checksum,
    read_all,
    run_pull,
    s3_env,
    source_for,
    tree,
    via_proxy,
)

__all__ = [
    "proxy",
    "s3_env",
    "s3_server",
    "via_proxy",
]  # fixtures, imported so that pytest finds them

CHUNK = 64 * 1024


def small_chunks(server: S3Server, **extra: str) -> dict[str, str]:
    return {
        **cli_env(server),
        "STORAGE_INITIALIZER_CHUNK_SIZE": str(CHUNK),
        "STORAGE_INITIALIZER_WORKERS": "4",
        "STORAGE_INITIALIZER_RETRIES": "1",
        **extra,
    }


def recorded_checksums(dest: Path) -> dict[str, dict[str, str]]:
    """path -> checksums from the marker the pull wrote."""
    (marker,) = dest.rglob("marker.json")
    data = json.loads(marker.read_text())
    return {item["path"]: item["checksums"] for item in data["files"]}


def test_combinable_crcs_rank_before_md5() -> None:
    announced = {"md5": "0" * 32, "sha256": "1" * 64, "crc32": "2" * 8}
    assert checksums.choose(announced) == "crc32"
    assert checksums.choose({**announced, "crc32c": "3" * 8}) == "crc32c"
    assert checksums.choose({**announced, "crc64nvme": "4" * 16}) == "crc64nvme"
    assert checksums.choose({"md5": "0" * 32, "sha256": "1" * 64}) == "md5"


def test_crc64nvme_combines_across_chunks() -> None:
    data = payload(300_001, 5)
    update = crcmath.updater("crc64nvme")
    assert update is not None
    whole = crcmath.hexdigest(update(data, 0), "crc64nvme")
    assert whole == f"{_crc64nvme(data):016x}"  # against the test's pure-Python reference
    value = 0
    for start in range(0, len(data), 65_536):
        part = data[start : start + 65_536]
        value = crcmath.combine("crc64nvme", value, update(part, 0), len(part))
    assert crcmath.hexdigest(value, "crc64nvme") == whole


def test_crc64nvme_announced_with_an_md5_etag_verifies_a_chunked_pull(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """An object as current AWS SDKs upload it: CRC64NVME and an MD5 ETag. It is fetched in
    ranged chunks and verified with the CRC64NVME (combined from the chunks), which the marker
    records."""
    bucket = s3_server.new_bucket({"model/config.json": b"{}"})
    data = payload(10 * CHUNK + 7, 3)
    value = _crc64nvme(data).to_bytes(8, "big")
    put_with_checksum(s3_server, bucket, "model/weights.bin", data, "CRC64NVME", value)
    dest = tmp_path / "out"
    result = run_pull(f"s3://{bucket}/model", dest, env=small_chunks(s3_server))
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree(dest) == {"config.json": b"{}", "weights.bin": data}
    assert recorded_checksums(dest)["weights.bin"] == {"crc64nvme": value.hex()}


def test_a_wrong_crc64nvme_fails_the_pull_even_with_a_matching_md5_etag(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """The CRC is what is checked (the ETag's MD5 would have passed): damaged bytes behind a
    stored CRC64NVME fail the pull, naming the file and the algorithm."""
    bucket = s3_server.new_bucket({"model/config.json": b"{}"})
    data = payload(5 * CHUNK + 1, 4)
    damaged = bytearray(_crc64nvme(data).to_bytes(8, "big"))
    damaged[0] ^= 0x80
    put_with_checksum(s3_server, bucket, "model/weights.bin", data, "CRC64NVME", bytes(damaged))
    dest = tmp_path / "out"
    result = run_pull(f"s3://{bucket}/model", dest, env=small_chunks(s3_server))
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "weights.bin failed verification: crc64nvme " in last, last
    assert not dest.exists() or tree(dest) == {}


# -- writes -------------------------------------------------------------------------------------


def faulty(proxy: CountingProxy) -> list[Fault]:
    """Cut bodies and 500s on some GETs: retries resume chunks at unaligned offsets."""
    faults = [
        Fault(status=500, method="GET", path_contains="/model/", probability=0.1, seed=1),
        Fault(
            kind="truncate",
            method="GET",
            path_contains="/model/",
            probability=0.2,
            truncate_fraction=0.37,
            seed=3,
        ),
    ]
    proxy.set_faults(*faults)
    return faults


def pull_through_faults(
    s3_server: S3Server,
    proxy: CountingProxy,
    dest: Path,
    files: dict[str, bytes],
    env: dict[str, str],
    *flags: str,
) -> subprocess.CompletedProcess[str]:
    """``files`` (keys under ``model/``) pulled through ``proxy`` with :func:`faulty`'s cuts
    and 500s, with ``env`` over :func:`small_chunks`: the pull must succeed byte-identically
    and at least one fault must have been injected. Returns the pull's run."""
    bucket = s3_server.new_bucket(files)
    faults = faulty(proxy)
    env = {
        **small_chunks(s3_server),
        **s3_server.env(proxy.url),
        "STORAGE_INITIALIZER_RETRIES": "12",
        **env,
    }
    result = run_pull(f"s3://{bucket}/model", dest, *flags, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree(dest) == {k[len("model/") :]: v for k, v in files.items()}
    assert sum(f.hits for f in faults) > 0, "no fault was injected: the test proves nothing"
    return result


@pytest.mark.parametrize(
    ("read_size", "write_size"),
    [("256KiB", "4097"), ("16KiB", "16KiB"), ("4097", "1MiB"), ("1MiB", "32KiB")],
)
def test_every_read_and_write_size_reassembles_files_byte_identically(
    s3_server: S3Server, proxy: CountingProxy, tmp_path: Path, read_size: str, write_size: str
) -> None:
    files = {
        "model/a.bin": payload(10 * CHUNK + 7, 1),
        "model/b.bin": payload(3 * CHUNK, 2),
        "model/small.json": payload(5000, 3),
        "model/empty": b"",
    }
    sizes = {
        "STORAGE_INITIALIZER_READ_SIZE": read_size,
        "STORAGE_INITIALIZER_WRITE_SIZE": write_size,
    }
    pull_through_faults(s3_server, proxy, tmp_path / "out", files, sizes)


def test_buffered_sink_writes_blocks_in_pieces(tmp_path: Path) -> None:
    data = payload(100_003, 4)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        sink = writer.Writer(write_size=4096).open(fd, path, 0, len(data))
        assert isinstance(sink, writer.BufferedSink)
        sink.write(data[:70_000], 0)
        sink.write(data[70_000:], 70_000)
        sink.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_buffered_pieces_end_on_write_size_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks read eagerly arrive in any size: the pieces are cut so that each ends on a
    multiple of the write size, filling whole page-cache folios, and every byte lands."""
    data = payload(50_000, 6)
    path = tmp_path / "f"
    writes: list[tuple[int, int]] = []
    real = writer.pwrite_all

    def recording(fd: int, chunk: bytes | memoryview, offset: int) -> None:
        writes.append((offset, len(chunk)))
        real(fd, chunk, offset)

    monkeypatch.setattr(writer, "pwrite_all", recording)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        sink = writer.Writer(write_size=4096).open(fd, path, 0, len(data))
        cuts = [0, 1000, 1001, 9000, 20_480, 45_000, 50_000]  # blocks of odd sizes
        for start, end in itertools.pairwise(cuts):
            sink.write(data[start:end], start)
        sink.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert all(size <= 4096 for _, size in writes)
    interior = [offset + size for offset, size in writes if offset + size not in cuts]
    assert interior and all(end % 4096 == 0 for end in interior), writes


def _direct_or_skip(directory: Path) -> None:
    if not writer.direct_io_supported(directory):
        pytest.skip(f"the filesystem of {directory} does not support O_DIRECT")


def test_direct_sink_writes_aligned_blocks_and_a_buffered_tail(tmp_path: Path) -> None:
    _direct_or_skip(tmp_path)
    size = writer.DIRECT_MIN_SIZE + writer.DIRECT_BUFFER + 4097
    data = payload(size, 5)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        sink = writer.Writer(direct=True).open(fd, path, 0, size)
        assert isinstance(sink, writer.DirectSink)
        position = 0
        for length in itertools.cycle((1, 65_537, 1 << 20, 333)):
            if position >= size:
                break
            block = data[position : position + length]
            sink.write(block, position)
            position += len(block)
        sink.close()
        # A sink starting at an unaligned offset (a resumed chunk) writes through the cache.
        assert isinstance(writer.Writer(direct=True).open(fd, path, 17, size), writer.BufferedSink)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


@pytest.mark.parametrize("asked_by", ["env", "flag"])
def test_direct_io_pull_with_faults_is_byte_identical(
    s3_server: S3Server, proxy: CountingProxy, tmp_path: Path, asked_by: str
) -> None:
    _direct_or_skip(tmp_path)
    files = {
        "model/big.bin": payload(writer.DIRECT_MIN_SIZE + 3 * MiB + 4097, 6),
        "model/small.bin": payload(100_000, 7),
    }
    env = {"STORAGE_INITIALIZER_CHUNK_SIZE": "1MiB"}
    if asked_by == "env":
        env["STORAGE_INITIALIZER_DIRECT_IO"] = "true"
    flags = ("--direct-io", "--write-size", "64KiB") if asked_by == "flag" else ()
    result = pull_through_faults(s3_server, proxy, tmp_path / "out", files, env, *flags)
    assert "direct I/O is not possible" not in result.stderr


# -- the lean S3 GET ----------------------------------------------------------------------------


def lean_source(uri: str) -> s3mod.S3Source:
    source = source_for(uri)
    assert source._lean is not None, "the lean path is not in use"
    return source


def test_lean_get_is_presigned_ranged_and_pinned(
    s3_env: S3Server, via_proxy: CountingProxy
) -> None:
    data = payload(300_000, 8)
    bucket = s3_env.new_bucket({"m/a": data})
    source = lean_source(f"s3://{bucket}/m")
    (file,) = source.list().files
    assert read_all(source, file, 1000, 200_000) == data[1000:200_000]
    assert read_all(source, file) == data
    gets = [r for r in via_proxy.requests if r.method == "GET" and r.path.endswith("/m/a")]
    assert len(gets) == 2
    assert all("X-Amz-Signature=" in r.query for r in gets)  # SigV4, signed by botocore
    assert gets[0].range == "bytes=1000-199999" and gets[1].range is None
    etag = file.version.partition("@")[0]
    assert all(r.headers.get("If-Match") == f'"{etag}"' for r in gets), gets[0].headers


def test_lean_get_of_an_object_replaced_after_listing_is_source_changed(
    s3_env: S3Server,
) -> None:
    bucket = s3_env.new_bucket({"m/a": b"version one"})
    source = lean_source(f"s3://{bucket}/m")
    (file,) = source.list().files
    s3_env.upload(bucket, {"m/a": b"version two!"})
    with pytest.raises(SourceChangedError, match=r"\(a\).*changed after it was listed"):
        read_all(source, file)


def test_lean_get_errors_are_mapped_like_the_sdk_path(
    s3_env: S3Server, via_proxy: CountingProxy
) -> None:
    bucket = s3_env.new_bucket({"m/a": b"payload", "m/b": b"other"})
    source = lean_source(f"s3://{bucket}/m")
    first, second = source.list().files
    s3_env.client().delete_object(Bucket=bucket, Key="m/a")
    # Gone after the listing: a change of the source (the pull lists again), as on the SDK path.
    with pytest.raises(SourceChangedError, match="disappeared"):
        read_all(source, first)
    via_proxy.set_faults(s3_error("AccessDenied", "Access Denied", status=403, method="GET"))
    with pytest.raises(AccessDeniedError, match="AccessDenied"):
        read_all(source, second)
    via_proxy.set_faults(
        s3_error(
            "SlowDown", "Reduce your rate", status=503, method="GET", headers={"Retry-After": "7"}
        )
    )
    with pytest.raises(TransientError, match="SlowDown") as raised:
        read_all(source, second)
    assert raised.value.retry_after == 7.0  # the engine's backoff honours it
    via_proxy.set_faults()
    assert read_all(source, second) == b"other"


def test_lean_get_body_cut_off_is_transient_and_resumes(
    s3_env: S3Server, via_proxy: CountingProxy
) -> None:
    data = payload(3 * MiB, 9)
    bucket = s3_env.new_bucket({"m/a": data})
    source = lean_source(f"s3://{bucket}/m")
    (file,) = source.list().files
    via_proxy.set_faults(Fault(kind="truncate", truncate_fraction=0.5, method="GET", times=1))
    received = read_until_broken(source, file)
    assert 0 < len(received) < len(data)
    assert read_all(source, file, len(received)) == data[len(received) :]


def test_lean_get_is_not_used_behind_a_proxy(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    bucket = s3_env.new_bucket({"m/a": b"x"})
    assert source_for(f"s3://{bucket}/m")._lean is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert source_for(f"s3://{bucket}/m")._lean is not None


# -- a model larger than the memory limit ---------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _memory_cgroup(name: str, limit: int) -> tuple[Path, Path]:
    """A fresh memory cgroup (v2, else v1): its directory and the file counting OOM kills."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        group = CGROUP_ROOT / name
        group.mkdir()
        (group / "memory.max").write_text(f"{limit}\n")
        with contextlib.suppress(OSError):
            (group / "memory.swap.max").write_text("0\n")
        return group, group / "memory.events"
    group = CGROUP_ROOT / "memory" / name
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(f"{limit}\n")
    with contextlib.suppress(OSError):
        (group / "memory.memsw.limit_in_bytes").write_text(f"{limit}\n")
    return group, group / "memory.oom_control"


def _oom_kills(events: Path) -> int:
    for line in events.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct-io"])
def test_a_model_four_times_the_memory_limit_is_pulled_within_it(
    nginx: Nginx, tmp_path: Path, direct: bool
) -> None:
    """The pull runs in a cgroup whose memory limit (page cache included, as in a pod) is a
    quarter of the file: written back as it goes, it is neither OOM-killed nor stalled."""
    limit = 128 * MiB
    if direct:
        _direct_or_skip(tmp_path)
    try:
        group, events = _memory_cgroup(f"si-test-{os.getpid()}-{int(direct)}", limit)
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {CGROUP_ROOT}: {exc}")
    try:
        folder = nginx.new_dir()
        source = nginx.docroot / folder / "big.bin"
        digest = hashlib.sha256()
        with open(source, "wb") as handle:
            for index in range(4 * limit // (8 * MiB)):
                block = hashlib.sha256(str(index).encode()).digest() * (8 * MiB // 32)
                handle.write(block)
                digest.update(block)
        dest = tmp_path / "out"
        env = clean_env({"STORAGE_INITIALIZER_DIRECT_IO": "true" if direct else "false"})
        join = 'echo $$ > "$0" && exec "$@"'
        argv = ["sh", "-c", join, str(group / "cgroup.procs")]
        result = run([*argv, *cli_argv("pull", nginx.url(f"{folder}/big.bin"), dest)], env)
        assert result.returncode == 0, result.describe()
        assert _oom_kills(events) == 0
        with open(dest / "big.bin", "rb") as handle:
            assert hashlib.file_digest(handle, "sha256").hexdigest() == digest.hexdigest()
        source.unlink()
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


@pytest.mark.parametrize(
    "endpoint", [{"endpoint_url": "http://127.0.0.1:9"}, {}], ids=["custom-endpoint", "aws"]
)
def test_lean_urls_carry_the_signature_botocore_presigns(endpoint: dict[str, str]) -> None:
    """The lean path signs keys itself from one URL botocore presigned per bucket: the URL of
    any key (unicode, reserved characters, a version) has botocore's own signature."""
    import urllib.parse

    import boto3
    from botocore.config import Config

    from storage_initializer.providers.s3_lean import LeanGetter

    client = boto3.session.Session().client(
        "s3",
        region_name="eu-west-1",
        aws_access_key_id="AKIAEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(signature_version="s3v4"),
        **endpoint,
    )
    lean = LeanGetter(client, "my-bucket", True, (1.0, 1.0), lambda exc, where: exc)  # type: ignore[arg-type, return-value]
    for key, version in (("a b/ü~+?#%x", "v1"), ("plain/key.bin", None), ("x//y", None)):
        for _ in range(3):  # the same second, so that X-Amz-Date (and the signature) agree
            ours = lean._sign(key, version)
            params = {"Bucket": "my-bucket", "Key": key} | (
                {"VersionId": version} if version else {}
            )
            theirs = client.generate_presigned_url("get_object", Params=params, ExpiresIn=3600)
            mine, botos = (urllib.parse.urlsplit(u) for u in (ours, theirs))
            first, second = (urllib.parse.parse_qs(u.query) for u in (mine, botos))
            if first["X-Amz-Date"] == second["X-Amz-Date"]:
                break
        assert (mine.netloc, mine.path) == (botos.netloc, botos.path)
        assert first == second
