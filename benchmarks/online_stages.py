"""Where one uncached request's CPU goes: candidates, features, trees, new-item slots.

    .venv/bin/python benchmarks/online_stages.py --bundle /tmp/srv/bundle230
    .venv/bin/python benchmarks/online_stages.py --bundle B --baseline old_online.py
    .venv/bin/python benchmarks/online_stages.py --bundle B --unknown --sources

Builds `recsys.online.OnlineRanker` on the bundle and times, per user, the stages
of `OnlineRanker.rank` for `--users` random bundle users: candidates, features, the
float32 matrix, `trees.predict`, and the new-item slots merged into the ranked list
(`with_new_items`; 0 for a bundle without slots or a ranker from before it).
`--unknown` times users the bundle does not know instead, each with a history of 1
to 10 random items at the bundle's "now" (the realistic load mix's unknown users);
`--sources` splits the candidates' time by source (its rows, its top, its scores of
the union). With `--baseline`, an
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
from machine import cpu
from threadpoolctl import threadpool_limits


def _load_module(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


Extra = tuple[np.ndarray, np.ndarray] | None


def _time_user(r: object, u: int, extra: Extra = None) -> tuple[float, float, float, float, float]:
    st = r.user_state(u) if extra is None else r.user_state(u, extra)  # type: ignore[attr-defined]
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
    scores = r.trees.predict(X)  # type: ignore[attr-defined]
    t4 = time.thread_time()
    slots = getattr(r, "with_new_items", None)
    if slots is not None and not hasattr(r, "feature_columns"):
        order = np.argsort(-scores, kind="stable")
        slots(st, c.items[order], scores[order])
    t5 = time.thread_time()
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4


def _time_sources(r: object, u: int, extra: Extra) -> dict[str, np.ndarray]:
    """Per source of the current ranker: seconds for its rows, its top, its scores."""
    from features.batch import segment_index
    from recsys.candidates import source_rows

    p = r.pipeline  # type: ignore[attr-defined]
    b = r.user_state(u, extra).chunk  # type: ignore[attr-defined]
    n_items = r.n_items  # type: ignore[attr-defined]
    seen = b.seen(n_items)
    out = {}
    for src in p.sources_:
        t0 = time.thread_time()
        sr = source_rows(src, b, n_items)
        t1 = time.thread_time()
        ptr, items = sr.top(seen, p.config.sources.per_source)
        t2 = time.thread_time()
        sr.at(segment_index(ptr), items)
        t3 = time.thread_time()
        out[src.name] = np.array([t1 - t0, t2 - t1, t3 - t2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--baseline", type=Path, help="another recsys/online.py to compare with")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--unknown", action="store_true", help="users the bundle does not know, 1-10 items each"
    )
    ap.add_argument("--sources", action="store_true", help="the candidates' time per source")
    a = ap.parse_args()

    from recsys.online import OnlineRanker
    from recsys.pipeline import Pipeline

    p = Pipeline.load(a.bundle)
    rankers = {"current": OnlineRanker(p)}
    if a.baseline:
        old = _load_module(a.baseline, "baseline_online")
        rankers = {"baseline": old.OnlineRanker(p), **rankers}  # type: ignore[attr-defined]
    n_users = len(p.user_index_)
    rng = np.random.default_rng(a.seed)
    extras: list[Extra]
    if a.unknown:
        r0 = rankers["current"]
        users = np.full(a.users, -1)
        sizes = rng.integers(1, 11, a.users).tolist()
        now = r0.now  # type: ignore[attr-defined]
        extras = [(rng.integers(0, r0.n_items, n), np.full(n, now)) for n in sizes]  # type: ignore[attr-defined]
    else:
        users = rng.choice(n_users, min(a.users, n_users), replace=False)
        extras = [None] * len(users)
    todo = list(zip(users.tolist(), extras, strict=True))
    n_trees = sum(b.num_trees() for b in p.ranker_.boosters_)
    n_cands = []
    best = {k: np.full(5, np.inf) for k in rankers}
    with threadpool_limits(1):
        for r in rankers.values():  # warm: compile, caches
            for u, x in todo[:20]:
                _time_user(r, u, x)
        by_source: dict[str, np.ndarray] = {}
        for _ in range(a.passes):
            tot = {k: np.zeros(5) for k in rankers}
            src_tot: dict[str, np.ndarray] = {}
            for u, x in todo:
                for k, r in rankers.items():
                    tot[k] += _time_user(r, u, x)
                if a.sources:
                    for name, t in _time_sources(rankers["current"], u, x).items():
                        src_tot[name] = src_tot.get(name, 0) + t
            for k in rankers:
                best[k] = np.minimum(best[k], tot[k] / len(todo) * 1e3)
            for name, t in src_tot.items():
                by_source[name] = np.minimum(by_source.get(name, np.inf), t / len(todo) * 1e3)
        r = rankers["current"]
        for u, x in todo:
            st = r.user_state(u) if x is None else r.user_state(u, x)  # type: ignore[attr-defined]
            n_cands.append(len(r.candidates(st)[0]))  # type: ignore[attr-defined]
    who = "users the bundle does not know" if a.unknown else "users"
    print(f"machine: {cpu()}")
    print(
        f"{len(todo)} {who}, {np.mean(n_cands):.0f} candidates on average "
        f"({min(n_cands)} to {max(n_cands)}), {len(p.ranker_.boosters_)} tree model(s), "
        f"{n_trees} trees; ms per request, best of {a.passes} passes"
    )
    print(f"{'stage':<12}" + "".join(f"{k:>12}" for k in rankers))
    for j, stage in enumerate(("candidates", "features", "matrix", "trees", "new items")):
        print(f"{stage:<12}" + "".join(f"{best[k][j]:12.3f}" for k in rankers))
    print(f"{'total':<12}" + "".join(f"{best[k].sum():12.3f}" for k in rankers))
    if by_source:
        print(f"\n{'source':<12}{'rows':>8}{'top':>8}{'scores':>8}{'sum':>8}  (ms, current)")
        for name, t in by_source.items():
            print(f"{name:<12}" + "".join(f"{v:8.3f}" for v in (*t, t.sum())))


if __name__ == "__main__":
    main()
