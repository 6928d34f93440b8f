"""Interaction and item tables from every supported data source, in one canonical shape.

``data.source`` picks the reader:

- ``ml-latest-small``: the MovieLens copy shipped in the package (:mod:`.embedded`).
- ``movielens``: a folder in an original GroupLens layout: ``ratings.csv`` + ``movies.csv``
  (+ optional ``tags.csv``) as in ml-latest, ml-latest-small, ml-20m and later; or ``ratings.dat`` +
  ``movies.dat`` (+ optional ``tags.dat``) as in ml-1m and ml-10m (``::``-separated, no header,
  latin-1 in ml-1m).
- ``recbole``: RecBole atomic files ``<name>.inter`` (+ optional ``<name>.item``) in a folder: TSV
  with typed headers such as ``user_id:token  item_id:token  rating:float  timestamp:float``.
- ``interactions``: one Parquet / CSV / TSV file of interactions (``data.path``) and optionally one
  of items (``data.items_path``), with the column names ``data.user_col``, ``data.item_col``,
  ``data.time_col``; a column named ``rating``, when present, is the rating.

Every reader checks its input and raises :class:`DataError` naming the file, the column and the
0-based data row (header not counted) at fault. Ids are compared as strings (``"31"`` in a CSV
and ``31`` in a Parquet file are the same movie).

Example::

    src = load_source(DataConfig(source="movielens", path="data/ml-1m"))
    src.interactions.columns  # ['order', 'user_id', 'item_id', 'timestamp', 'rating']
    src.items.columns         # ['item_id', 'title', 'genres', 'tags']
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..stages import fingerprint_path
from .embedded import embedded_path

# MovieLens marks a movie without genres with this placeholder; it is a missing value, not a genre
_NO_GENRES = "(no genres listed)"
# ``::`` is two characters and polars splits on one byte: the .dat readers swap it for this control
# character, which cannot occur in MovieLens text
_DAT_SEPARATOR = "\x1f"
_DAT_COLUMNS = {
    "ratings.dat": ["UserID", "MovieID", "Rating", "Timestamp"],
    "movies.dat": ["MovieID", "Title", "Genres"],
    "tags.dat": ["UserID", "MovieID", "Tag", "Timestamp"],
}
_TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": ",", ".tsv": "\t", ".tab": "\t"}


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
        files: every file read, by role: ``interactions``, and ``items`` / ``tags`` when read.
        columns: canonical interaction column -> its name in ``files["interactions"]``, for error
            messages; ``rating`` is present only when the source has ratings.
        description: one line saying what was read.
    """

    interactions: pl.DataFrame
    items: pl.DataFrame
    files: dict[str, Path]
    columns: dict[str, str]
    description: str


def load_source(cfg: DataConfig) -> Source:
    """Read and check the source that ``cfg`` names; see the module docstring for the layouts."""
    layout, files = _locate(cfg)
    src = _READERS[layout](cfg, files, layout)
    _check_items_known(src)
    return src


def source_inputs(cfg: DataConfig) -> dict[str, str]:
    """``{role: fingerprint}`` of every file :func:`load_source` reads for ``cfg`` (for manifests)."""
    _, files = _locate(cfg)
    return {role: fingerprint_path(path) for role, path in files.items()}


# ----------------------------------------------------------------------------- locating files

def _locate(cfg: DataConfig) -> tuple[str, dict[str, Path]]:
    """The layout name and the files to read, by role; raises if a required one is missing."""
    if cfg.source == "ml-latest-small":
        folder = embedded_path()
        return "embedded", {"interactions": _file(folder / "ratings.parquet"),
                            "items": _file(folder / "movies.parquet"), "tags": _file(folder / "tags.parquet")}
    if cfg.source == "movielens":
        folder = _folder(cfg, "a MovieLens folder (ratings.csv + movies.csv, or ratings.dat + movies.dat)")
        for ext in ("csv", "dat"):
            if (folder / f"ratings.{ext}").is_file():
                files = {"interactions": folder / f"ratings.{ext}", "items": _file(folder / f"movies.{ext}")}
                if (folder / f"tags.{ext}").is_file():
                    files["tags"] = folder / f"tags.{ext}"
                return f"movielens-{ext}", files
        raise DataError("no MovieLens ratings: expected ratings.csv + movies.csv (ml-latest, ml-20m) or "
                        f"ratings.dat + movies.dat (ml-1m); found: {_listing(folder)}", file=folder)
    if cfg.source == "recbole":
        folder = _folder(cfg, "a folder of RecBole atomic files (<name>.inter, <name>.item)")
        named = folder / f"{folder.name}.inter"
        found = sorted(folder.glob("*.inter"))
        if named.is_file():
            inter = named
        elif len(found) == 1:
            inter = found[0]
        else:
            raise DataError(f"expected one <name>.inter file (or {named.name}); found: {_listing(folder)}",
                            file=folder)
        files = {"interactions": inter}
        if inter.with_suffix(".item").is_file():
            files["items"] = inter.with_suffix(".item")
        return "recbole", files
    if cfg.source == "interactions":
        if cfg.path is None:
            raise ConfigError("data.path: required for data.source=interactions (a Parquet or CSV file)")
        files = {"interactions": _file(Path(cfg.path))}
        if cfg.items_path is not None:
            files["items"] = _file(Path(cfg.items_path))
        return "interactions", files
    raise ConfigError(f"data.source: unknown source {cfg.source!r}")


