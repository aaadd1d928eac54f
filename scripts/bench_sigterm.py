"""Takeover time after SIGTERM: from the signal to the holder to the lease naming the waiter.

    python scripts/bench_sigterm.py [--rounds 7] [--stalled]

Each round starts a ``pull`` (the holder) from a local HTTP origin that trickles the model at
about 8 MiB/s, then a second ``pull`` of the same model into the same directory (the waiter),
both with the default ``--stale-after`` (30 s); once the waiter says it waits and the holder is
transferring, the holder gets SIGTERM, and the time until the lease file names the waiter is
measured. ``--stalled``: the origin stops sending in the middle of the file instead, so the
holder's worker is stuck inside a request when the signal comes (the engine then gives it
``signals.STOP_GRACE`` before leaving it behind). Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SIZE = 256 << 20
PIECE = 64 << 10
RATE = 8 << 20  # bytes per second per request


def _origin(stalled: threading.Event | None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            """Quiet."""

        def do_HEAD(self) -> None:
            self._answer(False)

        def do_GET(self) -> None:
            self._answer(True)

        def _answer(self, body: bool) -> None:
            start, end = 0, SIZE
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes="):
                first, _, last = wanted[6:].partition("-")
                start, end = int(first or 0), int(last) + 1 if last else SIZE
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", '"bench-sigterm"')
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{SIZE}")
            self.end_headers()
            position = start
            try:
                while body and position < end:
                    if stalled is not None and position - start >= PIECE:
                        stalled.wait(600)  # hold the request after its first piece
                    count = min(PIECE, end - position)
                    self.wfile.write(bytes([position // PIECE % 251]) * count)
                    position += count
                    time.sleep(count / RATE)
            except OSError:
                pass  # the client went away

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _lease(dest: Path) -> dict:
    state = dest / ".storage-initializer"
    try:
        names = sorted(n for n in os.listdir(state) if n.startswith("lease."))
        return json.loads((state / names[-1]).read_text()) if names else {}
    except (OSError, ValueError):
        return {}


def _until(condition, deadline: float = 60.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def one_round(url: str, work: Path) -> float:
    dest = work / "models"
    env = {**os.environ, "STORAGE_INITIALIZER_LOG_FORMAT": "json"}
    argv = [sys.executable, "-m", "storage_initializer", "pull", "--workers", "2", url, dest]
    logs = work / "waiter.log"
    holder = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    waiter = None
    try:
        _until(lambda: _lease(dest).get("pid") == holder.pid, what="the holder's lease")
        with open(logs, "w") as out:
            waiter = subprocess.Popen(argv, env=env, stderr=out)
        _until(lambda: "waiting for" in logs.read_text(), what="the waiter")
        _until(lambda: int(_lease(dest).get("bytes_done", 0)) > 0, what="the transfer")
        signalled = time.monotonic()
        holder.send_signal(signal.SIGTERM)
        _until(lambda: _lease(dest).get("pid") == waiter.pid, what="the takeover")
        took = time.monotonic() - signalled
        code = holder.wait(timeout=30)
        assert code == 143, f"the holder exited {code}"
        return took
    finally:
        for proc in (holder, waiter):
            if proc is not None:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--stalled", action="store_true")
    args = parser.parse_args()
    stalled = threading.Event() if args.stalled else None
    server = _origin(stalled)
    url = f"http://127.0.0.1:{server.server_address[1]}/model.bin"
    times = []
    for number in range(args.rounds):
        with tempfile.TemporaryDirectory("", "bench-sigterm-", None, True) as work:
            took = one_round(url, Path(work))
        times.append(took)
        print(f"round {number}: waiter's lease {took:.3f}s after SIGTERM", flush=True)
    kind = "a stalled origin" if args.stalled else "a trickling origin"
    print(
        f"takeover after SIGTERM ({kind}, stale-after 30): median {statistics.median(times):.3f}s,"
        f" min {min(times):.3f}s, max {max(times):.3f}s over {len(times)} rounds"
    )
    if stalled is not None:
        stalled.set()
    server.shutdown()


if __name__ == "__main__":
    main()
