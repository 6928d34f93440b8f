"""Train / validation / test splits of the prepare stage (``data.split``).

Every split takes the kept interactions as ``user_idx:int32``, ``item_idx:int32``,
``timestamp:int64``, sorted by user, then time, ties in input order, and returns three tables in
the layout of ``docs/run-directory.md``:

- ``train``: ``user_idx:int32``, ``items:list<int32>`` (time order), one row per user with
  training interactions;
- ``valid`` / ``test``: ``user_idx:int32``, ``history:list<int32>``, ``target:int32``, one row per
  evaluated user.

Kinds:

- ``leave_one_out``: every user; train = all but the last two, valid target = the second last,
  test target = the last, each with every item before it as history.
- ``cold_start_users``: users are split into train / valid / test by ``data.split_fractions`` with a
  hash of (``data.split_seed``, ``user_id``), so a user's part depends on neither the row order nor
  the other users; train holds the train users' whole sequences; a valid or test user's target is
  its last interaction, its history everything before (the paper's Table 2 setting).
- ``time``: ``data.split_times`` = [t1, t2]; train = every interaction before t1; a user with an
  interaction in [t1, t2) is a valid user whose target is the first such interaction; a user with one
  at or after t2 is a test user whose target is the first such; the history is every interaction
  strictly before the target's time. Users whose history would be empty cannot be scored by a
  sequence model and are left out (counted in the stats). With ``data.train_window_days`` = W the
  train part keeps only the interactions in [t1 - W days, t1) (a recent window, for periodic
  retraining); the older ones are dropped from training but still count as valid / test history.
- ``all``: every interaction trains (the time split with t1 after the newest interaction, so
  valid and test are empty); ``data.train_window_days`` counts back from the newest interaction.
  For a deployable model refit on all the data, once a held-out evaluation chose its settings.
"""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

from ..config import DataConfig, check_split_fractions, check_train_window, parse_split_times
from ..errors import ConfigError, DataError

Splits = tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def split(seq: pl.DataFrame, users: pl.DataFrame, cfg: DataConfig, interactions_file) -> tuple[Splits, dict]:
    """(train, valid, test) of ``seq`` by ``cfg.split``, and split facts for ``stats.json``.

    Args:
        seq: the kept interactions (see the module docstring).
        users: ``user_idx:int32``, ``user_id:str`` of every user in ``seq`` (for the hash rule).
        cfg: the data config (``split``, ``split_fractions``, ``split_seed``, ``split_times``).
        interactions_file: named in errors about the data.

    Raises:
        ConfigError: bad ``split_fractions`` / ``split_times`` (the key is named).
        DataError: a part of the split would be empty.
    """
    if cfg.split == "leave_one_out":
        parts, facts = leave_one_out(seq), {}
    elif cfg.split == "cold_start_users":
        parts, facts = cold_start_users(seq, users, cfg.split_fractions, cfg.split_seed)
    elif cfg.split == "time":
        t1, t2 = parse_split_times(cfg.split_times)
        parts, facts = by_time(seq, t1, t2, train_window_days=check_train_window(cfg))
    elif cfg.split == "all":
        end = int(seq["timestamp"].max()) + 1 if seq.height else 1
        parts, facts = by_time(seq, end, end + 1, train_window_days=check_train_window(cfg))
    else:
        raise ConfigError(f"data.split={cfg.split!r}: expected leave_one_out, cold_start_users, time or all")
    if cfg.split not in ("time", "all"):
        check_train_window(cfg)
    for name, part in zip(("train", "valid", "test"), parts):
        if part.height == 0 and (name == "train" or cfg.split != "all"):
            raise DataError(f"data.split={cfg.split}: the {name} part is empty ({facts or 'no rows'}); "
                            "change the split settings or use more data", file=interactions_file)
    return parts, {"kind": cfg.split, **facts}


def _sequences(seq: pl.DataFrame, name: str = "sequence") -> pl.LazyFrame:
    return seq.lazy().group_by("user_idx", maintain_order=True).agg(pl.col("item_idx").alias(name))


