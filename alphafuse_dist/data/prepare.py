"""The ``prepare`` stage: a source's interactions -> dense ids, leave-one-out sequences, item text.

Steps, in order (counts of every drop go to ``stats.json``):

1. read and check the source (:func:`.sources.load_source`);
2. keep interactions with ``rating >= data.min_rating`` (when set);
3. drop exact repeats of (user, item, timestamp), keeping the first in input order;
4. drop users with fewer than ``data.min_user_interactions`` interactions (one pass);
5. dense ids: the items of the kept interactions sorted by ``item_id`` get ``item_idx`` 0..N-1, the
   users sorted by ``user_id`` get ``user_idx`` 0..U-1 (string order: the same input always gives
   the same ids);
6. each user's sequence in time order, ties in input order; leave-one-out split: train = all but
   the last two, valid target = the second last, test target = the last, each with every item
   before it as history;
7. item popularity = training interactions; head items = the ``round(head_fraction * N)`` most
   popular (ties: lower ``item_idx`` first); item text = ``data.text_template`` filled in.

Output files and columns: ``docs/run-directory.md`` (``prepare/`` row).

Example::

    info = prepare(DataConfig(), Path("runs/demo/prepare"))
    info["rows"]  # {'items': 9066, 'users': 671, 'interactions': 100004, 'train': 98662}
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Callable

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..stages import atomic_write_json
from .sources import Source, load_source

# the Arrow schemas of docs/run-directory.md, written exactly (polars alone would write
# large_string / large_list, which other readers see as different types)
SCHEMAS = {
    "items": pa.schema([("item_idx", pa.int32()), ("item_id", pa.string()), ("text", pa.string()),
                        ("popularity", pa.int32()), ("is_head", pa.bool_())]),
    "users": pa.schema([("user_idx", pa.int32()), ("user_id", pa.string())]),
    "train": pa.schema([("user_idx", pa.int32()), ("items", pa.list_(pa.int32()))]),
    "valid": pa.schema([("user_idx", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]),
    "test": pa.schema([("user_idx", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]),
}
_CONVERSIONS: dict[str | None, Callable[[str], str]] = {None: str, "s": str, "r": repr, "a": ascii}


def prepare(cfg: DataConfig, out_dir: Path) -> dict:
    """Build the ``prepare/`` files of the run directory from the source ``cfg`` names.

    Writes ``items.parquet`` (N rows), ``users.parquet`` (U rows), ``train.parquet``,
    ``valid.parquet``, ``test.parquet`` (U rows each) and ``stats.json`` into ``out_dir``.

    Returns:
        ``{"rows": {"items": N, "users": U, "interactions": M, "train": M - 2U}, "source": str}``,
        where M counts the interactions kept after filtering.

    Raises:
        DataError: bad input (file, column and row named), an unknown template column, or no user
            left after filtering.
        ConfigError: ``head_fraction`` outside [0, 1] or ``min_user_interactions`` below 3.
    """
    if not 0.0 <= cfg.head_fraction <= 1.0:
        raise ConfigError(f"data.head_fraction={cfg.head_fraction}: must be in [0, 1]")
    if cfg.min_user_interactions < 3:
        raise ConfigError(f"data.min_user_interactions={cfg.min_user_interactions}: must be >= 3 "
                          "for the leave-one-out split")
    src = load_source(cfg)
    text = item_text(cfg.text_template, src)  # before the heavy work: a template typo fails fast
    kept, dropped = _filter(src, cfg)

    items = kept.select(pl.col("item_id").unique().sort()).with_row_index("item_idx").with_columns(
        pl.col("item_idx").cast(pl.Int32))
    users = kept.select(pl.col("user_id").unique().sort()).with_row_index("user_idx").with_columns(
        pl.col("user_idx").cast(pl.Int32))
    sequences = (kept.lazy()
                 .join(items.lazy(), on="item_id").join(users.lazy(), on="user_id")
                 .sort("user_idx", "timestamp", "order")
                 .group_by("user_idx", maintain_order=True)
                 .agg(pl.col("item_idx").alias("sequence"))
                 .collect())
    length = pl.col("sequence").list.len()
    train = sequences.select("user_idx", pl.col("sequence").list.head(length - 2).alias("items"))
    valid = sequences.select("user_idx", pl.col("sequence").list.head(length - 2).alias("history"),
                             pl.col("sequence").list.get(-2).alias("target"))
    test = sequences.select("user_idx", pl.col("sequence").list.head(length - 1).alias("history"),
                            pl.col("sequence").list.get(-1).alias("target"))

    popularity = train.select(pl.col("items").explode().alias("item_idx")).group_by("item_idx").len()
    n_head = round(cfg.head_fraction * items.height)
    items = (items
             .join(popularity, on="item_idx", how="left")
             .join(text, on="item_id", how="left")
             .with_columns(pl.col("len").fill_null(0).cast(pl.Int32).alias("popularity"))
             .sort(["popularity", "item_idx"], descending=[True, False])
             .with_columns((pl.int_range(pl.len()) < n_head).alias("is_head"))
             .sort("item_idx")
             .select("item_idx", "item_id", "text", "popularity", "is_head"))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in (("items", items), ("users", users), ("train", train), ("valid", valid), ("test", test)):
        pq.write_table(frame.to_arrow().cast(SCHEMAS[name]), out_dir / f"{name}.parquet", compression="zstd")

    lengths = sequences.select(length.alias("n"))["n"]
    rows = {"items": items.height, "users": users.height, "interactions": kept.height,
            "train": kept.height - 2 * users.height}
    atomic_write_json(out_dir / "stats.json", {
        "source": src.description,
        "files": {role: str(path) for role, path in src.files.items()},
        **rows,
        "interactions_read": src.interactions.height,
        "catalogue_items": src.items.height,
        "head_items": n_head,
        "dropped": dropped,
        "sequence_length": {"min": lengths.min(), "median": lengths.median(), "mean": round(lengths.mean(), 3),
                            "max": lengths.max()},
    })
    return {"rows": rows, "source": src.description}


def item_text(template: str, src: Source) -> pl.DataFrame:
    """``item_id:str``, ``text:str`` for every catalogue item: ``template`` filled in as by
    ``str.format`` from the item's columns (``item_id`` and the text columns).

    Missing values render as ""; runs of whitespace become one space, ends are stripped.
    Conversions and format specs (``{title!r}``, ``{title:.40}``) work as in ``str.format``.

    Raises:
        ConfigError: the template is not a valid format string or has positional fields.
        DataError: a field names no column of the item table (the columns are listed).
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"data.text_template={template!r}: {e}") from None
    items = src.items
    pieces: list[pl.Expr] = []
    for literal, field, spec, conversion in parts:
        if literal:
            pieces.append(pl.lit(literal))
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ConfigError(f"data.text_template={template!r}: fields must name item columns, "
                              f"e.g. {{title}}; found {{{field}}}")
        if field not in items.columns:
            raise DataError(f"data.text_template names an item column that does not exist; item columns: "
                            f"{', '.join(items.columns)}", file=src.files.get("items"), column=field)
        value = pl.col(field).cast(pl.String).fill_null("")
        if spec or conversion:
            # rare, so a per-item Python call is acceptable here; plain fields stay vectorised
            convert = _CONVERSIONS[conversion]
            value = value.map_elements(lambda v, c=convert, s=spec: format(c(v), s), return_dtype=pl.String)
        pieces.append(value)
    text = pl.concat_str(pieces) if pieces else pl.lit("")
    return items.select("item_id", text.str.replace_all(r"\s+", " ").str.strip_chars().alias("text"))


