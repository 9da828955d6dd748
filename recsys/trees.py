"""Fast evaluation of the ranker's LightGBM trees for small batches (one request).

LightGBM's own `predict` costs milliseconds per call on a few hundred rows, most of it
per-call overhead and thread start-up. lleaves compiles each model to native code with
LLVM; its predictions are the same numbers (checked by `check`). When lleaves is not
installed, LightGBM's predict runs single-threaded.

Compiled models are cached on disk by their text's hash, with a note once `check` has
held them equal to LightGBM; a process that finds both (a batch job's workers) never
imports LightGBM.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from recsys.ranker import Ranker

log = logging.getLogger("recsys")


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_TREE_CACHE", Path(tempfile.gettempdir()) / "recsys-cache"))


class TreeEnsemble:
    """The mean of a ranker's models' raw scores, as `Ranker.predict`."""

    def __init__(
        self,
        ranker: Ranker,
        cache_dir: Path | None = None,
        backend: str = "auto",
        n_jobs: int = 1,
    ) -> None:
        self.ranker = ranker
        self.backend = backend
        self.n_jobs = n_jobs
        self._compiled: list[object] | None = None
        self._checked: list[Path] = []  # the notes `check` writes
        if backend in ("auto", "lleaves"):
            try:
                cache = cache_dir or default_cache_dir()
                texts = ranker.model_texts()
                self._compiled = [self._compile(t, cache) for t in texts]
                self._checked = [cache / f"{_key(t)}.checked" for t in texts]
                self.backend = "lleaves"
            except Exception as e:  # not installed, or an llvmlite it cannot use
                if backend == "lleaves":
                    raise
                log.warning("lleaves unavailable (%s); LightGBM predicts", e)
                self.backend = "lightgbm"
        else:
            self.backend = "lightgbm"

    @staticmethod
    def _compile(text: str, cache_dir: Path) -> object:
        import lleaves

        key = _key(text)
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

    @property
    def checked(self) -> bool:
        """Whether `check` has held these compiled models equal to LightGBM (in this
        process or an earlier one, through the cache's notes)."""
        return self._compiled is None or all(p.is_file() for p in self._checked)

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self._compiled is not None:
            Xd = np.ascontiguousarray(X, dtype=np.float64)
            return np.mean([m.predict(Xd, n_jobs=self.n_jobs) for m in self._compiled], axis=0)  # type: ignore[attr-defined]
        boosters = self.ranker.boosters_
        return np.mean([b.predict(X, num_threads=self.n_jobs) for b in boosters], axis=0)

    def predict_reference(self, X: np.ndarray) -> np.ndarray:
        """LightGBM's own predict: the offline scores."""
        return np.mean([b.predict(X, num_threads=1) for b in self.ranker.boosters_], axis=0)

    def check(self, X: np.ndarray, atol: float = 1e-9) -> float:
        """Largest difference to LightGBM on `X`; raises if above `atol`."""
        d = float(np.max(np.abs(self.predict(X) - self.predict_reference(X)), initial=0.0))
        if d > atol:
            raise ValueError(
                f"compiled trees ({self.backend}) differ from LightGBM by {d:.3g} > {atol:g}"
            )
        if len(X):
            for p in self._checked:
                tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
                try:
                    tmp.write_text(f"{d:.3g} on {len(X)} rows\n")
                    os.replace(tmp, p)
                except OSError as e:  # a read-only cache: the next process checks again
                    log.debug("cannot note the check in %s: %s", p.parent, e)
        return d


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]
