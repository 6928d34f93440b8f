"""Evaluation kernels: full-ranking target ranks and top-k (also over row-sharded tables), sampled
candidate ranks (the LLM-ESR protocol), HR / NDCG / MRR, per-group metrics.

Shapes: ``U`` users in a batch, ``N`` items, ``d`` width, ``k`` cut-off, ``C`` item chunk.

Both ranking functions score ALL ``N`` items, one chunk of ``C`` items at a time, so memory is
``O(U x C)``, never ``O(U x N)``. Ties are broken by item id: of two items with equal scores the
one with the smaller id ranks ahead, so results are identical for every chunk size and every run.

Scores do not depend on how they are computed. Before scoring, each row (user or item) is
rounded to a fixed-point vector: ``q = round(x * 2**(b - e))`` with ``2**e >= max|x|`` its own
power-of-two scale and ``b`` bits (22 at ``d = 128``; see :func:`exact_rows`). Cosine rows are
L2-normalised first, with the sum of squares taken column by column in a fixed order. The score of
a (user, item) pair is then the integer dot product of the two fixed-point vectors times the two
scales. Every partial sum is an integer below 2**53, so float64 computes it exactly whatever the
summation order: a matrix product of any chunk shape, any shard, any thread count or the target's
own row-wise product gives the same bits. The rounding of the inputs is the stated precision
(about 2**-22 of a row's largest entry); ties that remain are broken by item id.

Example::

    ranks = target_ranks(states, table, targets, similarity="cosine")  # [U]
    metrics_from_ranks(ranks, ks=(10,))  # {"HR@10": ..., "NDCG@10": ..., "MRR@10": ..., "users": U}
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Similarity = Literal["dot", "cosine"]


def target_ranks(user_states: Tensor, item_table: Tensor, targets: Tensor, *, similarity: Similarity = "dot",
                 item_chunk: int = 65_536, exclude: Sequence[Tensor] | ItemLists | None = None) -> Tensor:
    """0-based rank of each user's target among all items (0: nothing ranks ahead of it).

    The rank counts the items that score higher than the target, plus the items that score the
    same and have a smaller id.

    Args:
        user_states: ``[U, d]`` float user representations.
        item_table: ``[N, d]`` float item vectors; row ``i`` is item ``i``.
        targets: ``[U]`` long, each user's target item in ``0..N-1``.
        similarity: ``"dot"``, or ``"cosine"`` (both sides L2-normalised first).
        item_chunk: items scored at once; peak memory is about ``24 * U * item_chunk`` bytes.
        exclude: ``U`` 1-D long tensors (or one :class:`ItemLists`), the items that do not
            compete for each user (e.g. the history; duplicates allowed). A listed target still
            gets its rank: a re-consumed item is a valid target.

    Returns:
        ``[U]`` long ranks on ``item_table``'s device.

    Example::

        table = torch.tensor([[3.0], [1.0], [2.0], [2.0]])
        target_ranks(torch.ones(2, 1), table, torch.tensor([3, 2]))  # [2, 1]: item 2 ties item 3
    """
    num_users, num_items = _check_inputs(user_states, item_table, item_chunk)
    if targets.shape != (num_users,) or targets.dtype != torch.long:
        raise ValueError(f"targets: expected a long tensor of shape [{num_users}], "
                         f"got {targets.dtype} of shape {list(targets.shape)}")
    if num_users and not (0 <= int(targets.min()) and int(targets.max()) < num_items):
        raise ValueError(f"targets: item ids must lie in 0..{num_items - 1}, "
                         f"got {int(targets.min())}..{int(targets.max())}")
    device = item_table.device
    targets = targets.to(device)
    users = exact_rows(user_states.to(device), similarity)
    target_scores = _row_scores(users, exact_rows(item_table[targets], similarity))
    blocked = _pairs_by_item(exclude, num_users, num_items, device)
    columns = TargetColumns(targets.cpu().numpy(), device)

    ranks = torch.zeros(num_users, dtype=torch.long, device=device)
    work = torch.empty(num_users * min(item_chunk, num_items), device=device)
    for start, _, scores in _chunk_scores(users, item_table, similarity, item_chunk):
        ranks += count_ahead(scores, target_scores, columns, start, blocked, work)
    return ranks


def sharded_target_ranks(user_states: Tensor, local_rows: Tensor, row_offset: int, targets: Tensor,
                         target_rows: Tensor, *, similarity: Similarity = "dot", item_chunk: int = 65_536,
                         group=None, exclude: Sequence[Tensor] | ItemLists | None = None, work: Tensor | None = None
                         ) -> Tensor:
    """:func:`target_ranks` over an item table split by rows across the ranks of a process group:
    each rank counts the items of its own rows that rank ahead of each user's target, and the
    counts are summed (one ``all_reduce``).

    Every rank passes the same ``user_states``, ``targets`` and ``target_rows`` and gets the same
    ranks, equal to :func:`target_ranks` on the whole table (the target's score comes from its own
    row, computed exactly as there; an item of equal score counts only when its global id is
    smaller, so the target never counts itself).

    Args:
        local_rows: ``[n_r, d]`` this rank's rows, items ``row_offset .. row_offset + n_r - 1``
            (may be empty).
        targets: ``[U]`` long global item ids.
        target_rows: ``[U, d]`` the targets' rows of the whole table (``table[targets]``).
        group: the ``torch.distributed`` process group (None: the default group; without an
            initialised process group the local counts are returned, i.e. one shard).
        exclude: per user, global item ids that do not compete (as in :func:`target_ranks`).
        work: a float32 buffer for the comparisons (see :func:`count_ahead`), kept by a caller
            that ranks batch after batch.
    """
    import torch.distributed as dist

    num_users = user_states.shape[0]
    if targets.shape != (num_users,) or targets.dtype != torch.long:
        raise ValueError(f"targets: expected a long tensor of shape [{num_users}], "
                         f"got {targets.dtype} of shape {list(targets.shape)}")
    if target_rows.shape != user_states.shape:
        raise ValueError(f"target_rows: expected shape {list(user_states.shape)}, got {list(target_rows.shape)}")
    device = user_states.device
    users = exact_rows(user_states, similarity)
    ranks = torch.zeros(num_users, dtype=torch.long, device=device)
    if local_rows.shape[0]:
        _check_inputs(user_states, local_rows, item_chunk)
        target_scores = _row_scores(users, exact_rows(target_rows.to(device), similarity))
        # local ids; outside 0..n_r-1 when the target is another shard's
        local_targets = TargetColumns(targets.cpu().numpy() - row_offset, device)
        n_local = local_rows.shape[0]
        local_exclude = None if exclude is None else ItemLists.of(exclude).within(row_offset, row_offset + n_local)
        blocked = _pairs_by_item(local_exclude, num_users, n_local, device)
        for start, _, scores in _chunk_scores(users, local_rows.to(device), similarity, item_chunk):
            ranks += count_ahead(scores, target_scores, local_targets, start, blocked, work)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ranks, group=group)
    return ranks


def full_ranking_topk(user_states: Tensor, item_table: Tensor, k: int, *, similarity: Similarity = "dot",
                      item_chunk: int = 65_536, exclude: Sequence[Tensor] | ItemLists | None = None,
                      score_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The ``k`` best items of each user over all items, best first, merged chunk by chunk.

    Order: higher score first, then smaller item id, the same order :func:`target_ranks` counts.

    Args:
        user_states: ``[U, d]`` float user representations.
        item_table: ``[N, d]`` float item vectors; row ``i`` is item ``i``.
        k: items per user, ``1 <= k <= N``.
        similarity: ``"dot"``, or ``"cosine"`` (both sides L2-normalised first).
        item_chunk: items scored at once; memory is ``O(U x (item_chunk + k))``.
        exclude: ``U`` 1-D long tensors (or one :class:`ItemLists`), items never recommended to
            each user (e.g. the history).
            They score ``-inf``, so they fill the tail only when fewer than ``k`` others remain.
        score_dtype: ``torch.float64`` (default: exact, kernel-independent scores, see the module
            notes) or a fast serving precision such as ``torch.bfloat16`` on GPU (GEMM-bound;
            the tie rule still holds, but near-equal scores may swap against the exact order).

    Returns:
        ``(scores, ids)``: ``[U, k]`` float32 scores and ``[U, k]`` long item ids.

    Example::

        table = torch.tensor([[3.0], [1.0], [2.0], [2.0]])
        full_ranking_topk(torch.ones(1, 1), table, 3)  # ([[3., 2., 2.]], [[0, 2, 3]])
    """
    num_users, num_items = _check_inputs(user_states, item_table, item_chunk)
    if not 1 <= k <= num_items:
        raise ValueError(f"k={k}: must lie in 1..{num_items} (the number of items)")
    device = item_table.device
    users = exact_rows(user_states.to(device), similarity) if score_dtype == torch.float64 \
        else _fast_rows(user_states.to(device), similarity, score_dtype)
    blocked = _pairs_by_item(exclude, num_users, num_items, device)

    best_scores = torch.empty(num_users, 0, device=device)
    best_ids = torch.empty(num_users, 0, dtype=torch.long, device=device)
    # the finiteness scan of every chunk costs as much as the GEMM at low precision: exact mode only
    for start, end, scores in _chunk_scores(users, item_table, similarity, item_chunk,
                                            check=score_dtype == torch.float64):
        _fill_pairs(scores, blocked, start, -math.inf)
        chunk_scores, chunk_cols = _topk_in_id_order(scores, min(k, end - start))
        # Among equal scores the candidates below sit in id order (the running best first, all of
        # smaller ids, then this chunk's in column order), so a stable sort keeps the tie rule.
        candidates = torch.cat([best_scores, chunk_scores], dim=1)
        candidate_ids = torch.cat([best_ids, chunk_cols + start], dim=1)
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_ids = candidates.gather(1, order), candidate_ids.gather(1, order)
    return best_scores, best_ids


