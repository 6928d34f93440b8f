"""The recommender: an item module + a sequence encoder with tied input/output item vectors, and
``build_model``, which builds it from a run's config (identically on every worker).

Shapes: ``B`` batch, ``L`` history length (``max_len``), ``d`` width, ``N`` items, ``K`` negatives.
Sequences are left-padded with the padding id ``N`` so the most recent item is always at
position ``L-1``; padded positions carry a zero vector, as in SASRec.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..errors import choose
from ..runtime.seeding import seed_torch, seeded_generator
from .backbones import build_encoder
from .items import build_item_module
from .losses import FULL_CATALOGUE_LOSSES, LOSSES, logq_correct
from .sasrec import user_states_from_table


class SequentialRecommender(nn.Module):
    """Item table + sequence encoder, tied input/output item vectors (docs/method.md section 2, step 9).

    ``similarity`` "cosine" L2-normalises user states and item vectors and divides by the
    temperature; it is used in training AND evaluation, so the ranking optimised is the ranking
    measured (the reference code trains on cosine and evaluates on dot products).
    ``loss``: "infonce" (sampled softmax), "bce" (sampled negatives) or "full_ce" (softmax over
    all N items, logsumexp over blocks of ``ce_chunk`` items); see ``losses.py``. An encoder with a
    ``diffusion_loss`` (dreamrec) is trained by it instead, and draws no negatives.
    """

    def __init__(self, items: nn.Module, encoder: nn.Module, similarity: str = "cosine",
                 temperature: float = 0.07, loss: str = "infonce", ce_chunk: int = 65_536):
        super().__init__()
        self.loss_fn = choose(LOSSES, loss, "train.loss")
        self.diffusion = hasattr(encoder, "diffusion_loss")
        self.full_catalogue = loss in FULL_CATALOGUE_LOSSES and not self.diffusion
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
                masked: torch.Tensor | None = None, log_q: torch.Tensor | None = None,
                noise: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss terms (see ``loss_terms``); ``forward`` so that DDP/DMP wrappers sync."""
        return self.loss_terms(seqs, targets, negatives, last_only, masked, log_q, noise)

    def loss_terms(self, seqs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, last_only: bool = False,
                   masked: torch.Tensor | None = None, log_q: torch.Tensor | None = None,
                   noise: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
            noise: diffusion encoders (dreamrec): (t [B, L], eps [B, L, d], uncond [B, L]) of
                ``dreamrec.draw_diffusion_noise``; the loss is the encoder's ``diffusion_loss`` at
                every trained position and ``negatives`` are not used.

        Returns:
            (sum of per-position losses, number of positions) so that callers can normalise by
            the GLOBAL count across workers (exact parity with one process). The sum includes
            the item module's ``extra_loss(uniq_ids, vecs)`` and ``user_loss(inputs, user_states)``
            (the last position's hidden state [B, d]) when it has them (already scaled sums).
        """
        B, L = seqs.shape
        pad = self.pad_id
        if self.diffusion:
            if noise is None:
                raise ValueError("a diffusion encoder needs the step's noise (dreamrec.draw_diffusion_noise)")
            negatives = negatives.new_empty(0)
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
        if self.full_catalogue:
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
        pos_mask = tgt_slot >= 0
        if self.diffusion:
            t, eps, uncond = (part.reshape(B * L, *part.shape[2:])[pos_mask] for part in noise)
            x0 = self.encoder.target(vecs[tgt_slot[pos_mask]])
            loss = self.encoder.diffusion_loss(h.reshape(B * L, -1)[pos_mask], x0, t, eps.to(x0.dtype), uncond)
            return self._with_item_losses(loss, uniq, vecs, inputs, h)
        raw_h = h
        h = self.normalize(h)
        hp = h.reshape(B * L, -1)[pos_mask]
        scale = 1.0 / self.temperature if self.similarity == "cosine" else 1.0
        pos_logit = (hp * self.normalize(vecs[tgt_slot[pos_mask]])).sum(-1) * scale
        if self.full_catalogue:
            loss = self.loss_fn(hp, self.normalize(vecs), pos_logit, scale, self.ce_chunk)
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
            loss = self.loss_fn(pos_logit, neg_logit)
        return self._with_item_losses(loss, uniq, vecs, inputs, raw_h)

    def _with_item_losses(self, loss: torch.Tensor, uniq: torch.Tensor, vecs: torch.Tensor, inputs: torch.Tensor,
                          h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-position ``loss`` [M] + the item module's extra losses, M)."""
        total = loss.sum()
        extra_loss = getattr(self.items, "extra_loss", None)
        if extra_loss is not None:
            total = total + extra_loss(uniq, vecs)
        user_loss = getattr(self.items, "user_loss", None)
        if user_loss is not None:
            total = total + user_loss(inputs, h[:, -1])
        return total, torch.full((), float(loss.numel()), device=total.device)  # a fill: no host-to-device copy


def build_model(cfg: RunConfig, num_items: int, semantic: torch.Tensor | None, device: torch.device,
                language: torch.Tensor | None = None, basis=None) -> SequentialRecommender:
    """The unsharded model, identically initialised on every worker: the item module from
    ``seeded_generator(cfg.seed)``, the encoder from torch's global generator seeded with ``cfg.seed``.

    Args:
        semantic: float32 [N, d] decompose table; language: float32 [N, d_l] embed vectors in
            item_idx order; basis: the decompose stage's NullSpaceBasis. Each only where
            ``model.items.METHOD_INPUTS[cfg.method]`` names it.
    """
    m, t = cfg.model, cfg.train
    items = build_item_module(cfg, num_items, semantic, language, device, seeded_generator(cfg.seed), basis=basis)
    seed_torch(cfg.seed)
    encoder = build_encoder(m).to(device)
    return SequentialRecommender(items, encoder, m.similarity, m.temperature, loss=t.loss, ce_chunk=t.ce_chunk)
