"""Interaction filters of the prepare stage, applied in this order:

1. ``data.min_rating``: keep interactions rated at least this (unrated ones go too);
2. ``data.dedupe``: ``"exact"`` drops repeats of (user, item, timestamp), keeping the first in
   input order; ``"user_item"`` keeps only each (user, item) pair's first interaction in time
   (ties: input order); ``"none"`` keeps everything;
3. iterative k-core: drop users with fewer than ``data.min_user_interactions`` and items with fewer
   than ``data.min_item_interactions`` interactions, again and again until both hold (dropping
   items can push a user below the limit and the other way round);
4. ``data.max_history``: keep each user's last L interactions in time (ties: input order).

Every filter works on the canonical interaction columns ``order:int64``, ``user:uint32``,
``item:uint32`` (dense codes of the ids, see :func:`.prepare.prepare`), ``timestamp:int64``,
``rating:float64``, in input order, and returns the rows it keeps in input order.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .sources import Source


def filter_interactions(inter: pl.DataFrame, cfg: DataConfig, src: Source
                        ) -> tuple[pl.DataFrame, dict[str, int], int]:
    """The interactions that steps 1-4 keep (input order), how many each step dropped, and the
    number of k-core passes it took until both limits held.

    The counts: ``below_min_rating`` (when set), ``duplicates``, ``k_core_interactions``,
    ``k_core_users`` and ``k_core_items`` (users / items that lost all their interactions) and
    ``max_history_interactions`` (when set).

    Raises:
        DataError: ``min_rating`` set for a source without ratings, or nothing left.
    """
    dropped: dict[str, int] = {}
    kept = inter
    if cfg.min_rating is not None:
        if "rating" not in src.columns:
            has = (f"no column '{cfg.rating_col}' (data.rating_col)" if cfg.source == "interactions"
                   else "no ratings")
            raise DataError(f"data.min_rating={cfg.min_rating} is set but the interactions have {has}",
                            file=src.files["interactions"])
        kept = kept.filter(pl.col("rating") >= cfg.min_rating)
        dropped["below_min_rating"] = inter.height - kept.height
    before = kept.height
    kept = dedupe(kept, cfg.dedupe)
    dropped["duplicates"] = before - kept.height
    before_users, before_items, before = kept["user"].n_unique(), kept["item"].n_unique(), kept.height
    kept, rounds = k_core(kept, cfg.min_user_interactions, cfg.min_item_interactions)
    dropped["k_core_interactions"] = before - kept.height
    dropped["k_core_users"] = before_users - kept["user"].n_unique()
    dropped["k_core_items"] = before_items - kept["item"].n_unique()
    if kept.height == 0:
        raise DataError(f"no interaction is left after filtering (data.min_user_interactions="
                        f"{cfg.min_user_interactions}, data.min_item_interactions={cfg.min_item_interactions}; "
                        f"dropped: {dropped})", file=src.files["interactions"])
    if cfg.max_history is not None:
        before = kept.height
        kept = last_per_user(kept, cfg.max_history)
        dropped["max_history_interactions"] = before - kept.height
    return kept, dropped, rounds


def dedupe(inter: pl.DataFrame, rule: str) -> pl.DataFrame:
    """``inter`` without repeats by ``rule`` (``"exact"``, ``"user_item"``, ``"none"``), input order kept."""
    if rule == "exact":
        return inter.filter(pl.struct("user", "item", "timestamp").is_first_distinct())
    if rule == "user_item":
        first = (inter.lazy().sort("timestamp", "order")
                 .unique(subset=["user", "item"], keep="first", maintain_order=True).select("order"))
        return inter.lazy().join(first, on="order", how="semi", maintain_order="left").collect()
    if rule == "none":
        return inter
    raise ConfigError(f"data.dedupe={rule!r}: expected exact, user_item or none")


def k_core(inter: pl.DataFrame, min_user: int, min_item: int) -> tuple[pl.DataFrame, int]:
    """The largest subset of ``inter`` in which every user has >= ``min_user`` and every item
    >= ``min_item`` interactions (possibly empty), input order kept, and the passes it took.

    Each pass drops the rows of every user and item below its limit, counted on the rows the
    previous pass kept; the first pass that drops nothing ends the loop. Removing rows only ever
    lowers counts, so the fixed point reached is the unique largest such subset. The codes are
    small non-negative integers, so ``np.bincount`` counts a pass in one sweep.
    """
    users, items = inter["user"].to_numpy(), inter["item"].to_numpy()
    alive = np.flatnonzero(np.ones(len(users), dtype=bool))  # row numbers still kept
    rounds = 0
    while True:
        rounds += 1
        u, i = users[alive], items[alive]
        ok = (np.bincount(u)[u] >= min_user) & (np.bincount(i)[i] >= min_item)
        if ok.all():
            return inter[alive], rounds
        alive = alive[ok]


def last_per_user(inter: pl.DataFrame, n: int) -> pl.DataFrame:
    """Each user's last ``n`` rows of ``inter`` by (timestamp, order), input order kept."""
    users = inter["user"].to_numpy()
    over_cap = np.bincount(users)[users] > n
    if not over_cap.any():
        return inter
    # only the users above the cap need their rows ranked in time; usually a small share
    heavy = inter.filter(pl.Series(over_cap))
    position = pl.int_range(pl.len()).over("user", order_by=["timestamp", "order"])  # 0 = oldest
    cut = heavy.filter(position < pl.len().over("user").cast(pl.Int64) - n).select("order")
    return inter.join(cut, on="order", how="anti", maintain_order="left")