def sample_negatives(num_items: int, interacted: Sequence[np.ndarray], users: np.ndarray, n: int,
                     seed: int) -> np.ndarray:
    """``n`` distinct items per user drawn uniformly from the items the user never interacted with
    (the LLM-ESR / sampled protocol's candidates; the target must be listed in ``interacted``).

    Each user's draw depends only on ``(seed, user id)``: the same user gets the same negatives
    in every batch, shard and run.

    Args:
        num_items: N.
        interacted: per user, int array of every item the user interacted with (history, target).
        users: ``[U]`` user ids (seed the per-user generators).
        n: negatives per user.

    Returns:
        ``[U, n]`` int64.

    Raises:
        ValueError: naming the user when fewer than ``n`` items are left to draw from.
    """
    out = np.empty((len(users), n), dtype=np.int64)
    for row, (user, seen) in enumerate(zip(users, interacted)):
        seen = np.unique(np.asarray(seen, dtype=np.int64))
        free = num_items - len(seen)
        if free < n:
            raise ValueError(f"user {int(user)}: only {free} items never interacted with, {n} negatives needed")
        rng = np.random.default_rng([seed, int(user)])
        picked = np.empty(0, dtype=np.int64)
        while len(picked) < n:  # rejection sampling; a dense user falls back to an explicit draw
            if free < 4 * n:
                picked = rng.choice(np.setdiff1d(np.arange(num_items), seen), size=n, replace=False)
                break
            cand = rng.integers(0, num_items, size=2 * (n - len(picked)))
            cand = cand[~np.isin(cand, seen) & ~np.isin(cand, picked)]
            _, first = np.unique(cand, return_index=True)
            picked = np.concatenate([picked, cand[np.sort(first)]])[:n]
        out[row] = picked
    return out