def _folder(cfg: DataConfig, what: str) -> Path:
    if cfg.path is None:
        raise ConfigError(f"data.path: required for data.source={cfg.source} ({what})")
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"{'is not a folder' if folder.exists() else 'does not exist'}: expected {what}",
                        file=folder)
    return folder


def _file(path: Path) -> Path:
    if not path.is_file():
        raise DataError("is not a file" if path.exists() else "does not exist", file=path)
    return path


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"


# ----------------------------------------------------------------------------- reading files

def _read_table(path: Path, required: list[str], optional: list[str] = (), everything: bool = False
                ) -> pl.DataFrame:
    """The ``required`` and present ``optional`` columns (or, with ``everything``, all columns) of a
    Parquet / CSV / TSV file, chosen by suffix.

    CSV fields are read as strings and typed later, so that ids keep their exact text ("007").
    """
    kind = _TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unknown file type {path.suffix!r}: expected {', '.join(_TABLE_SUFFIXES)}", file=path)
    try:
        if kind == "parquet":
            frame = pl.scan_parquet(path)
        else:
            # empty fields stay "" here: a missing id is reported as such, text renders it as ""
            frame = pl.scan_csv(path, separator=kind, infer_schema=False, empty_string_is_null=False)
        names = frame.collect_schema().names()
        _require_columns(names, required, path)
        keep = names if everything else [*required, *(c for c in optional if c in names and c not in required)]
        # projection pushdown: a wide interactions file costs only the columns used
        return frame.select(keep).collect()
    except pl.exceptions.NoDataError:
        raise DataError("is empty: expected a header and data rows", file=path) from None
    except (pl.exceptions.PolarsError, OSError) as e:
        what = "Parquet" if kind == "parquet" else "CSV"
        raise DataError(f"cannot be read as {what}: {_first_line(e)}", file=path) from None


def _read_dat(path: Path) -> pl.DataFrame:
    """A MovieLens ``.dat`` file (``::``-separated, no header) with the GroupLens column names."""
    names = _DAT_COLUMNS[path.name]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # ml-1m: titles such as "Misérables, Les (1995)"
    if _DAT_SEPARATOR in text:
        row = text.count("\n", 0, text.index(_DAT_SEPARATOR))
        raise DataError("contains the control character \\x1f: not a MovieLens .dat file", file=path, row=row)
    try:
        return pl.read_csv(io.BytesIO(text.replace("::", _DAT_SEPARATOR).encode()), has_header=False,
                           separator=_DAT_SEPARATOR, quote_char=None, schema={n: pl.String for n in names},
                           empty_string_is_null=False)
    except pl.exceptions.NoDataError:
        raise DataError("is empty: expected one '::'-separated record per line", file=path) from None
    except pl.exceptions.PolarsError as e:
        raise DataError(f"is not a MovieLens .dat file with fields {'::'.join(names)}: {_first_line(e)}",
                        file=path) from None


def _read_recbole(path: Path) -> pl.DataFrame:
    """A RecBole atomic file, all fields as strings, typed headers (``item_id:token``) kept."""
    try:
        # RecBole files are unquoted TSV: a '"' inside a title is text, not a quote
        return pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False, empty_string_is_null=False)
    except pl.exceptions.NoDataError:
        raise DataError("is empty: expected a typed header such as user_id:token", file=path) from None
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot be read as a RecBole atomic file (TSV): {_first_line(e)}", file=path) from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _require_columns(names: list[str], required: list[str], path: Path) -> None:
    for col in required:
        if col not in names:
            raise DataError(f"missing required column; columns found: {', '.join(names) or 'none'}",
                            file=path, column=col)


# ----------------------------------------------------------------------------- canonical tables

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


# ----------------------------------------------------------------------------- the readers

