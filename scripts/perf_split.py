#!/usr/bin/env python3
"""Where a pull's CPU went, from ``perf script`` output: by kind of work and by phase.

    perf record -F 2000 -g -o pull.data -- taskset -c 0 \\
        python3 -m storage_initializer.entrypoint http://127.0.0.1:PORT/model.bin /tmp/dest
    perf script -i pull.data > pull.txt
    scripts/perf_split.py pull.txt [--hz 2000]

Each sample is put in the first kind whose keyword appears in its call chain (kernel and
native frames; Python 3.11 frames show only as the interpreter), and in a phase: before the
first socket receive (start: interpreter, imports, listing), up to the last one (transfer),
after it (finish: verification, fsync of directories, commit, exit). Used for the profile in
docs/performance.md ("The lean HTTP read").
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("fsync/writeback", ("ext4_sync_file", "sync_file_range", "file_write_and_wait",
                         "__x64_sys_fsync", "__x64_sys_fdatasync", "do_writepages")),
    ("page-cache write", ("__x64_sys_pwrite64", "vfs_write", "__x64_sys_write")),
    ("socket receive", ("tcp_recvmsg", "__x64_sys_recvfrom", "sock_recvmsg")),
    ("softirq/net rx", ("net_rx_action", "handle_softirqs", "__do_softirq")),
    ("socket send/connect", ("tcp_sendmsg", "__sys_connect", "__x64_sys_sendto")),
    ("crc (awscrt)", ("aws_checksums_crc",)),
    ("awscrt init", ("s2n_init", "jent_", "RAND_bytes", "aws_io_library_init", "PyInit__awscrt")),
    ("file metadata", ("__x64_sys_openat", "__x64_sys_close", "__x64_sys_mkdir",
                       "__x64_sys_rename", "__x64_sys_newfstatat", "__x64_sys_statx",
                       "__x64_sys_ftruncate", "__x64_sys_getdents64", "__x64_sys_unlink")),
    ("page faults/mmap/exec/exit", ("exc_page_fault", "__x64_sys_mmap", "__x64_sys_munmap",
                                    "execve", "do_exit", "__x64_sys_brk", "mprotect")),
    ("futex/scheduling", ("futex", "schedule", "finish_task_switch", "sched_yield")),
    ("gc", ("gc_collect_main",)),
    ("dynamic loading", ("ld-linux", "_dl_", "do_lookup_x")),
    ("python interpreter", ("libpython", "python3")),
]  # fmt: skip
_TIME = re.compile(r"^\d+\.\d+:$")


def kind(frames: list[str]) -> str:
    text = " ".join(frames)
    for name, keys in KINDS:
        if any(key in text for key in keys):
            return name
    return "other"


def samples(path: str) -> list[tuple[float, list[str]]]:
    """(time, call chain) of every sample in ``perf script`` output."""
    out: list[tuple[float, list[str]]] = []
    when: float | None = None
    frames: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                if when is not None:
                    out.append((when, frames))
                when, frames = None, []
            elif line[0] in " \t":
                frames.append(line.strip())
            else:
                stamp = next((p for p in line.split() if _TIME.match(p)), None)
                when = float(stamp[:-1]) if stamp else None
                frames = []
    if when is not None:
        out.append((when, frames))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("perf_script_output")
    parser.add_argument("--hz", type=float, default=2000.0, help="perf record -F [2000]")
    args = parser.parse_args(argv)
    found = samples(args.perf_script_output)
    if not found:
        print("no samples", file=sys.stderr)
        return 1
    hz = args.hz
    receive = [t for t, f in found if any("tcp_recvmsg" in x for x in f)]
    first, last = (min(receive), max(receive)) if receive else (0.0, 0.0)
    phases = {"start": (-1e18, first), "transfer": (first, last), "finish": (last, 1e18)}
    print(f"total {len(found) / hz:.3f} CPU-s")
    for phase, (low, high) in phases.items():
        counts = collections.Counter(kind(f) for t, f in found if low <= t < high)
        print(f"== {phase}: {sum(counts.values()) / hz:.3f} CPU-s")
        for name, count in counts.most_common():
            print(f"   {count / hz:6.3f}s  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