def sampled_ranks(user_states: Tensor, item_table: Tensor, targets: Tensor, negatives: Tensor, *,
                  similarity: Similarity = "dot") -> Tensor:
    """0-based rank of each target among itself and its user's sampled negatives.

    Counted like :func:`target_ranks` (higher score, or equal score and smaller id), with the
    same exact scores, so a candidate set holding every item gives the same ranks.

    Args:
        user_states: ``[U, d]``.
        item_table: ``[N, d]``.
        targets: ``[U]`` long.
        negatives: ``[U, S]`` long, from :func:`sample_negatives` (never the target).

    Returns:
        ``[U]`` long ranks in ``0..S``.
    """
    num_users, _ = _check_inputs(user_states, item_table, 1)
    if negatives.dim() != 2 or negatives.shape[0] != num_users:
        raise ValueError(f"negatives: expected [{num_users}, S], got {list(negatives.shape)}")
    device = item_table.device
    users = exact_rows(user_states.to(device), similarity)
    targets, negatives = targets.to(device), negatives.to(device)
    target_scores = _row_scores(users, exact_rows(item_table[targets], similarity)).unsqueeze(1)
    q, scale = exact_rows(item_table[negatives.reshape(-1)], similarity)
    neg_scores = (torch.einsum("ud,usd->us", users[0], q.view(*negatives.shape, -1))
                  * users[1].unsqueeze(1) * scale.view(negatives.shape)).float()
    ahead = (neg_scores > target_scores) | ((neg_scores == target_scores) & (negatives < targets.unsqueeze(1)))
    return ahead.sum(dim=1)


