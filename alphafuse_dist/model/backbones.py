"""Sequence encoders behind ``model.backbone``, their registry ``ENCODERS``, and BERT4Rec's Cloze masking.

Every encoder maps item vectors ``x`` [B, L, d] and a validity mask ``valid`` [B, L] (True at real
items) to hidden states [B, L, d], zero at padded positions, and gives the user state [B, d] with
``user_state(x, valid)``. Sequences are left-padded: the valid positions of a row are its last
``valid.sum()`` positions and the most recent item sits at ``L-1``; pads carry zero vectors.

- ``sasrec``: causal Transformer (:class:`~alphafuse_dist.model.sasrec.SASRecEncoder`).
- ``gru4rec``: a GRU run over the valid items only (:class:`GRU4RecEncoder`).
- ``bert4rec``: bidirectional Transformer with a learned [MASK] vector, trained by masked item
  prediction (:class:`BERT4RecEncoder`, :func:`draw_cloze_mask`).
- ``dreamrec``: a diffusion model generating the next item's vector under the guidance of the
  SASRec encoder's state (:class:`~alphafuse_dist.model.dreamrec.DreamRecEncoder`), trained by its
  denoising loss (``diffusion_loss``) instead of ``train.loss``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import choose
from .dreamrec import DreamRecEncoder
from .sasrec import SASRecBlock, SASRecEncoder


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Rows of x [..., d] rescaled to norm sqrt(d) (RMS 1), as SASRecEncoder does for cosine."""
    return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5


