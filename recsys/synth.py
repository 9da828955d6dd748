"""Synthetic interactions and item catalogue: the embedded default data set.

The generative story, chosen so that every signal a real recommender exploits is there
to be learnt, and so that item *text* really predicts behaviour:

- Topics. Each latent topic has its own vocabulary of made-up, pronounceable words; a
  few real filler words are shared. An item mixes one or two topics; its title,
  description and tags are drawn mostly from its topics' words and its category is the
  name of its main topic.
- Users have sparse topic tastes (Dirichlet with small concentration), a heavy-tailed
  number of events and an active period inside the time range.
- Items have a Zipf-like appeal (a few items get much of the traffic) and a release
  time (a share exist from the start); appeal rises just after release and then decays
  to a floor, so recent popularity and trend matter. No event precedes its item's
  release; items released late may never be met (cold items).
- Users act in sessions. The first item of a session follows the user's taste; each next
  item usually stays in a topic of the previous item (Markov drift), and often is the
  previous item's "companion" (B tends to follow A in everyone's histories).
- Now and then a user re-consumes one of their recent items.

Everything is vectorised with numpy over chunks of users, and the interactions are
streamed to Parquet row groups, so memory stays bounded whatever the number of events.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.schema import EVENT, ITEM, TS, USER, atomic_path, write_parquet_atomic

DAY = 86_400.0
EVENT_TYPES = ("view", "click", "purchase")
RELEASED_AT = "released_at"

# Real words shared by all topics: they carry no topic signal, as in real catalogue text.
# fmt: off
_FILLER = (
    "the", "a", "and", "with", "for", "of", "in", "on", "new", "classic", "edition", "series",
    "collection", "guide", "deluxe", "original", "complete", "essential", "premium", "mini",
    "set", "pack", "volume", "story", "tales", "world", "life", "best", "great", "little",
    "big", "modern", "simple", "first", "last", "true", "wild", "good", "old", "daily", "home",
    "style", "special", "limited", "everyday", "perfect", "bright", "easy",
)
_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st",
    "kl", "gr", "sh", "ch", "th", "dr", "pl", "fl", "sk", "cr",
)
_VOWELS = (
    "a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ou", "io",
)
_CODAS = (
    "", "", "", "n", "r", "s", "l", "m", "x", "th", "nd", "rk",
)
# fmt: on

# Events per chunk of users: bounds the memory of one chunk (a few hundred MB at most).
_CHUNK_EVENTS = 400_000
# Cap on the (time bin x topic-membership) appeal table, in cells (8 bytes each).
_MAX_APPEAL_CELLS = 16_000_000


@dataclass(frozen=True)
class Story:
    """Knobs of the generative story; the defaults are the embedded data set.

    Tests switch single effects off (e.g. stay_prob=0) to show that their checks detect
    the effect rather than an accident of the data.
    """

    taste_concentration: float = 0.1  # Dirichlet alpha per topic; small = sparse tastes
    second_topic_prob: float = 0.4  # items mixing two topics
    zipf_exponent: float = 0.9  # item appeal ~ rank**-exponent; 0 = no popularity skew
    start_share: float = 0.3  # items that exist from the start of the range
    decay_days: float = 14.0  # typical decay time of appeal after release
    ramp_days: float = 1.5  # appeal rises over this time after release
    appeal_floor: float = 0.12  # long-run appeal, relative to the peak
    session_mean: float = 6.0  # mean events per session
    gap_seconds: float = 120.0  # mean time between events within a session
    stay_prob: float = 0.7  # next item in a topic of the previous item
    companion_prob: float = 0.3  # next item is the previous item's companion
    companion_same_topic: float = 0.7  # companions mostly share the main topic
    repeat_prob: float = 0.04  # re-consume one of the user's recent items
    activity_sigma: float = 1.1  # lognormal spread of events per user
    vocab_size: int = 40  # words per topic


@dataclass
class _Catalogue:
    """Hidden truth about items, from which both text and behaviour follow."""

    topic_names: list[str]
    vocab: list[list[str]]
    topics: np.ndarray  # (n_items, 2) int: main topic, second topic (= main if none)
    weights: np.ndarray  # (n_items, 2) float: mixture weights, second is 0 if none
    quality: np.ndarray  # (n_items,) Zipf-like appeal at peak
    release: np.ndarray  # (n_items,) seconds from the range start (negative = before)
    decay: np.ndarray  # (n_items,) days
    companion: np.ndarray  # (n_items,) item index

    @property
    def main(self) -> np.ndarray:
        return self.topics[:, 0]


def _make_words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """n distinct pronounceable nonsense words (2-3 syllables), none in `taken`."""
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        k = 2 + int(rng.random() < 0.4)
        w = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(k)
        )
        w += _CODAS[rng.integers(len(_CODAS))]
        if w not in seen and 4 <= len(w) <= 11:
            seen.add(w)
            out.append(w)
    return out


def _catalogue(
    rng: np.random.Generator, n_items: int, k: int, days: float, st: Story
) -> _Catalogue:
    """Topics, vocabularies and the hidden item attributes."""
    words = _make_words(rng, k * (st.vocab_size + 1), set(_FILLER))
    names = [w.capitalize() for w in words[:k]]
    vocab = [words[k + z * st.vocab_size : k + (z + 1) * st.vocab_size] for z in range(k)]

    topic_share = rng.dirichlet(np.full(k, 4.0))
    main = rng.choice(k, size=n_items, p=topic_share)
    main[rng.permutation(n_items)[:k]] = np.arange(k)  # every topic has an item
    second = (main + rng.integers(1, k, n_items)) % k if k > 1 else main.copy()
    has2 = (rng.random(n_items) < st.second_topic_prob) & (second != main)
    w2 = np.where(has2, rng.uniform(0.2, 0.45, n_items), 0.0)
    topics = np.stack([main, np.where(has2, second, main)], axis=1)
    weights = np.stack([1.0 - w2, w2], axis=1)

    quality = (1.0 + rng.permutation(n_items)) ** -st.zipf_exponent
    quality *= rng.lognormal(0.0, 0.3, n_items)

    span = days * DAY
    release = rng.uniform(0.0, span, n_items)
    at_start = rng.random(n_items) < st.start_share
    # Every topic keeps an item that exists from the start: a session can always start.
    order = np.lexsort((release, main))
    at_start[order[np.searchsorted(main[order], np.arange(k))]] = True
    release[at_start] = -rng.uniform(0.0, 60 * DAY, int(at_start.sum()))
    decay = st.decay_days * rng.lognormal(0.0, 0.4, n_items)

    # Companions: mostly another item of the same main topic, else any item.
    by_topic = np.argsort(main, kind="stable")
    lo = np.searchsorted(main[by_topic], np.arange(k), side="left")
    hi = np.searchsorted(main[by_topic], np.arange(k), side="right")
    size = hi[main] - lo[main]
    same = by_topic[lo[main] + (rng.random(n_items) * size).astype(np.int64)]
    companion = np.where(
        rng.random(n_items) < st.companion_same_topic, same, rng.integers(0, n_items, n_items)
    )
    self_pair = companion == np.arange(n_items)
    companion[self_pair] = (companion[self_pair] + 1) % n_items
    return _Catalogue(names, vocab, topics, weights, quality, release, decay, companion)


def _item_text(rng: np.random.Generator, cat: _Catalogue) -> dict[str, list[str]]:
    """Title, description, tags and category, drawn from each item's topic vocabularies."""
    n = len(cat.quality)
    v = len(cat.vocab[0])
    zipf = (1.0 + np.arange(v)) ** -0.8  # some words are more typical of a topic
    zipf /= zipf.sum()
    words = np.array(cat.vocab, dtype=object)  # (k, v)

    def topic_words(shape: tuple[int, ...], pick_second: np.ndarray) -> np.ndarray:
        z = np.where(pick_second, cat.topics[:, 1:2], cat.topics[:, 0:1])
        return words[z, rng.choice(v, size=shape, p=zipf)]

    n_desc = 24
    second = rng.random((n, n_desc)) < cat.weights[:, 1:2]
    desc_topic = topic_words((n, n_desc), second)
    filler = np.array(_FILLER, dtype=object)[rng.integers(len(_FILLER), size=(n, n_desc))]
    desc = np.where(rng.random((n, n_desc)) < 0.35, filler, desc_topic)
    desc_len = rng.integers(12, n_desc + 1, n)

    title_w = topic_words((n, 3), rng.random((n, 3)) < cat.weights[:, 1:2])
    title_len = rng.integers(2, 4, n)
    title_fill = np.where(rng.random(n) < 0.3, filler[:, 0], np.array(None, dtype=object))

    tag_idx = np.argsort(rng.random((n, v)) / zipf, axis=1)[:, :4]  # distinct, typical first
    tags_main = words[cat.topics[:, 0:1], tag_idx[:, :3]]
    tags_second = words[cat.topics[:, 1], tag_idx[:, 3]]

    titles, descs, tags = [], [], []
    for i in range(n):
        t = [str(w).capitalize() for w in title_w[i, : title_len[i]]]
        if title_fill[i] is not None:
            t.append(str(title_fill[i]).capitalize())
        titles.append(" ".join(t))
        d = " ".join(desc[i, : desc_len[i]])
        descs.append(d[0].upper() + d[1:] + ".")
        tg = list(tags_main[i])
        if cat.weights[i, 1] > 0 and tags_second[i] not in tg:
            tg.append(tags_second[i])
        tags.append("|".join(tg))
    category = [cat.topic_names[z] for z in cat.main]
    return {"title": titles, "description": descs, "category": category, "tags": tags}