def leave_one_out(seq: pl.DataFrame) -> Splits:
    """The leave-one-out split (every user needs >= 3 interactions)."""
    sequences = _sequences(seq).collect()
    length = pl.col("sequence").list.len()
    train = sequences.select("user_idx", pl.col("sequence").list.head(length - 2).alias("items"))
    valid = sequences.select("user_idx", pl.col("sequence").list.head(length - 2).alias("history"),
                             pl.col("sequence").list.get(-2).alias("target"))
    test = sequences.select("user_idx", pl.col("sequence").list.head(length - 1).alias("history"),
                            pl.col("sequence").list.get(-1).alias("target"))
    return train, valid, test


def cold_start_users(seq: pl.DataFrame, users: pl.DataFrame, fractions: list[float], seed: int
                     ) -> tuple[Splits, dict]:
    """The cold-start-users split; facts: the users in each part and the fractions used."""
    check_split_fractions(fractions)
    u = unit_hash(users["user_id"], seed)
    part = np.where(u < fractions[0], 0, np.where(u < fractions[0] + fractions[1], 1, 2)).astype(np.int8)
    parts = users.select("user_idx").with_columns(pl.Series("part", part))
    sequences = _sequences(seq).join(parts.lazy(), on="user_idx", maintain_order="left").collect()
    train = sequences.filter(pl.col("part") == 0).select("user_idx", pl.col("sequence").alias("items"))
    held_out = [sequences.filter(pl.col("part") == p).select(
        "user_idx", pl.col("sequence").list.head(pl.col("sequence").list.len() - 1).alias("history"),
        pl.col("sequence").list.get(-1).alias("target")) for p in (1, 2)]
    facts = {"fractions": fractions, "seed": seed,
             "users": {"train": train.height, "valid": held_out[0].height, "test": held_out[1].height}}
    return (train, *held_out), facts


def unit_hash(ids: pl.Series, seed: int) -> np.ndarray:
    """A number in [0, 1) per id, from the id's UTF-8 bytes and ``seed`` alone.

    FNV-1a over the bytes, then the splitmix64 finaliser (FNV alone mixes its last bytes poorly,
    and ids such as "u1", "u2" differ only there). Vectorised over ids, looping over byte
    positions: the result is the same on every machine and version, unlike polars' ``hash``.
    """
    arr = ids.to_arrow().cast(pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    for j in range(int(lengths.max(initial=0))):
        live = lengths > j
        byte = data[np.minimum(starts + j, len(data) - 1)].astype(np.uint64)
        h = np.where(live, (h ^ byte) * _FNV_PRIME, h)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def by_time(seq: pl.DataFrame, t1: int, t2: int, *, train_window_days: float | None = None) -> tuple[Splits, dict]:
    """The time split; facts: t1, t2, the training window and the held-out users left out for lack
    of history.

    Args:
        train_window_days: keep only training interactions at or after ``t1 - days * 86400``
            (None: all before t1). Histories of valid / test users are not cut.
    """
    ts = pl.col("timestamp")
    in_train = ts < t1
    facts: dict = {"t1": t1, "t2": t2, "without_history": {}}
    if train_window_days is not None:
        start = t1 - math.ceil(train_window_days * 86400)
        in_train = in_train & (ts >= start)
        facts |= {"train_window_days": train_window_days, "train_start": start,
                  "dropped_before_window": int(seq.filter(ts < start).height)}
    train = _sequences(seq.filter(in_train), "items").collect()
    held_out = []
    for name, window in (("valid", (ts >= t1) & (ts < t2)), ("test", ts >= t2)):
        # the first row of each user in the window: rows are in time order within a user
        targets = (seq.lazy().filter(window).group_by("user_idx", maintain_order=True)
                   .agg(pl.col("item_idx").first().alias("target"), ts.first().alias("target_time")))
        history = (seq.lazy().join(targets, on="user_idx", maintain_order="left")
                   .filter(ts < pl.col("target_time"))
                   .group_by("user_idx", maintain_order=True).agg(pl.col("item_idx").alias("history")))
        rows = targets.join(history, on="user_idx", how="left", maintain_order="left").collect()
        facts["without_history"][name] = rows["history"].null_count()
        held_out.append(rows.filter(pl.col("history").is_not_null()).select("user_idx", "history", "target"))
    return (train, *held_out), facts
