"""The language model as a candidate source: user vector against every item vector."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from features.batch import Histories
from recsys.candidates import DenseRows, History, ItemMatrix, ProductRows
from recsys.lm.cold import cold_pool

if TYPE_CHECKING:
    from recsys.lm.model import LanguageModel


class LMNearest:
    """Cosine of the user's LM vector with every item's (cold items included).

    The model is fitted by the pipeline before the sources; `fit` keeps a reference.
    Scores are dense rows like every source's; the pipeline takes the top-N per chunk
    of users, so memory stays at chunk x items. The user vectors are computed once per
    chunk (the new-item slots use them too).
    """

    name = "lm"
    finite_scores = True  # products of unit vectors

    def __init__(self, model: LanguageModel, cold_slots: float = 0.0) -> None:
        self.model = model
        self.cold_slots = cold_slots

    def fit(self, h: History) -> LMNearest:
        self.cold_ = cold_pool(h.X) if self.cold_slots > 0 else np.zeros(0, np.int64)
        return self

    def rows(self, b: Histories, n_items: int) -> ProductRows | DenseRows:
        """User vectors against item vectors (`ProductRows`: the same scores for a user
        alone as in a chunk); with cold slots, the dense rows they rewrite."""
        if self.cold_slots > 0:
            return DenseRows(self.scores(b, n_items), finite=True)
        return self._products(b, n_items)

    def _products(self, b: Histories, n_items: int) -> ProductRows:
        V = ItemMatrix.cached(self.model, self.model.item_vectors_)
        return ProductRows(self.model.user_vectors_for(b), V, n_items)

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        s = self._products(b, n_items).dense()
        if self.cold_slots > 0:
            cold = self.cold_[self.cold_ < n_items]
            if len(cold) and len(cold) < n_items:
                u = self.model.user_vectors_for(b)
                cs = ProductRows(u, ItemMatrix(self.model.text_vectors_[cold]), len(cold)).dense()
                s[:, cold] = interleave_cold(np.delete(s, cold, axis=1), cs, self.cold_slots)
        return s

    def state(self) -> dict[str, np.ndarray]:
        return {}  # the model is saved on its own (lm_*.safetensors)

    def load_state(self, state: dict[str, np.ndarray], h: History) -> LMNearest:
        return self.fit(h)


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
