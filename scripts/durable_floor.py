"""The disk's floor for a pull: write the model's bytes durably, and nothing else.

``python durable_floor.py DEST SOURCE...`` copies each source file (the bench's local model, in
the page cache) into ``DEST`` with ``O_DIRECT`` in 4 MiB aligned blocks, writes the unaligned
tail through the page cache and ``fdatasync``s every file. No network, no checksum, no page-cache
allocation for the body: what is left is the time the disk needs to take the bytes.

Why the bench has it: a tool that makes every file durable cannot finish before the disk has
the bytes, while the stock initializer and s5cmd do not wait for that. Printed beside them, the
floor says whether a target in wall time (2 x the stock initializer, 0.9 x s5cmd) is reachable
at all by a tool that fsyncs on this machine. ``dd oflag=direct`` would do the same per file,
but 200 small files would each pay a process start; ``dd conv=fsync`` with large blocks
measures the page cache's cost of large writes (expensive on some VMs), not the disk.

Where ``O_DIRECT`` is refused (tmpfs), the file is written through the page cache and
``fdatasync``ed instead.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
from pathlib import Path

BLOCK = 4 << 20
#: O_DIRECT wants the buffer, offset and length aligned to the logical block size; 4 KiB
#: covers every common device.
ALIGN = 4096


def copy_durably(source: Path, target: Path, buffer: mmap.mmap) -> None:
    """Copy ``source`` to ``target``: aligned blocks with O_DIRECT, the tail buffered, fdatasync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        out = os.open(target, flags | os.O_DIRECT, 0o644)
    except OSError:
        out = os.open(target, flags, 0o644)
    view = memoryview(buffer)
    try:
        with open(source, "rb", buffering=0) as inp:
            while True:
                count = inp.readinto(view)
                if not count:
                    break
                aligned = count - count % ALIGN
                if aligned:
                    os.write(out, view[:aligned])
                if aligned < count:  # the tail: leave direct I/O for the last partial block
                    fcntl.fcntl(out, fcntl.F_SETFL, fcntl.fcntl(out, fcntl.F_GETFL) & ~os.O_DIRECT)
                    os.write(out, view[aligned:count])
        os.fdatasync(out)
    finally:
        view.release()
        os.close(out)


def main(argv: list[str]) -> int:
    dest, sources = Path(argv[0]), [Path(a) for a in argv[1:]]
    dest.mkdir(parents=True, exist_ok=True)
    buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    try:
        for index, source in enumerate(sources):
            copy_durably(source, dest / f"{index:04d}-{source.name}", buffer)
    finally:
        buffer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
