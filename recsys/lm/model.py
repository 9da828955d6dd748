"""`LanguageModel`: fit the two towers on a history, give item and user vectors.

    lm = LanguageModel(LMConfig()).fit(history, items)
    lm.item_vectors_                 # [n_items, d], unit length, from item text
    lm.user_vectors(users, history)  # [n_users, d], numpy, from recent item vectors

Training runs in two phases, both early-stopped on validation recall@N (each chosen
user's last training event):
1. heads: the encoder is frozen and its pooled output computed once; the projection
   head and the user tower train on every step's batch (cheap, many epochs);
2. encoder: the top `train_layers` blocks (LoRA or full) train together with the heads,
   from cached hidden states entering those blocks; negatives and history come from a
   table of vectors refreshed each epoch, the targets run through the blocks. On CPU
   by default there are none (`cpu_train_layers` = 0) and this phase does not run.
On CPU the whole of it keeps within `cpu_time_budget_s`; on CUDA bf16 autocast is on and
every layer is fine-tuned unless configured (the batches are the same size: four times
larger ones left a small log a few steps an epoch, and lost NDCG).
Each epoch writes a checkpoint; a rerun with the same data and settings resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from features.batch import Histories
from recsys.candidates import History
from recsys.lm.config import TEXT_LENGTHS, LMConfig
from recsys.lm.numpy_tower import history_matrix, user_vectors_numpy
from recsys.lm.text import item_texts
from recsys.memory import mapped_large_blocks, release_free_memory, rss_gib


class _LazyModule(types.ModuleType):
    """A module imported on its first attribute's use: torch and the modules built on
    it load when a model is fitted or encodes, not to recommend (1.4 s of each batch
    worker's start)."""

    def __getattr__(self, name: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self.__name__), name)


if TYPE_CHECKING:
    import torch
    from torch import nn

    from recsys.lm import encoder as lm_encoder
    from recsys.lm import train as lm_train
    from recsys.lm import user_tower as lm_user_tower
else:
    torch, nn = _LazyModule("torch"), _LazyModule("torch.nn")
    lm_encoder, lm_train = _LazyModule("recsys.lm.encoder"), _LazyModule("recsys.lm.train")
    lm_user_tower = _LazyModule("recsys.lm.user_tower")

log = logging.getLogger("recsys")


# encoder steps timed before deciding whether a first encoder epoch can be half done
PROBE_STEPS = 10


