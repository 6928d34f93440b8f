"""Training losses behind ``train.loss``: pure functions of logits and vectors.

Shapes: ``M`` scored positions, ``K`` negatives per position, ``N`` items, ``d`` width. Every loss
returns the per-position loss [M]; callers sum it and divide by the GLOBAL number of positions.
A masked-out negative (an accidental hit: the negative equals the position's target) carries the
logit ``-inf``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def sampled_softmax_loss(pos_logit: torch.Tensor, neg_logit: torch.Tensor) -> torch.Tensor:
    """InfoNCE / sampled softmax [M]: ``-log(exp(s+) / (exp(s+) + sum_k exp(s-_k)))``.

    Args:
        pos_logit: [M] logit of each position's target.
        neg_logit: [M, K] logits of its negatives (``-inf`` = masked out).
    """
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)
    return -F.log_softmax(logits, dim=1)[:, 0]


def bce_loss(pos_logit: torch.Tensor, neg_logit: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with sampled negatives [M]:

        loss_m = -log sigmoid(s+_m) - (1 / K'_m) * sum_{k not masked} log(1 - sigmoid(s-_mk))

    where ``K'_m`` is the number of negatives of position m that are not masked out (``-inf``):
    the positive and the mean over its negatives weigh the same, whatever K is (with K = 1 this is
    SASRec's original loss). A position whose negatives are all masked keeps its positive term.

    Args:
        pos_logit: [M]; neg_logit: [M, K] (``-inf`` = masked out).
    """
    kept = torch.isfinite(neg_logit)
    # softplus(x) = -log(1 - sigmoid(x)) and softplus(-inf) = 0 with zero gradient
    neg_term = F.softplus(neg_logit).sum(1) / kept.sum(1).clamp(min=1)
    return F.softplus(-pos_logit) + neg_term


def logq_correct(pos_logit: torch.Tensor, neg_logit: torch.Tensor, pos_log_q: torch.Tensor,
                 neg_log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling-bias (logQ) correction, as in sampled softmax (Jean et al. 2015; Yi et al. 2019):
    every logit s_j of an item j becomes ``s_j - log Q_j``, the positive's included, where Q_j is
    the expected number of times j is drawn as a negative for the position (``K * q_j`` for K
    draws with replacement from the sampling distribution q; see :func:`expected_count_log_q`).

    Args:
        pos_logit: [M]; neg_logit: [M, K]; pos_log_q: [M] log Q of each target;
        neg_log_q: [M, K] (or broadcastable) log Q of each negative.
    """
    return pos_logit - pos_log_q, neg_logit - neg_log_q


def expected_count_log_q(probs: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """log Q_j = log(K * q_j) [N] for K negatives drawn with replacement from ``probs`` q [N]
    (``-inf`` for items never drawn)."""
    return torch.log(probs.double() * num_negatives).float()


def _chunk_logsumexp(h: torch.Tensor, items: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.logsumexp(h @ items.T * scale, dim=1)


def full_softmax_loss(h: torch.Tensor, items: torch.Tensor, pos_logit: torch.Tensor, scale: float,
                      chunk: int) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue [M]: ``logsumexp_j(scale * h . items_j) - s+``.

    The logsumexp is taken over blocks of ``chunk`` items and each block is recomputed in the
    backward pass (activation checkpointing), so at most [M, chunk] logits exist at a time instead
    of [M, N]. Gradients flow to ``h`` and to every item vector.

    Args:
        h: [M] x d user states (already normalised for cosine).
        items: [N, d] all item vectors (already normalised for cosine).
        pos_logit: [M] ``scale * h . items[target]``.
        scale: 1 / temperature (cosine) or 1 (dot).
        chunk: items per block.
    """
    parts = [checkpoint(_chunk_logsumexp, h, items[s:s + chunk], scale, use_reentrant=False)
             for s in range(0, items.shape[0], chunk)]
    return torch.logsumexp(torch.stack(parts), dim=0) - pos_logit


# train.loss -> per-position loss. Sampled losses score the targets against drawn negatives
# (pos_logit [M], neg_logit [M, K]); full-catalogue losses score every item (h, items, pos_logit,
# scale, chunk).
SAMPLED_LOSSES = {"infonce": sampled_softmax_loss, "bce": bce_loss}
FULL_CATALOGUE_LOSSES = {"full_ce": full_softmax_loss}
LOSSES = SAMPLED_LOSSES | FULL_CATALOGUE_LOSSES
