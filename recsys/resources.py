"""The CPUs this process may use: its CPU affinity and its cgroup's CPU quota.

`os.cpu_count()` counts the machine's cores. In a container limited to 4 CPUs on a
64-core host (`docker run --cpus 4`, a Kubernetes CPU limit) it says 64, and a default
of one worker process per core starts 64 processes that each hold the bundle, on 4
CPUs' worth of time. Every default here that counts processes or threads takes
`usable_cpus()` instead: the CPUs of the affinity mask (`taskset`, cpusets), no more
than the quota of the cgroup the process runs in (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`, the lowest along its path), rounded down,
at least 1.

Also what the CPU is (`cpu_flags`, `machine`), for the reports that compare runs
made on different machines.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's cores."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _lineage(root: Path, rel: str) -> list[Path]:
    """The cgroup folder at `rel` under `root` and each of its parents up to `root`."""
    parts = [p for p in rel.split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_v2(d: Path) -> float | None:
    text = _read(d / "cpu.max")  # "max 100000" (no limit) or "200000 100000"
    if text is None:
        return None
    fields = text.split()
    try:
        if len(fields) == 2 and fields[0] != "max" and int(fields[1]) > 0:
            return int(fields[0]) / int(fields[1])
    except ValueError:
        pass
    return None


def _ints(d: Path, *names: str) -> list[int] | None:
    """The integer in each of the files `names` of folder `d`; None where one is
    missing or not an integer (cgroup v2 writes "max" for no limit)."""
    out = []
    for name in names:
        text = _read(d / name)
        if text is None:
            return None
        try:
            out.append(int(text))
        except ValueError:
            return None
    return out


def _quota_v1(d: Path) -> float | None:
    qp = _ints(d, "cpu.cfs_quota_us", "cpu.cfs_period_us")
    return qp[0] / qp[1] if qp and qp[0] > 0 and qp[1] > 0 else None  # -1: no limit


def _cgroup_dirs(controller: str, root: Path, proc_cgroup: Path) -> list[tuple[Path, int]]:
    """This process's cgroup folders for `controller` ("cpu", "memory"): its own and
    each parent's, with their hierarchy's version (2: the unified one, mounted at
    `root`; 1: the controller's own mount under it)."""
    out: list[tuple[Path, int]] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, rel = fields
        if controllers == "":
            out += [(d, 2) for d in _lineage(root, rel)]
        elif controller in controllers.split(","):
            mounts = (root / controllers, root / controller)
            mount = next((m for m in mounts if m.is_dir()), None)
            if mount is not None:
                out += [(d, 1) for d in _lineage(mount, rel)]
    return out


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPUs' worth of time this process's cgroup allows (2.5 for a quota of 250 ms
    per 100 ms), the lowest along its path; None without a quota or off Linux."""
    dirs = _cgroup_dirs("cpu", root, proc_cgroup)
    found = [q for d, v in dirs if (q := (_quota_v2 if v == 2 else _quota_v1)(d)) is not None]
    return min(found) if found else None


def _usage_v2(d: Path) -> float | None:
    usec = _counters(d / "cpu.stat").get("usage_usec")
    return None if usec is None else usec / 1e6


def _usage_v1(d: Path) -> float | None:
    ns = _ints(d, "cpuacct.usage")
    return None if ns is None else ns[0] / 1e9


def cpu_time_reader(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> Callable[[], float | None] | None:
    """A reader of the CPU seconds used so far by the cgroup whose CPUs this process
    shares: the one with the lowest quota along its path (a container's or pod's
    limit), else its own cgroup (a cpuset). v2 reads `cpu.stat`'s `usage_usec`; v1
    `cpuacct.usage` beside the quota (`cpu,cpuacct` mounted together) or in the
    `cpuacct` hierarchy's folder at the same place. None where there is none to read
    (not Linux, no cgroup files)."""
    dirs = _cgroup_dirs("cpu", root, proc_cgroup)
    quotas = [
        (q, i)
        for i, (d, v) in enumerate(dirs)
        if (q := (_quota_v2 if v == 2 else _quota_v1)(d)) is not None
    ]
    at = min(quotas)[1] if quotas else 0
    candidates: list[tuple[Path, int]] = dirs[at : at + 1]
    if candidates and candidates[0][1] == 1:  # v1: cpuacct may be its own hierarchy
        acct = _cgroup_dirs("cpuacct", root, proc_cgroup)
        candidates += acct[at : at + 1] if len(acct) == len(dirs) else acct[:1]
    for d, v in candidates:
        read = functools.partial(_usage_v2 if v == 2 else _usage_v1, d)
        if read() is not None:
            return read
    return None


@functools.cache
def usable_cpus() -> int:
    """The processes or threads a default should run at once: the affinity's CPUs, no
    more than the cgroup's quota rounded down (a quota of 1.5 CPUs: 1), at least 1."""
    n = affinity_cpus()
    q = cpu_quota()
    if q is not None:
        n = min(n, max(1, math.floor(q)))
    return max(1, n)


def describe() -> str:
    """For logs: "4 usable CPUs (cgroup quota 4 CPUs)", "1 usable CPU (affinity 1 of 2
    cores)" or "2 usable CPUs"."""
    n, aff, q = usable_cpus(), affinity_cpus(), cpu_quota()
    total = os.cpu_count() or aff
    why = []
    if aff < total:
        why.append(f"affinity {aff} of {total} cores")
    if q is not None and math.floor(q) < aff:
        why.append(f"cgroup quota {q:g} CPU{'s' if q != 1 else ''}")
    return f"{n} usable CPU{'s' if n != 1 else ''}" + (f" ({'; '.join(why)})" if why else "")


# environment variables that limit the instruction sets of the numeric libraries:
# torch's (oneDNN, ATen, FBGEMM, MKL), OpenBLAS's kernel choice and numpy's dispatch
ISA_LIMITS = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "MKL_ENABLE_INSTRUCTIONS",
    "OPENBLAS_CORETYPE",
    "NPY_DISABLE_CPU_FEATURES",
)
_X86_FLAGS = re.compile(r"^(avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*|avx_ne_convert)$")
_ARM_FLAGS = re.compile(r"^(asimd|asimddp|asimdhp|fphp|bf16|i8mm|sve.*|sme.*)$")


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """The CPU's model name and the flags that decide the encoding precision (x86:
    AVX2, AVX-512, AMX, AVX-VNNI; ARM: NEON, dot product, bf16, i8mm, SVE), from
    /proc/cpuinfo (Linux); the machine's name and no flags elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags, pattern = "", list[str](), _X86_FLAGS
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86, ARM
            flags, pattern = value.split(), _X86_FLAGS if key == "flags" else _ARM_FLAGS
    keep = sorted(f for f in flags if pattern.match(f))
    return model or platform.processor() or platform.machine(), keep


def machine() -> dict[str, Any]:
    """What a run ran on, for the reports that compare runs across machines: the CPU's
    model and architecture, the usable CPUs, the flags that decide the numeric kernels
    (`cpu_flags`) and any instruction-set limit set in the environment (`ISA_LIMITS`).
    Reads no more than /proc and the cgroup files: torch is not imported."""
    model, flags = cpu_flags()
    return {
        "cpu": model,
        "arch": platform.machine(),
        "usable_cpus": usable_cpus(),
        "flags": flags,
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
    }


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")


def limit_threads_to_quota() -> dict[str, str]:
    """Where a cgroup quota allows fewer CPUs than the affinity mask shows, make it the
    default thread count of the numeric libraries (OpenMP: torch and LightGBM; BLAS;
    polars), unless the environment names one: they size their pools by the cores
    they see and, on a quota, wait for CPU time with every extra thread. Call before
    they load. Returns what was set."""
    n = usable_cpus()
    if n >= affinity_cpus():
        return {}
    set_ = {k: str(n) for k in THREAD_VARS if k not in os.environ}
    os.environ.update(set_)
    QUOTA_SET.update(set_)
    return set_


QUOTA_SET: dict[str, str] = {}  # what `limit_threads_to_quota` set (not the user)


def user_set(var: str) -> bool:
    """Whether the environment's `var` is the user's, not `limit_threads_to_quota`'s."""
    return var in os.environ and os.environ[var] != QUOTA_SET.get(var)


