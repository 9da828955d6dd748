"""Where one uncached request's CPU goes: candidates, features, trees (in-process).

    .venv/bin/python benchmarks/online_stages.py --bundle /tmp/srv/bundle230
    .venv/bin/python benchmarks/online_stages.py --bundle B --baseline old_online.py

Builds `recsys.online.OnlineRanker` on the bundle and times, per user, the stages
of `OnlineRanker.rank` for `--users` random bundle users: candidates, features, the
float32 matrix, and `trees.predict`. With `--baseline`, an
`OnlineRanker` from another copy of the module (e.g. the previous commit's
recsys/online.py) is timed too, interleaved user by user with the current one, so
both see the same load; each stage reports the best of `--passes` passes (mean per
user). Times are the thread's CPU time (`time.thread_time`), which other jobs on
the machine disturb less than wall time; BLAS runs on one thread, as in the server's
workers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits


def _load_module(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _time_user(r: object, u: int) -> tuple[float, float, float, float]:
    st = r.user_state(u)  # type: ignore[attr-defined]
    if hasattr(r, "feature_columns"):  # an older OnlineRanker: candidates, then features
        t0 = time.thread_time()
        cands, cols = r.candidates(st)  # type: ignore[attr-defined]
        t1 = time.thread_time()
        cols.update(r.feature_columns(st, cands))  # type: ignore[attr-defined]
        t2 = time.thread_time()
        X = r.matrix(cols, len(cands))  # type: ignore[attr-defined]
    else:  # the pipeline's chunk kernels, on a chunk of one
        from recsys.candidates import candidates
        from recsys.pipeline import feature_matrix

        p = r.pipeline  # type: ignore[attr-defined]
        b = st.chunk
        t0 = time.thread_time()
        c = candidates(p.sources_, b, r.n_items, p.config.sources.per_source)  # type: ignore[attr-defined]
        t1 = time.thread_time()
        c.cols |= p.features.transform(b, c, p.lm.similarity_vectors if p.lm else None)
        t2 = time.thread_time()
        X = feature_matrix(c.cols, r.features, len(c))  # type: ignore[attr-defined]
    t3 = time.thread_time()
    r.trees.predict(X)  # type: ignore[attr-defined]
    t4 = time.thread_time()
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--baseline", type=Path, help="another recsys/online.py to compare with")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from recsys.online import OnlineRanker
    from recsys.pipeline import Pipeline

    p = Pipeline.load(a.bundle)
    rankers = {"current": OnlineRanker(p)}
    if a.baseline:
        old = _load_module(a.baseline, "baseline_online")
        rankers = {"baseline": old.OnlineRanker(p), **rankers}  # type: ignore[attr-defined]
    n_users = len(p.user_index_)
    users = np.random.default_rng(a.seed).choice(n_users, min(a.users, n_users), replace=False)
    n_trees = sum(b.num_trees() for b in p.ranker_.boosters_)
    n_cands = []
    best = {k: np.full(4, np.inf) for k in rankers}
    with threadpool_limits(1):
        for r in rankers.values():  # warm: compile, caches
            for u in users[:20].tolist():
                _time_user(r, u)
        for _ in range(a.passes):
            tot = {k: np.zeros(4) for k in rankers}
            for u in users.tolist():
                for k, r in rankers.items():
                    tot[k] += _time_user(r, u)
            for k in rankers:
                best[k] = np.minimum(best[k], tot[k] / len(users) * 1e3)
        r = rankers["current"]
        for u in users.tolist():
            n_cands.append(len(r.candidates(r.user_state(u))[0]))  # type: ignore[attr-defined]
    print(
        f"{len(users)} users, {np.mean(n_cands):.0f} candidates on average "
        f"({min(n_cands)} to {max(n_cands)}), {len(p.ranker_.boosters_)} tree model(s), "
        f"{n_trees} trees; ms per request, best of {a.passes} passes"
    )
    print(f"{'stage':<12}" + "".join(f"{k:>12}" for k in rankers))
    for j, stage in enumerate(("candidates", "features", "matrix", "trees")):
        print(f"{stage:<12}" + "".join(f"{best[k][j]:12.3f}" for k in rankers))
    print(f"{'total':<12}" + "".join(f"{best[k].sum():12.3f}" for k in rankers))


if __name__ == "__main__":
    main()
