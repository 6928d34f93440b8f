"""Full-ranking validation metrics of a live (possibly TorchRec-sharded) model, computed over row
shards of the item table: every worker of a training run calls :func:`sharded_metrics`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..runtime.dist import rank_world
from ..data.sequences import list_column
from .metrics import ItemLists, metrics_from_ranks, sharded_target_ranks


@torch.no_grad()
def sharded_metrics(net, hist: np.ndarray, targets: np.ndarray, ks, device, item_chunk: int,
                    user_batch: int = 1024, exclude: ItemLists | Sequence | None = None) -> dict:
    """Full-ranking metrics of all users ``hist`` [U, L] (left-padded) -> ``targets`` [U].

    Each worker builds the fused rows of its own item range only (``N / world`` rows, never the
    whole table) and the user states of its share of users; the states are all-gathered, every
    worker counts, for every user, the items of its range that rank ahead of the target
    (``sharded_target_ranks``), and the counts are summed. The ranks equal single-process
    ``target_ranks`` on the whole table exactly.

    Lookups through the item module are collectives with TorchRec, so every worker makes the same
    number of them (a worker with less work looks up an empty id list).

    Args:
        net: the unwrapped ``model.recommender.SequentialRecommender`` (its ``items``,
            ``normalize`` and ``user_states``); left in train mode afterwards.
        exclude: per user, items removed from the ranking (the filtered protocol: the whole
            history, see :func:`read_histories`; or one array per user); None ranks every item.

    Returns:
        ``metrics_from_ranks`` of the ranks, ``users`` as an int.
    """
    rank, world = rank_world()
    net.eval()
    items = net.items
    n_items, num_users = items.num_items, len(targets)
    lo, hi = n_items * rank // world, n_items * (rank + 1) // world
    widest = -(-n_items // world)
    parts = []
    for c in range(-(-widest // item_chunk)):
        s = min(lo + c * item_chunk, hi)
        parts.append(items(torch.arange(s, min(s + item_chunk, hi), device=device)))
    local_rows = net.normalize(torch.cat(parts)) if parts else torch.empty(0, items.dim, device=device)

    # user states: this worker's share (users rank, rank + world, ...), then gathered in user order
    mine = np.arange(rank, num_users, world)
    share = -(-num_users // world)
    states = torch.zeros(share, items.dim, device=device)
    for b in range(-(-share // user_batch)):
        sel = mine[b * user_batch:(b + 1) * user_batch]
        if len(sel):
            h = torch.as_tensor(hist[sel], device=device)
            states[b * user_batch: b * user_batch + len(sel)] = net.normalize(net.user_states(h)).float()
        else:
            items(torch.empty(0, dtype=torch.long, device=device))  # the collective lookup of an empty batch
    if world > 1:
        gathered = [torch.empty_like(states) for _ in range(world)]
        dist.all_gather(gathered, states)
        states = torch.stack(gathered, dim=1).reshape(-1, items.dim)[:num_users]  # row r*world + w = user
    y = torch.as_tensor(targets, device=device)
    # the comparisons' buffer, kept across batches (on the CPU a fresh one costs more than the pass)
    work = torch.empty(min(user_batch, num_users) * min(item_chunk, local_rows.shape[0]), device=device)
    exclude = None if exclude is None else ItemLists.of(exclude)
    ranks = []
    for s in range(0, num_users, user_batch):
        t = y[s:s + user_batch]
        ex = None if exclude is None else exclude.slice(s, s + user_batch)
        ranks.append(sharded_target_ranks(states[s:s + user_batch], local_rows, lo, t,
                                          net.normalize(items(t)).float(), item_chunk=item_chunk, exclude=ex,
                                          work=work))
    ranks = torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)
    net.train()
    out = metrics_from_ranks(ranks.cpu(), ks)
    return out | {"users": int(out.pop("users"))}


def read_histories(split_file: Path) -> ItemLists:
    """Each user's whole history (item ids) from a prepare split file (``valid.parquet``,
    ``test.parquet``), in row order."""
    return ItemLists(*list_column(split_file, "history"))
