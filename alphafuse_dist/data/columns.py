"""The canonical shape of a source's tables (:class:`Source`) and the checks that bring read columns
into it: ids, timestamps, ratings and item text, each bad value a :class:`DataError` naming the file,
the column and the 0-based data row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..errors import DataError


@dataclass(frozen=True)
class Source:
    """The tables of one data source, checked and in canonical form.

    Attributes:
        interactions: one row per input interaction, in input order, ``M`` rows:
            ``order:int64`` (0-based data row in ``files["interactions"]``), ``user_id:str``,
            ``item_id:str`` (both non-empty), ``timestamp:int64`` (>= 0; epoch seconds for every
            shipped layout), ``rating:float64`` (null where the source has no rating).
            Every ``item_id`` is in ``items``.
        items: one row per catalogue item: ``item_id:str`` (unique, non-empty) followed by the
            text columns (all ``str``, null where missing). MovieLens: ``title``, ``genres``
            (comma-separated), ``tags`` (distinct user tags, comma-separated, ``""`` if none).
            Amazon: ``title``, ``brand``, ``categories``, ``description`` and per release
            ``price`` / ``features`` / ``main_category`` (see :func:`.formats._amazon`).
        files: every file read, by role: ``interactions``, and ``items`` / ``tags`` / ``genres``
            (ml-100k's ``u.genre``) when read.
        columns: canonical interaction column -> its name in ``files["interactions"]``, for error
            messages; ``rating`` is present only when the source has ratings.
        description: one line saying what was read.
    """

    interactions: pl.DataFrame
    items: pl.DataFrame
    files: dict[str, Path]
    columns: dict[str, str]
    description: str


def _require_columns(names: list[str], required: list[str], path: Path) -> None:
    for col in required:
        if col not in names:
            shown = ", ".join(n if len(n) <= 60 else n[:57] + "..." for n in names[:50])
            shown += " ..." if len(names) > 50 else ""
            raise DataError(f"missing required column; columns found: {shown or 'none'}",
                            file=path, column=col)



def _interactions(df: pl.DataFrame, path: Path, columns: dict[str, str]) -> pl.DataFrame:
    """Canonical interactions (see :class:`Source`) from ``df`` whose columns ``columns`` names."""
    _require_columns(df.columns, list(columns.values()), path)
    if df.height == 0:
        raise DataError("has no data rows: expected one interaction per row", file=path)
    rating = (_ratings(df[columns["rating"]], path) if "rating" in columns
              else pl.repeat(None, df.height, dtype=pl.Float64, eager=True))
    return pl.DataFrame([
        pl.int_range(0, df.height, dtype=pl.Int64, eager=True).alias("order"),
        _ids(df[columns["user_id"]], path).alias("user_id"),
        _ids(df[columns["item_id"]], path).alias("item_id"),
        _timestamps(df[columns["timestamp"]], path).alias("timestamp"),
        rating.alias("rating"),
    ])


def _items(df: pl.DataFrame, path: Path, id_col: str) -> pl.DataFrame:
    """Canonical items: ``item_id`` first, every other column as text; ids checked unique."""
    _require_columns(df.columns, [id_col], path)
    if df.height == 0:
        raise DataError("has no data rows: expected one item per row", file=path)
    ids = _ids(df[id_col], path)
    repeated = ~ids.is_first_distinct()
    if repeated.any():
        row = repeated.arg_true()[0]
        first = (ids == ids[row]).arg_true()[0]
        raise DataError(f"item id {ids[row]!r} repeats the item of row {first}: item ids must be unique",
                        file=path, column=id_col, row=row)
    text = [_text(df[c], path).alias(c) for c in df.columns if c != id_col]
    if "item_id" in (s.name for s in text):
        raise DataError(f"a text column is named 'item_id' but the id column is '{id_col}': rename one",
                        file=path, column="item_id")
    return pl.DataFrame([ids.alias("item_id"), *text])


def _ids(values: pl.Series, path: Path) -> pl.Series:
    """Ids as stripped strings; whole-number floats (pandas' nullable ints) lose their '.0'."""
    dtype = values.dtype
    if dtype.is_float():
        whole = values.is_null() | (values.is_finite() & (values == values.floor()))
        if not whole.all():
            row = (~whole).arg_true()[0]
            raise DataError(f"id {values[row]} is not a whole number: expected strings or integers",
                            file=path, column=values.name, row=row)
        values = values.cast(pl.Int64)
    elif not (dtype == pl.String or dtype.is_integer() or isinstance(dtype, (pl.Categorical, pl.Enum))):
        raise DataError(f"ids of type {dtype} are not supported: expected strings or integers",
                        file=path, column=values.name)
    ids = values.cast(pl.String).str.strip_chars()
    missing = ids.is_null() | (ids == "")
    if missing.any():
        raise DataError("missing id (null or empty)", file=path, column=values.name, row=missing.arg_true()[0])
    return ids


def _timestamps(values: pl.Series, path: Path) -> pl.Series:
    """Timestamps as int64 >= 0: integers as they are, floats floored, dates as epoch seconds.

    Strings are read as integers, else as decimals (RecBole writes ``978300760.0``), else as
    ISO-8601 dates / date-times.
    """
    dtype = values.dtype
    if dtype.is_integer():
        ts = values.cast(pl.Int64)
    elif dtype.is_float():
        ts = values.floor().cast(pl.Int64, strict=False)  # NaN and inf become null: reported below
    elif dtype == pl.Datetime or dtype == pl.Date:
        ts = values.dt.epoch("s")
    elif dtype == pl.String:
        text = values.str.strip_chars()
        ts = text.cast(pl.Int64, strict=False).fill_null(
            text.cast(pl.Float64, strict=False).floor().cast(pl.Int64, strict=False))
        if (ts.is_null() & (text != "")).any():
            try:
                ts = ts.fill_null(text.str.to_datetime(strict=False).dt.epoch("s"))
            except pl.exceptions.PolarsError:
                pass  # no date format fits: the rows stay null and the first one is reported
    else:
        raise DataError(f"timestamps of type {dtype} are not supported: expected integers or dates",
                        file=path, column=values.name)
    bad = ts.is_null()
    if bad.any():
        row = bad.arg_true()[0]
        value = values[row]
        what = ("missing timestamp (null or empty)" if value is None or str(value).strip() == ""
                else f"cannot read {value!r} as a timestamp")
        raise DataError(f"{what}: expected integer epoch seconds or an ISO-8601 date", file=path,
                        column=values.name, row=row)
    negative = ts < 0
    if negative.any():
        row = negative.arg_true()[0]
        raise DataError(f"negative timestamp {ts[row]}: expected epoch seconds >= 0", file=path,
                        column=values.name, row=row)
    return ts


def _ratings(values: pl.Series, path: Path) -> pl.Series:
    """Ratings as float64; empty or null stays null (no rating), anything else must be a number."""
    if values.dtype == pl.String:
        text = values.str.strip_chars()
        ratings = text.cast(pl.Float64, strict=False)
        bad = ratings.is_null() & (text != "")
        if bad.any():
            row = bad.arg_true()[0]
            raise DataError(f"cannot read {values[row]!r} as a rating: expected a number", file=path,
                            column=values.name, row=row)
        return ratings
    if not (values.dtype.is_numeric() or values.dtype == pl.Null):
        raise DataError(f"ratings of type {values.dtype} are not supported: expected numbers",
                        file=path, column=values.name)
    return values.cast(pl.Float64)


def _text(values: pl.Series, path: Path) -> pl.Series:
    """An item column as text: lists joined with ', ', whole floats without '.0'."""
    dtype = values.dtype
    if dtype == pl.String:
        return values
    if isinstance(dtype, pl.List) and (dtype.inner == pl.String or dtype.inner.is_numeric()):
        return values.cast(pl.List(pl.String)).list.join(", ")
    if dtype.is_float():
        whole = values.is_finite() & (values == values.floor())
        return (pl.select(pl.when(whole).then(values.cast(pl.Int64, strict=False).cast(pl.String))
                          .otherwise(values.cast(pl.String))).to_series())
    try:
        return values.cast(pl.String)
    except pl.exceptions.PolarsError:
        raise DataError(f"columns of type {dtype} cannot be item text: expected strings, numbers or "
                        "lists of them", file=path, column=values.name) from None


def _check_items_known(src: Source) -> None:
    """Every interaction's item must be in the item table; reports the first row that is not."""
    if "items" not in src.files:
        return  # the item table was made from the interactions
    unknown = src.interactions.filter(~pl.col("item_id").is_in(src.items["item_id"].implode()))
    if unknown.height:
        first = unknown.row(0, named=True)
        raise DataError(f"item id {first['item_id']!r} is not in the item table {src.files['items']} "
                        f"({unknown.height} interactions, {unknown['item_id'].n_unique()} distinct ids "
                        "missing)", file=src.files["interactions"], column=src.columns["item_id"],
                        row=first["order"])
