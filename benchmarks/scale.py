"""Scale benchmark: fit and batch recommend on synthetic data of given sizes.

    .venv/bin/python benchmarks/scale.py --sizes 1m,10m --work /tmp/scale
    .venv/bin/python benchmarks/scale.py --sizes 1m --lm           # also with the LM
    .venv/bin/python benchmarks/scale.py --sizes 2000000:100000:40000   # events:users:items

Per size it generates the data with `recsys synth` (kept in --work and reused), then
runs, each as its own `recsys` process: `fit --no-lm` (and `fit` with the language
model with --lm), and `recommend` for every user and for a tenth of them (peak memory
must not grow with the users). It prints, per size: events, users, items, the fit's
seconds per stage (from the bundle's manifest) and in all, the peak resident memory
of the whole process tree (sampled every 0.2 s: the process and its children, e.g.
the recommend workers), and users/s of recommend from start to finished file. The
machine's CPU model and flags head the output; --json writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from machine import cpu

RECSYS = str(Path(sys.executable).with_name("recsys"))
SIZES = {  # events, users, items
    "100k": (100_000, 5_000, 4_000),
    "1m": (1_000_000, 50_000, 20_000),
    "10m": (10_000_000, 500_000, 100_000),
}


def run(args: list[str], log: Path) -> tuple[float, float]:
    """Run a recsys command; returns (wall seconds, peak RSS in GiB of its process
    tree). Raises when it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([RECSYS, *args], stdout=f, stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            root = psutil.Process(p.pid)
            while not done.is_set():
                try:
                    procs = [root, *root.children(recursive=True)]
                    rss = 0
                    for q in procs:
                        with contextlib.suppress(psutil.Error):
                            rss += q.memory_info().rss
                    peak[0] = max(peak[0], rss)
                except psutil.Error:
                    pass
                done.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = p.wait()
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"recsys {' '.join(args)} failed ({rc}); see {log}")
    return wall, peak[0] / 2**30


def parse_size(s: str) -> tuple[str, tuple[int, int, int]]:
    if s in SIZES:
        return s, SIZES[s]
    e, u, i = (int(x) for x in s.split(":"))
    return s, (e, u, i)


def bench(
    name: str, size: tuple[int, int, int], work: Path, variants: list[str], k: int
) -> dict[str, Any]:
    import polars as pl

    events, users, items = size
    d = work / name
    data = d / "data"
    out: dict[str, Any] = {"size": name, "events": events, "users": users, "items": items}
    d.mkdir(parents=True, exist_ok=True)
    if not (data / "interactions.parquet").exists():
        out["synth_s"], _ = run(
            ["synth", "--out", str(data), "--users", str(users), "--items", str(items),
             "--events", str(events), "--seed", "1"], d / "synth.log",
        )  # fmt: skip
    ids = pl.read_parquet(data / "interactions.parquet", columns=["user_id"])["user_id"].unique()
    ids = ids.sort()
    all_users, tenth = d / "users_all.parquet", d / "users_tenth.parquet"
    pl.DataFrame({"user_id": ids}).write_parquet(all_users)
    pl.DataFrame({"user_id": ids.gather_every(10)}).write_parquet(tenth)
    out["distinct_users"] = len(ids)
    for variant in variants:
        bundle = d / ("bundle_lm" if variant == "LM" else "bundle")
        fit = ["fit", "--interactions", str(data / "interactions.parquet"),
               "--items", str(data / "items.parquet"), "--out", str(bundle)]  # fmt: skip
        if variant == "no LM":
            fit.append("--no-lm")
        wall, peak = run(fit, d / f"fit_{variant.replace(' ', '')}.log")
        manifest = json.loads((bundle / "manifest.json").read_text())
        row: dict[str, Any] = {"fit_s": wall, "fit_peak_gib": peak,
                               "stages_s": manifest.get("timings_s", {})}  # fmt: skip
        if "lm" in manifest:  # the language model's own stages, and its encoding rate
            lm_s = manifest["lm"].get("timings_s", {})
            row["lm_stages_s"] = lm_s
            if lm_s.get("encode (frozen)"):
                row["lm_encode_items_per_s"] = items / lm_s["encode (frozen)"]
        for label, users_file in (("tenth", tenth), ("all", all_users)):
            n = pl.read_parquet(users_file).height
            recs = d / f"recs_{label}.parquet"
            wall, peak = run(
                ["recommend", "--bundle", str(bundle), "--users", str(users_file), "--k", str(k),
                 "--out", str(recs)], d / f"recommend_{variant.replace(' ', '')}_{label}.log",
            )  # fmt: skip
            row[f"recommend_{label}"] = {"users": n, "s": wall, "users_per_s": n / wall,
                                         "peak_gib": peak}  # fmt: skip
            recs.unlink(missing_ok=True)
        out[variant] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1m", help="comma-separated: 100k, 1m, 10m or E:U:I")
    ap.add_argument("--work", type=Path, default=Path("/tmp/recsys-scale"))
    ap.add_argument("--lm", action="store_true", help="also fit and recommend with the LM")
    ap.add_argument("--lm-only", action="store_true", help="only the fit with the LM")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", type=Path, help="write every figure here")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu()}, {psutil.virtual_memory().total / 2**30:.0f} GiB", flush=True)
    results = []
    for s in a.sizes.split(","):
        name, size = parse_size(s.strip())
        variants = ["LM"] if a.lm_only else ["no LM", "LM"] if a.lm else ["no LM"]
        r = bench(name, size, a.work, variants, a.k)
        results.append(r)
        print(f"\n== {name}: {r['events']:,} events, {r['distinct_users']:,} users, "
              f"{r['items']:,} items", flush=True)  # fmt: skip
        for variant in ("no LM", "LM"):
            if variant not in r:
                continue
            v = r[variant]
            stages = ", ".join(f"{k} {x:.0f}" for k, x in v["stages_s"].items())
            print(f"  fit ({variant}): {v['fit_s']:.0f} s, peak {v['fit_peak_gib']:.2f} GiB "
                  f"[{stages}]")  # fmt: skip
            if "lm_stages_s" in v:
                lm_stages = ", ".join(f"{k} {x:.0f}" for k, x in v["lm_stages_s"].items())
                rate = v.get("lm_encode_items_per_s")
                print(f"    language model: [{lm_stages}]"
                      + (f", frozen pass {rate:,.0f} items/s" if rate else ""))  # fmt: skip
            for label in ("tenth", "all"):
                rr = v[f"recommend_{label}"]
                print(f"  recommend ({variant}, {label}: {rr['users']:,} users): "
                      f"{rr['s']:.0f} s, {rr['users_per_s']:.0f} users/s, "
                      f"peak {rr['peak_gib']:.2f} GiB")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"machine": cpu(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
