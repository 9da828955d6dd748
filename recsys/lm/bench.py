"""Item-encoding throughput: the naive loop against the encoding path the model uses.

naive:  batches of 256 in catalogue order, padded to `max_length` 64, fp32, no_grad.
sorted: texts sorted by token length (batches padded to their own longest text),
        `torch.inference_mode`, batches side by side on one-threaded workers; on CPU
        in fp32 (the reference) and in the reduced precisions asked for, by default
        the one `lm.cpu_precision = "auto"` picks on this CPU (bf16 with bf16
        hardware, else int8 in attention's linear layers); on CUDA bf16 autocast.
All include padding and the forward pass, not tokenisation (cached), and are timed on
the same texts in one process; each reduced-precision path's vectors are compared
with fp32's (cosine of the pooled outputs). items/s is wall-clock; items per
CPU-second is what one fully available core gives, a figure that holds up on a
machine shared with other jobs (wall time does not).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np
import torch

from recsys.lm.encoder import (
    Tokens,
    cpu_bf16_native,
    cpu_inference_copy,
    cpu_precision,
    encode_pooled,
    fused_linear_supported,
    load_pretrained,
    mean_pool,
)
from recsys.resources import ISA_LIMITS, cpu_flags


def cpu_report() -> dict[str, Any]:
    """What the CPU offers and what torch makes of it: the flags, any instruction-set
    limit set in the environment, torch's vector capability, whether oneDNN has bf16
    kernels here and its fused linear runs in bf16, and the precision `auto` picks."""
    model, flags = cpu_flags()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "?"
    return {
        "model": model,
        "machine": platform.machine(),
        "flags": flags,
        "limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
        "torch_capability": capability,
        "bf16_native": cpu_bf16_native(),
        "fused_bf16": fused_linear_supported(torch.bfloat16),
        "picked": cpu_precision("auto"),
    }


def _naive(
    encoder: torch.nn.Module, tok: Any, texts: list[str], dev: torch.device
) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for s in range(0, len(texts), 256):
            b = tok(texts[s : s + 256], padding="max_length", truncation=True, max_length=64,
                    return_tensors="pt")  # fmt: skip
            ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
            mean_pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return len(texts) / (time.perf_counter() - t0), len(texts) / (time.process_time() - c0)


def cpu_precisions(asked: list[str]) -> list[str]:
    """The CPU paths to time: fp32 (the reference) first, then `asked` ('auto' is the
    precision `lm.cpu_precision = "auto"` picks here), without repeats."""
    out = ["fp32"]
    for p in asked:
        p = cpu_precision(p) if p != "fp32" else p
        if p not in out:
            out.append(p)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )


def bench_encode(
    texts: list[str],
    model: str,
    devices: list[str],
    batch_sizes: list[int],
    max_length: int = 48,
    naive: bool = True,
    precisions: list[str] | None = None,
) -> list[dict[str, Any]]:
    """items/s per (device, method, batch size), measured one after the other. On CPU
    `precisions` (default: the one `auto` picks) besides fp32; each row of a reduced
    precision has its pooled vectors' cosine to fp32's (mean and minimum over the
    texts) and `picked` where `auto` would use it."""
    tok, enc = load_pretrained(model)
    enc.eval()
    tokens = Tokens.from_texts(tok, texts, max_length)
    pad = int(getattr(tok, "pad_token_id", 0) or 0)
    picked = cpu_precision("auto")
    rows: list[dict[str, Any]] = []
    for d in devices:
        dev = torch.device(d)
        base = enc.to(dev)
        if naive:
            wall, cpu = _naive(base, tok, texts, dev)
            rows.append({"device": d, "method": "naive fp32, pad 64", "batch": 256,
                         "items_per_s": wall, "items_per_cpu_s": cpu})  # fmt: skip
        fast: list[tuple[str, str, torch.nn.Module]]
        if dev.type == "cpu":
            fast = [
                (p, "sorted, fp32" if p == "fp32" else f"sorted + {p}",
                 base if p == "fp32" else cpu_inference_copy(enc.cpu(), p))
                for p in cpu_precisions(precisions or ["auto"])
            ]  # fmt: skip
        else:
            fast = [("bf16" if dev.type == "cuda" else "fp32",
                     "sorted + bf16" if dev.type == "cuda" else "sorted", base)]  # fmt: skip
        ref: np.ndarray | None = None
        for precision, label, m in fast:
            encode_pooled(m, Tokens(tokens.ids[:64], tokens.lengths[:64]), dev, 64, pad)  # warm
            for bs in batch_sizes:
                t0, c0 = time.perf_counter(), time.process_time()
                v = encode_pooled(m, tokens, dev, bs, pad)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                row = {"device": d, "method": label, "batch": bs, "precision": precision,
                       "picked": dev.type == "cpu" and precision == picked,
                       "items_per_s": len(texts) / wall,
                       "items_per_cpu_s": len(texts) / cpu}  # fmt: skip
                if precision == "fp32" and ref is None:
                    ref = v
                elif ref is not None:
                    cos = _cosine(v, ref)
                    row |= {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
                rows.append(row)
    lens = tokens.lengths
    for r in rows:
        r |= {"items": len(texts), "mean_tokens": float(np.mean(lens)),
              "threads": torch.get_num_threads()}  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]]) -> str | None:
    """The picked CPU path against fp32: its best items/s over the batch sizes and its
    cosine to fp32, and its ratios to the naive and the sorted fp32 loops, in items/s
    and in items per CPU-second (each the best over the batch sizes)."""

    def best(pred: Any, key: str = "items_per_s") -> dict[str, Any] | None:
        rs = [r for r in rows if r["device"] == "cpu" and pred(r)]
        return max(rs, key=lambda r: r[key]) if rs else None

    def is_pick(r: dict[str, Any]) -> bool:
        return bool(r.get("picked"))

    def is_fp32(r: dict[str, Any]) -> bool:
        return r.get("precision") == "fp32"

    def is_naive(r: dict[str, Any]) -> bool:
        return str(r["method"]).startswith("naive")

    pick, pick_cpu = best(is_pick), best(is_pick, "items_per_cpu_s")
    if pick is None or pick_cpu is None or best(is_fp32) is None:
        return None
    cpu = pick_cpu["items_per_cpu_s"]
    cos = f", cosine to fp32 mean {pick['cos_mean']:.4f} (min {pick['cos_min']:.4f})"
    lines = [
        f"picked {pick['precision']}: {pick['items_per_s']:.0f} items/s at batch "
        f"{pick['batch']}{cos if 'cos_mean' in pick else ''}"
    ]
    for name, pred in (("naive fp32", is_naive), ("sorted fp32", is_fp32)):
        r, c = best(pred), best(pred, "items_per_cpu_s")
        if r is None or c is None:
            continue
        lines.append(
            f"  {pick['items_per_s'] / r['items_per_s']:.2f}x {name} ({r['items_per_s']:.0f} "
            f"items/s); per CPU-second {cpu / c['items_per_cpu_s']:.2f}x "
            f"({cpu:.0f} against {c['items_per_cpu_s']:.0f})"
        )
    return "\n".join(lines)
