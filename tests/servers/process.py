"""What every test server run as a child process (nginx, moto, fake-gcs-server, Azurite, the
registry, SeaweedFS, git's daemon) needs: a free port to start on, and a stop that cannot hang.

Why one module: each server module had its own copy of both, and they drifted (one waited 10 s,
another 20 s, one never killed).
"""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """A port the kernel considers free right now (the server binds it a moment later; callers
    retry with another port if something took it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def end_process(process: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """Terminate ``process`` if it still runs; kill it if it has not ended ``grace`` seconds
    later."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
