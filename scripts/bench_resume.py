"""What journalling durable progress costs a pull (docs/concurrency.md, "Resume after a kill").

Runs the transfer engine in process on one file served from memory (no network: only the
engine's own work and the disk count), written into staging below ``--dir``, and prints the
best wall time of a few rounds and the number of progress lines journalled. Run it against
another tree with ``PYTHONPATH=<tree> python3 scripts/bench_resume.py`` to compare.

    python3 scripts/bench_resume.py --size-mib 1024 --workers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from storage_initializer.engine import Engine
from storage_initializer.progress import Progress
from storage_initializer.providers.base import Listing, RemoteFile, Source
from storage_initializer.settings import Settings
from storage_initializer.store import layout
from storage_initializer.store.staging import Staging

MIB = 1 << 20


class MemorySource(Source):
    """One file of repeated random-looking blocks, read in 1 MiB blocks like the providers."""

    default_workers = 4

    def __init__(self, size: int) -> None:
        self.size = size
        self.block = bytes(range(256)) * (MIB // 256)
        crc = 0
        for offset in range(0, size, MIB):
            crc = zlib.crc32(self.block[: min(MIB, size - offset)], crc)
        self.sums = {"crc32": f"{crc:08x}"}

    def list(self) -> Listing:
        return Listing([RemoteFile("w.bin", self.size, self.sums, "v1")], "fp")

    def read(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        stop = self.size if end is None else end
        for offset in range(start, stop, MIB):
            yield self.block[: min(MIB, stop - offset)]


def one_round(root: Path, size: int, workers: int, chunk: int) -> tuple[float, int]:
    source = MemorySource(size)
    entry = layout.direct(root, "k" * 16)
    layout.ensure_state_dir(entry)
    staging = Staging.prepare(entry, "owner", entry.key, "fp")
    settings = Settings(chunk_size=chunk, workers=workers)
    engine = Engine(source, settings, Progress(), threading.Event())
    began = time.monotonic()
    engine.run(source.list().files, staging)
    took = time.monotonic() - began
    journal = staging.dir / "chunks.jsonl"
    lines = len(journal.read_text().splitlines()) if journal.exists() else 0
    return took, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--chunk-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where staging goes (default: a temp dir)")
    args = parser.parse_args()
    times, lines = [], 0
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=args.dir) as work:
            took, lines = one_round(
                Path(work) / "dest", args.size_mib * MIB, args.workers, args.chunk_mib * MIB
            )
            times.append(took)
    best = min(times)
    print(
        f"{args.size_mib} MiB, {args.workers} workers, {args.chunk_mib} MiB chunks: best of "
        f"{args.rounds} {best:.2f}s ({args.size_mib / best:.0f} MiB/s), "
        f"{lines} progress lines journalled"
    )


if __name__ == "__main__":
    main()
