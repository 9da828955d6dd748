"""`recsys evaluate` over several seeds: what the language model adds, mean and worst.

    .venv/bin/python benchmarks/seeds.py --data DIR [--seeds 0-4] [--config F] [--out DIR]

On a small data set the language model's effect on NDCG@10 can be as large as the
spread between seeds (ml-latest-small: about +0.005 to +0.010 against a spread of
0.013 between seeds of the pipeline without it), so one seed's ablation does not say
whether it helps. This runs `recsys evaluate --seed S` (with its no-LM ablation) for
each seed, one after another, each in its own process with a fresh language-model
cache (`RECSYS_CACHE_DIR` under the output folder, removed afterwards unless
--keep-cache), and prints per seed the pipeline's NDCG@10 with and without the
language model, EASE's, the lift with the paired 95% interval of the difference,
the seconds of the fit with the language model and its lists (the report's
`seconds`), the wall time and the peak RSS of the process (the kernel's accounting
of the child, `os.wait4`); then the mean and the worst seed. DIR holds
interactions.parquet and items.parquet (`recsys ingest`).
Each seed's report stays in OUT/seedS; OUT/seeds.json has the table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECSYS = str(Path(sys.executable).with_name("recsys"))


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,7' -> [0, 2, 7]; '1-2,5' -> [1, 2, 5]."""
    seeds: list[int] = []
    for part in text.split(","):
        a, dash, b = part.strip().partition("-")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise ValueError(f"seeds: {text!r} is not like 0-4 or 0,2,7")
        seeds += range(int(a), int(b) + 1) if dash else [int(a)]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {text!r} names a seed twice")
    return seeds


def seed_row(m: dict[str, Any]) -> dict[str, Any]:
    """One seed's figures from its metrics.json: NDCG@k of the pipeline with and
    without the language model and of EASE, the lift, its paired interval, x EASE."""
    k = m["k"]
    rows = m["models"]
    ndcg = {name: r[f"ndcg@{k}"] for name, r in rows.items()}
    ab = m.get("ablation") or {}
    out: dict[str, Any] = {
        "seed": m.get("seed"),
        "recsys": ndcg.get("recsys"),
        "no_lm": ndcg.get("recsys (no LM)"),
        "ease": ndcg.get("EASE"),
        "fit_s": rows.get("recsys", rows.get("recsys (no LM)", {})).get("seconds"),
    }
    main = out["recsys"] if out["recsys"] is not None else out["no_lm"]
    if out["recsys"] is not None and out["no_lm"]:
        out["lift"] = out["recsys"] / out["no_lm"]
    if "paired" in ab:
        out["diff_lo"], out["diff_hi"] = ab["paired"]["lo"], ab["paired"]["hi"]
    if main is not None and out["ease"]:
        out["x_ease"] = main / out["ease"]
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and worst seed of each figure that every seed has."""
    out: dict[str, Any] = {"seeds": len(rows)}
    for key in ("recsys", "no_lm", "ease", "lift", "x_ease"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals and len(vals) == len(rows):
            out[key] = {"mean": sum(vals) / len(vals), "worst": min(vals)}
    out["interval_excludes_zero"] = sum(1 for r in rows if r.get("diff_lo", 0.0) > 0.0)
    return out


def run_seed(seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    data = Path(args.data)
    report, cache = out / f"seed{seed}", out / f"cache{seed}"
    cmd = [
        RECSYS, "evaluate", "--seed", str(seed), "--out", str(report),
        "--interactions", str(data / "interactions.parquet"),
        "--items", str(data / "items.parquet"),
    ]  # fmt: skip
    if args.config:
        cmd += ["--config", str(args.config)]
    if args.no_lm:
        cmd.append("--no-lm")
    env = os.environ | {"RECSYS_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    with open(out / f"seed{seed}.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"seed {seed}: recsys evaluate failed; see {out / f'seed{seed}.log'}")
    m = json.loads((report / "metrics.json").read_text())
    row = seed_row(m) | {"wall_s": wall, "peak_gib": usage.ru_maxrss / 2**20}
    row["machine"] = m.get("machine", {})
    return row


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with interactions.parquet, items.parquet")
    ap.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,2,7 (default 0-4)")
    ap.add_argument("--config", help="TOML settings for every seed (their `seed` is overridden)")
    ap.add_argument("--out", default="seeds_out", help="reports, logs and seeds.json")
    ap.add_argument("--no-lm", action="store_true", help="the pipeline without the language model")
    ap.add_argument("--keep-cache", action="store_true", help="keep each seed's language model")
    args = ap.parse_args()
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    head = f"{'seed':>4} {'recsys':>7} {'no LM':>7} {'EASE':>7} {'lift':>6} {'paired 95% CI':>19} "
    head += f"{'x EASE':>6} {'fit s':>6} {'wall s':>6} {'peak GiB':>8}"
    for i, s in enumerate(seeds):
        r = run_seed(s, args, out)
        rows.append(r)
        if i == 0:
            mach = r["machine"]
            flags = " ".join(mach.get("flags", []))
            print(f"machine: {mach.get('cpu')}, {mach.get('usable_cpus')} CPUs, flags {flags}")
            print(f"language model encoding: {mach.get('lm', 'none')}")
            print(head)
        ci = f"[{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}]" if "diff_lo" in r else ""
        print(
            f"{s:>4} {_f(r['recsys'], '.4f'):>7} {_f(r['no_lm'], '.4f'):>7} "
            f"{_f(r['ease'], '.4f'):>7} {_f(r.get('lift'), '.3f'):>6} {ci:>19} "
            f"{_f(r.get('x_ease'), '.3f'):>6} {_f(r['fit_s'], '.0f'):>6} {r['wall_s']:>6.0f} "
            f"{r['peak_gib']:>8.2f}",
            flush=True,
        )
    summ = summarise(rows)
    for key, label in (("recsys", "NDCG@10"), ("no_lm", "NDCG@10 without the LM"),
                       ("lift", "lift over no LM"), ("x_ease", "x EASE")):  # fmt: skip
        if key in summ:
            print(f"{label}: mean {summ[key]['mean']:.4f}, worst seed {summ[key]['worst']:.4f}")
    if "lift" in summ:
        print(f"paired intervals excluding zero: {summ['interval_excludes_zero']} of {len(rows)}")
    tmp = out / "seeds.json.tmp"
    tmp.write_text(json.dumps({"rows": rows, "summary": summ}, indent=2))
    tmp.replace(out / "seeds.json")


if __name__ == "__main__":
    main()