def metrics_by_group(ranks: Tensor, groups: dict[str, Tensor], ks: Sequence[int] = (10, 20), *,
                     top: Tensor | None = None, head_items: Tensor | None = None) -> dict[str, dict[str, float]]:
    """:func:`metrics_from_ranks` overall and for each named user mask ``[U]`` bool in ``groups``;
    with ``top`` (``[U, k]`` each user's recommended items) and ``head_items`` (``[N]`` bool) also
    :func:`list_metrics` of each group's lists."""
    def of(mask: Tensor | None) -> dict[str, float]:
        sel = ranks if mask is None else ranks[mask.to(ranks.device)]
        out = metrics_from_ranks(sel, ks)
        if top is not None:
            out |= list_metrics(top if mask is None else top[mask.to(top.device)], head_items)
        return out

    out = {"overall": of(None)}
    for name, mask in groups.items():
        if mask.shape != ranks.shape or mask.dtype != torch.bool:
            raise ValueError(f"group {name!r}: expected a bool mask of shape {list(ranks.shape)}")
        out[name] = of(mask)
    return out


def list_metrics(top: Tensor, head_items: Tensor) -> dict[str, float]:
    """What the top-k lists hold, beside their accuracy (``k = top.shape[1]``):

    - ``PopShare@k``: the share of all list slots that hold a head item;
    - ``Coverage@k``: distinct items over all the lists / the ``N`` items of the catalogue.

    Args:
        top: ``[U, k]`` long, each user's recommended items.
        head_items: ``[N]`` bool, which items are head items.

    Returns:
        ``{"PopShare@k": ..., "Coverage@k": ...}``; 0.0 for both when there are no users.

    Example::

        list_metrics(torch.tensor([[0, 1], [0, 2]]), torch.tensor([True, False, False, False]))
        # {"PopShare@2": 0.5, "Coverage@2": 0.75}
    """
    if top.dim() != 2 or head_items.dim() != 1:
        raise ValueError(f"top: expected [U, k] and head_items [N], got {list(top.shape)} and {list(head_items.shape)}")
    k, slots = top.shape[1], top.numel()
    top, head_items = top.cpu(), head_items.cpu().bool()
    share = head_items[top].sum().item() / slots if slots else 0.0
    coverage = torch.unique(top).numel() / head_items.numel() if slots else 0.0
    return {f"PopShare@{k}": share, f"Coverage@{k}": coverage}


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Hit rate, NDCG and MRR at each cut-off, averaged over users.

    For a 0-based rank ``r`` and cut-off ``k``: ``HR@k = [r < k]``, ``NDCG@k = [r < k] / log2(r + 2)``,
    ``MRR@k = [r < k] / (r + 1)``.

    Args:
        ranks: ``[U]`` 0-based ranks, e.g. from :func:`target_ranks`.
        ks: cut-offs, each ``>= 1``.

    Returns:
        ``{"HR@10": ..., "NDCG@10": ..., "MRR@10": ..., <the same at each k>, "users": U}``. With no
        users every metric is 0.0 (and ``users`` 0), so empty groups stay JSON-safe, never NaN.

    Example::

        metrics_from_ranks(torch.tensor([0, 1, 4, 30]), ks=(10,))["HR@10"]  # 0.75
    """
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks={list(ks)}: must be a non-empty list of positive integers")
    ranks = ranks.detach().to("cpu", torch.float64).reshape(-1)
    num_users = ranks.numel()
    denominator = max(num_users, 1)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        zero = torch.zeros_like(ranks)
        out[f"HR@{k}"] = hit.sum().item() / denominator
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), zero).sum().item() / denominator
        out[f"MRR@{k}"] = torch.where(hit, 1.0 / (ranks + 1.0), zero).sum().item() / denominator
    out["users"] = num_users
    return out


# ----------------------------------------------------------------------------- helpers

def _check_inputs(user_states: Tensor, item_table: Tensor, item_chunk: int) -> tuple[int, int]:
    """Validate shapes, dtypes and the chunk size; return ``(U, N)``."""
    for name, t in (("user_states", user_states), ("item_table", item_table)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a 2-D float tensor, got {t.dtype} of shape {list(t.shape)}")
    if user_states.shape[1] != item_table.shape[1]:
        raise ValueError(f"user_states width {user_states.shape[1]} != item_table width {item_table.shape[1]}")
    if item_table.shape[0] == 0:
        raise ValueError("item_table: has no items")
    if item_chunk < 1:
        raise ValueError(f"item_chunk={item_chunk}: must be >= 1")
    if not torch.isfinite(user_states).all():
        raise ValueError("user_states: contains NaN or infinite values")
    return user_states.shape[0], item_table.shape[0]


def exact_rows(rows: Tensor, similarity: Similarity) -> tuple[Tensor, Tensor]:
    """Rows in the fixed-point form that makes scores exact (see the module notes).

    Args:
        rows: ``[R, d]`` float.
        similarity: ``"dot"``, or ``"cosine"`` (rows L2-normalised first).

    Returns:
        ``(q, scale)``: ``q`` ``[R, d]`` float64 holding integers of magnitude ``<= 2**b``, and
        ``scale`` ``[R]`` float64 powers of two, so that row ``r`` is about ``q[r] * scale[r]``.
        ``b = (52 - ceil(log2 d)) // 2`` keeps every dot product of two such rows below 2**53.
    """
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"similarity={similarity!r}: expected 'dot' or 'cosine'")
    x = rows.to(torch.float64)
    if similarity == "cosine":
        # one column at a time: the same additions in the same order for a row in any batch
        squares = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for column in x.unbind(dim=1):
            squares += column * column
        x = x / squares.sqrt().clamp_min(1e-12).unsqueeze(1)
    bits = (52 - math.ceil(math.log2(max(x.shape[1], 1)))) // 2
    exponent = torch.frexp(x.abs().amax(dim=1, keepdim=True)).exponent.to(torch.int64)  # max|x| <= 2**exponent
    # 2**(exponent - bits) built from its IEEE bits: exact on every device
    scale = (((exponent - bits).clamp(-1022, 1023) + 1023) << 52).view(torch.float64)
    return torch.round(x / scale), scale.squeeze(1)


def exact_scores(users: tuple[Tensor, Tensor], items: tuple[Tensor, Tensor]) -> Tensor:
    """``[U, C]`` float32 scores of :func:`exact_rows` users against :func:`exact_rows` items."""
    products = users[0] @ items[0].T  # scaled in place: a fresh [U, C] float64 tensor costs a pass
    return products.mul_(users[1].unsqueeze(1)).mul_(items[1].unsqueeze(0)).float()


def _row_scores(users: tuple[Tensor, Tensor], items: tuple[Tensor, Tensor]) -> Tensor:
    """``[U]`` float32 scores of user ``u`` against item row ``u`` (equal to :func:`exact_scores`'s)."""
    return ((users[0] * items[0]).sum(dim=1) * users[1] * items[1]).float()


def _fast_rows(x: Tensor, similarity: Similarity, dtype: torch.dtype) -> Tensor:
    """``[R, d]`` rows in a fast serving precision (e.g. bfloat16), L2-normalised for cosine."""
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"similarity={similarity!r}: expected 'dot' or 'cosine'")
    x = x.float()
    return (F.normalize(x, dim=1) if similarity == "cosine" else x).to(dtype)