def _filter(src: Source, cfg: DataConfig) -> tuple[pl.DataFrame, dict[str, int]]:
    """The interactions that steps 2-4 keep (input order), and how many each step dropped."""
    kept = src.interactions
    dropped = {}
    if cfg.min_rating is not None:
        if "rating" not in src.columns:
            raise DataError(f"data.min_rating={cfg.min_rating} is set but this source has no ratings",
                            file=src.files["interactions"])
        before = kept.height
        kept = kept.filter(pl.col("rating") >= cfg.min_rating)  # unrated interactions go too
        dropped["below_min_rating"] = before - kept.height
    before = kept.height
    kept = kept.unique(subset=["user_id", "item_id", "timestamp"], keep="first", maintain_order=True)
    dropped["duplicates"] = before - kept.height
    per_user = pl.len().over("user_id")
    short = kept.filter(per_user < cfg.min_user_interactions)
    kept = kept.filter(per_user >= cfg.min_user_interactions)
    dropped["short_users"] = short["user_id"].n_unique()
    dropped["short_user_interactions"] = short.height
    if kept.height == 0:
        raise DataError(f"no user has data.min_user_interactions={cfg.min_user_interactions} interactions "
                        f"after filtering (dropped: {dropped})", file=src.files["interactions"])
    return kept, dropped
