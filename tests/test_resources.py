"""The CPUs a process may use: its affinity and its cgroup's quota (a container's
`--cpus`), read from cgroup files written here for v1 and v2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from recsys import resources
from recsys.resources import cpu_flags, cpu_quota


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


def test_available_memory_is_the_least_room_of_the_machine_and_the_cgroups(tmp_path: Path) -> None:
    from recsys.resources import available_memory

    root, proc, meminfo = tmp_path / "cgroup", tmp_path / "proc_cgroup", tmp_path / "meminfo"
    write(meminfo, "MemTotal:       24000000 kB\nMemAvailable:    8000000 kB\n")
    write(proc, "0::/ctr\n")
    assert available_memory(root, proc, meminfo) == 8_000_000 * 1024  # no limit files
    write(root / "ctr" / "memory.max", "max\n")
    write(root / "ctr" / "memory.current", "100\n")
    assert available_memory(root, proc, meminfo) == 8_000_000 * 1024
    write(root / "ctr" / "memory.max", str(3 << 30) + "\n")  # a 3 GiB container
    write(root / "ctr" / "memory.current", str(1 << 30) + "\n")
    assert available_memory(root, proc, meminfo) == 2 << 30
    write(proc, "7:memory:/docker/x\n")  # v1, "no limit" written as a huge number
    v1 = root / "memory" / "docker" / "x"
    write(v1 / "memory.limit_in_bytes", "9223372036854771712\n")
    write(v1 / "memory.usage_in_bytes", "5\n")
    assert available_memory(root, proc, meminfo) == 8_000_000 * 1024
    write(v1 / "memory.limit_in_bytes", str(1 << 30) + "\n")
    assert available_memory(root, proc, meminfo) == (1 << 30) - 5
    assert available_memory(root, tmp_path / "none", tmp_path / "none") is None


def test_workers_that_fit_beside_the_first() -> None:
    from recsys.batch import workers_that_fit

    assert workers_that_fit(8, 0.7, None) == 8  # unknown: no cap
    assert workers_that_fit(8, 0.7, 2 << 30) == 1 + int(0.85 * 2 / 0.7)
    assert workers_that_fit(8, 0.7, 100 << 30) == 8
    assert workers_that_fit(8, 0.7, 0) == 1  # the first goes on alone


def test_recommend_starts_no_more_workers_than_memory_holds(
    bundle_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each worker holds the bundle: with room for none beside the first, the first
    ranks every part, and the file is the one two workers write."""
    import polars as pl

    from recsys import batch
    from recsys.batch import recommend_file
    from recsys.pipeline import Pipeline

    ids = Pipeline.load(str(bundle_dir)).user_index_.ids.head(60)
    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": ids}).write_parquet(users)
    pools: list[int] = []  # the processes each pool may start

    class Pool(batch.ProcessPoolExecutor):
        def __init__(self, n: int, **kw: Any) -> None:
            pools.append(n)
            super().__init__(n, **kw)

    monkeypatch.setattr(batch, "ProcessPoolExecutor", Pool)
    two, one = tmp_path / "two.parquet", tmp_path / "one.parquet"
    recommend_file(bundle_dir, users, two, k=5, batch_size=10, workers=2)
    assert pools == [1, 1]  # the first worker, then one more beside it
    monkeypatch.setattr(resources, "available_memory", lambda: 0)
    pools.clear()
    with caplog.at_level("WARNING", logger="recsys"):
        recommend_file(bundle_dir, users, one, k=5, batch_size=10, workers=2)
    assert pools == [1] and "running 1 of 2 workers" in caplog.text
    assert pl.read_parquet(one).equals(pl.read_parquet(two))
    assert pl.read_parquet(one).height == 60 * 5


class DyingJob:
    """A batch job whose worker process dies on every part but the first (as the
    system's out-of-memory killer would end it)."""

    threads: int | None = None

    def load(self) -> float:
        return 0.0

    def run(self, index: int) -> int:
        if index:
            os._exit(9)
        return 10


def test_a_killed_worker_is_a_clear_error_after_the_parts_done() -> None:
    from recsys.batch import WorkerLost, run_local

    done: list[int] = []
    with pytest.raises(WorkerLost, match="rerun with fewer --workers"):
        run_local(DyingJob(), [0, 1, 2, 3], 2, done.append)  # type: ignore[arg-type]
    assert done in ([], [10])  # only the part that was written


def test_cpu_flags_read_x86_and_arm_cpuinfo() -> None:
    x86 = (
        "model name\t: Some CPU\nflags\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_tile smep\n"
    )
    assert cpu_flags(x86) == ("Some CPU", ["amx_tile", "avx2", "avx512_bf16", "avx512f", "fma"])
    arm = "processor\t: 0\nFeatures\t: fp asimd aes asimddp sve sve2 i8mm bf16 svebf16 rng\n"
    assert cpu_flags(arm)[1] == ["asimd", "asimddp", "bf16", "i8mm", "sve", "sve2", "svebf16"]


def test_machine_names_the_cpu_its_flags_and_the_environment_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resources, "cpu_flags", lambda: ("Some CPU", ["avx2", "avx512_bf16"]))
    monkeypatch.setattr(resources, "usable_cpus", lambda: 3)
    for var in resources.ISA_LIMITS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    m = resources.machine()
    assert m["cpu"] == "Some CPU" and m["flags"] == ["avx2", "avx512_bf16"]
    assert m["usable_cpus"] == 3 and m["arch"]
    assert m["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}
