"""Two "nodes" whose file locks do not see each other: two sshfs mounts of one directory.

On NFS and friends, ``flock`` taken on one host may be invisible on another. Two FUSE
(sshfs) mounts of one directory reproduce that on one machine: a flock on one mount is not
seen through the other, while files (the lease, the marker) are. Each mount gets its own
``STORAGE_INITIALIZER_NODE_ID`` so the lease treats the two as different hosts (no dead-pid
shortcut across them): only the lease can keep the download single, and it must.

sshd runs on 127.0.0.1 on a free port with a throwaway host key and an authorized key made
here. The test is skipped, saying why, only when the machine cannot provide sshd, sshfs or
FUSE.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.concurrency_helpers import bytes_by_app, lease_of, object_gets, s3_env
from tests.helpers import (
    cli,
    digests,
    entrypoint_argv,
    pattern,
    poll_until,
    start,
    tree_digest,
    wait_all,
)
from tests.servers.process import free_port
from tests.servers.proxy import CountingProxy, Fault
from tests.servers.s3 import S3Server, proxy, s3_server

__all__ = ["proxy", "s3_server"]

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
TOOLS = {"sshd": SSHD, **{t: shutil.which(t) for t in ("sshfs", "ssh-keygen", "fusermount3")}}
#: sshfs must not cache: a lease written through one mount has to be seen through the other
#: at once, as on a network filesystem mounted with close-to-open consistency.
SSHFS_OPTIONS = (
    "StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,"
    "dir_cache=no,attr_timeout=0,entry_timeout=0,negative_timeout=0"
)
CHUNK = 64 * 1024
MODEL = {
    "model/config.json": pattern(2_000, 81),
    "model/weights.bin": pattern(10 * CHUNK, 82),
}
SIZE = sum(len(v) for v in MODEL.values())
LOCAL = digests({k.split("/", 1)[1]: v for k, v in MODEL.items()})


@dataclass
class Nodes:
    shared: Path
    a: Path
    b: Path


def _skip_unless_possible() -> None:
    missing = [name for name, path in TOOLS.items() if not path]
    if missing:
        pytest.skip(f"two-node test needs {', '.join(missing)} (apt: openssh-server sshfs fuse3)")
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("two-node test needs FUSE: /dev/fuse is missing or not accessible")


def _start_sshd(work: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    host_key, client_key = work / "host_key", work / "client_key"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (work / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd started as root insists on its privilege separation directory, which a
        # container without a running sshd service does not have.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = free_port()
    config = work / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {work / 'sshd.pid'}",
                f"AuthorizedKeysFile {work / 'authorized_keys'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "StrictModes no",
                "UsePAM no",
                "PermitRootLogin yes",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    log = open(work / "sshd.log", "wb")  # noqa: SIM115 - lives as long as sshd
    assert SSHD is not None
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    poll_until(
        lambda: "Server listening" in (work / "sshd.log").read_text() or proc.poll() is not None,
        30,
        "sshd to listen",
    )
    if proc.poll() is not None:
        pytest.fail(f"sshd did not start: {(work / 'sshd.log').read_text()}")
    return proc, port, client_key


def _mount(port: int, key: Path, shared: Path, where: Path) -> None:
    where.mkdir()
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    done = subprocess.run(
        [
            "sshfs",
            "-p",
            str(port),
            "-o",
            f"IdentityFile={key},{SSHFS_OPTIONS}",
            f"{user}@127.0.0.1:{shared}",
            str(where),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        reason = done.stderr.strip()
        if "fuse" in reason.lower() and ("permission" in reason.lower() or "device" in reason):
            pytest.skip(f"this machine cannot mount FUSE filesystems: {reason}")
        pytest.fail(f"sshfs mount failed: {reason}")


@pytest.fixture
def nodes(tmp: Path) -> Iterator[Nodes]:
    _skip_unless_possible()
    work = tmp / "sshd"
    work.mkdir()
    shared = tmp / "shared"
    shared.mkdir()
    sshd, port, key = _start_sshd(work)
    mounted: list[Path] = []
    try:
        for name in ("node-a", "node-b"):
            _mount(port, key, shared, tmp / name)
            mounted.append(tmp / name)
        yield Nodes(shared, tmp / "node-a", tmp / "node-b")
    finally:
        for where in mounted:
            subprocess.run(["fusermount3", "-u", "-z", str(where)], check=False)
        sshd.send_signal(signal.SIGTERM)
        sshd.wait(timeout=30)


def _slow(bucket: str, seconds: float) -> Fault:
    return Fault(
        kind="delay",
        delay=seconds,
        method="GET",
        path_contains=f"/{bucket}/",
        predicate=lambda r: "list-type" not in r.query,
    )


def _env(s3: S3Server, proxy: CountingProxy, node: str, app: str, **more: str) -> dict[str, str]:
    return s3_env(
        s3,
        proxy,
        app,
        STORAGE_INITIALIZER_NODE_ID=node,
        STORAGE_INITIALIZER_CHUNK_SIZE="64KiB",
        **more,
    )


def test_flock_is_not_shared_between_the_mounts(nodes: Nodes) -> None:
    """The premise: each mount's flock is private, like flock on NFS across hosts."""
    import fcntl

    (nodes.a / "probe").write_text("x")
    with open(nodes.a / "probe") as one, open(nodes.b / "probe") as two:
        fcntl.flock(one, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(two, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if the lock were shared


def test_processes_on_two_nodes_download_once(
    nodes: Nodes, s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    bucket = s3_server.new_bucket(MODEL)
    proxy.set_faults(_slow(bucket, 0.1))
    uri = f"s3://{bucket}/model"
    procs = []
    for index in range(6):
        node, mount = ("node-a", nodes.a) if index % 2 == 0 else ("node-b", nodes.b)
        env = _env(s3_server, proxy, node, f"{node}-{index}")
        procs.append(start(entrypoint_argv(uri, mount / "models"), env, tmp / "logs"))
    runs = wait_all(procs, timeout=240)
    for result in runs:
        assert result.returncode == 0, result.describe()
    gets = object_gets(proxy, bucket)
    assert sum(r.bytes for r in gets) == SIZE, bytes_by_app(proxy, bucket)
    keys = [(r.path, r.range) for r in gets]
    assert len(keys) == len(set(keys)), keys
    outcomes = sorted(r.outcome() for r in runs)
    assert outcomes.count("downloaded") == 1, outcomes
    for where in (nodes.shared, nodes.a, nodes.b):
        assert tree_digest(where / "models") == LOCAL
    verify = cli("verify", nodes.shared / "models")
    assert verify.returncode == 0, verify.describe()


def test_holder_killed_on_one_node_is_taken_over_from_the_other(
    nodes: Nodes, s3_server: S3Server, proxy: CountingProxy, tmp: Path
) -> None:
    """Across nodes a dead pid proves nothing: the waiter takes over once the heartbeat has
    been silent for --stale-after, and resumes the dead holder's chunks."""
    bucket = s3_server.new_bucket(MODEL)
    proxy.set_faults(_slow(bucket, 0.15))
    uri = f"s3://{bucket}/model"
    # One request at a time: what was fetched before the kill is then at most one chunk
    # more than what the holder journalled.
    stale = {"STORAGE_INITIALIZER_STALE_AFTER": "3", "STORAGE_INITIALIZER_WORKERS": "1"}
    holder = start(
        entrypoint_argv(uri, nodes.a / "models"),
        _env(s3_server, proxy, "node-a", "holder", **stale),
        tmp / "logs",
    )
    poll_until(lambda: (lease_of(nodes.shared / "models") or {}).get("pid"), 60, "the lease")
    waiter = start(
        entrypoint_argv(uri, nodes.b / "models"),
        _env(s3_server, proxy, "node-b", "waiter", **stale),
        tmp / "logs",
    )
    poll_until(lambda: bytes_by_app(proxy, bucket).get("holder", 0) >= 3 * CHUNK, 60, "some chunks")
    holder.popen.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    holder.wait(timeout=30)
    fetched_by_holder = bytes_by_app(proxy, bucket).get("holder", 0)
    poll_until(
        lambda: (lease_of(nodes.shared / "models") or {}).get("host") == "node-b",
        60,
        "the other node's takeover",
    )
    print(f"\ncross-node takeover {time.monotonic() - killed_at:.2f}s after SIGKILL (stale 3s)")
    result = waiter.wait(timeout=120)
    assert result.returncode == 0, result.describe()
    assert tree_digest(nodes.shared / "models") == LOCAL
    after = bytes_by_app(proxy, bucket).get("waiter", 0)
    assert after <= SIZE - fetched_by_holder + CHUNK, (after, fetched_by_holder)
