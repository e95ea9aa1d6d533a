"""How many CPUs this process may use: the fewest of its affinity mask and its cgroup's CPU
quota (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), as nginx's
`worker_processes auto` and Go's runtime read them. A container limited to 2 CPUs on a
64-core node gets 2 workers, not 64."""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Where the cgroup filesystem is mounted (a test may point elsewhere).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on, at least 1."""
    count = len(os.sched_getaffinity(0))
    quota = cgroup_quota(root)
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def cgroup_quota(root: Path = CGROUP_ROOT) -> int | None:
    """The CPU quota of this process's cgroup, rounded up to whole CPUs; None if unlimited
    or unreadable."""
    groups = _own_groups()
    v2 = groups.get("", "/").lstrip("/")
    for base in (root / v2, root):
        limit = _read(base / "cpu.max")
        if limit is not None:
            share, _, period = limit.partition(" ")
            return None if share == "max" else _ratio(share, period)
    v1 = groups.get("cpu", "/").lstrip("/")
    for mount in ("cpu", "cpu,cpuacct"):
        for base in (root / mount / v1, root / mount):
            cfs = _read(base / "cpu.cfs_quota_us")
            if cfs is not None:
                return None if cfs == "-1" else _ratio(cfs, _read(base / "cpu.cfs_period_us"))
    return None


def _own_groups() -> dict[str, str]:
    """This process's cgroup path per controller from /proc/self/cgroup ("" for v2)."""
    groups: dict[str, str] = {}
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for name in controllers.split(",") if controllers else [""]:
            groups[name] = path or "/"
    return groups


def _ratio(quota: str, period: str | None) -> int | None:
    try:
        q, p = int(quota), int(period or "100000")
    except ValueError:
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