def _chunk_scores(users: tuple[Tensor, Tensor] | Tensor, item_table: Tensor, similarity: Similarity,
                  item_chunk: int, check: bool = True) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, end, scores)`` with ``scores`` ``[U, end - start]`` float32 per item chunk:
    exact for :func:`exact_rows` users, in the users' dtype for fast-path users."""
    for start in range(0, item_table.shape[0], item_chunk):
        end = min(start + item_chunk, item_table.shape[0])
        chunk = item_table[start:end]
        # non-finite item scores would break both the counting and the top-k selection silently
        if check and not torch.isfinite(chunk).all():
            raise ValueError(f"item_table rows {start}..{end - 1}: contain NaN or infinite values")
        if isinstance(users, tuple):
            yield start, end, exact_scores(users, exact_rows(chunk, similarity))
        else:
            yield start, end, (users @ _fast_rows(chunk, similarity, users.dtype).T).float()


class _Pairs:
    """Distinct (user, item) pairs sorted by item, on the device, with a host copy that finds a
    chunk's pairs without waiting for the device."""

    def __init__(self, users: np.ndarray, items: np.ndarray, device: torch.device):
        self.users_host, self.items_host = users, items
        self.users = torch.from_numpy(users).to(device)
        self.items = torch.from_numpy(items).to(device)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """``(lo, hi)``: pairs ``lo..hi-1`` are those of items ``start..end-1``."""
        lo, hi = np.searchsorted(self.items_host, [start, end])
        return int(lo), int(hi)

    def most_per_user(self, lo: int, hi: int) -> int:
        """The largest number of pairs ``lo..hi-1`` that one user has."""
        return int(np.bincount(self.users_host[lo:hi]).max()) if hi > lo else 0

    def positions(self, lo: int, hi: int, start: int, width: int) -> Tensor:
        """Flat positions of pairs ``lo..hi-1`` in a ``[B, width]`` chunk of items ``start..``."""
        return self.users[lo:hi] * width + (self.items[lo:hi] - start)


