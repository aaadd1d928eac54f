#!/usr/bin/env python3
"""The CPU this tool spends per small file, measured by the kernel, not by the wall clock.

Why its own script: on a shared 2-core machine wall times of a 1-2 s pull move by half between
rounds, and the full benchmark (scripts/bench) takes minutes to reach its small-files rows. This
starts SeaweedFS (``weed mini``, as the tests do) on CPU 1, uploads ``--count`` objects of
16 KiB and one more below another prefix, then runs the KServe entrypoint on CPU 0 (1 usable
CPU: 4 workers, as under KServe's ``cpuLimit: 1``) over the many and over the one, alternating,
and reports per variant the median CPU seconds (user + system, ``wait4``) of each and the
difference per file. Variants are package roots given as ``name=path`` (``git archive HEAD
storage_initializer | tar -x -C /tmp/base`` makes one of another commit), so a change and its
baseline are measured in the same minutes, interleaved. The trees pulled are removed only at
the end: on ext4 without a journal, creating files right after deleting as many costs the next
run up to a millisecond of system CPU a file (see scripts/bench_limits.py).

    python3 scripts/bench_smallfiles.py --rounds 24 base=/tmp/base new=.  # paired too
    python3 scripts/bench_smallfiles.py --profile /tmp/prof new=.   # py-spy raw stacks too
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, start_seaweedfs  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Fork + exec ``cmd`` and read the kernel's rusage of it: wall, user and system seconds."""
    began = time.monotonic()
    err = tempfile.TemporaryFile()  # noqa: SIM115 - shared with the forked child
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.dup2(err.fileno(), 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.execvpe(cmd[0], cmd, env)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - began
    if os.waitstatus_to_exitcode(status) != 0:
        err.seek(0)
        raise RuntimeError(f"{cmd}: {status}: {err.read().decode()[-2000:]}")
    return wall, usage.ru_utime, usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="name=package root (a directory)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", help="directory for py-spy raw profiles (one run each)")
    parser.add_argument("--cpu", default="0", help="the CPU the tool runs on")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds to wait after the upload"
    )
    parser.add_argument(
        "--many-only", action="store_true", help="no 1-object pulls: the paired figures only"
    )
    args = parser.parse_args()
    variants = {}
    for item in args.variants:
        name, _, root = item.partition("=")
        variants[name] = str(Path(root).resolve())
        compileall.compile_dir(str(Path(root) / "storage_initializer"), quiet=1)
    server = start_seaweedfs()
    work = Path(tempfile.mkdtemp(prefix="si-smallfiles-"))
    try:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "1", str(server.process.pid)],
            check=True,
            capture_output=True,
        )
        bucket = server.new_bucket()
        client = server.client()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: client.put_object(
                        Bucket=bucket, Key=f"many/f{i:05d}.bin", Body=os.urandom(16384)
                    ),
                    range(args.count),
                )
            )
        client.put_object(Bucket=bucket, Key="one/f.bin", Body=os.urandom(16384))
        time.sleep(args.settle)  # a server still busy with what was just written answers slower
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STORAGE_"))}
        base_env.update(
            AWS_ENDPOINT_URL=server.endpoint,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_DEFAULT_REGION=REGION,
        )
        #: (variant, "many"/"one", "cpu"/"user"/"sys") -> seconds of each round
        results: dict[tuple[str, str, str], list[float]] = {}
        for round_index in range(args.rounds):
            order = list(variants.items())
            if round_index % 2:
                order.reverse()
            for name, root in order:
                env = {**base_env, "PYTHONPATH": root}
                for what in ("many",) if args.many_only else ("many", "one"):
                    dest = work / f"{name}-{what}-{round_index}"
                    cmd = [
                        "taskset", "-c", args.cpu, sys.executable, "-m",
                        "storage_initializer.entrypoint", f"s3://{bucket}/{what}", str(dest),
                    ]  # fmt: skip
                    _, user, system = timed(cmd, env)
                    for kind, value in (("cpu", user + system), ("user", user), ("sys", system)):
                        results.setdefault((name, what, kind), []).append(value)
                    # Kept until the end: see scripts/bench_limits.py (_alternate's ``keep``).
                if args.many_only:
                    continue
                line = []
                for kind in ("cpu", "user", "sys"):
                    many = results[(name, "many", kind)][-1]
                    one = results[(name, "one", kind)][-1]
                    line.append(f"{kind} {(many - one) * 1000 / args.count:.3f}")
                print(f"round {round_index} {name}: ms per file: " + ", ".join(line), flush=True)
        for name in [] if args.many_only else variants:
            line = []
            for kind in ("cpu", "user", "sys"):
                many = results[(name, "many", kind)]
                one = results[(name, "one", kind)]
                per = sorted((m - o) * 1000 / args.count for m, o in zip(many, one, strict=True))
                median = (statistics.median(many) - statistics.median(one)) * 1000 / args.count
                line.append(f"{kind} {median:.3f} ({per[0]:.2f}..{per[-1]:.2f})")
            print(f"{name}: ms per file, median (per-round range): " + "; ".join(line))
            many_cpu = statistics.median(results[(name, "many", "cpu")])
            one_cpu = statistics.median(results[(name, "one", "cpu")])
            print(
                f"{name}: median CPU-s of the pulls: {many_cpu:.3f} ({args.count} files), "
                f"{one_cpu:.3f} (1 file)"
            )
        if len(variants) == 2:  # each round ran both: the pairs cancel most of the drift
            first, second = variants
            for kind in ("cpu", "user"):
                pairs = [
                    b - a
                    for a, b in zip(
                        results[(first, "many", kind)], results[(second, "many", kind)], strict=True
                    )
                ]
                print(
                    f"{second} - {first}, {kind} of the {args.count}-file pull, paired: median "
                    f"{statistics.median(pairs) * 1000:+.1f} ms, lower in "
                    f"{sum(p < 0 for p in pairs)} of {len(pairs)} rounds"
                )
        if args.profile:
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            for name, root in variants.items():
                env = {**base_env, "PYTHONPATH": root}
                dest = work / f"{name}-profile"
                cmd = [
                    "py-spy", "record", "--threads", "-f", "raw", "-r", "1000",
                    "-o", str(out / f"{name}.txt"), "--", "taskset", "-c", args.cpu,
                    sys.executable, "-m", "storage_initializer.entrypoint",
                    f"s3://{bucket}/many", str(dest),
                ]  # fmt: skip
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                shutil.rmtree(dest, ignore_errors=True)
                print(f"profile of {name}: {out / (name + '.txt')}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