def _movielens(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """MovieLens ratings, movies (title, genres) and the movies' distinct user tags."""
    dat = layout == "movielens-dat"
    user, movie, rating, time, title, genres, tag = (
        ("UserID", "MovieID", "Rating", "Timestamp", "Title", "Genres", "Tag") if dat
        else ("userId", "movieId", "rating", "timestamp", "title", "genres", "tag"))  # CSV, embedded Parquet

    def read(role: str, columns: list[str]) -> pl.DataFrame:
        return _read_dat(files[role]).select(columns) if dat else _read_table(files[role], columns)

    cols = {"user_id": user, "item_id": movie, "timestamp": time, "rating": rating}
    interactions = _interactions(read("interactions", list(cols.values())), files["interactions"], cols)
    items = (_items(read("items", [movie, title, genres]), files["items"], movie)
             .rename({title: "title", genres: "genres"})
             .with_columns(pl.when(pl.col("genres") == _NO_GENRES).then(pl.lit(""))
                           .otherwise(pl.col("genres").str.split("|").list.join(", ")).alias("genres")))
    if "tags" in files:
        tags = _tag_lists(read("tags", [movie, tag]), files["tags"], movie, tag)
    else:
        tags = pl.DataFrame(schema={"item_id": pl.String, "tags": pl.String})
    # tags of movies missing from the movie table have no item to describe and are left out
    items = (items.join(tags, on="item_id", how="left", maintain_order="left")
             .with_columns(pl.col("tags").fill_null("")))
    where = ("MovieLens ml-latest-small (embedded in alphafuse_dist)" if layout == "embedded"
             else f"MovieLens {'.dat' if dat else 'CSV'} files in {files['interactions'].parent}")
    return Source(interactions, items, files, cols, where)


def _tag_lists(tags: pl.DataFrame, path: Path, id_col: str, tag_col: str) -> pl.DataFrame:
    """``item_id:str``, ``tags:str``: each item's distinct non-empty tags, first-seen order, ', '-joined."""
    return (pl.DataFrame([_ids(tags[id_col], path).alias("item_id"),
                          tags[tag_col].cast(pl.String).str.strip_chars().alias("tag")])
            .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
            .group_by("item_id", maintain_order=True)
            .agg(pl.col("tag").unique(maintain_order=True).str.join(", ").alias("tags")))


def _recbole(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """RecBole ``.inter`` (+ ``.item``); ``data.user_col`` etc. name the fields (RecBole's defaults).

    Item fields become text: ``*_seq`` fields and ``genre`` (a space-separated list in the ML-1M
    copy even where typed ``token``) are ', '-joined; ``movie_title`` + ``release_year`` become
    ``title`` = "Title (Year)" as in MovieLens, plus ``year``.
    """
    inter = _read_recbole(files["interactions"])
    typed = {c.split(":", 1)[0]: c for c in inter.columns}
    cols = {"user_id": cfg.user_col, "item_id": cfg.item_col, "timestamp": cfg.time_col}
    if "rating" in typed:
        cols["rating"] = "rating"
    cols = {k: typed.get(v, v) for k, v in cols.items()}  # "user_id" -> "user_id:token"
    interactions = _interactions(inter, files["interactions"], cols)
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, cols,
                      f"RecBole atomic file {files['interactions']} (no .item file)")
    raw = _read_recbole(files["items"])
    typed_items = {c.split(":", 1)[0]: c for c in raw.columns}
    items = _items(raw, files["items"], typed_items.get(cfg.item_col, cfg.item_col))
    bare = {c: c.split(":", 1)[0] for c in items.columns[1:]}
    items = items.rename(bare).with_columns(
        pl.col(name).str.extract_all(r"\S+").list.join(", ")
        for header, name in bare.items() if header.endswith("_seq") or name in ("genre", "genres"))
    if "movie_title" in items.columns and "release_year" in items.columns:
        year = pl.col("release_year").str.strip_chars().str.replace(r"\.0+$", "")
        items = items.with_columns(
            pl.when(year != "").then(pl.format("{} ({})", pl.col("movie_title"), year))
            .otherwise(pl.col("movie_title")).alias("movie_title"),
            year.alias("release_year"))
    names = {"movie_title": "title", "release_year": "year", "genre": "genres"}
    items = items.rename({k: v for k, v in names.items() if k in items.columns and v not in items.columns})
    return Source(interactions, items, files, cols,
                  f"RecBole atomic files {files['interactions']} + {files['items'].name}")


def _generic(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """An interactions table with configurable column names and an optional item table."""
    path = files["interactions"]
    cols = {"user_id": cfg.user_col, "item_id": cfg.item_col, "timestamp": cfg.time_col}
    df = _read_table(path, list(cols.values()), optional=["rating"])
    if "rating" in df.columns and "rating" not in cols.values():
        cols["rating"] = "rating"
    interactions = _interactions(df, path, cols)
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, cols, f"interactions {path} (no item file)")
    items = _items(_read_table(files["items"], [cfg.item_col], everything=True), files["items"], cfg.item_col)
    return Source(interactions, items, files, cols, f"interactions {path}, items {files['items']}")


def _ids_only(interactions: pl.DataFrame) -> pl.DataFrame:
    """The item table of a source without one: its distinct item ids, no text columns."""
    return interactions.select(pl.col("item_id").unique(maintain_order=True))


_READERS = {"embedded": _movielens, "movielens-csv": _movielens, "movielens-dat": _movielens,
            "recbole": _recbole, "interactions": _generic}