MEMINFO = Path("/proc/meminfo")
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _counters(path: Path) -> dict[str, int]:
    """The "name value" or "Name: value kB" lines of a counters file (/proc/meminfo, a
    cgroup's memory.stat, /proc/self/smaps_rollup) by name, as written (kB stay kB);
    empty where it cannot be read."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            with contextlib.suppress(ValueError):
                out[fields[0].rstrip(":")] = int(fields[1])
    return out


def _room_v2(d: Path) -> int | None:
    lu = _ints(d, "memory.max", "memory.current")  # "max": no limit
    if lu is None:
        return None
    # the usage counts the page cache; its inactive part is reclaimed first
    return lu[0] - (lu[1] - _counters(d / "memory.stat").get("inactive_file", 0))


def _room_v1(d: Path) -> int | None:
    lu = _ints(d, "memory.limit_in_bytes", "memory.usage_in_bytes")
    if lu is None or lu[0] >= NO_LIMIT:
        return None
    return lu[0] - (lu[1] - _counters(d / "memory.stat").get("total_inactive_file", 0))


def available_memory(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, meminfo: Path = MEMINFO
) -> int | None:
    """Bytes this process's tree could still take: the machine's available memory
    (MemAvailable), no more than the room left under its cgroup's memory limit (the
    lowest along its path); None where neither can be read (not Linux)."""
    mem = _counters(meminfo)
    found = [mem["MemAvailable"] * 1024] if "MemAvailable" in mem else []
    dirs = _cgroup_dirs("memory", root, proc_cgroup)
    found += [r for d, v in dirs if (r := (_room_v2 if v == 2 else _room_v1)(d)) is not None]
    return max(0, min(found)) if found else None


def shared_memory(smaps: Path = Path("/proc/self/smaps_rollup")) -> int:
    """Bytes of this process's resident memory that other processes map too (shared
    libraries, files): what a second process of the same program does not add. 0 where
    it cannot be read."""
    c = _counters(smaps)
    return (c.get("Shared_Clean", 0) + c.get("Shared_Dirty", 0)) * 1024
