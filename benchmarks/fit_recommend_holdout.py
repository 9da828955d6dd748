"""`recsys fit` + `recsys recommend` as a user runs them, scored on held-out events.

    .venv/bin/python benchmarks/fit_recommend_holdout.py                 # ml-latest-small
    .venv/bin/python benchmarks/fit_recommend_holdout.py --data DIR      # any canonical data

The data (interactions.parquet + items.parquet in DIR, or ml-latest-small ingested
from ../shared/datasets) is split by the DESIGN.md protocol (per user, the last 20%
in time held out); user and item ids are replaced by opaque strings, so the commands
see a data set they were never tuned on. The training part is written as canonical
Parquet, the two commands run as subprocesses and are timed, and the lists they
write are scored against the held-out events next to EASE (l2=200) on the same split.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from recsys.candidates import History, source_top_k
from recsys.data import I, IdIndex, U, to_canonical, to_internal
from recsys.evaluate import baselines
from recsys.metrics import summarize
from recsys.schema import ITEM, USER, read_interactions, read_items
from recsys.split import split_last_fraction

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT.parent / "shared" / "datasets" / "ml-latest-small"
RECSYS = str(Path(sys.executable).with_name("recsys"))


def _opaque(ids: pl.Series, prefix: str) -> pl.Series:
    return pl.Series(
        [prefix + hashlib.sha1(str(v).encode()).hexdigest()[:12] for v in ids.to_list()]
    )


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="dir with canonical Parquet")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="working dir (default: temp)")
    ap.add_argument("fit_args", nargs="*", help="extra `recsys fit` arguments, e.g. --no-lm")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="recsys-holdout-"))
    work.mkdir(parents=True, exist_ok=True)
    data = a.data
    if data is None:
        if not (MOVIELENS / "ratings.csv").exists():
            sys.exit(f"no data: pass --data DIR or provide {MOVIELENS}")
        data = work / "ml"
        subprocess.run([RECSYS, "ingest", "movielens", str(MOVIELENS), str(data)], check=True)

    items = read_items(data / "items.parquet")
    inter = read_interactions(data / "interactions.parquet", items=items)
    users, item_index = IdIndex.from_values(inter[USER]), IdIndex(items[ITEM])
    hist, test = split_last_fraction(to_internal(inter, users, item_index), 0.2)

    # opaque string ids: nothing of the original ids (or their dtype) reaches the commands
    new_users = IdIndex(_opaque(users.ids, "u-"))
    new_items = IdIndex(_opaque(item_index.ids, "i-"))
    train_path, items_path, users_path = (
        work / "train.parquet",
        work / "items.parquet",
        work / "users.parquet",
    )
    to_canonical(hist, new_users, new_items).write_parquet(train_path)
    items.with_columns(new_items.ids.alias(ITEM)).write_parquet(items_path)
    test_users = np.sort(test[U].unique().to_numpy()).astype(np.int64)
    pl.DataFrame({USER: new_users.take(test_users)}).write_parquet(users_path)

    bundle, recs_path = work / "bundle", work / "recs.parquet"
    fit_cmd = [RECSYS, "fit", "--interactions", str(train_path), "--items", str(items_path)]
    t_fit = _run([*fit_cmd, "--out", str(bundle), *a.fit_args])
    rec_cmd = [RECSYS, "recommend", "--bundle", str(bundle), "--users", str(users_path)]
    t_rec = _run([*rec_cmd, "--k", str(a.k), "--out", str(recs_path)])

    recs = pl.read_parquet(recs_path)
    back_u = pl.DataFrame({USER: new_users.ids, U: np.arange(len(new_users), dtype=np.int32)})
    back_i = pl.DataFrame({ITEM: new_items.ids, I: np.arange(len(new_items), dtype=np.int32)})
    r = recs.join(back_u, on=USER).join(back_i, on=ITEM).sort([U, "rank"])
    mat = np.full((len(test_users), a.k), -1, dtype=np.int64)
    row_of = {int(u): j for j, u in enumerate(test_users)}
    for u, i, rank in zip(r[U].to_list(), r[I].to_list(), r["rank"].to_list(), strict=True):
        mat[row_of[u], rank - 1] = i
    ours = summarize(mat, test_users, test, a.k, len(item_index))

    h = History(hist, len(users), len(item_index))
    ease = baselines()["EASE"].fit(h)
    ease_recs = source_top_k(ease, h, test_users, a.k)
    base = summarize(ease_recs, test_users, test, a.k, len(item_index))

    k = a.k
    print(f"\ndata: {data} ({len(inter)} events, {len(users)} users, {len(item_index)} items)")
    print(f"recsys fit        {t_fit:7.1f} s")
    print(f"recsys recommend  {t_rec:7.1f} s   ({len(test_users)} users)")
    print(f"fit + recommend   {t_fit + t_rec:7.1f} s")
    print(f"{'model':<22}{'NDCG@' + str(k):>10}{'Recall@' + str(k):>11}{'HR@' + str(k):>8}")
    for name, m in (("EASE (l2=200)", base), ("recsys fit+recommend", ours)):
        print(f"{name:<22}{m[f'ndcg@{k}']:>10.4f}{m[f'recall@{k}']:>11.4f}{m[f'hr@{k}']:>8.4f}")
    print(f"ratio to EASE: {ours[f'ndcg@{k}'] / base[f'ndcg@{k}']:.3f}")


if __name__ == "__main__":
    main()
