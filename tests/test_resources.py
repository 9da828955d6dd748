"""The CPUs a process may use: its affinity and its cgroup's quota (a container's
`--cpus`), read from cgroup files written here for v1 and v2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys import resources
from recsys.resources import cpu_quota


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_is_the_lowest_along_the_process_cgroup_path(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    write(proc, "0::/kubepods/pod1/ctr\n")
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")  # no limit itself
    write(root / "kubepods" / "pod1" / "cpu.max", "250000 100000\n")  # the pod's: 2.5 CPUs
    write(root / "kubepods" / "cpu.max", "800000 100000\n")
    assert cpu_quota(root, proc) == 2.5
    write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cpu_quota(root, proc) == 8.0
    write(root / "kubepods" / "cpu.max", "max 100000\n")
    assert cpu_quota(root, proc) is None


def test_v1_quota_from_the_cpu_controller_and_none_without_one(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    write(proc, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    d = root / "cpu,cpuacct" / "docker" / "abc"
    write(d / "cpu.cfs_quota_us", "150000\n")
    write(d / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(root, proc) == 1.5
    write(d / "cpu.cfs_quota_us", "-1\n")  # no limit
    assert cpu_quota(root, proc) is None
    write(d / "cpu.cfs_quota_us", "garbage\n")
    assert cpu_quota(root, proc) is None
    assert cpu_quota(root, tmp_path / "missing") is None  # not Linux, or no /proc


@pytest.mark.parametrize(
    ("affinity", "quota", "usable"),
    [(8, None, 8), (8, 2.5, 2), (8, 0.5, 1), (2, 16.0, 2)],
)
def test_usable_cpus_is_the_affinity_within_the_quota_rounded_down(
    monkeypatch: pytest.MonkeyPatch, affinity: int, quota: float | None, usable: int
) -> None:
    monkeypatch.setattr(resources, "affinity_cpus", lambda: affinity)
    monkeypatch.setattr(resources, "cpu_quota", lambda: quota)
    resources.usable_cpus.cache_clear()
    try:
        assert resources.usable_cpus() == usable
        assert resources.describe().startswith(f"{usable} usable CPU")
        assert ("cgroup quota" in resources.describe()) == (usable < affinity)
    finally:
        resources.usable_cpus.cache_clear()


def test_thread_pools_default_to_the_quota_where_it_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in resources.THREAD_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own choice stays
    monkeypatch.setattr(resources, "QUOTA_SET", {})
    monkeypatch.setattr(resources, "affinity_cpus", lambda: 64)
    monkeypatch.setattr(resources, "cpu_quota", lambda: 4.0)
    resources.usable_cpus.cache_clear()
    try:
        assert resources.limit_threads_to_quota() == {
            "OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "4", "POLARS_MAX_THREADS": "4"
        }  # fmt: skip
        assert os.environ["MKL_NUM_THREADS"] == "3"
        # `recsys serve` makes its workers single-threaded unless the user said otherwise
        assert not resources.user_set("OMP_NUM_THREADS") and resources.user_set("MKL_NUM_THREADS")
        monkeypatch.setattr(resources, "cpu_quota", lambda: None)
        resources.usable_cpus.cache_clear()
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert resources.limit_threads_to_quota() == {}  # no quota: the libraries decide
        assert "OMP_NUM_THREADS" not in os.environ
    finally:
        resources.usable_cpus.cache_clear()
