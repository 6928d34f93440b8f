"""Sequences as padded id arrays, built from prepare's Parquet files: training windows (all at once,
or streamed a few thousand sequences at a time), evaluation histories, item counts.

Shapes: ``W`` training windows, ``U`` users, ``L`` history length; the padding id is ``N``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.compute as pc

from ..runtime.parquet import iter_batches, read_table


def list_column(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values int64, offsets int64 [rows+1]) of a list<int32> column."""
    col = read_table(path, columns=[column]).column(column).combine_chunks()
    return (np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.int64),
            np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64))


def windows_of(values: np.ndarray, offsets: np.ndarray, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each sequence ``values[offsets[u]:offsets[u+1]]`` into windows of ``max_len + 1`` items,
    stride ``max_len``, aligned to the sequence end, so that every (history -> next item)
    transition is a target exactly once per epoch and the newest transitions keep the longest
    context. Windows come sequence by sequence, the newest window of each first.

    Returns:
        inputs [W, L] and targets [W, L] (int64, left-padded with ``pad_id``): ``targets[w, t]``
        is the item following ``inputs[w, t]``.
    """
    starts, ends = offsets[:-1], offsets[1:]
    # window w of a user covers [end - (w+1) L - 1, end - w L) clipped at the user's start
    n_win = window_counts(ends - starts, max_len)
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


def window_counts(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Training windows int64 [U] of sequences of ``lengths`` items (see :func:`windows_of`)."""
    return np.maximum(0, -(-(np.asarray(lengths, dtype=np.int64) - 1) // max_len))


def training_windows(train_parquet: Path, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Every training window of train.parquet at once (:func:`windows_of` of its ``items`` lists):
    the reference the streamed reader (:func:`stream_windows`) is checked against."""
    values, offsets = list_column(train_parquet, "items")
    return windows_of(values, offsets, max_len, pad_id)


# sequences per read of the streamed functions: a read's memory (its lists and windows) stays a few MB
READ_ROWS = 4_096


def _list_batches(train_parquet: Path, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat values int64, offsets int64 from 0) of the ``items`` lists, ``rows`` sequences at a time."""
    for batch in iter_batches(train_parquet, batch_size=rows, columns=["items"]):
        col = batch.column(0)
        lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
        yield values, offsets


def count_windows(train_parquet: Path, max_len: int, rows: int = READ_ROWS) -> int:
    """The number of training windows of train.parquet, read ``rows`` sequences at a time."""
    return int(sum(window_counts(np.diff(offsets), max_len).sum()
                   for _, offsets in _list_batches(train_parquet, rows)))


def stream_windows(train_parquet: Path, max_len: int, pad_id: int, rows: int = READ_ROWS
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The windows of :func:`training_windows`, in the same order, built ``rows`` sequences at a
    time (memory bounded by one read, whatever the file's size): (inputs [w, L], targets [w, L])."""
    for values, offsets in _list_batches(train_parquet, rows):
        yield windows_of(values, offsets, max_len, pad_id)


def eval_inputs(split_parquet: Path, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_idx [U], last ``max_len`` history items left-padded [U, L], target [U]) of a split."""
    t = read_table(split_parquet, columns=["user_idx", "target"])
    hist = last_items(*list_column(split_parquet, "history"), max_len, pad_id)
    return (t.column("user_idx").to_numpy().astype(np.int64), hist,
            t.column("target").to_numpy().astype(np.int64))


def last_items(values: np.ndarray, offsets: np.ndarray, max_len: int, pad_id: int) -> np.ndarray:
    """The last ``max_len`` items of each list ``values[offsets[u]:offsets[u+1]]``, left-padded
    with ``pad_id``: int64 [U, max_len]."""
    ends = offsets[1:]
    if not len(values):  # no user has an item: all padding
        return np.full((len(ends), max_len), pad_id, dtype=np.int64)
    pos = np.arange(max_len)
    length = np.minimum(ends - offsets[:-1], max_len)
    k = pos[None, :] - (max_len - length)[:, None]
    ok = k >= 0
    idx = (ends - length)[:, None] + np.where(ok, k, 0)
    return np.where(ok, values[np.minimum(idx, len(values) - 1)], pad_id).astype(np.int64)


def item_counts(train_parquet: Path, num_items: int, rows: int = READ_ROWS) -> np.ndarray:
    """Training interactions per item [N] (int64): occurrences in train.parquet's ``items`` lists,
    counted ``rows`` sequences at a time."""
    counts = np.zeros(num_items, dtype=np.int64)
    for values, _ in _list_batches(train_parquet, rows):
        counts += np.bincount(values, minlength=num_items)[:num_items]
    return counts
