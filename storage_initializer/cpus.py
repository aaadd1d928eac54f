"""How many CPUs this process may really use, and the worker count that follows from it.

An init container runs under a CPU limit (KServe's default is ``cpuLimit: 1``), but
``os.cpu_count()`` reports the node's CPUs. Each worker is a Python thread that takes the GIL
for every block it receives; with many more threads than usable CPUs the threads spend their
time handing the GIL to each other (measured on 2 CPUs against Azurite: 16 workers needed
12.3 s and 14.5 s of CPU for 2 GiB where 4 needed 9.5 s and 10.6 s). So the backend's default
is capped at a few workers per usable CPU; ``--workers`` still sets any number.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Workers per usable CPU when the user does not say: enough to hide request latency.
WORKERS_PER_CPU = 4
MIN_WORKERS = 2
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of our cgroup in CPUs (v2 ``cpu.max``, or v1 CFS quota), None if unlimited."""
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        fields = []
    if fields:  # cgroup v2: "<quota> <period>" or "max <period>"
        try:
            return int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000)
        except (ValueError, ZeroDivisionError):
            return None  # "max": no quota
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota_us > 0 and period_us > 0:
        return quota_us / period_us
    own = _own_v1_cpu_cgroup() if root == CGROUP_ROOT else ""
    if own:  # no cgroup namespace (a cgroup v1 host): the quota of our own cgroup
        try:
            quota_us = int((root / "cpu" / own / "cpu.cfs_quota_us").read_text())
            period_us = int((root / "cpu" / own / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    return None


def _own_v1_cpu_cgroup() -> str:
    """Our cgroup in the v1 ``cpu`` hierarchy, relative ("" for the root or none)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path.strip("/")
    return ""


def usable_cpus(root: Path = CGROUP_ROOT) -> float:
    """CPUs we may run on (affinity), reduced to the cgroup's quota when it is smaller."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_limit(root)
    if limit is not None and limit > 0:
        cpus = min(cpus, limit)
    return max(cpus, 0.1)


def default_workers(backend_default: int, root: Path = CGROUP_ROOT) -> int:
    """The backend's default, capped at WORKERS_PER_CPU per usable CPU (at least MIN_WORKERS)."""
    cap = max(MIN_WORKERS, math.ceil(WORKERS_PER_CPU * usable_cpus(root)))
    return max(1, min(backend_default, cap))
