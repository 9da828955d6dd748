"""The language model as a candidate source: user vector against every item vector."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from recsys.candidates import History

if TYPE_CHECKING:
    from recsys.lm.model import LanguageModel


class LMNearest:
    """Cosine of the user's LM vector with every item's (cold items included).

    The model is fitted by the pipeline before the sources; `fit` keeps a reference.
    Scores are dense rows like every source's; the pipeline takes the top-N per chunk
    of users, so memory stays at chunk x items.
    """

    name = "lm"

    def __init__(self, model: LanguageModel, cold_slots: float = 0.0) -> None:
        self.model = model
        self.cold_slots = cold_slots

    def fit(self, h: History) -> LMNearest:
        return self

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        u = self.model.user_vectors(users, h)
        s = (u @ self.model.item_vectors_.T).astype(np.float32)
        if self.cold_slots > 0:
            cold = np.flatnonzero(np.diff(h.X.tocsc().indptr) == 0)
            if len(cold) and len(cold) < h.n_items:
                s[:, cold] = interleave_cold(
                    np.delete(s, cold, axis=1), u @ self.model.text_vectors_[cold].T,
                    self.cold_slots,
                )  # fmt: skip
        return s

    def state(self) -> dict[str, np.ndarray]:
        return {}  # the model is saved on its own (lm_*.safetensors)

    def load_state(self, state: dict[str, np.ndarray], h: History) -> LMNearest:
        return self


def interleave_cold(warm: np.ndarray, cold: np.ndarray, share: float) -> np.ndarray:
    """Scores for cold items that put them at every (1/share)-th place of each row's
    ranking: the cold item ranked r-th by its text vector gets the score of the warm
    item at place ceil(r / share), less a little. Items without interactions have no
    learned offset, so their raw cosine is not on the warm items' scale."""
    B, nc = cold.shape
    k = min(warm.shape[1], int(np.ceil(nc / share)) + 1)
    top = -np.sort(np.partition(-warm, k - 1, axis=1)[:, :k], axis=1)  # descending
    order = np.argsort(-cold, axis=1, kind="stable")
    place = np.minimum(np.ceil(np.arange(1, nc + 1) / share).astype(np.int64) - 1, k - 1)
    out = np.empty_like(cold, dtype=np.float32)
    rows = np.arange(B)[:, None]
    out[rows, order] = top[:, place] - 1e-4 * (1 + np.arange(nc, dtype=np.float32))
    return out
