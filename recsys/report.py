"""The evaluation report a team reads: Markdown that stands alone, and PNG plots.

Every `plot_*` function takes the report dictionary (`Report.to_dict()`, the content
of metrics.json) and returns a matplotlib Figure, so notebooks show the same plots as
the report folder. Outside Jupyter, matplotlib runs on the Agg backend.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import matplotlib
import polars as pl

if "ipykernel" not in sys.modules:  # notebooks keep their inline backend
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from rich.table import Table

PLOTS = {
    "ndcg_ci.png": "NDCG@10 per model with its 95% bootstrap interval, and the paired "
    "difference to EASE",
    "metrics_at_k.png": "NDCG, Recall, HR and MRR at k = 5, 10, 20, 50",
    "user_segments.png": "NDCG@10 by user history length",
    "item_popularity.png": "Recall@10 of held-out items by item popularity decile, "
    "and for cold vs warm items",
    "exposure.png": "Share of list slots by item popularity decile against the share of "
    "training interactions",
    "beyond_accuracy.png": "Coverage, novelty, share of slots on the most popular decile and "
    "category diversity of the lists",
    "importances.png": "Ranker feature importances (gain)",
}


def results_table(d: dict[str, Any]) -> Table:
    """The models' headline metrics of a report (`Report.to_dict()`) as a rich table,
    with each model's NDCG as a multiple of EASE's when EASE was measured."""
    k = d["k"]
    rows = d["models"]
    ease = rows.get("EASE", {}).get(f"ndcg@{k}")
    t = Table(title=f"{d['users']} users, {d['items']} items, {d['test_events']} held-out events")
    for c in ["model", f"NDCG@{k}", f"Recall@{k}", f"HR@{k}", f"MRR@{k}", "coverage", "s"] + (
        ["× EASE"] if ease else []
    ):
        t.add_column(c, justify="left" if c == "model" else "right")
    for name, m in rows.items():
        row = [name] + [
            f"{m[c]:.4f}" for c in (f"ndcg@{k}", f"recall@{k}", f"hr@{k}", f"mrr@{k}", "coverage")
        ]
        row.append(f"{m['seconds']:.1f}")
        if ease:
            row.append(f"{m[f'ndcg@{k}'] / ease:.3f}")
        t.add_row(*row)
    return t


def _models(d: dict[str, Any]) -> list[str]:
    return list(d["analysis"]["at_k"])


def _colors(names: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def plot_ndcg_ci(d: dict[str, Any]) -> Figure:
    a = d["analysis"]
    ci, paired, ref = a["bootstrap"]["ci"], a["paired"], a["bootstrap"]["reference"]
    names = list(ci)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 2.0))
    col = _colors(names)
    y = range(len(names))
    means = [ci[n]["mean"] for n in names]
    err = [
        [ci[n]["mean"] - ci[n]["lo"] for n in names],
        [ci[n]["hi"] - ci[n]["mean"] for n in names],
    ]
    axes[0].barh(y, means, xerr=err, color=[col[n] for n in names], capsize=4)
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"{a['headline'].upper()} (95% CI, {a['bootstrap']['resamples']} resamples)")
    for i, n in enumerate(names):
        axes[0].text(ci[n]["hi"], i, f" {ci[n]['mean']:.4f}", va="center", fontsize=8)
    others = [n for n in names if n in paired]
    yy = range(len(others))
    diffs = [paired[n]["diff"] for n in others]
    derr = [
        [paired[n]["diff"] - paired[n]["lo"] for n in others],
        [paired[n]["hi"] - paired[n]["diff"] for n in others],
    ]
    axes[1].barh(yy, diffs, xerr=derr, color=[col[n] for n in others], capsize=4)
    axes[1].axvline(0, color="black", lw=0.8)
    axes[1].set_yticks(list(yy), others)
    axes[1].invert_yaxis()
    axes[1].set_xlabel(f"paired difference to {ref} (95% CI)")
    fig.suptitle("Headline metric with bootstrap confidence intervals over users")
    fig.tight_layout()
    return fig


def plot_metrics_at_k(d: dict[str, Any]) -> Figure:
    a = d["analysis"]
    names, ks = _models(d), a["ks"]
    col = _colors(names)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, m in zip(axes.ravel(), ("ndcg", "recall", "hr", "mrr"), strict=True):
        for n in names:
            ax.plot(ks, [a["at_k"][n][f"{m}@{k}"] for k in ks], marker="o", label=n, color=col[n])
        ax.set_title(f"{m.upper()}@k")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.grid(alpha=0.3)
    axes[1, 0].set_xlabel("k")
    axes[1, 1].set_xlabel("k")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Ranking metrics at several list lengths")
    fig.tight_layout()
    return fig


def _grouped_bars(ax: Any, labels: list[str], series: dict[str, list[float]], col: dict) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(labels))]
        ax.bar(
            xs,
            [0 if v is None or math.isnan(v) else v for v in vals],
            width,
            label=name,
            color=col[name],
        )
    ax.set_xticks(range(len(labels)), labels)
    ax.grid(axis="y", alpha=0.3)


def plot_user_segments(d: dict[str, Any]) -> Figure:
    a = d["analysis"]
    s = a["user_segments"]
    head = a["headline"]
    names = list(s["models"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    _grouped_bars(
        ax,
        [f"{lab}\n({n} users)" for lab, n in zip(s["labels"], s["users"], strict=True)],
        {n: s["models"][n][head] for n in names},
        _colors(names),
    )
    ax.set_ylabel(head.upper())
    ax.set_xlabel("users by training history length")
    ax.legend(fontsize=8, ncol=min(len(names), 6))
    ax.set_title("Headline metric by user segment")
    fig.tight_layout()
    return fig


def plot_item_popularity(d: dict[str, Any]) -> Figure:
    a = d["analysis"]
    k = a["k"]
    dec, cw = a["item_deciles"], a["cold_warm"]
    names = list(dec[f"recall@{k}"])
    col = _colors(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    xs = list(range(1, 11))
    for n in names:
        vals = [math.nan if v is None else v for v in dec[f"recall@{k}"][n]]
        axes[0].plot(xs, vals, marker="o", label=n, color=col[n])
    ax2 = axes[0].twinx()
    ax2.bar(xs, dec["held_out_share"], color="grey", alpha=0.2)
    ax2.set_ylabel("share of held-out events (grey)")
    axes[0].set_zorder(ax2.get_zorder() + 1)
    axes[0].patch.set_visible(False)
    axes[0].set_xticks(xs)
    axes[0].set_xlabel("item popularity decile (1 = most popular 10% of items)")
    axes[0].set_ylabel(f"Recall@{k} of held-out events")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    _grouped_bars(
        axes[1],
        [f"cold\n(<{cw['cold_threshold']} events)", "warm"],
        {n: [cw[f"recall@{k}"][n]["cold"], cw[f"recall@{k}"][n]["warm"]] for n in names},
        col,
    )
    axes[1].set_title(
        f"{cw['held_out_share_cold']:.1%} of held-out events are on cold items", fontsize=9
    )
    fig.suptitle("Which held-out items the models find")
    fig.tight_layout()
    return fig


def plot_exposure(d: dict[str, Any]) -> Figure:
    a = d["analysis"]
    e = a["exposure"]
    names = list(e["slot_share"])
    col = _colors(names)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = list(range(1, 11))
    ax.plot(
        xs,
        e["interaction_share"],
        color="black",
        lw=2.5,
        ls="--",
        marker="s",
        label="training interactions",
    )
    for n in names:
        ax.plot(xs, e["slot_share"][n], marker="o", label=n, color=col[n])
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xticks(xs)
    ax.set_xlabel("item popularity decile (1 = most popular 10% of items)")
    ax.set_ylabel(f"share of top-{a['k']} list slots")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Exposure: where the list slots go, against where the interactions are")
    fig.tight_layout()
    return fig


def plot_beyond_accuracy(d: dict[str, Any]) -> Figure:
    a = d["analysis"]
    k = a["k"]
    names = _models(d)
    col = _colors(names)
    keys = [f"coverage@{k}", f"novelty@{k}", f"top_decile_share@{k}", f"diversity@{k}"]
    keys = [key for key in keys if key in a["beyond"][names[0]]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 4))
    for ax, key in zip(list(axes) if len(keys) > 1 else [axes], keys, strict=True):
        ax.bar(
            range(len(names)), [a["beyond"][n][key] for n in names], color=[col[n] for n in names]
        )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "Beyond accuracy: catalogue coverage, novelty (bits), popularity percentile, diversity"
    )
    fig.tight_layout()
    return fig


def plot_importances(d: dict[str, Any], top: int = 20) -> Figure:
    imps = d.get("importances") or {}
    name = next(iter(imps), None)
    fig, ax = plt.subplots(figsize=(9, 0.3 * top + 1.5))
    if name is None:
        ax.text(0.5, 0.5, "no ranker in this run", ha="center")
        return fig
    rows = imps[name][:top]
    total = sum(r["gain"] for r in imps[name]) or 1.0
    ax.barh(range(len(rows)), [r["gain"] / total for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [r["feature"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of total gain (mean over the ranker's boosters)")
    ax.set_title(f"Ranker feature importances ({name}), top {len(rows)}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


PLOTTERS = {
    "ndcg_ci.png": plot_ndcg_ci,
    "metrics_at_k.png": plot_metrics_at_k,
    "user_segments.png": plot_user_segments,
    "item_popularity.png": plot_item_popularity,
    "exposure.png": plot_exposure,
    "beyond_accuracy.png": plot_beyond_accuracy,
    "importances.png": plot_importances,
}


def write_plots(d: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Every plot of the report as a PNG in `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, fn in PLOTTERS.items():
        fig = fn(d)
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    return paths


# -- Tables ------------------------------------------------------------------------------


def headline_table(d: dict[str, Any]) -> pl.DataFrame:
    """One row per model: the headline metric with its bootstrap interval, the paired
    difference to the reference, the other metrics at k and the beyond-accuracy ones."""
    a, k = d["analysis"], d["k"]
    ci, paired = a["bootstrap"]["ci"], a["paired"]
    rows = []
    for name, m in d["models"].items():
        p = paired.get(name, {})
        rows.append(
            {
                "model": name,
                a["headline"]: ci[name]["mean"],
                "ci_lo": ci[name]["lo"],
                "ci_hi": ci[name]["hi"],
                f"vs_{a['bootstrap']['reference']}": p.get("diff", 0.0),
                "vs_lo": p.get("lo", 0.0),
                "vs_hi": p.get("hi", 0.0),
                **{key: m[key] for key in (f"recall@{k}", f"hr@{k}", f"mrr@{k}")},
                **a["beyond"][name],
                "seconds": m.get("seconds", float("nan")),
            }
        )
    return pl.DataFrame(rows)


def ablation_table(d: dict[str, Any]) -> pl.DataFrame:
    """The pipeline with and without the language model (empty when not run)."""
    ab = d.get("ablation") or {}
    names = [ab.get("with"), ab.get("without")]
    if not all(n in d["models"] for n in names):
        return pl.DataFrame({"note": [ab.get("note", "the ablation was not run")]})
    t = headline_table(d)
    return t.filter(pl.col("model").is_in(names))


# -- Markdown ----------------------------------------------------------------------------


def _f(v: float | None, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _p(p: float, resamples: int) -> str:
    return f"< {1 / resamples:.3f}" if p == 0 else f"≈ {p:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def markdown_section(d: dict[str, Any], title: str) -> str:
    """One '## title' section of report.md (e.g. 'Headline', 'Language-model ablation')."""
    text = markdown(d)
    start = text.find(f"## {title}\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 3)
    return text[start : end if end >= 0 else len(text)].strip() + "\n"


def machine_line(m: dict[str, Any] | None) -> str:
    """report.md's sentence on what the run ran on (`recsys.resources.machine()`): the
    same seed can give other figures on another CPU (bf16 or int8 encoding, other
    BLAS and LightGBM kernels), so a comparison across reports starts here."""
    if not m:
        return ""
    cpus = m.get("usable_cpus")
    text = f"Run on: {m.get('cpu') or '?'} ({m.get('arch') or '?'})"
    if cpus:
        text += f", {cpus} usable CPU{'s' if cpus != 1 else ''}"
    text += f"; CPU flags: {' '.join(m.get('flags') or []) or 'none of those the kernels use'}"
    limits = m.get("isa_limits") or {}
    if limits:
        text += "; instruction sets limited by " + ", ".join(f"{k}={v}" for k, v in limits.items())
    if m.get("lm"):
        text += f"; the language model encoded the items in {m['lm']}"
    return text + "."


def markdown(d: dict[str, Any]) -> str:
    """report.md: what was measured, the headline with its interval, and every view."""
    a = d.get("analysis")
    k = d["k"]
    rows = d["models"]
    lines = [
        "# Offline evaluation",
        "",
        f"{d['users']} users and {d['items']} items; {d['train_events']} training and "
        f"{d['test_events']} held-out events. Protocol: per user, events sorted by time, the "
        "last 20% (at least one) held out; every catalogue item the user has not met in "
        "training is ranked; binary relevance; metrics averaged over users.",
        "",
    ]
    run_on = machine_line(d.get("machine"))
    if run_on:
        lines[-1:-1] = ["", run_on]
    tied = d.get("tied_holdout", 0.0)
    if tied > 0.01:
        lines[-1:-1] = [
            "",
            f"{100 * tied:.1f}% of the held-out events have the same time as their user's "
            "last training event, so for them the order of the input's rows, not time, "
            "decided what was held out.",
        ]
    if not a:
        lines += _table(
            ["model", f"NDCG@{k}", f"Recall@{k}", f"HR@{k}", f"MRR@{k}", "coverage", "seconds"],
            [
                [n]
                + [
                    _f(m.get(c))
                    for c in (f"ndcg@{k}", f"recall@{k}", f"hr@{k}", f"mrr@{k}", "coverage")
                ]
                + [_f(m.get("seconds"), 1)]
                for n, m in rows.items()
            ],
        )
        return "\n".join(lines) + "\n"

    head, boot = a["headline"], a["bootstrap"]
    ci, paired, ref = boot["ci"], a["paired"], boot["reference"]
    best = max(ci, key=lambda n: ci[n]["mean"])
    lines += ["## Headline", ""]
    level = round(boot["level"] * 100)
    lines.append(
        f"**{best}** has the highest {head.upper()}: **{ci[best]['mean']:.4f}** "
        f"({level}% CI {ci[best]['lo']:.4f}–{ci[best]['hi']:.4f}; percentile bootstrap over "
        f"{a['users']} users, {boot['resamples']} resamples)."
    )
    if best in paired:
        p = paired[best]
        verdict = (
            "an interval that excludes zero, so the gain is not noise"
            if p["lo"] > 0 or p["hi"] < 0
            else "an interval that includes zero, so the two cannot be told apart on this data"
        )
        lines.append(
            f"Against {ref} ({ci[ref]['mean']:.4f}), the paired difference over the same "
            f"users is {p['diff']:+.4f} ({level}% CI {p['lo']:+.4f} to {p['hi']:+.4f}, "
            f"bootstrap p {_p(p['p'], boot['resamples'])}): {verdict}. {best} is better for "
            f"{p['wins']:.0%} of users, worse for {p['losses']:.0%}, tied for the rest."
        )
    lines += [
        "",
        "Two runs differ beyond noise when their intervals of the paired difference exclude "
        "zero; the per-model interval alone is wider than the paired one.",
        "",
    ]
    hdr = ["model", f"{head.upper()} [{level}% CI]", f"Δ vs {ref} [{level}% CI]"]
    hdr += [f"Recall@{k}", f"HR@{k}", f"MRR@{k}", "coverage", "seconds"]
    body = []
    for n, m in rows.items():
        c = ci.get(n, {})
        p = paired.get(n)
        body.append(
            [
                n,
                f"{_f(c.get('mean'))} [{_f(c.get('lo'))}, {_f(c.get('hi'))}]",
                f"{p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" if p else "reference",
                _f(m.get(f"recall@{k}")),
                _f(m.get(f"hr@{k}")),
                _f(m.get(f"mrr@{k}")),
                _f(m.get("coverage")),
                _f(m.get("seconds"), 1),
            ]
        )
    lines += _table(hdr, body)
    lines += ["", "![NDCG with confidence intervals](ndcg_ci.png)", ""]

    # ablation
    ab = d.get("ablation")
    lines += ["## Language-model ablation", ""]
    if ab and ab.get("with") in ci and ab.get("without") in ci:
        w, wo = ab["with"], ab["without"]
        diff = ci[w]["mean"] - ci[wo]["mean"]
        lines.append(
            f"`{w}` against `{wo}` (the same pipeline fitted with `use_lm = false`): "
            f"{head.upper()} {ci[w]['mean']:.4f} vs {ci[wo]['mean']:.4f}, a difference of "
            f"{diff:+.4f} ({diff / max(ci[wo]['mean'], 1e-12):+.1%})."
        )
        if ab.get("paired"):
            p = ab["paired"]
            verdict = (
                "the interval excludes zero: the language model's effect is not noise."
                if p["lo"] > 0 or p["hi"] < 0
                else "the interval includes zero: on this data the language model's effect "
                "cannot be told apart from noise."
            )
            lines.append(
                f"Paired over users: {p['diff']:+.4f} "
                f"({level}% CI {p['lo']:+.4f} to {p['hi']:+.4f}); {verdict}"
            )
    else:
        lines.append(ab.get("note", "Not run.") if ab else "Not run.")
    lines.append("")

    # metrics at k
    lines += ["## Metrics at k", ""]
    ks = a["ks"]
    body = [
        [n] + [_f(a["at_k"][n][f"{m}@{kk}"]) for m in ("ndcg", "recall") for kk in ks]
        for n in a["at_k"]
    ]
    lines += _table(["model"] + [f"{m}@{kk}" for m in ("NDCG", "Recall") for kk in ks], body)
    lines += ["", "![metrics at k](metrics_at_k.png)", ""]

    # beyond accuracy
    lines += [
        "## Beyond accuracy",
        "",
        f"Of the top-{k} lists: catalogue coverage (share of items shown to anyone); novelty "
        "(mean self-information −log2 of the share of training users who met the item; "
        "higher = less obvious); popularity percentile of the shown items (1 = the most "
        "popular item); share of slots on the most popular decile of items; intra-list "
        "diversity (mean pairwise 1 − Jaccard of item categories, when items have them).",
        "",
    ]
    bkeys = list(next(iter(a["beyond"].values())))
    lines += _table(
        ["model", *bkeys],
        [
            [n] + [_f(a["beyond"][n][b], 1 if b.startswith("mean_item") else 3) for b in bkeys]
            for n in a["beyond"]
        ],
    )
    lines += ["", "![beyond accuracy](beyond_accuracy.png)", ""]

    # segments
    s = a["user_segments"]
    lines += [
        "## Segments",
        "",
        f"### Users by history length ({head.upper()})",
        "",
    ]
    lines += _table(
        ["model"]
        + [f"{lab} ({n} users)" for lab, n in zip(s["labels"], s["users"], strict=True)]
        + ["gap"],
        [[n] + [_f(v) for v in s["models"][n][head]] + [_f(s["gap"][n])] for n in s["models"]],
    )
    lines += [
        "",
        "The gap is the largest minus the smallest segment value: how unevenly the model "
        "serves light and heavy users.",
        "",
        "![user segments](user_segments.png)",
        "",
        f"### Items by popularity decile (Recall@{k} of held-out events on those items)",
        "",
    ]
    dec = a["item_deciles"]
    lines += _table(
        ["model"] + [f"d{i}" for i in range(1, 11)],
        [["held-out share"] + [_f(v, 3) for v in dec["held_out_share"]]]
        + [[n] + [_f(v, 3) for v in vals] for n, vals in dec[f"recall@{k}"].items()],
    )
    cw = a["cold_warm"]
    lines += [
        "",
        f"### Cold vs warm items (cold: fewer than {cw['cold_threshold']} training events; "
        f"{cw['cold_items']} items, {cw['held_out_share_cold']:.1%} of held-out events)",
        "",
    ]
    lines += _table(
        ["model", f"Recall@{k} cold", f"Recall@{k} warm"],
        [[n, _f(v["cold"]), _f(v["warm"])] for n, v in cw[f"recall@{k}"].items()],
    )
    lines += ["", "![item popularity](item_popularity.png)", ""]

    # exposure
    e = a["exposure"]
    lines += [
        "## Exposure",
        "",
        f"Share of top-{k} list slots that go to each item popularity decile, against the "
        "share of training interactions on that decile. A model that amplifies popularity "
        "puts more of its slots on decile 1 than the interactions do.",
        "",
    ]
    lines += _table(
        ["", *[f"d{i}" for i in range(1, 11)]],
        [["interactions"] + [_f(v, 3) for v in e["interaction_share"]]]
        + [[n] + [_f(v, 3) for v in vals] for n, vals in e["slot_share"].items()],
    )
    lines += ["", "![exposure](exposure.png)", ""]

    # importances
    imps = d.get("importances") or {}
    if imps:
        name = next(iter(imps))
        total = sum(r["gain"] for r in imps[name]) or 1.0
        lines += [f"## Ranker feature importances ({name})", ""]
        lines += _table(
            ["feature", "gain share", "splits"],
            [
                [r["feature"], f"{r['gain'] / total:.3f}", f"{r['split']:.0f}"]
                for r in imps[name][:15]
            ],
        )
        lines += ["", "![importances](importances.png)", ""]

    lines += ["## Plots", ""] + [f"- `{f}`: {desc}" for f, desc in PLOTS.items()]
    return "\n".join(lines) + "\n"
