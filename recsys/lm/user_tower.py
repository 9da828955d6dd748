"""The user tower: recency-aware attention pooling over the user's recent item vectors.

A handful of small matrices, so a user vector costs microseconds: `user_vectors_numpy`
computes exactly what `UserTower.forward` computes, for serving without torch.

    q   = w_q + W_q x_0                      (x_0: the most recent item)
    a_j = softmax_j((W_k x_j + p_j) . q / sqrt(d) + b_j)   over the valid positions
    s   = sum_j a_j x_j
    u   = normalise(s + W_o s + c x_0)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class UserTower(nn.Module):
    def __init__(self, dim: int, history_len: int) -> None:
        super().__init__()
        self.dim = dim
        self.history_len = history_len
        self.query = nn.Parameter(torch.zeros(dim))
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.pos = nn.Parameter(torch.zeros(history_len, dim))
        self.recency = nn.Parameter(-0.1 * torch.arange(history_len, dtype=torch.float32))
        self.out = nn.Linear(dim, dim)
        self.last_mix = nn.Parameter(torch.tensor(0.0))
        nn.init.normal_(self.q_proj.weight, std=0.02)
        nn.init.normal_(self.k_proj.weight, std=0.02)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d] item vectors, position 0 the most recent; mask: [B, L] bool."""
        L = x.shape[1]
        q = self.query + self.q_proj(x[:, 0])
        k = self.k_proj(x) + self.pos[:L]
        logits = (k @ q.unsqueeze(-1)).squeeze(-1) / self.dim**0.5 + self.recency[:L]
        logits = logits.masked_fill(~mask, -1e9)
        a = torch.softmax(logits, dim=-1) * mask
        s = (a.unsqueeze(-1) * x).sum(1)
        u = s + self.out(s) + self.last_mix * x[:, 0]
        return nn.functional.normalize(u, dim=-1)

    def numpy_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()}


def user_vectors_numpy(state: dict[str, np.ndarray], x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`UserTower.forward` in numpy. x: [B, L, d] float32, mask: [B, L] bool.

    Computed in float64 and rounded to float32: a float32 product's last bit depends
    on the BLAS kernel the batch's size picks, so one user alone (a request) and the
    same user in a chunk of thousands (the batch job) would differ in the last bit."""
    state = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    x = x.astype(np.float64)
    d = x.shape[-1]
    L = x.shape[1]
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
