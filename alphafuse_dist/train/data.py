"""Training and evaluation inputs as padded id arrays, built from prepare's Parquet files.

Shapes: ``W`` training windows, ``U`` users, ``L`` history length; the padding id is ``N``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _lists(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values int64, offsets int64 [rows+1]) of a list<int32> column."""
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    return (np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.int64),
            np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64))


def training_windows(train_parquet: Path, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every training sequence into windows of ``max_len + 1`` items, stride ``max_len``,
    aligned to the sequence end, so that every (history -> next item) transition is a target
    exactly once per epoch and the newest transitions keep the longest context.

    Returns:
        inputs [W, L] and targets [W, L] (int64, left-padded with ``pad_id``): ``targets[w, t]``
        is the item following ``inputs[w, t]``.
    """
    values, offsets = _lists(train_parquet, "items")
    starts, ends = offsets[:-1], offsets[1:]
    # window w of a user covers [end - (w+1) L - 1, end - w L) clipped at the user's start
    n_win = np.maximum(0, np.ceil((ends - starts - 1) / max_len)).astype(np.int64)
    user = np.repeat(np.arange(len(starts)), n_win)
    w = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    win_end = ends[user] - w * max_len  # exclusive end of the window's targets
    win_start = np.maximum(starts[user], win_end - max_len - 1)
    length = win_end - win_start - 1  # number of (input, target) pairs
    pos = np.arange(max_len)
    # left padding: column j holds pair index j - (L - length)
    k = pos[None, :] - (max_len - length)[:, None]
    ok = k >= 0
    idx = win_start[:, None] + np.where(ok, k, 0)
    inputs = np.where(ok, values[idx], pad_id)
    targets = np.where(ok, values[np.minimum(idx + 1, len(values) - 1)], pad_id)
    return inputs.astype(np.int64), targets.astype(np.int64)


def eval_inputs(split_parquet: Path, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_idx [U], last ``max_len`` history items left-padded [U, L], target [U]) of a split."""
    t = pq.read_table(split_parquet, columns=["user_idx", "history", "target"])
    values, offsets = _lists(split_parquet, "history")
    ends = offsets[1:]
    pos = np.arange(max_len)
    length = np.minimum(ends - offsets[:-1], max_len)
    k = pos[None, :] - (max_len - length)[:, None]
    ok = k >= 0
    idx = (ends - length)[:, None] + np.where(ok, k, 0)
    hist = np.where(ok, values[np.minimum(idx, max(len(values) - 1, 0))], pad_id)
    return (t.column("user_idx").to_numpy().astype(np.int64), hist.astype(np.int64),
            t.column("target").to_numpy().astype(np.int64))


def item_counts(train_parquet: Path, num_items: int) -> np.ndarray:
    """Training interactions per item [N] (int64): occurrences in train.parquet's ``items`` lists."""
    values, _ = _lists(train_parquet, "items")
    return np.bincount(values, minlength=num_items).astype(np.int64)


def read_embeddings(embed_dir: Path, num_items: int) -> np.ndarray:
    """The embed stage's language embeddings as float32 [N, d_l], row i = ``item_idx`` i.

    Reads every ``part-*.parquet`` fragment (``item_idx``, fixed-size list ``vector``), whatever
    the order of fragments and rows.

    Raises:
        DataError: naming the file when an item_idx is outside 0..N-1 or occurs twice, or naming
            the folder when fragments or items are missing.
    """
    from ..errors import DataError

    embed_dir = Path(embed_dir)
    files = sorted(embed_dir.glob("part-*.parquet"))
    if not files:
        raise DataError("no part-*.parquet embedding fragments; run the embed stage", file=embed_dir)
    table, seen = None, np.zeros(num_items, dtype=bool)
    for path in files:
        frag = pq.read_table(path, columns=["item_idx", "vector"])
        vectors = frag.column("vector").combine_chunks()
        idx = frag.column("item_idx").to_numpy().astype(np.int64)
        X = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), vectors.type.list_size)
        if table is None:
            table = np.zeros((num_items, X.shape[1]), dtype=np.float32)
        if X.shape[1] != table.shape[1]:
            raise DataError(f"vectors have d_l={X.shape[1]}, {files[0].name} has {table.shape[1]}", file=path)
        bad = idx[(idx < 0) | (idx >= num_items)]
        if len(bad):
            raise DataError(f"item_idx {bad[0]} is outside 0..{num_items - 1}", file=path, column="item_idx")
        counts = np.bincount(idx, minlength=num_items)
        twice = np.flatnonzero((counts > 1) | (seen & (counts > 0)))
        if len(twice):
            raise DataError(f"item_idx {twice[0]} occurs more than once", file=path, column="item_idx")
        seen |= counts > 0
        table[idx] = X
    if not seen.all():
        raise DataError(f"{int((~seen).sum())} items have no embedding (first item_idx {np.flatnonzero(~seen)[0]}); "
                        "rerun the embed stage", file=embed_dir)
    return table