class ItemLists:
    """Item id lists of many users in one flat array (CSR): user ``u``'s items are
    ``values[offsets[u]:offsets[u + 1]]``. The compact form of ``exclude``: slicing a batch or a
    row range and building the (user, item) pairs take array operations, never one object per
    user (500k histories as 500k arrays cost seconds to build, pickle for a Ray task and join).

    Example::

        lists = ItemLists.of([torch.tensor([3, 1]), torch.tensor([], dtype=torch.long)])
        lists.values, lists.offsets  # [3, 1], [0, 2, 2]
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        values, offsets = np.asarray(values), np.asarray(offsets)
        for name, a in (("values", values), ("offsets", offsets)):
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name}: expected integers, got {a.dtype}")
        self.values = values.astype(np.int64, copy=False)
        self.offsets = offsets.astype(np.int64, copy=False)
        if self.offsets.ndim != 1 or not len(self.offsets) or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.values) or (np.diff(self.offsets) < 0).any():
            raise ValueError(f"offsets: expected 0 = offsets[0] <= ... <= offsets[-1] = {len(self.values)} "
                             f"(the number of values)")

    @classmethod
    def of(cls, lists: "Sequence[Tensor | np.ndarray] | ItemLists") -> "ItemLists":
        """From one 1-D integer tensor (or array) per user; ``ItemLists`` are returned as they are."""
        if isinstance(lists, ItemLists):
            return lists
        lists = [torch.as_tensor(e) for e in lists]
        for u, e in enumerate(lists):
            if e.dim() != 1 or e.dtype not in (torch.long, torch.int32):
                raise ValueError(f"exclude[{u}]: expected a 1-D integer tensor, got {e.dtype} of shape {list(e.shape)}")
        lengths = np.fromiter((e.shape[0] for e in lists), np.int64, len(lists))
        values = np.concatenate([e.cpu().numpy().astype(np.int64, copy=False) for e in lists]) if len(lists) \
            else np.empty(0, dtype=np.int64)
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Items per user, int64 ``[U]``."""
        return np.diff(self.offsets)

    def slice(self, lo: int, hi: int) -> "ItemLists":
        """Users ``lo..hi-1`` (``0 <= lo``; ``hi`` is capped at the number of users)."""
        if lo < 0 or hi < 0:
            raise ValueError(f"slice({lo}, {hi}): bounds must be >= 0")
        lo, hi = min(lo, len(self)), min(hi, len(self))
        hi = max(lo, hi)
        return ItemLists(self.values[self.offsets[lo]:self.offsets[hi]], self.offsets[lo:hi + 1] - self.offsets[lo])

    def within(self, lo: int, hi: int) -> "ItemLists":
        """Each user's items in ``lo..hi-1``, shifted to ``0..hi-lo-1`` (a row shard's local ids)."""
        keep = (self.values >= lo) & (self.values < hi)
        kept = np.concatenate([[0], np.cumsum(keep)])
        return ItemLists(self.values[keep] - lo, kept[self.offsets])

    def tolist(self) -> list[np.ndarray]:
        """One int64 array per user."""
        return np.split(self.values, self.offsets[1:-1]) if len(self) else []


