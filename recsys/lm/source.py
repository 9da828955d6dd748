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

    def __init__(self, model: LanguageModel) -> None:
        self.model = model

    def fit(self, h: History) -> LMNearest:
        return self

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        u = self.model.user_vectors(users, h)
        return (u @ self.model.item_vectors_.T).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {}  # the model is saved on its own (lm_*.safetensors)

    def load_state(self, state: dict[str, np.ndarray], h: History) -> LMNearest:
        return self
