"""SASRec-style causal Transformer over item-vector sequences, and the recommender around any encoder
(the other backbones live in ``backbones.py``, the losses in ``losses.py``).

Shapes: ``B`` batch, ``L`` history length (``max_len``), ``d`` width, ``N`` items, ``K`` negatives.
Sequences are left-padded with the padding id ``N`` so the most recent item is always at
position ``L-1`` (as in the reference code); padded positions carry a zero vector, as in SASRec.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .item_table import FusedItemTable
from .losses import bce_loss, full_softmax_loss, logq_correct, sampled_softmax_loss


class SASRecBlock(nn.Module):
    """Pre-LayerNorm block: causal self-attention + position-wise feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
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




class SequentialRecommender(nn.Module):
    """Item table + sequence encoder, tied input/output item vectors (docs/method.md section 2, step 9).

    ``similarity`` "cosine" L2-normalises user states and item vectors and divides by the
    temperature; it is used in training AND evaluation, so the ranking optimised is the ranking
    measured (the reference code trains on cosine and evaluates on dot products).
    ``loss``: "infonce" (sampled softmax), "bce" (sampled negatives) or "full_ce" (softmax over
    all N items, logsumexp over blocks of ``ce_chunk`` items); see ``losses.py``.
    """

    def __init__(self, items: FusedItemTable, encoder: nn.Module, similarity: str = "cosine",
                 temperature: float = 0.07, loss: str = "infonce", ce_chunk: int = 65_536):
        super().__init__()
        if loss not in ("infonce", "bce", "full_ce"):
            raise ValueError(f"train.loss={loss!r}: expected infonce, bce or full_ce")
        self.items, self.encoder = items, encoder
        self.similarity, self.temperature = similarity, temperature
        self.loss, self.ce_chunk = loss, ce_chunk

    @property
    def pad_id(self) -> int:
        return self.items.num_items

    def embed_sequences(self, seqs: torch.Tensor) -> torch.Tensor:
        """Item vectors [B, L, d] of padded id sequences [B, L] (pad -> zeros), looked up."""
        B, L = seqs.shape
        flat = seqs.reshape(-1)
        valid = flat != self.pad_id
        out = torch.zeros(B * L, self.encoder.dim, device=seqs.device)
        vecs = self.items(flat[valid])
        out = out.index_put((valid.nonzero().squeeze(1),), vecs.to(out.dtype))
        return out.view(B, L, -1)

    def user_states(self, seqs: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """User states [B, d] of left-padded ``seqs`` [B, L], by the encoder's ``user_state`` rule."""
        if table is not None:
            return user_states_from_table(self.encoder, table, seqs)
        return self.encoder.user_state(self.embed_sequences(seqs), seqs != self.pad_id)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.similarity == "cosine" else x

    def forward(self, seqs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, last_only: bool = False,
                masked: torch.Tensor | None = None,
                log_q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss terms (see ``loss_terms``); ``forward`` so that DDP/DMP wrappers sync."""
        return self.loss_terms(seqs, targets, negatives, last_only, masked, log_q)

    def loss_terms(self, seqs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, last_only: bool = False,
                   masked: torch.Tensor | None = None,
                   log_q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the per-position losses of ``self.loss`` and the number of positions.

        Args:
            seqs: [B, L] left-padded inputs (causal backbones; unused with ``masked``).
            targets: [B, L] next item at each position (pad where there is none). With ``masked``
                (bert4rec) they are the input sequence itself: the window's last L items.
            negatives: [K] shared by the whole step, or [B, K] per sequence (every position of
                sequence b uses row b); empty (and ignored) with loss "full_ce". A negative equal
                to a position's target is masked out (an accidental hit is not a negative).
            last_only: causal backbones: train on the last position only (the paper's setting).
            masked: [B, L] bool (bert4rec, Cloze): positions of ``targets`` whose input vector is
                replaced by [MASK]; the loss is taken there, against the original item.
            log_q: [N] log expected count of each item among a position's negatives: applies the
                logQ correction (``losses.logq_correct``) to the sampled losses.

        Returns:
            (sum of per-position losses, number of positions) so that callers can normalise by
            the GLOBAL count across workers (exact parity with one process). The sum includes
            the item module's ``extra_loss(uniq_ids, vecs)`` when it has one (an already scaled sum).
        """
        B, L = seqs.shape
        pad = self.pad_id
        if masked is not None:
            inputs, targets = targets, torch.where(masked, targets, torch.full_like(targets, pad))
        else:
            inputs = seqs
            if last_only:
                targets = torch.where(torch.arange(L, device=seqs.device) == L - 1, targets,
                                      torch.full_like(targets, pad))
        # One lookup of every distinct id the step needs: the sharded lookup (an all-to-all) then
        # moves each row once, the gradient of a repeated id is summed by autograd, and a fused
        # TorchRec optimiser (applied in the lookup's backward) updates each row once per step.
        ids = torch.cat([inputs.reshape(-1), targets.reshape(-1), negatives.reshape(-1)])
        real = ids != pad
        slot = torch.full_like(ids, -1)
        if self.loss == "full_ce":
            # every item is scored: the lookup is the whole catalogue, the same on every rank
            uniq = torch.arange(self.items.num_items, device=ids.device)
            slot[real] = ids[real]
        else:
            uniq, inverse = torch.unique(ids[real], return_inverse=True)
            slot[real] = inverse
        vecs = self.items(uniq)
        seq_slot, tgt_slot, neg_slot = slot.split([B * L, B * L, negatives.numel()])
        x = torch.zeros(B * L, vecs.shape[1], dtype=vecs.dtype, device=vecs.device)
        has = seq_slot >= 0
        x = x.index_put((has.nonzero().squeeze(1),), vecs[seq_slot[has]])
        valid = inputs != pad
        h = (self.encoder(x.view(B, L, -1), valid) if masked is None
             else self.encoder(x.view(B, L, -1), valid, masked))
        h = self.normalize(h)
        pos_mask = tgt_slot >= 0
        hp = h.reshape(B * L, -1)[pos_mask]
        scale = 1.0 / self.temperature if self.similarity == "cosine" else 1.0
        pos_logit = (hp * self.normalize(vecs[tgt_slot[pos_mask]])).sum(-1) * scale
        if self.loss == "full_ce":
            loss = full_softmax_loss(hp, self.normalize(vecs), pos_logit, scale, self.ce_chunk)
        else:
            tgt_ids = targets.reshape(-1)[pos_mask]
            neg = self.normalize(vecs[neg_slot])
            if negatives.dim() == 1:
                neg_logit = hp @ neg.T * scale
                neg_ids = negatives.unsqueeze(0)  # [1, K], broadcast over positions
            else:
                K = negatives.shape[1]
                neg_logit = torch.bmm(h, neg.view(B, K, -1).transpose(1, 2)).reshape(B * L, K)[pos_mask] * scale
                neg_ids = negatives.repeat_interleave(L, dim=0)[pos_mask]  # [M, K]: each position's sequence row
            neg_logit = neg_logit.masked_fill(neg_ids == tgt_ids.unsqueeze(1), float("-inf"))
            if log_q is not None:
                pos_logit, neg_logit = logq_correct(pos_logit, neg_logit, log_q[tgt_ids], log_q[neg_ids])
            loss = (sampled_softmax_loss if self.loss == "infonce" else bce_loss)(pos_logit, neg_logit)
        total = loss.sum()
        extra_loss = getattr(self.items, "extra_loss", None)
        if extra_loss is not None:
            total = total + extra_loss(uniq, vecs)
        return total, torch.tensor(float(loss.numel()))
