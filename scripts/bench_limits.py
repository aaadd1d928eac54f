"""Benchmark scenario ``limits`` (part of the S3 scenario): each tool under KServe's limits.

KServe runs the storage initializer with ``cpuLimit: 1`` and ``memoryLimit: 1Gi`` by default;
the page cache a process fills counts against its memory limit. So the CPU spent per byte
decides how fast a large model arrives, and a pull must write back as it goes instead of
collecting dirty pages until the limit kills it. On the same SeaweedFS server and model as the
unconstrained S3 table, this measures, per tool (this tool, the stock initializer, s5cmd,
s5cmd followed by ``sync -f``, and the durable floor: the model's bytes written with
``O_DIRECT`` and ``fdatasync``, one file after another, by ``durable_floor.py``: what the disk
needs to take them, which a tool that fsyncs cannot beat by much):

- **1 CPU**: the tool pinned to CPU 0 (``taskset``), SeaweedFS moved to CPU 1 meanwhile;
- **KServe limits**: the tool in a fresh cgroup per run with 1 CPU of quota and 1 GiB of
  memory (cgroup v2 if the host has its controllers, else v1 ``cpu`` and ``memory``), the
  server still on CPU 1;

reporting CPU-s/GiB, MiB/s, peak RSS and the cgroup's peak memory (page cache included) and
OOM kills; the per-file cost of small files on 1 CPU (a pull of the model's small files
against a pull of one of them); the write-size sweep (``STORAGE_INITIALIZER_WRITE_SIZE``) and
direct I/O on 1 CPU; and a pull of a model several times larger than the memory limit under
that limit. Printed, never asserted. Kept apart from bench.py so it has one job.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
#: KServe's default resources of the storage-initializer container.
CPU_LIMIT = 1.0
MEMORY_LIMIT = 1 * GIB
#: The sweep of write sizes (KiB) and the direct-I/O variant, all on 1 CPU.
SWEEP_KIB = (16, 32, 64, 128, 256, 1024)
#: Objects of 16 KiB for the per-file cost (fewer with --small).
SMALL_FILES = 1000
SMALL_FILES_SMALL = 100
SMALL_PREFIX = "small-files"

#: Joins the cgroup whose ``cgroup.procs`` files are given, then runs the command.
JOIN = """
import os, sys
split = sys.argv.index("--")
for procs in sys.argv[1:split]:
    with open(procs, "w") as handle:
        handle.write(str(os.getpid()))
