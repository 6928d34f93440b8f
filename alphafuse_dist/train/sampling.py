"""Negative sampling of a training step (``train.negative_sampler``, ``train.negatives``)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.sequences import item_counts
from ..model.losses import FULL_CATALOGUE_LOSSES


def sampling_probs(cfg: RunConfig, train_parquet: Path, num_items: int) -> torch.Tensor | None:
    """Negative-sampling distribution q [N] (float64): None for uniform; for popularity
    ``count_j ** alpha / sum`` over the training counts (items never trained on are never drawn)."""
    t = cfg.train
    if t.negative_sampler == "uniform":
        return None
    weights = torch.from_numpy(item_counts(train_parquet, num_items)).double()
    weights = torch.where(weights > 0, weights ** t.popularity_alpha, weights)
    return weights / weights.sum()


def draw_negatives(cfg: RunConfig, generator: torch.Generator, num_items: int, probs: torch.Tensor | None,
                   rank: int, world: int) -> torch.Tensor:
    """This worker's negatives of one step: [K] shared by the step, or [B_local, K] per sequence
    (drawn [batch_size, K] for the GLOBAL batch, then rows ``rank::world``, the rows the recipe gives
    this worker), or an empty [0] for a full-catalogue loss. Uniform or from ``probs`` (with
    replacement)."""
    t = cfg.train
    if t.loss in FULL_CATALOGUE_LOSSES:
        return torch.empty(0, dtype=torch.long)
    shape = (t.num_negatives,) if t.negatives == "shared" else (t.batch_size, t.num_negatives)
    count = math.prod(shape)
    if probs is None:
        ids = torch.randint(0, num_items, (count,), generator=generator)
    else:
        ids = torch.multinomial(probs, count, replacement=True, generator=generator)
    ids = ids.view(shape)
    return ids if t.negatives == "shared" else ids[rank::world]
