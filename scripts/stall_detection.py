"""How long a stalled transfer holds a pull with the default settings (docs/security.md).

nginx behind the counting proxy (tests/servers/) sends the first 64 KiB of a 1 MiB file at
once, then one byte a second; the KServe entrypoint pulls it with default settings
(--stall-timeout 30, --min-rate 1KiB). Printed: seconds from the first request (its 64 KiB take
no measurable time on loopback, so this is when the trickle begins) to the retry request the
stall guard caused (the guard's detection plus the engine's first backoff, which the log line
states), and the whole pull; then what counting bytes costs each socket read (16-byte reads
from a socketpair, before and after stall.install()).

    python scripts/stall_detection.py

Printed, never asserted.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import clean_env, entrypoint_argv, pattern  # noqa: E402
from tests.servers.nginx import Nginx, start_nginx  # noqa: E402
from tests.servers.proxy import CountingProxy, Fault  # noqa: E402

SIZE = 1 << 20


def main() -> None:
    nginx = start_nginx()
    try:
        _measure(nginx)
    finally:
        nginx.stop()
        shutil.rmtree(nginx.prefix, ignore_errors=True)


def _measure(nginx: Nginx) -> None:
    path = nginx.put("m/model.bin", pattern(SIZE, 5))
    upstream = f"http://127.0.0.1:{nginx.http_port}"
    with CountingProxy(upstream) as server, tempfile.TemporaryDirectory() as tmp:
        server.set_faults(
            Fault(
                kind="trickle",
                method="GET",
                truncate_fraction=(64 << 10) / SIZE,
                delay=1.0,
                times=1,
            )
        )
        url = f"{server.url}/{path}"
        env = clean_env(PYTHONPATH=str(ROOT))
        began = time.monotonic()
        done = subprocess.run(
            entrypoint_argv(url, Path(tmp) / "dest"),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        total = time.monotonic() - began
        gets = server.select(method="GET")
    if done.returncode != 0 or len(gets) < 2:
        print(done.stderr)
        raise SystemExit("the pull did not go as planned")
    retry = gets[1].at - gets[0].at
    backoff = re.search(r"retrying .* in ([0-9.]+)s", done.stderr)
    wait = float(backoff.group(1)) if backoff else 0.0
    print(f"trickle began → retry request: {retry:.1f}s (backoff {wait:.1f}s included)")
    print(f"stall detected after: {retry - wait:.1f}s")
    print(f"whole pull: {total:.1f}s, resumed with {gets[1].range}")


def _read_cost() -> float:
    """Microseconds per unbuffered 16-byte read through socket.SocketIO (best of 5)."""
    best = float("inf")
    for _ in range(5):
        a, b = socket.socketpair()
        reader = b.makefile("rb", buffering=0)
        count = 200_000
        a.sendall(b"x" * count)
        buffer = bytearray(16)
        began = time.perf_counter()
        for _ in range(count // 16):
            reader.readinto(buffer)
        best = min(best, (time.perf_counter() - began) / (count // 16) * 1e6)
        reader.close()
        a.close()
        b.close()
    return best


def cost() -> None:
    from storage_initializer import stall

    plain = _read_cost()
    stall.install()
    wrapped = _read_cost()
    print(f"socket read: {plain:.2f} µs plain, {wrapped:.2f} µs counted (+{wrapped - plain:.2f})")


if __name__ == "__main__":
    main()
    cost()