class GRU4RecEncoder(nn.Module):
    """GRU over item vectors [B, L, d] -> hidden states [B, L, d] (``num_layers`` stacked GRUs).

    The hidden state is exactly zero until a sequence's first valid item: each left-padded row is
    first moved to the front (its valid items at positions 0..n-1, pads after), the GRU runs from
    position 0, and the outputs are moved back. Trailing pads come after every valid output, so
    a sequence's hidden states do not depend on how much padding it has.

    Example::

        enc = GRU4RecEncoder(dim=8)
        enc(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape  # [2, 5, 8]
    """

    def __init__(self, dim: int, num_layers: int = 1, dropout: float = 0.1, normalize_inputs: bool = True):
        """``dropout``: on the input vectors (and between GRU layers when ``num_layers > 1``).
        ``normalize_inputs``: item vectors enter at unit RMS (used with cosine similarity)."""
        super().__init__()
        self.dim, self.normalize_inputs = dim, normalize_inputs
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        if self.normalize_inputs:
            x = _unit_rms(x)
        x = self.drop(x)
        n = valid.sum(1, keepdim=True)  # [B, 1] valid items per row
        pos = torch.arange(L, device=x.device).unsqueeze(0)
        front = ((pos + L - n).clamp(max=L - 1)).unsqueeze(-1).expand(B, L, d)
        x = x.gather(1, front) * (pos < n).unsqueeze(-1).to(x.dtype)
        out, _ = self.gru(x)
        back = ((pos - (L - n)).clamp(min=0)).unsqueeze(-1).expand(B, L, d)
        return out.gather(1, back) * valid.unsqueeze(-1).to(out.dtype)

    def user_state(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, d]: the hidden state after the most recent item (position L-1)."""
        return self(x, valid)[:, -1]


class BERT4RecEncoder(nn.Module):
    """Bidirectional Transformer: item vectors [B, L, d] -> hidden states [B, L, d].

    Same blocks as SASRec without the causal mask: every position attends to every valid position
    of its row (never to pads), so each row needs at least one valid position. Positions are
    learned and right-aligned (the last position is always ``pos[max_len-1]``). ``masked`` [B, L]
    replaces the input vector of those (valid) positions with the learned [MASK] vector.

    Example::

        enc = BERT4RecEncoder(dim=8, max_len=5)
        enc.user_state(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape  # [2, 8]
    """

    def __init__(self, dim: int, max_len: int, num_blocks: int = 1, num_heads: int = 1, dropout: float = 0.1,
                 normalize_inputs: bool = True):
        super().__init__()
        self.dim, self.max_len, self.num_heads, self.normalize_inputs = dim, max_len, num_heads, normalize_inputs
        self.mask_token = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, num_heads, dropout) for _ in range(num_blocks))
        self.ln = nn.LayerNorm(dim, eps=1e-8)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        if masked is not None:
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        keep = valid.unsqueeze(-1).to(x.dtype)
        if self.normalize_inputs:
            x = _unit_rms(x)
        x = self.drop(x + self.pos.weight[-L:]) * keep
        # [B * heads, L, L], True = may not attend: pads are never keys
        blocked = (~valid).unsqueeze(1).expand(B, L, L).repeat_interleave(self.num_heads, 0)
        for block in self.blocks:
            x = block(x, blocked, keep)
        return self.ln(x) * keep

    def user_state(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, d]: the history shifted left by one (the oldest item drops out when the window is
        full) with [MASK] at position L-1; the hidden state there predicts the next item."""
        B, L, d = x.shape
        x = torch.cat([x[:, 1:], x.new_zeros(B, 1, d)], 1)
        valid = torch.cat([valid[:, 1:], valid.new_ones(B, 1)], 1)
        masked = torch.zeros_like(valid)
        masked[:, -1] = True
        return self(x, valid, masked)[:, -1]


def cloze_mask(valid: torch.Tensor, uniform: torch.Tensor, pick: torch.Tensor, mask_prob: float) -> torch.Tensor:
    """BERT4Rec's masked positions [B, L] (bool) from given uniform draws.

    Each valid position is masked when its ``uniform`` [B, L] draw is below ``mask_prob``; a row
    left with no masked position gets one: its valid position number ``floor(pick * n)`` (of n,
    counted from the first valid one), ``pick`` [B] uniform in [0, 1). The last position is not
    treated specially (no extra "mask the last item" samples).
    """
    masked = valid & (uniform < mask_prob)
    n = valid.sum(1)
    need = (n > 0) & ~masked.any(1)
    L = valid.shape[1]
    at = L - n + torch.minimum((pick * n).long(), (n - 1).clamp(min=0))
    rows = need.nonzero().squeeze(1)
    masked[rows, at[rows]] = True
    return masked


def draw_cloze_mask(generator: torch.Generator, valid: torch.Tensor, global_batch: int, rank: int, world: int,
                    mask_prob: float) -> torch.Tensor:
    """Masked positions [B_local, L] of this worker's rows, drawn for the GLOBAL batch.

    The draws are made for all ``global_batch`` rows, then rows ``rank::world`` are kept (the rows
    the training recipe gives this worker), so the mask of a sequence does not depend on how the
    batch is split over workers. ``valid`` [B_local, L] is this worker's validity mask.
    """
    L = valid.shape[1]
    uniform = torch.rand(global_batch, L, generator=generator)[rank::world]
    pick = torch.rand(global_batch, generator=generator)[rank::world]
    return cloze_mask(valid, uniform.to(valid.device), pick.to(valid.device), mask_prob)


# model.backbone -> builder(model config, normalize_inputs) of the encoder
ENCODERS = {
    "sasrec": lambda m, norm: SASRecEncoder(m.dim, m.max_len, m.num_blocks, m.num_heads, m.dropout,
                                            normalize_inputs=norm),
    "gru4rec": lambda m, norm: GRU4RecEncoder(m.dim, m.num_blocks, m.dropout, normalize_inputs=norm),
    "bert4rec": lambda m, norm: BERT4RecEncoder(m.dim, m.max_len, m.num_blocks, m.num_heads, m.dropout,
                                                normalize_inputs=norm),
    "dreamrec": lambda m, norm: DreamRecEncoder(
        m.dim, m.max_len, m.num_blocks, m.num_heads, m.dropout, norm, timesteps=m.dreamrec_timesteps,
        schedule=m.dreamrec_schedule, beta_start=m.dreamrec_beta_start, beta_end=m.dreamrec_beta_end,
        guidance=m.dreamrec_guidance, p_uncond=m.dreamrec_p_uncond, sample_steps=m.dreamrec_sample_steps),
}


def build_encoder(m: ModelConfig) -> nn.Module:
    """The encoder named by ``model.backbone`` (inputs at unit RMS when similarity is cosine)."""
    return choose(ENCODERS, m.backbone, "model.backbone")(m, m.similarity == "cosine")
