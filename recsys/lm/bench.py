"""Item-encoding throughput: the naive loop against the encoding path the model uses.

naive: batches of 256 in catalogue order, padded to `max_length` 64, fp32, no_grad.
fast:  texts sorted by token length (batches padded to their own longest text),
       `torch.inference_mode`; on CPU int8 dynamic quantisation of the linear layers,
       and bf16 weights where the CPU has bf16 hardware (what `lm.cpu_precision =
       "auto"` then uses); on CUDA bf16 autocast. All include padding and the forward
       pass, not tokenisation (cached), and are timed on the same texts in one process.
items/s is wall-clock; items per CPU-second is what one fully available core gives, a
figure that holds up on a machine shared with other jobs (wall time does not).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from recsys.lm.encoder import (
    Tokens,
    cpu_bf16_native,
    cpu_inference_copy,
    encode_pooled,
    load_pretrained,
    mean_pool,
)


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


def bench_encode(
    texts: list[str],
    model: str,
    devices: list[str],
    batch_sizes: list[int],
    max_length: int = 48,
    naive: bool = True,
    quantize: bool = True,
) -> list[dict[str, Any]]:
    """items/s per (device, method, batch size), measured one after the other."""
    tok, enc = load_pretrained(model)
    enc.eval()
    tokens = Tokens.from_texts(tok, texts, max_length)
    pad = int(getattr(tok, "pad_token_id", 0) or 0)
    rows: list[dict[str, Any]] = []
    for d in devices:
        dev = torch.device(d)
        base = enc.to(dev)
        if naive:
            wall, cpu = _naive(base, tok, texts, dev)
            rows.append({"device": d, "method": "naive fp32, pad 64", "batch": 256,
                         "items_per_s": wall, "items_per_cpu_s": cpu})  # fmt: skip
        if dev.type == "cpu" and quantize:
            # int8 everywhere; bf16 too where the CPU has it (what `auto` then picks)
            precisions = ["int8", "bf16"] if cpu_bf16_native() else ["int8"]
            fast = [(f"sorted + {p}", cpu_inference_copy(enc.cpu(), p)) for p in precisions]
        else:
            fast = [("sorted + bf16" if dev.type == "cuda" else "sorted", base)]
        for label, m in fast:
            encode_pooled(m, Tokens(tokens.ids[:64], tokens.lengths[:64]), dev, 64, pad)  # warm
            for bs in batch_sizes:
                t0, c0 = time.perf_counter(), time.process_time()
                encode_pooled(m, tokens, dev, bs, pad)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                rows.append({"device": d, "method": label, "batch": bs,
                             "items_per_s": len(texts) / wall,
                             "items_per_cpu_s": len(texts) / cpu})  # fmt: skip
    lens = tokens.lengths
    for r in rows:
        r |= {"items": len(texts), "mean_tokens": float(np.mean(lens)),
              "threads": torch.get_num_threads()}  # fmt: skip
    return rows