class _ItemSampler:
    """Draws items of a topic in proportion to their appeal at a time, released ones only.

    A table holds the cumulative appeal over (time bin, topic membership) in one flat,
    monotone array, so a batch of (topic, bin) draws is a single np.searchsorted.
    Within each topic the memberships are ordered by release time, latest first, so the
    last one of a segment always exists from the start (a safe clip target).
    """

    def __init__(self, cat: _Catalogue, days: float, st: Story) -> None:
        n = len(cat.quality)
        two = cat.weights[:, 1] > 0
        ent_item = np.concatenate([np.arange(n), np.flatnonzero(two)])
        ent_topic = np.concatenate([cat.topics[:, 0], cat.topics[two, 1]])
        ent_w = np.concatenate([cat.weights[:, 0], cat.weights[two, 1]])
        order = np.lexsort((-cat.release[ent_item], ent_topic))
        self.ent_item = ent_item[order]
        ent_topic, ent_w = ent_topic[order], ent_w[order]
        k = len(cat.topic_names)
        self.lo = np.searchsorted(ent_topic, np.arange(k), side="left")
        self.hi = np.searchsorted(ent_topic, np.arange(k), side="right")
        e = len(ent_item)
        self.n_ent = e

        bin_days = max(1, math.ceil(days * e / _MAX_APPEAL_CELLS))
        self.bin_seconds = bin_days * DAY
        self.n_bins = max(1, math.ceil(days / bin_days))
        rel = cat.release[self.ent_item]
        q = cat.quality[self.ent_item] * ent_w
        tau = cat.decay[self.ent_item]
        # cum[0] = 0 and cum[1 + b*e + j] = total appeal of cells before and at (b, j).
        self.cum = np.zeros(self.n_bins * e + 1)
        cells = self.cum[1:].reshape(self.n_bins, e)
        rows = max(1, 2_000_000 // max(e, 1))
        for b0 in range(0, self.n_bins, rows):
            b = np.arange(b0, min(b0 + rows, self.n_bins))[:, None]
            age = np.maximum(((b + 0.5) * self.bin_seconds - rel) / DAY, 0.0)
            shape = (1.0 - np.exp(-age / st.ramp_days)) * np.exp(-age / tau)
            a = q * (st.appeal_floor + (1.0 - st.appeal_floor) * shape)
            cells[b0 : b0 + len(b)] = np.where(rel <= b * self.bin_seconds, a, 0.0)
        np.cumsum(self.cum, out=self.cum)

    def time_bin(self, t: np.ndarray) -> np.ndarray:
        return np.minimum((t // self.bin_seconds).astype(np.int64), self.n_bins - 1)

    def sample(self, topic: np.ndarray, tbin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        base_row = tbin * self.n_ent
        lo, hi = self.lo[topic], self.hi[topic]
        base, top = self.cum[base_row + lo], self.cum[base_row + hi]
        target = base + rng.random(len(topic)) * (top - base)
        j = np.searchsorted(self.cum, target, side="right") - 1 - base_row
        return self.ent_item[np.clip(j, lo, hi - 1)]


def _events_per_user(
    rng: np.random.Generator, n_users: int, n_events: int, st: Story
) -> np.ndarray:
    """Heavy-tailed activity summing exactly to n_events; everyone has one event if possible."""
    w = rng.lognormal(0.0, st.activity_sigma, n_users)
    w /= w.sum()
    floor = 1 if n_events >= n_users else 0
    return floor + rng.multinomial(n_events - floor * n_users, w)


def _chunks(counts: np.ndarray) -> Iterator[tuple[int, int]]:
    """User ranges [a, b) holding about _CHUNK_EVENTS events each."""
    cum = np.cumsum(counts)
    a = 0
    while a < len(counts):
        done = cum[a - 1] if a else 0
        b = int(np.searchsorted(cum, done + _CHUNK_EVENTS, side="right"))
        b = min(max(b, a + 1), len(counts))
        yield a, b
        a = b


def _simulate(
    rng: np.random.Generator,
    n_u: np.ndarray,
    cat: _Catalogue,
    sampler: _ItemSampler,
    taste_alpha: np.ndarray,
    days: float,
    st: Story,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Events of one chunk of users (all with n_u >= 1): local user, item, seconds, type."""
    m = len(n_u)
    n = int(n_u.sum())
    span = days * DAY
    taste = rng.dirichlet(taste_alpha, size=m)
    ctaste = np.cumsum(taste, axis=1)

    # Sessions: contiguous runs of a user's events; lengths are geometric per user.
    ev_user = np.repeat(np.arange(m), n_u)
    user_first = np.concatenate(([0], np.cumsum(n_u)[:-1]))
    sess_mean = 1.0 + rng.gamma(2.0, (st.session_mean - 1.0) / 2.0, m)
    new = rng.random(n) < (1.0 / sess_mean)[ev_user]
    new[user_first] = True
    sess_first = np.flatnonzero(new)
    sess_id = np.cumsum(new) - 1
    sess_len = np.diff(np.append(sess_first, n))
    sess_user = ev_user[sess_first]
    user_sess0 = np.searchsorted(sess_user, np.arange(m))

    # Times: gaps within a session; sessions spread, without overlap, over an active period.
    gap = rng.exponential(st.gap_seconds, n)
    gap[sess_first] = 0.0
    # The heaviest users browse faster, so that they too fit in the time range.
    busy = np.bincount(ev_user, gap, minlength=m)
    gap *= np.minimum(1.0, 0.7 * span / np.maximum(busy, 1.0))[ev_user]
    cg = np.cumsum(gap)
    offset = cg - cg[sess_first][sess_id]
    dur = offset[sess_first + sess_len - 1]
    dur_u = np.bincount(sess_user, dur, minlength=m)
    length = span * rng.uniform(0.15, 1.0, m)
    length = np.minimum(np.maximum(length, 1.25 * dur_u), span)
    begin = rng.uniform(0.0, 1.0, m) * (span - length)
    free = np.maximum(length - dur_u, 0.0)
    e = rng.exponential(1.0, len(sess_first))
    e_tot = np.bincount(sess_user, e, minlength=m) + rng.exponential(1.0, m)
    ce = np.cumsum(e)
    ce_u = ce - (ce - e)[user_sess0][sess_user]  # inclusive: a gap before the first session
    cd = np.cumsum(dur) - dur
    cd_u = cd - cd[user_sess0][sess_user]  # exclusive: durations of earlier sessions
    sess_start = begin[sess_user] + cd_u + free[sess_user] * ce_u / e_tot[sess_user]
    t = np.minimum(sess_start[sess_id] + offset, span - 1.0)
    tbin = sampler.time_bin(t)

    # Items, one step of all sessions at a time: taste, topic drift and companions.
    item = np.empty(n, dtype=np.int64)
    by_len = np.argsort(-sess_len, kind="stable")
    neg_len = -sess_len[by_len]
    k = ctaste.shape[1]
    for step in range(int(sess_len.max())):
        s = by_len[: int(np.searchsorted(neg_len, -step, side="left"))]
        idx = sess_first[s] + step
        u = rng.random(len(s))
        topic = np.minimum((ctaste[sess_user[s]] < u[:, None]).sum(axis=1), k - 1)
        if step:
            prev = item[idx - 1]
            second = rng.random(len(s)) < cat.weights[prev, 1]
            drift = np.where(second, cat.topics[prev, 1], cat.topics[prev, 0])
            topic = np.where(rng.random(len(s)) < st.stay_prob, drift, topic)
        chosen = sampler.sample(topic, tbin[idx], rng)
        if step:
            # A session moves on: drawing the item just met again is redrawn once.
            again = np.flatnonzero(chosen == prev)
            chosen[again] = sampler.sample(topic[again], tbin[idx[again]], rng)
            comp = cat.companion[prev]
            follow = (rng.random(len(s)) < st.companion_prob) & (cat.release[comp] <= t[idx])
            chosen = np.where(follow, comp, chosen)
        item[idx] = chosen

    # Repeats: now and then one of the user's few previous items again.
    back = 1 + rng.geometric(0.4, n)
    pos = np.arange(n) - user_first[ev_user]
    rep = np.flatnonzero((rng.random(n) < st.repeat_prob) & (pos >= back))
    item[rep] = item[rep - back[rep]]

    # Event types: purchases are likelier on items of the user's favourite topics.
    p_buy = 0.02 + 0.12 * taste[ev_user, cat.main[item]]
    r = rng.random(n)
    etype = np.where(r < p_buy, 2, np.where(r < p_buy + 0.28, 1, 0)).astype(np.int8)

    if np.any(cat.release[item] > t):  # an invariant of the story, cheap to check
        raise AssertionError("synthetic event before its item's release")
    return ev_user, item, t, etype


def _parse_start(start: str) -> datetime:
    dt = datetime.fromisoformat(start)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _ids(prefix: str, n: int, min_width: int) -> pa.Array:
    width = max(min_width, len(str(max(n - 1, 0))))
    return pa.array([f"{prefix}{i:0{width}d}" for i in range(n)], type=pa.string())


INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field(USER, pa.string(), nullable=False),
        pa.field(ITEM, pa.string(), nullable=False),
        pa.field(TS, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(EVENT, pa.string(), nullable=False),
    ]
)


def generate(
    out_dir: str | os.PathLike[str],
    *,
    n_users: int = 2000,
    n_items: int = 1500,
    n_events: int = 150_000,
    seed: int = 0,
    n_topics: int = 20,
    start: str = "2024-01-01",
    days: int = 180,
    progress: bool = True,
    story: Story | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/interactions.parquet and out_dir/items.parquet (canonical schema).

    Deterministic for a given seed and sizes. Interactions are sorted by user, then time;
    items carry an extra `released_at` column (no event precedes it). Both files are
    written atomically; interactions are streamed in row groups, one per chunk of users.
    """
    if n_users < 1 or n_items < 1 or n_events < 1 or days < 1 or n_topics < 1:
        raise ValueError("n_users, n_items, n_events, days and n_topics must all be >= 1")
    st = story or Story()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = min(n_topics, n_items)
    t0 = _parse_start(start)
    start_us = (t0 - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    cat = _catalogue(rng, n_items, k, float(days), st)
    text = _item_text(rng, cat)
    item_ids = _ids("i", n_items, 5)
    items = pl.DataFrame(
        {
            ITEM: item_ids.to_pylist(),
            **text,
            RELEASED_AT: start_us + np.round(cat.release * 1e6).astype(np.int64),
        }
    ).with_columns(pl.col(RELEASED_AT).cast(pl.Datetime("us", "UTC")))
    items_path = write_parquet_atomic(items, out / "items.parquet")

    sampler = _ItemSampler(cat, float(days), st)
    topic_share = np.bincount(cat.main, minlength=k) / n_items
    taste_alpha = np.maximum(st.taste_concentration * k * topic_share, 1e-3)
    counts = _events_per_user(rng, n_users, n_events, st)
    user_ids = _ids("u", n_users, 6)
    event_names = pa.array(EVENT_TYPES, type=pa.string())

    inter_path = out / "interactions.parquet"
    with (
        atomic_path(inter_path) as tmp,
        pq.ParquetWriter(tmp, INTERACTIONS_SCHEMA, compression="zstd") as writer,
        tqdm(total=n_events, unit="ev", unit_scale=True, disable=not progress, desc="synth") as bar,
    ):
        for c, (a, b) in enumerate(_chunks(counts)):
            users = a + np.flatnonzero(counts[a:b])
            if len(users) == 0:
                continue
            crng = np.random.default_rng(np.random.SeedSequence([seed, 1, c]))
            u, i, t, e = _simulate(crng, counts[users], cat, sampler, taste_alpha, days, st)
            ts = start_us + np.round(t * 1e6).astype(np.int64)
            table = pa.table(
                [
                    user_ids.take(pa.array(users[u])),
                    item_ids.take(pa.array(i)),
                    pa.array(ts, type=pa.timestamp("us", tz="UTC")),
                    event_names.take(pa.array(e)),
                ],
                schema=INTERACTIONS_SCHEMA,
            )
            writer.write_table(table, row_group_size=len(table))
            bar.update(len(table))
    return inter_path, items_path
