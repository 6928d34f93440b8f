"""SASRec-style causal Transformer over item-vector sequences, and user states over a full item table
(the other backbones live in ``backbones.py``, the recommender around any encoder in ``recommender.py``).

Shapes: ``B`` batch, ``L`` history length (``max_len``), ``d`` width, ``N`` items, ``K`` negatives.
Sequences are left-padded with the padding id ``N`` so the most recent item is always at
position ``L-1`` (as in the reference code); padded positions carry a zero vector, as in SASRec.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _without_key_bias(grad: torch.Tensor) -> torch.Tensor:
    """``in_proj_bias``'s gradient [3d] with its key third (d:2d) set to zero."""
    d = grad.shape[0] // 3
    return torch.cat([grad[:d], grad.new_zeros(d), grad[2 * d:]])


class SASRecBlock(nn.Module):
    """Pre-LayerNorm block: causal self-attention + position-wise feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        # The key bias cannot change the attention (it adds q.b_k to every logit of query q, and the
        # softmax over keys ignores that), so its gradient is zero but for rounding noise, which Adam
        # scales into lr-sized steps: a random walk that ends differently in runs of the same function
        # (another TorchRec plan, more workers). It is not trained: it keeps its initial value (zero).
        self.attn.in_proj_bias.register_hook(_without_key_bias)
        self.ln2 = nn.LayerNorm(dim, eps=1e-8)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim),
                                nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, causal: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.ln1(x)
        # queries are normalised, keys/values are not: SASRec's original arrangement
        h, _ = self.attn(q, x, x, attn_mask=causal, need_weights=False)
        x = (q + h) * keep
        return (x + self.ff(self.ln2(x))) * keep


class SASRecEncoder(nn.Module):
    """Causal Transformer: item vectors [B, L, d] -> hidden states [B, L, d].

    Example::

        enc = SASRecEncoder(dim=8, max_len=5)
        enc(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape  # [2, 5, 8]
    """

    def __init__(self, dim: int, max_len: int, num_blocks: int = 1, num_heads: int = 1, dropout: float = 0.1,
                 normalize_inputs: bool = True):
        """``normalize_inputs``: L2-normalise item vectors to norm sqrt(d) before adding positions
        (used with cosine similarity)."""
        super().__init__()
        self.dim, self.max_len, self.normalize_inputs = dim, max_len, normalize_inputs
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, num_heads, dropout) for _ in range(num_blocks))
        self.ln = nn.LayerNorm(dim, eps=1e-8)
        self.register_buffer("causal", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        keep = valid.unsqueeze(-1).to(x.dtype)
        if self.normalize_inputs:
            # Item vectors enter at unit RMS, the scale of the positions: whitened semantic rows
            # (RMS 1, norm ~sqrt(d)) and small ID rows would otherwise drown or be drowned by
            # them. With cosine scores an item vector's norm carries no meaning anyway.
            x = F.normalize(x, dim=-1) * self.dim ** 0.5
        x = self.drop(x + self.pos.weight[-L:]) * keep
        for block in self.blocks:
            x = block(x, self.causal[:L, :L], keep)
        return self.ln(x) * keep

    def user_state(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, d]: the hidden state at the last position (the most recent item)."""
        return self(x, valid)[:, -1]


def user_states_from_table(encoder: nn.Module, table: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """User states [B, d] of left-padded id sequences [B, L] (pad id = N) over a full item table
    [N, d], by the encoder's own rule (``encoder.user_state``: any backbone of ``backbones.py``)."""
    valid = seqs != table.shape[0]
    x = torch.zeros(*seqs.shape, table.shape[1], dtype=table.dtype, device=table.device)
    x[valid] = table[seqs[valid]]
    return encoder.user_state(x, valid)