def _pairs_by_item(exclude: "Sequence[Tensor] | ItemLists | None", num_users: int, num_items: int,
                   device: torch.device) -> _Pairs:
    """Each user's excluded items as distinct (user, item) pairs, sorted by item."""
    if exclude is None:
        empty = np.empty(0, dtype=np.int64)
        return _Pairs(empty, empty, device)
    if len(exclude) != num_users:
        raise ValueError(f"exclude: expected one tensor per user ({num_users}), got {len(exclude)}")
    # joined on the host, deduplicated and sorted there, then one copy to the device
    lists = ItemLists.of(exclude)
    flat = lists.values
    bad = np.flatnonzero((flat < 0) | (flat >= num_items))
    if len(bad):
        u = int(np.searchsorted(lists.offsets, int(bad[0]), side="right")) - 1
        raise ValueError(f"exclude[{u}]: item ids must lie in 0..{num_items - 1}")
    key = np.unique(flat * max(num_users, 1) + np.repeat(np.arange(num_users), lists.lengths()))  # by item, then user
    return _Pairs(key % max(num_users, 1), key // max(num_users, 1), device)


def _fill_pairs(chunk: Tensor, pairs: _Pairs, start: int, value: float | bool) -> None:
    """``chunk[u, i - start] = value`` for the pairs ``(u, i)`` whose item lies in the contiguous
    ``[B, C]`` chunk's columns ``start .. start + C - 1`` (``index_fill_`` on its flat view: on CPU
    the 2-D index assignment is ~15x slower)."""
    width = chunk.shape[1]
    lo, hi = pairs.span(start, start + width)
    chunk.view(-1).index_fill_(0, pairs.positions(lo, hi, start, width), value)


class TargetColumns:
    """Each row's target item id on the device, and the rows sorted by it on the host, so that the
    rows whose target lies inside an item chunk are found without waiting for the device (a copy of
    host data to the GPU waits for every queued kernel)."""

    def __init__(self, targets: np.ndarray, device: torch.device):
        order = np.argsort(targets, kind="stable")
        self.ids = torch.from_numpy(targets).to(device)
        self.sorted_ids = targets[order]
        self.order = torch.from_numpy(order).to(device)

    def inside(self, start: int, end: int) -> Tensor:
        """Rows whose target lies in ``start + 1 .. end - 1`` (in a chunk of items ``start..end-1``,
        with at least one column left of it)."""
        lo, hi = np.searchsorted(self.sorted_ids, [start + 1, end])
        return self.order[int(lo):int(hi)]


@torch.no_grad()  # counts have no gradient, and the comparisons are written into `work` (out=)
def count_ahead(scores: Tensor, target_scores: Tensor, targets: TargetColumns, start: int,
                blocked: _Pairs | None = None, work: Tensor | None = None) -> Tensor:
    """Per row of ``[B, C]`` float32 scores of items ``start .. start + C - 1``, the items ahead of
    the row's target: a higher score, or an equal score and a smaller id; ``[B]`` long.

    Args:
        target_scores: ``[B]`` float32.
        targets: the rows' targets (anywhere in the catalogue).
        blocked: pairs that are not counted.
        work: a contiguous ``[B * C]`` (or longer) float32 tensor on the scores' device to
            compute in, overwritten (None: a new one). On the CPU the first touch of a fresh
            ``[B, C]`` tensor costs more than the comparison itself: pass the same one every chunk.

    One pass over the scores: a row whose target lies right of every column counts the scores at
    or above its target's (``> nextafter(t, -inf)``), any other row the scores above it; rows whose
    target lies inside add their ties left of it (a running count of ties, read just left of the
    target); the blocked pairs ahead are taken off. The comparisons are summed as float32 ones and
    zeros (a bool sum is several times slower on the CPU), exact for chunks of up to 2**24 columns.
    """
    rows_n, width = scores.shape
    if width > 2 ** 24:
        raise ValueError(f"item chunk of {width:,} columns: count_ahead sums float32 ones, exact up to "
                         f"2**24 columns; use a smaller item_chunk")
    if work is None or work.numel() < rows_n * width:
        work = torch.empty(rows_n * width, device=scores.device)
    t = target_scores.unsqueeze(1)
    later = (targets.ids >= start + width).unsqueeze(1)
    above = torch.gt(scores, torch.where(later, torch.nextafter(t, torch.full_like(t, -math.inf)), t),
                     out=work[:rows_n * width].view(rows_n, width))
    counts = above.sum(dim=1).long()
    # a -inf target (a float32 score that overflowed): every column is at or above it
    counts.masked_fill_(later.squeeze(1) & (target_scores == -math.inf), width)
    rows = targets.inside(start, start + width)
    if rows.numel():  # ties left of the target, on these rows only
        ties = torch.index_select(scores, 0, rows, out=work[:rows.numel() * width].view(-1, width))
        torch.eq(ties, t[rows], out=ties).cumsum_(dim=1)
        left = (targets.ids[rows] - start - 1).unsqueeze(1)  # >= 0: the target is not the first column
        counts.index_add_(0, rows, ties.gather(1, left).squeeze(1).long())
    if blocked is not None:
        counts -= blocked_ahead(scores, target_scores, targets, start, blocked)
    return counts


def blocked_ahead(scores: Tensor, target_scores: Tensor, targets: TargetColumns, start: int,
                  blocked: _Pairs) -> Tensor:
    """Per row, how many of its blocked items in this chunk :func:`count_ahead` counts as ahead;
    ``[B]`` long."""
    counts = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    lo, hi = blocked.span(start, start + scores.shape[1])
    if hi > lo:
        users, items = blocked.users[lo:hi], blocked.items[lo:hi]
        s, t = scores[users, items - start], target_scores[users]
        counts.index_add_(0, users, ((s > t) | ((s == t) & (items < targets.ids[users]))).long())
    return counts


TOPK_GROUP = 64  # columns per group of the two-stage top-k (a power of two)


def _topk_in_id_order(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best columns of each row of ``[U, C]`` scores (higher score, then the smaller
    column), returned in column order (not by score) as ``([U, k] scores, [U, k] columns)``.

    Two stages when the columns split into groups of 8..64: the ``k`` best groups by their best
    score (ties to the smaller group), then the ``k`` best of their columns. Exact: a column among
    the ``k`` best has fewer than ``k`` columns ahead of it, so fewer than ``k`` groups have a best
    column ahead of its group's. One read of the scores instead of a top-k over all of them."""
    num_rows, width = scores.shape
    group = TOPK_GROUP
    while width % group:
        group //= 2
    if group < 8 or width // group <= k:
        return _topk_direct(scores, k)
    best = scores.view(num_rows, width // group, group).amax(dim=2)
    groups = _first_k_sorted(best, k)
    columns = (groups.unsqueeze(2) * group + torch.arange(group, device=scores.device)).view(num_rows, k * group)
    candidates = scores.gather(1, columns)
    sub = _first_k_sorted(candidates, k)
    return candidates.gather(1, sub), columns.gather(1, sub)


def _first_k_sorted(scores: Tensor, k: int) -> Tensor:
    """Columns of the ``k`` best of each row (ties to the smaller column), ascending: a stable sort,
    which never waits for the device (a narrow ``[B, n]``: group bests or candidates)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


def _topk_direct(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`_topk_in_id_order` by one ``torch.topk`` over all columns."""
    num_rows, width = scores.shape
    if k >= width:
        columns = torch.arange(width, device=scores.device).expand(num_rows, width)
        return scores, columns
    values, columns = torch.topk(scores, k + 1, dim=1)
    # torch.topk picks among scores equal to the k-th arbitrarily; rows where the (k+1)-th equals
    # the k-th (the cut falls inside a run of equal scores) take the leftmost ones instead
    columns = columns[:, :k]
    split = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
    if split.numel():
        kth = values[split, k - 1:k]
        rows = scores[split]
        above = rows > kth
        needed = k - above.sum(dim=1, keepdim=True)
        cut = rows == kth
        chosen = above | (cut & (cut.cumsum(dim=1, dtype=torch.int32) <= needed))
        columns[split] = chosen.nonzero()[:, 1].view(-1, k)  # row-major: exactly k per row
    columns = columns.sort(dim=1).values
    return scores.gather(1, columns), columns
