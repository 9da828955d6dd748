"""The user tower's forward pass in numpy (`UserTower.forward` without torch): what
the batch job and the endpoint run per user, so recommending never imports torch."""

from __future__ import annotations

import numpy as np


def user_vectors_numpy(state: dict[str, np.ndarray], x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`UserTower.forward` in numpy. x: [B, L, d] float32, mask: [B, L] bool.

    Computed in float64 and rounded to float32: a float32 product's last bit depends
    on the BLAS kernel the batch's size picks, so one user alone (a request) and the
    same user in a chunk of thousands (the batch job) would differ in the last bit."""
    state = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    x = x.astype(np.float64)
    d = x.shape[-1]
    L = x.shape[1]
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if n_blocks:
        h = x + state["pos"][:L]
        for b in range(n_blocks):
            h = _block_numpy({k[len(f"blocks.{b}.") :]: v for k, v in state.items()
                              if k.startswith(f"blocks.{b}.")}, h, mask)  # fmt: skip
        x = h * mask[..., None]
    q = state["query"] + x[:, 0] @ state["q_proj.weight"].T
    k = x @ state["k_proj.weight"].T + state["pos"][:L]
    logits = np.einsum("bld,bd->bl", k, q) / np.sqrt(d) + state["recency"][:L]
    logits = np.where(mask, logits, -1e9)
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits) * mask
    a = e / np.maximum(e.sum(axis=1, keepdims=True), 1e-30)
    s = np.einsum("bl,bld->bd", a, x)
    u = s + s @ state["out.weight"].T + state["out.bias"] + state["last_mix"] * x[:, 0]
    n = np.linalg.norm(u, axis=1, keepdims=True)
    return (u / np.maximum(n, 1e-12)).astype(np.float32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _block_numpy(s: dict[str, np.ndarray], h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`Block.forward` in numpy (float64)."""
    from scipy.special import erf

    d, L = h.shape[-1], h.shape[1]
    qkv = _layer_norm(h, s["ln1.weight"], s["ln1.bias"]) @ s["qkv.weight"].T + s["qkv.bias"]
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    logits = np.einsum("bid,bjd->bij", q, k) / np.sqrt(d)
    later = np.tril(np.ones((L, L), dtype=bool), -1)
    logits = np.where(later[None] | ~mask[:, None, :], -1e9, logits)
    logits = logits - logits.max(-1, keepdims=True)
    e = np.exp(logits)
    a = e / e.sum(-1, keepdims=True)
    h = h + np.einsum("bij,bjd->bid", a, v) @ s["proj.weight"].T + s["proj.bias"]
    f = _layer_norm(h, s["ln2.weight"], s["ln2.bias"]) @ s["fc1.weight"].T + s["fc1.bias"]
    f = 0.5 * f * (1.0 + erf(f / np.sqrt(2.0)))
    return h + f @ s["fc2.weight"].T + s["fc2.bias"]


def history_matrix(
    item_vectors: np.ndarray, histories: list[np.ndarray], history_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad each history (item indices, most recent first) into [B, L, d] and a mask."""
    B, d = len(histories), item_vectors.shape[1]
    x = np.zeros((B, history_len, d), dtype=np.float32)
    mask = np.zeros((B, history_len), dtype=bool)
    for r, h in enumerate(histories):
        h = np.asarray(h[:history_len], dtype=np.int64)
        x[r, : len(h)] = item_vectors[h]
        mask[r, : len(h)] = True
    return x, mask
