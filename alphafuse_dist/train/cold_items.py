"""ID parts of cold items (no training interaction) from their semantic neighbours (``train.cold_items``).

Why: in AlphaFuse the score of item j for a user state h is ``h . (semantic_j + [0, id_j])``.
Trained items' ID parts share a common component (popular items are pushed towards the average
user state), so an item whose ID part is zero, as a new item's is at a warm start, starts behind
every trained item; and during training a never-interacted item is only ever a negative, so its
ID row moves *away* from all users. On the ML-1M retraining simulation that put new items at a
median rank of 2,200-3,500 of 3,700 (below random), while their semantic part alone orders them
well among themselves (``benchmarks/retrain/RESULTS.md``).

``train.cold_items=neighbours`` replaces, after training, the ID part of every item with no
training interaction by the popularity-weighted mean ID part of its ``train.cold_neighbours``
nearest trained items (cosine of the frozen semantic coordinates):

    id_c = sum_{j in kNN(c)} count_j * id_j / sum_{j in kNN(c)} count_j

i.e. the ID part of "an interaction with an item that reads like c". Trained rows are untouched, so
the trained model's scores of trained items do not change. ``trained`` (the default, the paper's
behaviour) keeps the rows as training left them.

Example::

    table = fill_cold_items(table, semantic, counts, id_dim=64, k=10, injection="add")
"""
from __future__ import annotations

import torch

# cold rows per similarity block: [chunk, N_trained] float32 (128 x 1M = 512 MB)
_CHUNK = 128


@torch.no_grad()
def fill_cold_items(table: torch.Tensor, semantic: torch.Tensor, counts: torch.Tensor, *, id_dim: int, k: int,
                    injection: str = "add") -> tuple[torch.Tensor, int]:
    """(fused table with the cold items' ID parts replaced, number of cold items).

    Args:
        table: the trained fused item table [N, d] (not modified).
        semantic: the frozen semantic table [N, d] of the decompose stage (same rows).
        counts: training interactions per item [N]; cold items are those with count 0.
        id_dim: width of the ID part (the last ``id_dim`` columns, ``model.id_dims``).
        k: neighbours per cold item (fewer when fewer items were trained).
        injection: "add" (fused = semantic + [0, id]) or "cover" (fused = [semantic_s, id]).
    """
    if table.shape != semantic.shape or counts.shape[0] != table.shape[0]:
        raise ValueError(f"fill_cold_items: table {tuple(table.shape)}, semantic {tuple(semantic.shape)} and "
                         f"counts [{counts.shape[0]}] must describe the same items")
    counts = counts.to(torch.float32)
    cold = torch.nonzero(counts == 0).flatten()
    warm = torch.nonzero(counts > 0).flatten()
    if len(cold) == 0 or len(warm) == 0:
        return table, 0
    table = table.to(torch.float32)
    semantic = semantic.to(torch.float32)
    sem_dim = table.shape[1] - id_dim
    ids = table[:, sem_dim:] - (semantic[:, sem_dim:] if injection == "add" else 0.0)
    new_ids = neighbour_id_parts(semantic[cold, :sem_dim], semantic[warm, :sem_dim], ids[warm], counts[warm], k)
    out = table.clone()
    out[cold, sem_dim:] = new_ids + (semantic[cold, sem_dim:] if injection == "add" else 0.0)
    return out, int(len(cold))


@torch.no_grad()
def neighbour_id_parts(query: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                       k: int) -> torch.Tensor:
    """ID parts [c, d_n] of items with semantic parts ``query`` [c, d_s]: the ``counts``-weighted
    mean of ``ids`` [W, d_n] over the ``k`` trained items whose semantic parts ``keys`` [W, d_s]
    are nearest by cosine (``counts`` [W] all positive). Also the rule for text-only items at
    serving time (``alphafuse_dist.serve``)."""
    keys = torch.nn.functional.normalize(keys.to(torch.float32), dim=1)
    counts, ids, k = counts.to(torch.float32), ids.to(torch.float32), min(k, len(keys))
    parts = []
    for start in range(0, len(query), _CHUNK):
        rows = torch.nn.functional.normalize(query[start:start + _CHUNK].to(torch.float32), dim=1)
        top = (rows @ keys.T).topk(k, dim=1).indices  # [c, k] positions in keys
        weights = counts[top]
        weights = weights / weights.sum(dim=1, keepdim=True)
        parts.append((weights.unsqueeze(-1) * ids[top]).sum(dim=1))
    return torch.cat(parts) if parts else ids.new_zeros(0, ids.shape[1])
