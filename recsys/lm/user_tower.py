"""The user tower: recency-aware attention pooling over the user's recent item vectors,
optionally after `layers` transformer blocks over the history in order.

A handful of small matrices, so a user vector costs microseconds: `user_vectors_numpy`
computes exactly what `UserTower.forward` computes, for serving without torch.

With blocks, each history item first reads the others (pre-norm, one head, causal in
time: an item attends to itself and to what came before it), so the history is read
as a sequence (SASRec's block, over text vectors):

    h   = x + p                              (p: learned position of each place)
    h  += W_v' softmax(causal((W_q' n(h)) (W_k' n(h))^T / sqrt(d))) W_v n(h)
    h  += W_2 gelu(W_1 n(h))                 (n: layer norm)

and the pooling below runs over h (the blocks' residual branches start at zero, so an
untrained block passes the history through). Without blocks (the default):

    q   = w_q + W_q x_0                      (x_0: the most recent item)
    a_j = softmax_j((W_k x_j + p_j) . q / sqrt(d) + b_j)   over the valid positions
    s   = sum_j a_j x_j
    u   = normalise(s + W_o s + c x_0)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recsys.lm.numpy_tower import history_matrix, user_vectors_numpy

__all__ = ["Block", "UserTower", "history_matrix", "user_vectors_numpy"]


class Block(nn.Module):
    """One pre-norm transformer block over the history, one attention head, causal in
    time (position 0 is the most recent item, so place j sees places j, j+1, ...)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        for m in (self.proj, self.fc2):  # residual branches start at zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        d = h.shape[-1]
        L = h.shape[1]
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        logits = q @ k.transpose(1, 2) / d**0.5  # [B, L(query), L(key)]
        later = torch.ones(L, L, dtype=torch.bool, device=h.device).tril(-1)  # key more recent
        logits = logits.masked_fill(later.unsqueeze(0) | ~mask.unsqueeze(1), -1e9)
        h = h + self.proj(torch.softmax(logits, dim=-1) @ v)
        return h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))


class UserTower(nn.Module):
    def __init__(self, dim: int, history_len: int, layers: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.history_len = history_len
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
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
        if len(self.blocks):
            h = x + self.pos[:L]
            for block in self.blocks:
                h = block(h, mask)
            x = h * mask.unsqueeze(-1)
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