@contextlib.contextmanager
def deterministic(on: bool = True) -> Iterator[None]:
    """torch's deterministic algorithms inside the block (where `on`), as before after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def ties_as_sets(cfg: LMConfig, h: History) -> bool:
    """`cfg.ties_as_sets`, or where it is None whether every event time of `h` is a
    whole day (a day's events then have no known order)."""
    if cfg.ties_as_sets is not None:
        return cfg.ties_as_sets
    return bool(len(h.times)) and not np.any(h.times % 86_400)


def half_epoch_fits(seen: int, elapsed: float, left: float, epoch: int) -> bool:
    """Whether at the rate so far (`seen` examples in `elapsed` seconds) at least half
    of an `epoch` of examples would be done in the `left` seconds of the budget."""
    return seen + seen / max(elapsed, 1e-9) * max(left, 0.0) >= epoch / 2


class PackedHidden:
    """Hidden states of every item's tokens in one tensor: item j's are rows
    `offsets[j]:offsets[j + 1]`. One allocation, handed back to the system when the fit
    drops it, where a small tensor per item would stay in the heap's fragments."""

    def __init__(self, data: torch.Tensor, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @classmethod
    def empty(cls, lengths: np.ndarray, hidden: int, dtype: torch.dtype) -> PackedHidden:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(torch.empty(int(offsets[-1]), hidden, dtype=dtype), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.data[int(self.offsets[j]) : int(self.offsets[j + 1])]

    def __setitem__(self, j: int, value: torch.Tensor) -> None:
        self.data[int(self.offsets[j]) : int(self.offsets[j + 1])] = value


HIDDEN_FP32_BYTES = 2 << 30  # the fine-tuning cache's size in fp32 from which it is bf16


def cache_root() -> Path:
    return Path(os.environ.get("RECSYS_CACHE_DIR", Path.home() / ".cache" / "recsys"))


def _device(cfg: LMConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LanguageModel:
    """The two-tower model. Hyper-parameters in `config`; learned state ends in `_`."""

    def __init__(self, config: LMConfig | None = None, seed: int = 0) -> None:
        self.config = config or LMConfig()
        self.seed = seed

    # -- fitting ------------------------------------------------------------------------
    def fit(self, h: History, items: pl.DataFrame) -> LanguageModel:
        cfg = self.config
        cpu = _device(cfg).type != "cuda"
        # encoding passes (no gradients) take every thread torch has; training `cpu_threads`
        self._encode_threads = torch.get_num_threads()
        threads = cfg.cpu_threads if cpu and cfg.cpu_threads else torch.get_num_threads()
        with lm_encoder.ops_threads(threads):  # torch's thread count is restored afterwards
            return self._fit(h, items)

    def _fit(self, h: History, items: pl.DataFrame) -> LanguageModel:
        cfg = self.config
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.timings_: dict[str, float] = {}
        t_start = time.perf_counter()
        dev = _device(cfg)
        cuda = dev.type == "cuda"
        self.texts_ = item_texts(items, cfg.template)
        tokenizer, encoder = lm_encoder.load_pretrained(cfg.model)
        self.tokenizer_ = tokenizer
        self.pad_id_ = int(getattr(tokenizer, "pad_token_id", 0) or 0)
        ckdir = self._checkpoint_dir(h)
        t0 = time.perf_counter()
        tok_path = ckdir / "tokens.safetensors" if ckdir else None
        if tok_path is not None and tok_path.is_file():
            tokens = lm_encoder.load_tokens(tok_path)
        else:
            tokens = lm_encoder.Tokens.for_catalogue(
                tokenizer,
                self.texts_,
                cfg.max_length,
                cfg.max_tokens,
                lm_encoder.position_limit(tokenizer, encoder),
            )
            if tok_path is not None:
                lm_encoder.save_tokens(tok_path, tokens)
        self.tokens_ = tokens
        self.max_length_ = tokens.max_length or cfg.max_length or TEXT_LENGTHS[-1]
        if cfg.max_length is None:
            at_cut = float(np.mean(tokens.lengths >= self.max_length_)) if len(tokens.ids) else 0.0
            log.info(
                "lm: item texts cut at %d tokens (%s tokens in all, %.0f%% of texts at the cut)",
                self.max_length_,
                f"{int(tokens.lengths.sum()):,}",
                100 * at_cut,
            )
        self.timings_["tokenise"] = time.perf_counter() - t0

        train_layers = 0 if cfg.finetune == "none" else cfg.train_layers
        if train_layers is None:
            train_layers = 10**6 if cuda else cfg.cpu_train_layers
        encoder.requires_grad_(False)
        tower = lm_encoder.ItemTower(
            encoder, cfg.dim, train_layers, h.n_items if cfg.id_embeddings else 0
        )
        self.dim_ = tower.head.dim
        finetune = train_layers > 0 and cfg.finetune != "none"

        # frozen pass over every item: pooled output, and hidden states entering `start`
        t0 = time.perf_counter()
        with lm_encoder.ops_threads(getattr(self, "_encode_threads", torch.get_num_threads())):
            pooled0, hidden, precision = self._frozen_pass(tower, tokens, dev, keep_hidden=finetune)
        self.timings_["encode (frozen)"] = dt = time.perf_counter() - t0
        self.precision_ = f"{precision} on {dev.type}"  # the frozen pass's path, for reports
        log.info(
            "lm: frozen pass over %d items in %.1f s (%.0f items/s, %s on %s%s), RSS %.2f GiB",
            h.n_items,
            dt,
            h.n_items / max(dt, 1e-9),
            precision,
            dev.type,
            ", to the first trained layer" if finetune else "",
            rss_gib()[0],
        )

        as_sets = ties_as_sets(cfg, h)
        ex = lm_train.next_item_examples(
            h,
            cfg.history_len,
            cfg.target_window,
            self.seed,
            max_examples=cfg.max_examples,
            ties_as_sets=as_sets,
        )
        train_ex, valid_ex = lm_train.split_validation(
            ex, rng, cfg.valid_users, cfg.valid_per_user, cfg.valid_share
        )
        log.info(
            "lm: %d training examples, %d for validation (%d users)%s",
            len(train_ex),
            len(valid_ex),
            len(np.unique(valid_ex.users)),
            "; a user's events of one time train as a set" if as_sets else "",
        )
        user_tower = lm_user_tower.UserTower(self.dim_, cfg.history_len, cfg.user_layers)
        scale = nn.Parameter(torch.tensor(np.log(20.0), dtype=torch.float32))
        counts = np.bincount(train_ex.target, minlength=h.n_items).astype(np.float64)
        bs = cfg.batch_size
        loss_fn = lm_train.SampledSoftmax(counts, bs, cfg.negatives)
        seen_rows = [h.X[u].indices for u in valid_ex.users]
        budget = None if cuda else cfg.cpu_time_budget_s
        # the budget covers training; the frozen pass before it is bounded by the catalogue
        deadline = None if budget is None else time.perf_counter() + budget

        state = _TrainState(tower, user_tower, scale, loss_fn, dev)
        state.encode_threads = getattr(self, "_encode_threads", state.encode_threads)
        if finetune and cfg.finetune == "lora" and tower.start < tower.n_layers:
            state.add_lora(cfg)
        resumed = state.try_resume(ckdir)

        t0 = time.perf_counter()
        P0 = torch.from_numpy(pooled0)
        if not resumed.get("done"):
            heads_deadline = deadline
            if deadline is not None and finetune:
                now = time.perf_counter()
                heads_deadline = now + max(0.0, deadline - now) * cfg.heads_budget_share
            # the heads' steps are a few large products: every core pays here (15.6
            # against 21.5 s an epoch on ml-latest-small, two cores). Deterministic
            # kernels: on several threads the gradients' scatter-adds otherwise sum in
            # whatever order the threads finish, and two fits of a seed would differ
            with (
                lm_encoder.ops_threads(
                    state.encode_threads if not cuda else torch.get_num_threads()
                ),
                deterministic(not cuda),
            ):
                state.run_phase(
                    "heads",
                    cfg,
                    train_ex,
                    valid_ex,
                    seen_rows,
                    P0,
                    None,
                    bs,
                    rng,
                    heads_deadline,
                    ckdir,
                    resumed,
                    self.seed,
                )
            release_free_memory()  # what the heads' epochs freed, before the encoder's
            if finetune and (deadline is None or time.perf_counter() < deadline - 30):
                out_of_memory = False
                try:
                    state.run_phase(
                        "encoder",
                        cfg,
                        train_ex,
                        valid_ex,
                        seen_rows,
                        P0,
                        (tokens, hidden),
                        bs,
                        rng,
                        deadline,
                        ckdir,
                        resumed,
                        self.seed,
                    )
                except torch.cuda.OutOfMemoryError:
                    out_of_memory = True  # freed below, once the failed step's frames are gone
                if out_of_memory:
                    state.abandon_phase()
                    log.warning(
                        "language model: fine-tuning the encoder ran out of %s memory (a "
                        "step runs up to %d texts of up to %d tokens through it); the model "
                        "keeps its best epoch so far (the heads over the pretrained encoder "
                        "unless an encoder epoch had won). A smaller [lm] max_length (e.g. "
                        "48) or batch_size lets the encoder train",
                        dev.type.upper(),
                        bs,
                        self.max_length_,
                    )
            state.finish(ckdir)
        self.timings_["train"] = time.perf_counter() - t0
        self.history_: dict[str, list[dict[str, float]]] = state.history
        self.budget_bound_ = state.budget_bound
        self.best_recall_ = state.best
        self.encoder_tuned_ = state.best_uses_encoder
        self.recall_at_ = cfg.recall_at

        # final vectors: the best state, from the cache (no second encoder pass)
        t0 = time.perf_counter()
        state.restore_best()
        with torch.inference_mode():
            P = state.pooled_table((tokens, hidden), P0) if state.best_uses_encoder else P0.to(dev)
        self.similarity_space_ = "text"
        if cfg.refresh_epochs:  # the pooled table the vectors came from, for `refresh`
            self.__dict__["_table"] = P.float().cpu()
        if state.lora:
            tower.encoder = tower.encoder.merge_and_unload()  # type: ignore[operator]
        self._keep_trained(tower, user_tower, scale, P, dev)
        self.timings_["item vectors"] = time.perf_counter() - t0
        release_free_memory()
        log.info(
            "language model: %d items, dim %d, validation recall@%d %.4f (encoder %s), %.1f s",
            h.n_items,
            self.dim_,
            cfg.recall_at,
            self.best_recall_,
            "fine-tuned" if self.encoder_tuned_ else "frozen",
            time.perf_counter() - t_start,
        )
        return self

    def refresh(self, h: History) -> LanguageModel:
        """Train the heads `refresh_epochs` more epochs on `h` (the whole history, after
        the ranker was fitted on the part before its targets), from the model `fit`
        chose: the pipeline refits its other sources on everything for recommending,
        and this keeps the language model's item offsets and user tower as fresh as
        they are. No validation (its examples are in `h`); the encoder is not trained.
        Only right after `fit`, which keeps the pooled table it needs."""
        cfg = self.config
        table = self.__dict__.pop("_table", None)
        if table is None or cfg.refresh_epochs <= 0 or h.n_items != len(table):
            return self
        t0 = time.perf_counter()
        dev = _device(cfg)
        cuda = dev.type == "cuda"
        torch.manual_seed(self.seed)
        rng = np.random.default_rng([self.seed, 2])
        ex = lm_train.next_item_examples(
            h,
            cfg.history_len,
            cfg.target_window,
            self.seed,
            max_examples=min(cfg.max_examples, cfg.refresh_examples),
            ties_as_sets=ties_as_sets(cfg, h),
        )
        if len(ex) == 0:
            return self
        counts = np.bincount(ex.target, minlength=h.n_items).astype(np.float64)
        bs = cfg.batch_size
        loss_fn = lm_train.SampledSoftmax(counts, bs, cfg.negatives)
        scale = nn.Parameter(torch.tensor(np.log(self.scale_), dtype=torch.float32))
        tower, user_tower = self.tower_, self.user_tower_
        state = _TrainState(tower, user_tower, scale, loss_fn, dev)
        threads = getattr(self, "_encode_threads", torch.get_num_threads())
        with lm_encoder.ops_threads(threads), deterministic(not cuda):
            state.run_phase(
                "refresh", cfg, ex, None, [], table, None, bs, rng, None, None, {}, self.seed
            )
        self._keep_trained(tower, user_tower, scale, table, dev)
        self.timings_["refresh"] = time.perf_counter() - t0
        log.info(
            "language model: refreshed on the %d latest examples of the whole history, "
            "%d epoch(s), %.1f s",
            len(ex),
            cfg.refresh_epochs,
            time.perf_counter() - t0,
        )
        return self

    def _keep_trained(
        self,
        tower: lm_encoder.ItemTower,
        user_tower: lm_user_tower.UserTower,
        scale: nn.Parameter,
        P: torch.Tensor,
        dev: torch.device,
    ) -> None:
        """What recommending uses from trained modules: every item's vector from its
        pooled text `P` and its learned offset, its text vector alone (no offset: what a
        cold item gets), the towers on CPU, the user tower's numpy twin and the scale."""
        with torch.inference_mode():
            P = P.to(dev)
            all_idx = torch.arange(len(P), device=dev)
            self.item_vectors_ = tower.head.to(dev)(P, all_idx).float().cpu().numpy()
            self.text_vectors_ = tower.head(P).float().cpu().numpy()
        self.tower_ = tower.cpu().eval()
        self.user_tower_ = user_tower.cpu().eval()
        self.user_state_ = self.user_tower_.numpy_state()
        self.scale_ = float(scale.detach().exp())

    def _frozen_pass(
        self,
        tower: lm_encoder.ItemTower,
        tokens: lm_encoder.Tokens,
        dev: torch.device,
        keep_hidden: bool,
    ) -> tuple[np.ndarray, PackedHidden | None, str]:
        """The pooled output of every item, the hidden states entering the first
        trained layer (with `keep_hidden`), and the precision they were computed in."""
        cfg = self.config
        enc = tower.encoder
        precision = "fp32"
        if dev.type == "cpu" and cfg.quantize_cpu:
            precision = lm_encoder.cpu_precision(cfg.cpu_precision)
            enc = lm_encoder.cpu_inference_copy(enc, precision)
        enc = enc.to(dev).eval()
        if not keep_hidden or tower.start == 0:
            # the frozen encoder's output depends only on the model and the texts: cached
            key = hashlib.sha256(
                f"{lm_encoder.resolve_model(cfg.model)}|{self.max_length_}|{precision}|{dev.type}|"
                f"{sorted(getattr(enc, 'recsys_fused', {}).items())}".encode()
                + "\x1f".join(self.texts_).encode()
            ).hexdigest()[:20]
            path = cache_root() / "lm-frozen" / f"{key}.safetensors"
            if cfg.checkpoints and path.is_file():
                from safetensors.numpy import load_file

                return load_file(str(path))["pooled"], None, precision
            pooled = lm_encoder.encode_pooled(enc, tokens, dev, cfg.encode_batch_size, self.pad_id_)
            if cfg.checkpoints:
                from safetensors.numpy import save_file

                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"pooled": pooled}, str(path) + ".tmp")
                os.replace(str(path) + ".tmp", path)
            return pooled, None, precision
        # hidden states entering the first trainable block, per item (ragged, fp32 on CPU;
        # bf16 where fp32 would pass HIDDEN_FP32_BYTES, e.g. 100,000 items of 48 tokens)
        n, hid = len(tokens.lengths), lm_encoder.hidden_size(enc)
        store = torch.float32
        if int(np.sum(tokens.lengths)) * hid * 4 > HIDDEN_FP32_BYTES:
            store = torch.bfloat16
            log.info("lm: hidden states of %d items kept in bf16", n)
        pooled = np.zeros((n, hid), dtype=np.float32)
        hidden = PackedHidden.empty(tokens.lengths, hid, store)
        shadow = lm_encoder.ItemTower.__new__(lm_encoder.ItemTower)
        nn.Module.__init__(shadow)
        shadow.encoder, shadow.start = enc, tower.start

        def one(idx: np.ndarray) -> None:
            ids, mask = tokens.pad(idx, self.pad_id_)
            hs, po = lm_encoder.ItemTower.bottom(shadow, ids.to(dev), mask.to(dev))
            pooled[idx] = po.float().cpu().numpy()
            hs = hs.cpu()
            for r, j in enumerate(idx.tolist()):
                hidden[j] = hs[r, : tokens.lengths[j]]

        lm_encoder.map_batches(tokens.batches(cfg.encode_batch_size), one, dev)
        return pooled, hidden, precision

    def _checkpoint_dir(self, h: History) -> Path | None:
        if not self.config.checkpoints:
            return None
        d = hashlib.sha256()
        for col in ("u", "i", "t"):
            d.update(np.ascontiguousarray(h.ev[col].to_numpy()).tobytes())
        d.update("\x1f".join(self.texts_).encode())
        # settings that act after the fit (`refresh`) leave its checkpoints valid
        d.update(
            self.config.model_dump_json(exclude={"refresh_epochs", "refresh_examples"}).encode()
        )
        d.update(str(self.seed).encode())
        path = cache_root() / "lm" / d.hexdigest()[:20]
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- using ----------------------------------------------------------------------------
    def _check(self) -> None:
        if not hasattr(self, "item_vectors_"):
            raise RuntimeError("LanguageModel is not fitted: call fit() or load() first")

    @property
    def similarity_vectors(self) -> np.ndarray:
        """The vectors of the ranker's similarity features (`lm_sim_*`): the text
        vectors, i.e. the fine-tuned tower over each item's text without its learned
        per-item offset, so that they measure likeness in content beside the
        co-occurrence that the CF sources and `lm_score` already carry. (Bundles from
        before this choice use the item vectors, which their ranker was trained on.)"""
        self._check()
        if self.similarity_space_ == "item":
            return self.item_vectors_
        return self.text_vectors_

    def user_vectors(self, users: np.ndarray, h: History) -> np.ndarray:
        """[len(users), d] from each user's recent items in `h` (zeros without history)."""
        self._check()
        hist = h.last_items(np.asarray(users), self.config.history_len)
        return self.user_vectors_from(hist)

    def user_vectors_for(self, b: Histories) -> np.ndarray:
        """[len(b), d] for a chunk of users' events, computed once per chunk."""
        v = b.memo.get(self)
        if v is None:
            v = b.memo[self] = self.user_vectors_from(b.last_list(self.config.history_len))
        return v

    def user_vectors_from(self, histories: list[np.ndarray]) -> np.ndarray:
        """User vectors from item-index histories, most recent first (numpy only)."""
        x, mask = history_matrix(self.item_vectors_, histories, self.config.history_len)
        return user_vectors_numpy(self.user_state_, x, mask)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Item vectors for texts through the fine-tuned tower (the fast CPU path)."""
        self._check()
        tower = self.tower_
        dev = _device(self.config)
        tokens = lm_encoder.Tokens.from_texts(self.tokenizer_, texts, self.max_length_)
        enc = tower.encoder
        if dev.type == "cpu" and self.config.quantize_cpu:
            if getattr(self, "_quantized", None) is None:
                self._quantized = lm_encoder.cpu_inference_copy(enc, self.config.cpu_precision)
            enc = self._quantized
        pooled = lm_encoder.encode_pooled(
            enc.to(dev), tokens, dev, self.config.encode_batch_size, self.pad_id_, progress
        )
        with torch.inference_mode():
            return tower.head.to(dev)(torch.from_numpy(pooled).to(dev)).float().cpu().numpy()

    def encode_items(self, items: pl.DataFrame, progress: bool = False) -> np.ndarray:
        return self.encode(item_texts(items, self.config.template), progress)

    # -- persistence ------------------------------------------------------------------------
    def save(self, d: Path, prefix: str = "lm_") -> dict[str, Any]:
        """Write safetensors files into `d`; returns the manifest section."""
        from safetensors.torch import save_file

        self._check()
        tower = self.tower_
        trained = {
            f"encoder.{k}": v.contiguous()
            for k, v in tower.encoder.state_dict().items()
            if self.encoder_tuned_ and (layer := _layer_of(k)) is not None and layer >= tower.start
        }
        head = {f"head.{k}": v.contiguous() for k, v in tower.head.state_dict().items()}
        save_file(trained | head, str(d / f"{prefix}item_tower.safetensors"))
        save_file(
            {k: v.contiguous() for k, v in self.user_tower_.state_dict().items()},
            str(d / f"{prefix}user_tower.safetensors"),
        )
        save_file(
            {
                "item_vectors": torch.from_numpy(np.ascontiguousarray(self.item_vectors_)),
                "text_vectors": torch.from_numpy(np.ascontiguousarray(self.text_vectors_)),
            },
            str(d / f"{prefix}item_vectors.safetensors"),
        )
        return {
            "model": self.config.model,
            "tokenizer": self.config.model,
            "resolved_path": lm_encoder.resolve_model(self.config.model),
            "template": self.config.template,
            "max_length": self.max_length_,
            "dim": self.dim_,
            "history_len": self.config.history_len,
            "user_layers": len(self.user_tower_.blocks),
            "id_items": int(tower.head.n_items),
            "encoder_fine_tuned": bool(self.encoder_tuned_),
            "fine_tuning": self.config.finetune,
            "trained_layers_from": int(tower.start),
            "validation_recall": self.best_recall_,
            "recall_at": self.recall_at_,
            "scale": self.scale_,
            "similarity_space": self.similarity_space_,
            "files": {
                "item_tower": f"{prefix}item_tower.safetensors",
                "user_tower": f"{prefix}user_tower.safetensors",
                "item_vectors": f"{prefix}item_vectors.safetensors",
            },
            "timings_s": {k: round(v, 3) for k, v in getattr(self, "timings_", {}).items()},
        }

    @classmethod
    def load(
        cls, d: Path, section: dict[str, Any], config: LMConfig, seed: int = 0
    ) -> LanguageModel:
        """Rebuild from `save`'s files and manifest section, without torch: the arrays a
        recommendation needs (the towers load on first use; the base encoder offline)."""
        from safetensors.numpy import load_file

        lm = cls(config, seed)
        files = section["files"]
        # the item tower (tokenizer and encoder: seconds to load) only encodes new
        # texts; recommending needs the vectors and the user tower alone, so the tower
        # is read from these files when first used (`_load_item_tower`), if unchanged
        # since the bundle's checksums were verified
        st = (d / files["item_tower"]).stat()
        lm.__dict__["_item_tower_source"] = (d, dict(section), (st.st_size, st.st_mtime_ns))
        user_state = load_file(str(d / files["user_tower"]))
        lm.user_state_ = {k: v.astype(np.float32) for k, v in user_state.items()}
        lm.__dict__["_user_tower_shape"] = (
            int(section["dim"]),
            int(section["history_len"]),
            int(section.get("user_layers", 0)),
        )
        lm.dim_ = int(section["dim"])
        lm.max_length_ = int(section.get("max_length") or config.max_length or TEXT_LENGTHS[-1])
        vecs = load_file(str(d / files["item_vectors"]))
        lm.item_vectors_ = vecs["item_vectors"]
        lm.text_vectors_ = vecs.get("text_vectors", vecs["item_vectors"])
        lm.encoder_tuned_ = bool(section["encoder_fine_tuned"])
        lm.best_recall_ = float(section.get("validation_recall", float("nan")))
        lm.recall_at_ = int(section.get("recall_at", config.recall_at))
        lm.scale_ = float(section.get("scale", 20.0))
        # bundles written before the similarity features moved to the text vectors
        # keep the vectors their ranker was trained on
        lm.similarity_space_ = str(section.get("similarity_space", "item"))
        if lm.similarity_space_ not in ("item", "text"):
            raise ValueError(f"unknown LM similarity space {lm.similarity_space_!r}")
        return lm

    @property
    def user_tower_(self) -> lm_user_tower.UserTower:
        """The user tower as a torch module (for training and saving); a loaded model
        builds it from its numpy state on first use."""
        tower: lm_user_tower.UserTower | None = self.__dict__.get("_user_tower")
        if tower is None:
            shape = self.__dict__.get("_user_tower_shape")
            if shape is None:
                raise AttributeError("LanguageModel has no user tower: not fitted")
            tower = lm_user_tower.UserTower(*shape)
            tower.load_state_dict({k: torch.from_numpy(v) for k, v in self.user_state_.items()})
            self.__dict__["_user_tower"] = tower = tower.eval()
        return tower

    @user_tower_.setter
    def user_tower_(self, tower: lm_user_tower.UserTower) -> None:
        self.__dict__["_user_tower"] = tower

    # the item tower of a loaded model is read on first use (`_load_item_tower`)
    @property
    def tower_(self) -> lm_encoder.ItemTower:
        tower: lm_encoder.ItemTower = self._item_tower_part("_tower")
        return tower

    @tower_.setter
    def tower_(self, tower: lm_encoder.ItemTower) -> None:
        self.__dict__["_tower"] = tower

    @property
    def tokenizer_(self) -> Any:
        return self._item_tower_part("_tokenizer")

    @tokenizer_.setter
    def tokenizer_(self, tokenizer: Any) -> None:
        self.__dict__["_tokenizer"] = tokenizer

    @property
    def pad_id_(self) -> int:
        return int(self._item_tower_part("_pad_id"))

    @pad_id_.setter
    def pad_id_(self, pad_id: int) -> None:
        self.__dict__["_pad_id"] = pad_id

    def _item_tower_part(self, key: str) -> Any:
        self._load_item_tower()
        try:
            return self.__dict__[key]
        except KeyError:
            raise AttributeError(
                f"LanguageModel has no item tower ({key[1:]}): not fitted"
            ) from None

    def _load_item_tower(self) -> None:
        """The tokenizer, the base encoder (offline) and the fine-tuned weights of
        `save`'s files, for a model that `load` read without them (else nothing)."""
        src = self.__dict__.get("_item_tower_source")
        if src is None:
            return
        from safetensors.torch import load_file

        d, section, stamp = src
        path = d / section["files"]["item_tower"]
        st = path.stat() if path.exists() else None
        if st is None or (st.st_size, st.st_mtime_ns) != stamp:
            raise RuntimeError(f"{path} changed since the bundle was loaded: load it again")
        tokenizer, encoder = lm_encoder.load_pretrained(section["model"])
        tower = lm_encoder.ItemTower(encoder, section["dim"], 0, int(section.get("id_items", 0)))
        tower.start = int(section["trained_layers_from"])
        state = load_file(str(path))
        enc_state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        if enc_state:
            missing = set(enc_state) - set(tower.encoder.state_dict())
            if missing:
                raise RuntimeError(
                    f"fine-tuned weights do not fit the encoder: {sorted(missing)[:3]}"
                )
            tower.encoder.load_state_dict(enc_state, strict=False)
        tower.head.load_state_dict(
            {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        )
        self.tower_ = tower.eval()
        self.tokenizer_ = tokenizer
        self.pad_id_ = int(getattr(tokenizer, "pad_token_id", 0) or 0)
        del self.__dict__["_item_tower_source"]


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    for a, b in itertools.pairwise(parts):
        if a in ("layer", "layers") and b.isdigit():
            return int(b)
    return None


class _TrainState:
    """The trainable modules, the training loop and its checkpoints."""

    def __init__(
        self,
        tower: lm_encoder.ItemTower,
        user_tower: lm_user_tower.UserTower,
        scale: nn.Parameter,
        loss_fn: lm_train.SampledSoftmax,
        dev: torch.device,
    ) -> None:
        self.tower = tower.to(dev)
        self.user_tower = user_tower.to(dev)
        self.scale = scale
        self.loss_fn = loss_fn.to(dev)
        self.dev = dev
        self.lora = False
        self.best = -1.0
        self.best_state: dict[str, torch.Tensor] = {}
        self.best_uses_encoder = False
        self.history: dict[str, list[dict[str, float]]] = {"heads": [], "encoder": []}
        self.budget_bound: list[str] = []  # what the time budget cut short
        # threads of the passes without gradients (the item table); training keeps its own
        self.encode_threads = torch.get_num_threads()

    def add_lora(self, cfg: LMConfig) -> None:
        from peft import LoraConfig, get_peft_model

        layers = list(range(self.tower.start, self.tower.n_layers))
        names = {
            n.split(".")[-1]
            for n, m in self.tower.encoder.named_modules()
            if isinstance(m, nn.Linear)
        }
        targets = sorted(
            names
            & {
                "query",
                "key",
                "value",
                "dense",
                "q_lin",
                "k_lin",
                "v_lin",
                "out_lin",
                "lin1",
                "lin2",
            }
        )
        lc = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft says int; any > 0 scales
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            layers_to_transform=layers,
        )
        self.tower.encoder = get_peft_model(self.tower.encoder, lc)
        self.lora = True

    def trainable(self, phase: str) -> dict[str, nn.Parameter]:
        out = {f"head.{k}": p for k, p in self.tower.head.named_parameters()}
        out |= {f"user.{k}": p for k, p in self.user_tower.named_parameters()}
        out["scale"] = self.scale
        if phase == "encoder":
            out |= self.encoder_params()
        return out

    def encoder_params(self) -> dict[str, nn.Parameter]:
        out = {}
        for k, p in self.tower.encoder.named_parameters():
            layer = _layer_of(k)
            if layer is None or layer < self.tower.start:
                continue
            if self.lora and "lora_" not in k:
                continue
            out[f"enc.{k}"] = p
        return out

    def snapshot(self, phase: str) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone().cpu() for k, p in self.trainable("encoder").items()}

    def load_snapshot(self, snap: dict[str, torch.Tensor]) -> None:
        params = self.trainable("encoder")
        with torch.no_grad():
            for k, v in snap.items():
                if k in params:
                    params[k].copy_(v.to(params[k].device))

    # checkpoints: current and best parameters plus progress
    def save_checkpoint(self, ckdir: Path | None, progress: dict[str, Any]) -> None:
        if ckdir is None:
            return
        from safetensors.torch import save_file

        cur = self.snapshot("encoder")
        tensors = {f"cur.{k}": v.contiguous() for k, v in cur.items()}
        tensors |= {f"best.{k}": v.contiguous() for k, v in self.best_state.items()}
        tmp = ckdir / "ckpt.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, ckdir / "ckpt.safetensors")
        meta = progress | {
            "best": self.best,
            "best_uses_encoder": self.best_uses_encoder,
            "history": self.history,
        }
        (ckdir / "progress.json.tmp").write_text(json.dumps(meta))
        os.replace(ckdir / "progress.json.tmp", ckdir / "progress.json")

    def try_resume(self, ckdir: Path | None) -> dict[str, Any]:
        if ckdir is None or not (ckdir / "progress.json").is_file():
            return {}
        from safetensors.torch import load_file

        try:
            meta = json.loads((ckdir / "progress.json").read_text())
            t = load_file(str(ckdir / "ckpt.safetensors"))
        except (OSError, ValueError) as e:
            log.warning("ignoring an unreadable checkpoint in %s (%s)", ckdir, e)
            return {}
        self.load_snapshot({k[4:]: v for k, v in t.items() if k.startswith("cur.")})
        self.best_state = {k[5:]: v for k, v in t.items() if k.startswith("best.")}
        self.best = float(meta["best"])
        self.best_uses_encoder = bool(meta["best_uses_encoder"])
        self.history = meta["history"]
        log.info("language model: resuming from %s (%s)", ckdir, meta.get("where"))
        return meta

    def finish(self, ckdir: Path | None) -> None:
        self.save_checkpoint(ckdir, {"done": True, "where": "done"})

    def abandon_phase(self) -> None:
        """After a phase that failed mid-step (out of memory): drop its gradients, freeze
        the encoder again and give the device's cached blocks back."""
        for p in itertools.chain(
            self.tower.parameters(), self.user_tower.parameters(), [self.scale]
        ):
            p.grad = None
        for p in self.encoder_params().values():
            p.requires_grad_(False)
        release_free_memory()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def restore_best(self) -> None:
        if self.best_state:
            self.load_snapshot(self.best_state)

    def pooled_table(
        self, cache: tuple[lm_encoder.Tokens, PackedHidden | None], P0: torch.Tensor, bs: int = 256
    ) -> torch.Tensor:
        """Pooled output of the current encoder for every item (no grad)."""
        tokens, _hidden = cache
        out = torch.zeros_like(P0)
        was = self.tower.training
        self.tower.eval()

        def one(idx: np.ndarray) -> None:
            out[idx] = self._pooled(idx, cache).float().cpu()

        # batches side by side on every core (as the frozen pass), one thread each
        with (
            lm_encoder.ops_threads(self.encode_threads if self.dev.type == "cpu" else 1),
            mapped_large_blocks(),
        ):
            lm_encoder.map_batches(tokens.batches(bs), one, self.dev)
        self.tower.train(was)
        return out

    def _pooled(
        self, idx: np.ndarray, cache: tuple[lm_encoder.Tokens, PackedHidden | None]
    ) -> torch.Tensor:
        tokens, hidden = cache
        dev = self.dev
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if hidden is None:  # every layer trains: from token ids
                ids, mask = tokens.pad(idx)
                return self.tower.full(ids.to(dev), mask.to(dev)).float()
            L = int(tokens.lengths[idx].max())
            hs = torch.zeros(len(idx), L, hidden[int(idx[0])].shape[-1])
            mask = torch.zeros(len(idx), L, dtype=torch.long)
            for r, j in enumerate(idx.tolist()):
                n = int(tokens.lengths[j])
                hs[r, :n] = hidden[j]
                mask[r, :n] = 1
            return self.tower.top(hs.to(dev), mask.to(dev)).float()

    def run_phase(
        self,
        phase: str,
        cfg: LMConfig,
        train_ex: lm_train.Examples,
        valid_ex: lm_train.Examples | None,
        seen_rows: list[np.ndarray],
        P0: torch.Tensor,
        cache: tuple[lm_encoder.Tokens, PackedHidden | None] | None,
        bs: int,
        rng: np.random.Generator,
        deadline: float | None,
        ckdir: Path | None,
        resumed: dict[str, Any],
        seed: int,
    ) -> None:
        max_epochs = {
            "heads": cfg.epochs,
            "encoder": cfg.encoder_epochs,
            "refresh": cfg.refresh_epochs,
        }[phase]
        start_epoch = 0
        if resumed.get("phase") == phase:
            start_epoch = int(resumed["epoch"]) + 1
        elif resumed.get("phase") == "encoder" and phase == "heads":
            return
        if phase == "encoder" and self.best_state:
            self.load_snapshot(self.best_state)  # fine-tune from the best heads
        params = self.trainable(phase)
        # the heads come to the encoder phase trained; a new optimizer at their full rate
        # moves each of their weights by about that rate in its first steps, undoing them
        heads_lr = cfg.lr * (cfg.encoder_phase_heads_lr if phase == "encoder" else 1.0)
        groups = [
            {"params": [p for k, p in params.items() if not k.startswith("enc.")], "lr": heads_lr}
        ]
        enc = [p for k, p in params.items() if k.startswith("enc.")]
        if enc:
            for p in enc:
                p.requires_grad_(True)
            lr = cfg.encoder_lr * (10 if self.lora else 1)
            groups.append({"params": enc, "lr": lr})
        for p in self.tower.head.parameters():
            p.requires_grad_(True)
        # fused: one pass over each parameter (the item offsets are 10k x 128) instead of
        # one per operation of the update, 7% of a CPU heads epoch on ml-latest-small
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
        n_items = len(P0)
        dev = self.dev
        P0d = P0.to(dev)
        bad = int(resumed.get("bad", 0)) if resumed.get("phase") == phase else 0
        # the last epoch's seconds (table refresh and validation included): an epoch is
        # started only when one as long would end within the budget, so that a fit is
        # made of whole epochs, the same on a faster or slower machine as long as they
        # fit; the check inside the epoch remains for a first epoch that overruns
        last_s = 0.0
        for epoch in range(start_epoch, max_epochs):
            t_epoch = time.perf_counter()
            if deadline is not None and t_epoch + last_s > deadline:
                if last_s:
                    self.budget_warning(
                        f"no {phase} epoch {epoch + 1}: it would end past the time budget "
                        f"({last_s:.0f} s each), before validation recall ended the phase"
                    )
                break
            phase_key = ("heads", "encoder", "refresh").index(phase)
            erng = np.random.default_rng([seed, phase_key, epoch])
            # the first encoder epoch starts from the frozen encoder: its table is P0
            fresh_table = phase == "encoder" and epoch > 0
            P_tab = self.pooled_table(cache, P0).to(dev) if fresh_table else P0d  # type: ignore[arg-type]
            order = erng.permutation(len(train_ex))
            self.tower.train()
            self.user_tower.train()
            bar = tqdm(
                total=len(order),
                desc=f"lm {phase} epoch {epoch + 1}",
                unit="ex",
                leave=False,
                mininterval=5,
            )
            t0, seen_ex, losses = time.perf_counter(), 0, []
            stopped = skipped = False
            for step, s in enumerate(range(0, len(order), bs)):
                now = time.perf_counter()
                if deadline is not None and now > deadline:
                    stopped = True
                    break
                if (
                    phase == "encoder"
                    and deadline is not None
                    and step == PROBE_STEPS
                    and not half_epoch_fits(seen_ex, now - t0, deadline - now, len(order))
                ):
                    # a partial encoder epoch rarely beats the heads (1M synthetic events:
                    # 41% of one, recall 0.350 against 0.374), and its validation costs a
                    # pass over the catalogue
                    skipped = True
                    break
                b = train_ex.take(order[s : s + bs])
                hist = torch.from_numpy(b.history).to(dev)
                target = torch.from_numpy(b.target).to(dev)
                neg = torch.from_numpy(erng.integers(0, n_items, cfg.negatives)).to(dev)
                cand = torch.unique(torch.cat([target, neg]))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    # the head runs once per distinct item of the batch (history + candidates)
                    valid = hist >= 0
                    hk = hist.clamp(min=0)
                    allc = torch.unique(torch.cat([hk.flatten(), cand]))
                    pa = P_tab[allc]
                    if phase == "encoder":
                        tgt_u = torch.unique(target)
                        if cfg.encoder_items_per_step and dev.type == "cpu":
                            # on CPU only some targets run through the encoder each step
                            pick = erng.permutation(len(tgt_u))[: cfg.encoder_items_per_step]
                            tgt_u = torch.sort(tgt_u[torch.from_numpy(pick)]).values
                        assert cache is not None, "the encoder phase runs on the token cache"
                        fresh = self._pooled(tgt_u.cpu().numpy(), cache)
                        pa = pa.clone()
                        pa[torch.searchsorted(allc, tgt_u)] = fresh.to(pa.dtype)
                    keep = torch.rand(len(allc), device=dev) >= cfg.id_dropout
                    va = self.tower.head(pa, allc, keep).float()
                    hv = va[torch.searchsorted(allc, hk)] * valid.unsqueeze(-1)
                    u = self.user_tower(hv, valid)
                    cv = va[torch.searchsorted(allc, cand)]
                    loss = self.loss_fn(u, cv, cand, target, hist, self.scale.exp().clamp(max=100))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                seen_ex += len(b.target)
                bar.update(len(b.target))
                bar.set_postfix(
                    loss=f"{np.mean(losses[-20:]):.3f}",
                    ex_s=f"{seen_ex / max(time.perf_counter() - t0, 1e-9):.0f}",
                )
            bar.close()
            if skipped:
                rate = seen_ex / max(time.perf_counter() - t0, 1e-9)
                left = max(0.0, deadline - time.perf_counter()) if deadline else 0.0
                self.budget_warning("the encoder is not fine-tuned: under half an epoch fits")
                log.info(
                    "lm encoder: not fine-tuned, about %.0f of an epoch's %d examples would fit "
                    "in the %.0f s left of the time budget (%.0f ex/s); the heads are kept",
                    seen_ex + rate * left,
                    len(order),
                    left,
                    rate,
                )
                self.history[phase].append(
                    {"epoch": epoch + 1, "examples": seen_ex, "skipped": 1.0}
                )
                break
            if valid_ex is None:  # no validation (the refresh): every epoch is kept
                log.info(
                    "lm %s epoch %d: loss %.4f, %d ex in %.1f s",
                    phase,
                    epoch + 1,
                    np.mean(losses) if losses else float("nan"),
                    seen_ex,
                    time.perf_counter() - t0,
                )
                continue
            rec = self.validate(cfg, valid_ex, seen_rows, P0, cache if phase == "encoder" else None)
            self.history[phase].append(
                {
                    "epoch": epoch + 1,
                    "loss": float(np.mean(losses)) if losses else float("nan"),
                    f"recall@{cfg.recall_at}": rec,
                    "examples": seen_ex,
                    "seconds": time.perf_counter() - t0,
                }
            )
            log.info(
                "lm %s epoch %d: loss %.4f, validation recall@%d %.4f, %d ex in %.1f s%s, "
                "RSS %.2f GiB",
                phase,
                epoch + 1,
                np.mean(losses) if losses else float("nan"),
                cfg.recall_at,
                rec,
                seen_ex,
                time.perf_counter() - t0,
                " (time budget reached)" if stopped else "",
                rss_gib()[0],
            )
            if rec > self.best:
                self.best, bad = rec, 0
                self.best_state = self.snapshot(phase)
                self.best_uses_encoder = phase == "encoder"
            else:
                bad += 1
            self.save_checkpoint(
                ckdir,
                {"phase": phase, "epoch": epoch, "bad": bad, "where": f"{phase} epoch {epoch + 1}"},
            )
            if stopped and bad < cfg.patience:
                self.budget_warning(f"{phase} epoch {epoch + 1} was cut short")
            if bad >= cfg.patience or stopped:
                break
            last_s = time.perf_counter() - t_epoch
        for p in self.encoder_params().values():
            p.requires_grad_(False)

    def budget_warning(self, what: str) -> None:
        """The CPU time budget, not the validation recall, ended training: the model then
        depends on the machine's speed (a slower CPU trains fewer epochs)."""
        self.budget_bound.append(what)
        log.warning(
            "lm: %s. The CPU time budget ended training, so this model depends on this "
            "machine's speed; set lm.cpu_time_budget_s higher (or None) for the model that "
            "validation recall alone would choose",
            what,
        )

    def validate(
        self,
        cfg: LMConfig,
        valid_ex: lm_train.Examples,
        seen_rows: list[np.ndarray],
        P0: torch.Tensor,
        cache: tuple[lm_encoder.Tokens, PackedHidden | None] | None,
    ) -> float:
        self.tower.eval()
        self.user_tower.eval()
        with torch.no_grad():
            P = self.pooled_table(cache, P0) if cache is not None else P0
            V = self.tower.head(P.to(self.dev), torch.arange(len(P), device=self.dev)).float()
            hist = torch.from_numpy(valid_ex.history).to(self.dev)
            hv = V[hist.clamp(min=0)] * (hist >= 0).unsqueeze(-1)
            u = self.user_tower(hv, hist >= 0)
        return lm_train.recall_at(
            u.cpu().numpy(), V.cpu().numpy(), valid_ex.target, seen_rows, cfg.recall_at
        )
