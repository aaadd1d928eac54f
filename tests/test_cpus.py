"""The default worker count follows the CPUs a container may use, not the node's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage_initializer import cpus, uri
from storage_initializer.providers import open_source
from storage_initializer.settings import Settings


def _cgroup(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "100000 100000\n"}, 1.0),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu.max": "250000 100000\n"}, 2.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu__cpu.cfs_quota_us": "200000\n", "cpu__cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu__cpu.cfs_quota_us": "-1\n", "cpu__cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
        ({"cpu.max": "garbage\n"}, None),
    ],
)
def test_cgroup_quota_v1_and_v2(tmp_path: Path, files: dict[str, str], expected: float) -> None:
    assert cpus.cgroup_limit(_cgroup(tmp_path, **files)) == expected


def test_kserve_default_limit_of_one_cpu_caps_the_backend_default(tmp_path: Path) -> None:
    one_cpu = _cgroup(tmp_path, **{"cpu.max": "100000 100000\n"})
    assert cpus.default_workers(16, one_cpu) == cpus.WORKERS_PER_CPU
    assert cpus.default_workers(2, one_cpu) == 2  # a smaller backend default is kept
    half = _cgroup(tmp_path / "half", **{"cpu.max": "50000 100000\n"})
    assert cpus.default_workers(16, half) == cpus.MIN_WORKERS


def test_without_quota_the_affinity_counts(tmp_path: Path) -> None:
    unlimited = _cgroup(tmp_path, **{"cpu.max": "max 100000\n"})
    usable = len(os.sched_getaffinity(0))
    assert cpus.usable_cpus(unlimited) == usable
    expected = min(16, max(cpus.MIN_WORKERS, cpus.WORKERS_PER_CPU * usable))
    assert cpus.default_workers(16, unlimited) == expected


def test_the_flag_wins_over_the_cap(tmp_path: Path) -> None:
    source = open_source(uri.parse(str(tmp_path)), Settings(workers=32))
    assert source.workers() == 32
    source = open_source(uri.parse(str(tmp_path)), Settings())
    assert source.workers() == cpus.default_workers(source.default_workers)


def test_the_quota_of_our_own_v1_cgroup_counts_without_a_cgroup_namespace(tmp_path: Path) -> None:
    """On a cgroup v1 host without a cgroup namespace, /sys/fs/cgroup/cpu is the root's; the
    limit is that of the cgroup /proc/self/cgroup names (a real cgroup, 1 CPU of quota)."""
    import subprocess
    import sys

    hierarchy = cpus.CGROUP_ROOT / "cpu"
    group = hierarchy / f"si-test-{os.getpid()}"
    if (cpus.CGROUP_ROOT / "cpu.max").exists() or not (hierarchy / "cpu.cfs_quota_us").exists():
        pytest.skip("not a cgroup v1 host with the cpu controller at /sys/fs/cgroup/cpu")
    try:
        group.mkdir()
        (group / "cpu.cfs_quota_us").write_text("50000\n")
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc}")
    try:
        code = (
            f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()));"
            "from storage_initializer import cpus; print(cpus.cgroup_limit())"
        )
        repo = str(Path(__file__).resolve().parent.parent)
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": repo},
        ).stdout
        assert out.strip() == "0.5"
    finally:
        group.rmdir()
