"""Fast evaluation of the ranker's LightGBM trees for small batches (one request).

LightGBM's own `predict` costs milliseconds per call on a few hundred rows, most of it
per-call overhead and thread start-up. lleaves compiles each model to native code with
LLVM; its predictions are the same numbers (checked by `check`). When lleaves is not
installed, LightGBM's predict runs single-threaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import lightgbm as lgb
import numpy as np

log = logging.getLogger("recsys")


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_TREE_CACHE", Path(tempfile.gettempdir()) / "recsys-cache"))


class TreeEnsemble:
    """The mean of several boosters' raw scores, as `Ranker.predict`."""

    def __init__(
        self,
        boosters: list[lgb.Booster],
        cache_dir: Path | None = None,
        backend: str = "auto",
        n_jobs: int = 1,
    ) -> None:
        self.boosters = boosters
        self.backend = backend
        self.n_jobs = n_jobs
        self._compiled: list[object] | None = None
        if backend in ("auto", "lleaves"):
            try:
                self._compiled = [
                    self._compile(b, cache_dir or default_cache_dir()) for b in boosters
                ]
                self.backend = "lleaves"
            except Exception as e:  # not installed, or an llvmlite it cannot use
                if backend == "lleaves":
                    raise
                log.warning("lleaves unavailable (%s); LightGBM predicts", e)
                self.backend = "lightgbm"
        else:
            self.backend = "lightgbm"

    @staticmethod
    def _compile(b: lgb.Booster, cache_dir: Path) -> object:
        import lleaves

        text = b.model_to_string()
        key = hashlib.sha256(text.encode()).hexdigest()[:24]
        cache_dir.mkdir(parents=True, exist_ok=True)
        model_file = cache_dir / f"{key}.txt"
        if not model_file.exists():
            tmp = model_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, model_file)
        m = lleaves.Model(model_file=str(model_file))
        # lleaves reads a cached object file when present; write it atomically
        obj = cache_dir / f"{key}.o"
        if obj.exists():
            m.compile(cache=str(obj))
        else:
            tmp_obj = cache_dir / f"{key}.{os.getpid()}.o.tmp"
            m.compile(cache=str(tmp_obj))
            if tmp_obj.exists():
                os.replace(tmp_obj, obj)
        return m

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self._compiled is not None:
            Xd = np.ascontiguousarray(X, dtype=np.float64)
            return np.mean([m.predict(Xd, n_jobs=self.n_jobs) for m in self._compiled], axis=0)  # type: ignore[attr-defined]
        return np.mean([b.predict(X, num_threads=self.n_jobs) for b in self.boosters], axis=0)

    def predict_reference(self, X: np.ndarray) -> np.ndarray:
        """LightGBM's own predict: the offline scores."""
        return np.mean([b.predict(X, num_threads=1) for b in self.boosters], axis=0)

    def check(self, X: np.ndarray, atol: float = 1e-9) -> float:
        """Largest difference to LightGBM on `X`; raises if above `atol`."""
        d = float(np.max(np.abs(self.predict(X) - self.predict_reference(X)), initial=0.0))
        if d > atol:
            raise ValueError(
                f"compiled trees ({self.backend}) differ from LightGBM by {d:.3g} > {atol:g}"
            )
        return d
