"""The ``prepare`` stage: a source's interactions -> dense ids, split sequences, item groups, item text.

Steps, in order (counts of every drop go to ``stats.json``):

1. read and check the source (:func:`.sources.load_source`);
2. filter (:mod:`.filters`): ``data.min_rating``, ``data.dedupe``, iterative k-core over
   ``data.min_user_interactions`` / ``data.min_item_interactions``, ``data.max_history``;
3. dense ids (:mod:`.idmap`): users with kept interactions, and the items with kept interactions
   (``data.catalogue=interacted``) or every item of the item table (``all``), sorted as strings,
   get 0..n-1 -- or, with ``data.id_map``, keep a previous run's indices and get new ones appended;
4. each user's sequence in time order, ties in input order, split by ``data.split``
   (:mod:`.splits`: leave-one-out, cold-start users, or by time);
5. item popularity = TRAINING interactions only; head items by ``data.head_rule``:
   ``top_items`` = the ``round(head_fraction * N)`` most popular items (N: items not retired; ties:
   lower ``item_idx`` first), ``top_interactions`` = the most popular items that together hold
   ``head_fraction`` of the training interactions, ``threshold`` = popularity > ``head_threshold``;
6. item text (:mod:`.text`): cleaned fields in ``data.text_template``, empty text handled by
   ``data.missing_text``, cut to ``data.text_max_tokens`` tokens of the embedding model's tokenizer.

Output files and columns: ``docs/run-directory.md`` (``prepare/`` row).

Example::

    info = prepare(DataConfig(), Path("runs/demo/prepare"))
    info["rows"]  # {'items': 9066, 'users': 671, 'interactions': 100004, 'train': 98662, 'valid': 671, 'test': 671}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from ..config import DataConfig, validate_data
from ..runtime.manifest import atomic_write_json
from ..runtime.parquet import write_table
from .filters import filter_interactions
from .idmap import assign_ids, read_id_map
from .sources import load_source
from .splits import split
from .text import fill_missing, item_text, truncate_tokens

# the Arrow schemas of docs/run-directory.md, written exactly (polars alone would write
# large_string / large_list, which other readers see as different types)
SCHEMAS = {
    "items": pa.schema([("item_idx", pa.int32()), ("item_id", pa.string()), ("text", pa.string()),
                        ("popularity", pa.int32()), ("is_head", pa.bool_()), ("never_seen", pa.bool_()),
                        ("retired", pa.bool_())]),
    "users": pa.schema([("user_idx", pa.int32()), ("user_id", pa.string())]),
    "train": pa.schema([("user_idx", pa.int32()), ("items", pa.list_(pa.int32()))]),
    "valid": pa.schema([("user_idx", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]),
    "test": pa.schema([("user_idx", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]),
}
# the fewest interactions per user each split needs: leave-one-out keeps one for training and two
# targets; a held-out cold-start user needs a history besides its target
def prepare(cfg: DataConfig, out_dir: Path, *, tokenizer_path: str | None = None) -> dict:
    """Build the ``prepare/`` files of the run directory from the source ``cfg`` names.

    Writes ``items.parquet`` (N rows), ``users.parquet`` (U rows), ``train.parquet``,
    ``valid.parquet``, ``test.parquet`` and ``stats.json`` into ``out_dir``.

    Args:
        cfg: the data config.
        out_dir: the folder to write (created if missing).
        tokenizer_path: the embedding model's folder, whose tokenizer cuts texts to
            ``data.text_max_tokens`` tokens; None: the bundled all-MiniLM-L6-v2. Unused when
            ``text_max_tokens`` is None.

    Returns:
        ``{"rows": {"items": N, "users": U, "interactions": M, "train": T, "valid": V, "test": S},
        "source": str}``: M interactions kept after filtering, T of them in training, V and S
        evaluated users.

    Raises:
        DataError: bad input (file, column and row named), an unknown template column, items
            without text under ``missing_text=error``, nothing left after filtering, or an
            empty split part.
        ConfigError: a data key breaks a rule of ``config.validate_data`` (the key is named).
    """
    validate_data(cfg)  # before the data is read
    src = load_source(cfg)
    texts = item_text(cfg, src)  # before the heavy work: a template typo fails fast
    previous = read_id_map(Path(cfg.id_map)) if cfg.id_map is not None else None

    # the filters group by user and item many times: dense uint32 codes make that cheap
    user_codes = src.interactions.select(pl.col("user_id").unique()).with_row_index("user")
    item_codes = src.interactions.select(pl.col("item_id").unique()).with_row_index("item")
    coded = (src.interactions.lazy()
             .join(user_codes.lazy(), on="user_id", maintain_order="left")
             .join(item_codes.lazy(), on="item_id", maintain_order="left")
             .select("order", "user", "item", "timestamp", "rating").collect())
    kept, dropped, k_core_rounds = filter_interactions(coded, cfg, src)
    del coded

    # codes are row numbers of the code tables, so a bincount says which ones are still in use
    kept_items = item_codes.filter(pl.Series(np.bincount(kept["item"].to_numpy(), minlength=item_codes.height) > 0))
    kept_users = user_codes.filter(pl.Series(np.bincount(kept["user"].to_numpy(), minlength=user_codes.height) > 0))
    catalogue = src.items["item_id"] if cfg.catalogue == "all" else kept_items["item_id"]
    items = assign_ids(catalogue, previous.items if previous else None, "item_idx", "item_id")
    users = assign_ids(kept_users["user_id"], previous.users if previous else None, "user_idx", "user_id")
    seq = pl.DataFrame({
        "user_idx": _code_to_index(kept_users, users, "user", "user_idx", "user_id")[kept["user"].to_numpy()],
        "item_idx": _code_to_index(kept_items, items, "item", "item_idx", "item_id")[kept["item"].to_numpy()],
        "timestamp": kept["timestamp"], "order": kept["order"],
    }).sort("user_idx", "timestamp", "order").drop("order")
    active_users = users.filter(~pl.col("retired")).select("user_idx", "user_id")
    (train, valid, test), split_facts = split(seq, active_users, cfg, src.files["interactions"])

    popularity = (train.lazy().select(pl.col("items").explode().alias("item_idx"))
                  .group_by("item_idx").len().collect())
    items = items.join(popularity, on="item_idx", how="left", maintain_order="left").with_columns(
        pl.col("len").fill_null(0).cast(pl.Int32).alias("popularity")).drop("len")
    items, n_head = _head(items, cfg)
    items, text_facts = _texts(items, texts, previous.items if previous else None, cfg, src.files.get("items"),
                               tokenizer_path)
    items = items.with_columns((pl.col("popularity") == 0).alias("never_seen")).select(SCHEMAS["items"].names)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in (("items", items), ("users", users.select("user_idx", "user_id")), ("train", train),
                        ("valid", valid), ("test", test)):
        write_table(frame.to_arrow().cast(SCHEMAS[name]), out_dir / f"{name}.parquet", compression="zstd")

    lengths = seq.group_by("user_idx").len()["len"]
    n_train = int(train["items"].list.len().sum())
    rows = {"items": items.height, "users": users.height, "interactions": kept.height, "train": n_train,
            "valid": valid.height, "test": test.height}
    atomic_write_json(out_dir / "stats.json", {
        "source": src.description,
        "files": {role: str(path) for role, path in src.files.items()},
        **rows,
        "interactions_read": src.interactions.height,
        "catalogue_items": src.items.height,
        "catalogue": cfg.catalogue,
        "split": split_facts,
        "head_rule": cfg.head_rule,
        "head_items": n_head,
        "never_seen_items": int(items["never_seen"].sum()),
        "id_map": {"path": cfg.id_map, "new_items": int((items["item_idx"] >= previous.items.height).sum()),
                   "retired_items": int(items["retired"].sum()),
                   "new_users": int((users["user_idx"] >= previous.users.height).sum()),
                   "retired_users": int(users["retired"].sum())} if previous else None,
        **text_facts,
        "dropped": dropped,
        "k_core_rounds": k_core_rounds,
        "sequence_length": {"min": lengths.min(), "median": lengths.median(), "mean": round(lengths.mean(), 3),
                            "max": lengths.max()},
    })
    return {"rows": rows, "source": src.description}


def _code_to_index(codes: pl.DataFrame, ids: pl.DataFrame, code: str, idx: str, key: str) -> np.ndarray:
    """An int32 array mapping each code of ``codes`` (``code``, ``key``) to its ``idx`` in ``ids``
    (-1 for codes not in use), so that a gather replaces a join over every interaction."""
    pairs = codes.join(ids.select(idx, key), on=key)
    lut = np.full(int(codes[code].max()) + 1 if codes.height else 0, -1, dtype=np.int32)
    lut[pairs[code].to_numpy()] = pairs[idx].to_numpy()
    return lut


def _head(items: pl.DataFrame, cfg: DataConfig) -> tuple[pl.DataFrame, int]:
    """``items`` (``item_idx``, ``popularity``, ``retired``) with ``is_head`` by ``data.head_rule``,
    and the number of head items. Retired items are never head items."""
    rank = ["retired", "popularity", "item_idx"]  # the order of popularity, ties to lower idx
    ranked = items.sort(rank, descending=[False, True, False])
    if cfg.head_rule == "top_items":
        n_head = round(cfg.head_fraction * int((~items["retired"]).sum()))
        head = pl.int_range(pl.len()) < n_head
    elif cfg.head_rule == "top_interactions":
        # an item is head while the more popular ones hold less than the share: the smallest
        # prefix of the ranking holding head_fraction of all training interactions
        before = pl.col("popularity").cum_sum() - pl.col("popularity")
        head = (before < cfg.head_fraction * pl.col("popularity").sum()) & (pl.col("popularity") > 0)
    else:
        head = pl.col("popularity") > cfg.head_threshold
    ranked = ranked.with_columns((head & ~pl.col("retired")).alias("is_head"))
    return ranked.sort("item_idx"), int(ranked["is_head"].sum())


def _texts(items: pl.DataFrame, texts: pl.DataFrame, previous: pl.DataFrame | None, cfg: DataConfig,
           items_file, tokenizer_path: str | None) -> tuple[pl.DataFrame, dict]:
    """``items`` with ``text``: the current text for items in use, the previous run's text for
    retired items; and the counts of placeholders and token cuts for ``stats.json``."""
    current = items.filter(~pl.col("retired")).join(texts, on="item_id", how="left", maintain_order="left")
    current, placeholders = fill_missing(current, cfg, items_file)
    truncated = 0
    if cfg.text_max_tokens is not None:
        if tokenizer_path is None:
            from ..embed.encoder import resolve_model

            tokenizer_path = resolve_model("all-MiniLM-L6-v2")
        cut, truncated = truncate_tokens(current["text"], tokenizer_path, cfg.text_max_tokens)
        current = current.with_columns(cut)
    parts = [current.drop("empty")]
    if previous is not None:
        parts.append(items.filter("retired").join(previous.select("item_id", "text"), on="item_id",
                                                  maintain_order="left"))
    facts = {"placeholder_texts": placeholders, "truncated_texts": truncated,
             "text_max_tokens": cfg.text_max_tokens}
    return pl.concat(parts).sort("item_idx"), facts
