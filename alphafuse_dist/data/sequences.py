"""Sequences as padded id arrays, built from prepare's Parquet files: training windows, evaluation
histories, item counts.

Shapes: ``W`` training windows, ``U`` users, ``L`` history length; the padding id is ``N``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.parquet import read_table


def _lists(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values int64, offsets int64 [rows+1]) of a list<int32> column."""
    col = read_table(path, columns=[column]).column(column).combine_chunks()
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
    t = read_table(split_parquet, columns=["user_idx", "history", "target"])
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