os.execvp(sys.argv[split + 1], sys.argv[split + 1 :])
"""


class Cgroup:
    """One fresh cgroup with a CPU quota and a memory limit (v2, else v1 cpu + memory)."""

    ROOT = Path("/sys/fs/cgroup")

    def __init__(self, name: str, cpus: float = CPU_LIMIT, memory: int = MEMORY_LIMIT) -> None:
        self.v2 = {"cpu", "memory"} <= set(_read(self.ROOT / "cgroup.controllers").split())
        period = 100_000
        quota = int(cpus * period)
        if self.v2:
            self.dirs = [self.ROOT / name]
            self.dirs[0].mkdir()
            (self.dirs[0] / "cpu.max").write_text(f"{quota} {period}\n")
            (self.dirs[0] / "memory.max").write_text(f"{memory}\n")
            with contextlib.suppress(OSError):
                (self.dirs[0] / "memory.swap.max").write_text("0\n")
        else:
            self.dirs = [self.ROOT / "cpu" / name, self.ROOT / "memory" / name]
            for directory in self.dirs:
                directory.mkdir()
            (self.dirs[0] / "cpu.cfs_period_us").write_text(f"{period}\n")
            (self.dirs[0] / "cpu.cfs_quota_us").write_text(f"{quota}\n")
            (self.dirs[1] / "memory.limit_in_bytes").write_text(f"{memory}\n")
            with contextlib.suppress(OSError):  # no swap either, as in a pod
                (self.dirs[1] / "memory.memsw.limit_in_bytes").write_text(f"{memory}\n")

    @classmethod
    def unavailable(cls) -> str | None:
        """Why no cgroup can be made here (None: it can)."""
        try:
            probe = cls(f"si-bench-probe-{os.getpid()}")
        except OSError as exc:
            return f"cannot create a cgroup under {cls.ROOT}: {exc.strerror or exc}"
        probe.remove()
        return None

    def wrap(self, cmd: list[str]) -> list[str]:
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return [sys.executable, "-I", "-S", "-c", JOIN, *procs, "--", *cmd]

    @property
    def _memory(self) -> Path:
        return self.dirs[-1]

    def peak_memory(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(ValueError):
            return int(_read(self._memory / name) or 0)
        return 0

    def oom_kills(self) -> int:
        text = _read(self._memory / ("memory.events" if self.v2 else "memory.oom_control"))
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for directory in reversed(self.dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _pin(pid: int, cpus: str) -> bool:
    result = subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True)
    return result.returncode == 0


class Row:
    """Runs of one tool in one condition."""

    def __init__(self) -> None:
        self.runs: list[Any] = []
        self.peaks: list[int] = []
        self.ooms = 0


def _run(mod: Any, cmd: list[str], env: dict[str, str], how: str, row: Row, tag: str) -> None:
    if how == "cpu1":
        run = mod.run_timed(cmd, env, cpus="0")
    elif how == "cgroup":
        group = Cgroup(f"si-bench-{os.getpid()}-{tag}")
        try:
            run = mod.run_timed(group.wrap(cmd), env)
            row.peaks.append(group.peak_memory())
            row.ooms += group.oom_kills()
        finally:
            group.remove()
    else:
        run = mod.run_timed(cmd, env)
    row.runs.append(run)
    state = f"{run.seconds:6.2f}s cpu {run.cpu:6.2f}s rss {run.rss_mib:5.0f} MiB"
    mod.log(f"limits {how:6s} {tag:24s} {state}" + ("" if run.ok else f" FAILED {run.tail}"))


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _alternate(
    mod: Any,
    bench: Any,
    tools: dict[str, Callable[[Path], tuple[list[str], dict[str, str]]]],
    how: str,
    rounds: int,
    keep: bool = False,
) -> dict[str, Row]:
    """Each tool once per round, the order reversed every other round. ``keep``: remove the
    destinations only after the last round. On ext4 without a journal (this VM's disk) a new
    inode skips every inode freed in the last 5-35 s (``recently_deleted``), so a run that
    creates 1 000 files right after the previous run deleted 1 000 scans past them: 0.3-1 ms
    of system CPU a file, in whichever tool came next."""
    rows: dict[str, Row] = {name: Row() for name in tools}
    kept = []
    for round_index in range(rounds):
        names = list(tools) if round_index % 2 == 0 else list(reversed(tools))
        for name in names:
            dest = bench.dest()
            cmd, env = tools[name](dest)
            tag = "".join(c if c.isalnum() else "-" for c in name) + f"-{round_index}"
            _run(mod, cmd, env, how, rows[name], tag)
            if keep:
                kept.append(dest)
            else:
                mod.remove_tree(dest)
    for dest in kept:
        mod.remove_tree(dest)
    return rows


def _table(title: str, rows: dict[str, dict[str, Row]], size: int) -> str:
    """One Markdown table: per condition and tool, medians, ratios to s5cmd and stock."""
    lines = [
        f"**{title}**",
        "",
        "| condition | tool | CPU-s/GiB | MiB/s | peak RSS | cgroup peak | OOM kills "
        "| CPU ÷ s5cmd | MiB/s ÷ s5cmd | MiB/s ÷ s5cmd + sync | MiB/s ÷ stock "
        "| MiB/s ÷ durable floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for condition, table in rows.items():
        figures: dict[str, tuple[float | None, float | None]] = {}
        for name, row in table.items():
            good = [r for r in row.runs if r.ok]
            cpu = _median([r.cpu for r in good])
            wall = _median([r.seconds for r in good])
            figures[name] = (
                None if cpu is None else cpu / (size / GIB),
                None if wall is None else size / MIB / wall,
            )
        s5 = figures.get("s5cmd", (None, None))
        durable = figures.get("s5cmd + sync", (None, None))
        stock = figures.get("stock", (None, None))
        floor = figures.get("durable floor", (None, None))
        for name, row in table.items():
            cpu_gib, speed = figures[name]
            good = [r for r in row.runs if r.ok]
            rss = max((r.rss_mib for r in good), default=None)
            peak = max(row.peaks, default=0)
            failed = len(row.runs) - len(good)
            lines.append(
                f"| {condition} | {name} | {_f(cpu_gib)} | {_f(speed, 0)}"
                + (f" ({failed} failed)" if failed else "")
                + f" | {'–' if rss is None else f'{rss:.0f} MiB'} | "
                f"{f'{peak / MIB:.0f} MiB' if peak else '–'} | {row.ooms if row.peaks else '–'} | "
                f"{_ratio(cpu_gib, s5[0])} | {_ratio(speed, s5[1])} | "
                f"{_ratio(speed, durable[1])} | {_ratio(speed, stock[1])} | "
                f"{_ratio(speed, floor[1])} |"
            )
    return "\n".join(lines)


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}×"


def scenario_limits(
    bench: Any, mod: Any, endpoint: str, files: dict[str, Path], weed_pid: int, args: Any
) -> None:
    """Everything described in the module docstring, on the S3 scenario's server."""
    reason = Cgroup.unavailable()
    if reason:
        bench.notes.append(f"KServe limits not measured: {reason}")
    pinned = (os.cpu_count() or 1) > 1 and _pin(weed_pid, "1")
    try:
        _measure(bench, mod, endpoint, files, args, cgroups=reason is None)
    finally:
        if pinned:
            _pin(weed_pid, mod.server_home(bench))
    if not pinned:
        bench.notes.append("limits: SeaweedFS could not be moved to CPU 1")


def _measure(
    bench: Any, mod: Any, endpoint: str, files: dict[str, Path], args: Any, cgroups: bool
) -> None:
    uri = f"s3://{mod.BUCKET}/{mod.PREFIX}"
    env = mod.clean_env(mod.s3_env(endpoint))
    tools: dict[str, Callable[[Path], tuple[list[str], dict[str, str]]]] = {
        "this tool": lambda d: (mod.ours_cmd(uri, d), env),
    }
    if mod.stock_python():
        tools["stock"] = lambda d: (mod.stock_cmd(uri, d), env)
    if mod.shutil.which("s5cmd"):
        tools["s5cmd"] = lambda d: (mod.s5cmd_cmd(endpoint, d), env)
        # The same durability as this tool (every file on disk when it exits): s5cmd and then
        # ``sync -f`` of the destination's filesystem. The ratios stay against plain s5cmd.
        tools["s5cmd + sync"] = lambda d: (mod.then_sync(mod.s5cmd_cmd(endpoint, d), d), env)
    # What the disk needs to take the same bytes durably: no tool that fsyncs ends sooner.
    tools["durable floor"] = lambda d: (mod.floor_cmd(list(files.values()), d), env)
    rounds = max(3, bench.rounds)
    size = bench.shape.total
    conditions = {"1 CPU (taskset)": "cpu1"}
    if cgroups:
        conditions["KServe limits (1 CPU, 1 GiB cgroup)"] = "cgroup"
    rows = {title: _alternate(mod, bench, tools, how, rounds) for title, how in conditions.items()}
    bench.tables.append(_table(f"Under limits: {bench.shape.describe()}", rows, size))

    # Small files on 1 CPU: (pull of N small files - pull of one) / (N - 1), over a set of
    # its own: with the model's 200 the difference of two medians was within the noise.
    count = SMALL_FILES_SMALL if args.small else SMALL_FILES
    small = _upload_small_files(bench, mod, endpoint, count)
    _small_files(bench, mod, endpoint, env, small, rounds)

    # The write-size sweep and direct I/O, this tool only, on 1 CPU (--sweep 0: none).
    if args.sweep == [0]:
        if cgroups and args.big_gib:
            _larger_than_memory(bench, mod, endpoint, args.big_gib)
        return
    variants: dict[str, Callable[[Path], tuple[list[str], dict[str, str]]]] = {}
    for kib in args.sweep or SWEEP_KIB:
        extra = {"STORAGE_INITIALIZER_WRITE_SIZE": f"{kib}KiB"}
        variants[f"write {kib} KiB"] = lambda d, e=extra: (mod.ours_cmd(uri, d), env | e)
    variants["direct I/O"] = lambda d: (
        mod.ours_cmd(uri, d),
        env | {"STORAGE_INITIALIZER_DIRECT_IO": "true"},
    )
    sweep = _alternate(mod, bench, variants, "cpu1", rounds)
    bench.tables.append(_table("Write-size sweep, this tool on 1 CPU", {"1 CPU": sweep}, size))

    if cgroups and args.big_gib:
        _larger_than_memory(bench, mod, endpoint, args.big_gib)


def _upload_small_files(bench: Any, mod: Any, endpoint: str, count: int) -> list[str]:
    """``count`` objects of 16 KiB below ``SMALL_PREFIX``; returns their keys' last parts."""
    folder = bench.work / "small-files"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for index in range(count):
        path = folder / f"f{index:05d}.bin"
        path.write_bytes(os.urandom(16 * 1024))
        files[path.name] = path
    mod.upload_s3(endpoint, files, SMALL_PREFIX)
    return sorted(files)


def _small_files(
    bench: Any, mod: Any, endpoint: str, env: dict[str, str], small: list[str], rounds: int
) -> None:
    many = f"s3://{mod.BUCKET}/{SMALL_PREFIX}"
    one = f"s3://{mod.BUCKET}/{SMALL_PREFIX}/{small[0]}"
    tools: dict[str, Callable[[Path], tuple[list[str], dict[str, str]]]] = {}
    for label, target in (("many", many), ("one", one)):
        tools[f"this tool {label}"] = lambda d, t=target: (mod.ours_cmd(t, d), env)
        if mod.stock_python():
            tools[f"stock {label}"] = lambda d, t=target: (mod.stock_cmd(t, d), env)
        if mod.shutil.which("s5cmd"):
            glob = f"{many}/*" if label == "many" else one
            tools[f"s5cmd {label}"] = lambda d, g=glob: (
                [mod.shutil.which("s5cmd"), "--endpoint-url", endpoint, "cp", g, f"{d}/"],
                env,
            )
    rows = _alternate(mod, bench, tools, "cpu1", rounds, keep=True)
    parts = []
    for tool in ("this tool", "stock", "s5cmd"):
        if f"{tool} many" not in rows:
            continue
        many_runs = [r for r in rows[f"{tool} many"].runs if r.ok]
        one_runs = [r for r in rows[f"{tool} one"].runs if r.ok]
        if not many_runs or not one_runs:
            parts.append(f"{tool} failed")
            continue
        per = 1000 / (len(small) - 1)
        wall = (_median([r.seconds for r in many_runs]) or 0) - (
            _median([r.seconds for r in one_runs]) or 0
        )
        cpu = (_median([r.cpu for r in many_runs]) or 0) - (_median([r.cpu for r in one_runs]) or 0)
        parts.append(f"{tool} {wall * per:.2f} ms wall, {cpu * per:.2f} ms CPU")
    bench.extra[f"small files on 1 CPU, per file ({len(small)} x 16 KiB)"] = "; ".join(parts)
    mod.log("small files: " + "; ".join(parts))


def _larger_than_memory(bench: Any, mod: Any, endpoint: str, gib: int) -> None:
    shape = mod.Shape(gib, GIB, 0)
    directory = bench.work / "model-big"
    mod.log(f"larger than memory: generating {shape.describe()}")
    files = mod.make_model(directory, shape, seed=4)
    mod.upload_s3(endpoint, files, "model-big")
    mod.shutil.rmtree(directory)
    uri = f"s3://{mod.BUCKET}/model-big"
    env = mod.clean_env(mod.s3_env(endpoint))
    tools: dict[str, Callable[[Path], tuple[list[str], dict[str, str]]]] = {
        "this tool": lambda d: (mod.ours_cmd(uri, d), env),
        "this tool, direct I/O": lambda d: (
            mod.ours_cmd(uri, d),
            env | {"STORAGE_INITIALIZER_DIRECT_IO": "true"},
        ),
    }
    if mod.stock_python():
        tools["stock"] = lambda d: (mod.stock_cmd(uri, d), env)
    if mod.shutil.which("s5cmd"):
        tools["s5cmd"] = lambda d: (
            [mod.shutil.which("s5cmd"), "--endpoint-url", endpoint, "cp", f"{uri}/*", f"{d}/"],
            env,
        )
    rows = _alternate(mod, bench, tools, "cgroup", 1)
    title = f"{shape.describe()} under the 1 GiB limit ({gib}x the limit), one run each"
    bench.tables.append(_table(title, {"KServe limits": rows}, shape.total))
