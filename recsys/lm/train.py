"""Training data and loss of the two-tower model.

Examples are next-item targets from the training history: for each event after a
user's first, the target is that item and the input the user's `history_len` items
before it, most recent first. The loss is a sampled softmax over the batch's targets
plus uniformly drawn negatives, each logit corrected by the log of its sampling
probability (logQ), so popular items are not over-penalised for being sampled often.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys.candidates import History
from recsys.data import I, U


@dataclass
class Examples:
    users: np.ndarray  # [E] user index
    history: np.ndarray  # [E, L] item indices, most recent first, -1 = none
    target: np.ndarray  # [E]

    def __len__(self) -> int:
        return len(self.target)

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(self.users[idx], self.history[idx], self.target[idx])


def next_item_examples(
    h: History,
    history_len: int,
    target_window: int = 1,
    seed: int = 0,
    max_examples: int | None = None,
    ties_as_sets: bool = False,
) -> Examples:
    """Every event with at least one earlier event of the same user (with
    `max_examples`, the most recent that many by time, so that memory stays at
    max_examples x history_len however long the log), in the log's (user, time) order.

    With `target_window` > 1 the target is drawn from the user's next `target_window`
    events rather than the very next one: the model then learns what a user takes up
    over the coming events, which is what a top-k list is judged on, not only the
    immediate successor. The user's last event is always its own target.

    With `ties_as_sets`, a user's events of the same time have no order among them:
    each is a target whose history holds the others of its time (then the earlier
    events), so a day's two magazines give two examples, one each way, where the rows'
    order gave one. Without ties the examples are the same.
    """
    u = h.ev[U].to_numpy().astype(np.int64)
    i = h.ev[I].to_numpy().astype(np.int64)
    n = len(u)
    first = np.ones(n, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    # `top`: one past the newest event a target's history may hold (the end of its run
    # of equal times with ties_as_sets, else the target itself, which is skipped)
    times = h.times  # the events' times, in h.ev's order
    top = np.arange(n) + 1
    if ties_as_sets and n:
        run_start = first.copy()
        run_start[1:] |= times[1:] != times[:-1]
        top = _run_ends(run_start)
    others = top - 1 - start  # events of the user the history may hold
    keep = np.flatnonzero(others >= 1)
    if max_examples is not None and len(keep) > max_examples:
        keep = np.sort(keep[np.argsort(-times[keep], kind="stable")[:max_examples]])
    hist = np.full((len(keep), history_len), -1, dtype=np.int64)
    newest = top[keep] - 1  # the newest event the history may hold (or the target)
    above, n_hist = newest - keep, others[keep]  # events after the target in its run
    for j in range(history_len):
        ok = n_hist > j
        q = newest - j - (j >= above)  # counting down from the run's end, past the target
        hist[ok, j] = i[q[ok]]
    target = keep
    if target_window > 1:
        # the target itself, or one of the events after its run (ties are in its history)
        remaining = _run_ends(first)[keep] - top[keep] + 1  # first: each user's run
        step = np.random.default_rng(seed).integers(0, np.minimum(remaining, target_window))
        target = np.where(step == 0, keep, top[keep] - 1 + step)
    return Examples(u[keep], hist, i[target])


def _run_ends(starts: np.ndarray) -> np.ndarray:
    """Per event, one past the last event of its run, where `starts` marks each run's
    first event (`starts[0]` is True)."""
    at = np.flatnonzero(starts)
    n = len(starts)
    return np.repeat(np.r_[at[1:], n], np.diff(np.r_[at, n]))


def split_validation(
    ex: Examples, rng: np.random.Generator, users: int, per_user: int, share: float
) -> tuple[Examples, Examples]:
    """Hold out the last `per_user` examples of at most `users` users drawn at random,
    and at most `share` of the examples (at least one user's): a sparse log (most users
    with one or two events, where the users' last examples are most of the examples)
    keeps most for training, and a dense one validates on several examples per user, so
    that the epoch chosen does not turn on a few examples (ml-latest-small's 610 users
    gave 610 examples, one of them 0.0016 of recall@50). Everything else trains."""
    n = len(ex)
    if n == 0:
        return ex, ex
    starts = np.flatnonzero(np.r_[True, ex.users[1:] != ex.users[:-1]])
    ends = np.r_[starts[1:], n]
    take = np.minimum(ends - starts, per_user)
    order = rng.permutation(len(starts))[:users]
    within = np.cumsum(take[order]) <= max(share * n, take[order[0]])
    order = np.sort(order[within])
    held = np.zeros(n, dtype=bool)
    for s, e in zip(ends[order] - take[order], ends[order], strict=True):
        held[s:e] = True
    return ex.take(np.flatnonzero(~held)), ex.take(np.flatnonzero(held))


class SampledSoftmax(torch.nn.Module):
    """Cross-entropy over candidates with logQ correction and history masking."""

    log_q: torch.Tensor  # a buffer: log of each item's sampling probability

    def __init__(self, target_counts: np.ndarray, batch_size: int, n_negatives: int) -> None:
        super().__init__()
        n = len(target_counts)
        p = target_counts / max(target_counts.sum(), 1.0)
        q = np.minimum(1.0, batch_size * p) + n_negatives / max(n, 1)
        self.register_buffer("log_q", torch.from_numpy(np.log(np.maximum(q, 1e-12))).float())

    def forward(
        self,
        users: torch.Tensor,  # [B, d]
        cand_vecs: torch.Tensor,  # [C, d]
        cand: torch.Tensor,  # [C] item indices, sorted unique
        target: torch.Tensor,  # [B] item indices (all in cand)
        history: torch.Tensor,  # [B, L] item indices, -1 = none
        scale: torch.Tensor,
    ) -> torch.Tensor:
        logits = scale * (users @ cand_vecs.T) - self.log_q[cand]
        logits = logits.masked_fill(seen_mask(history, cand, target), -1e4)
        labels = torch.searchsorted(cand, target)
        return torch.nn.functional.cross_entropy(logits.float(), labels)


def seen_mask(history: torch.Tensor, cand: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, C]: candidate c is in row b's history and is not its target (the items a
    user already has are not negatives). `cand` is sorted and unique, so each history
    item finds its candidate by binary search: B x L lookups, not a B x L x C compare
    (a tenth of a CPU heads epoch on ml-latest-small)."""
    pos = torch.searchsorted(cand, history).clamp(max=len(cand) - 1)
    hit = cand[pos] == history  # a -1 (no item) finds no candidate
    rows = torch.arange(len(history), device=history.device).unsqueeze(-1).expand_as(pos)
    seen = torch.zeros(len(history), len(cand), dtype=torch.bool, device=history.device)
    seen[rows[hit], pos[hit]] = True
    return seen & (cand.view(1, -1) != target.view(-1, 1))


def recall_at(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    targets: np.ndarray,
    seen_rows: list[np.ndarray],
    n: int,
) -> float:
    """Share of validation targets in the top-n of all items, the user's own items masked."""
    hits = 0
    for s in range(0, len(targets), 512):
        sc = user_vecs[s : s + 512] @ item_vecs.T
        for r, seen in enumerate(seen_rows[s : s + 512]):
            t = targets[s + r]
            seen = seen[seen != t]
            sc[r, seen] = -np.inf
        top = np.argpartition(-sc, min(n, sc.shape[1] - 1), axis=1)[:, :n]
        hits += int((top == targets[s : s + 512, None]).any(1).sum())
    return hits / max(len(targets), 1)
