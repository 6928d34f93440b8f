"""One builder per source layout: MovieLens (CSV, ``.dat``, ml-100k), RecBole, UniSRec, a generic
interactions file, and the Amazon review releases. Each reads its layout's files with :mod:`.readers`
and returns a checked :class:`.columns.Source`; :mod:`.sources` finds the files and picks the builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..config import DataConfig
from ..errors import DataError
from .columns import Source, _ids, _interactions, _items, _require_columns, _text
from .readers import _read_dat, _read_headerless, _read_json_lines, _read_recbole, _read_table

# MovieLens marks a movie without genres with this placeholder; it is a missing value, not a genre
_NO_GENRES = "(no genres listed)"
# ml-100k's 19 genre flag columns, in file order, for a copy without ``u.genre``
_ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")
# ml-100k's u.item fields before the genre flags (names from the ml-100k README)
_ML100K_ITEM_FIELDS = ["movie id", "movie title", "release date", "video release date", "IMDb URL"]


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


def _movielens_100k(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """ml-100k: ``u.data`` ratings and ``u.item`` movies with their genre flags, as MovieLens items.

    ``u.data``: tab-separated user id, item id, rating, timestamp; no header. ``u.item``:
    '|'-separated, latin-1: movie id, title, release date, video release date, IMDb URL, then one
    0/1 flag per genre, named by ``u.genre`` (``name|index`` lines) or else the standard 19. Items
    get the columns of the other MovieLens layouts: ``title``, ``genres`` (the flagged genres,
    ', '-joined; "unknown" is a missing value) and ``tags`` (``""``: ml-100k has none).
    """
    cols = {"user_id": "user id", "item_id": "item id", "rating": "rating", "timestamp": "timestamp"}
    ratings = _read_headerless(files["interactions"], "\t", list(cols.values()), "an ml-100k u.data file")
    interactions = _interactions(ratings, files["interactions"], cols)
    genres = _ml100k_genres(files["genres"]) if "genres" in files else list(_ML100K_GENRES)
    path = files["items"]
    raw = _read_headerless(path, "|", _ML100K_ITEM_FIELDS + genres, "an ml-100k u.item file")
    for genre in genres:
        bad = ~raw[genre].is_in(["0", "1"])
        if bad.any():
            row = bad.arg_true()[0]
            raise DataError(f"genre flag {raw[genre][row]!r} is not 0 or 1", file=path, column=genre, row=row)
    flagged = pl.concat_list(pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in genres if g != "unknown")
    items = (_items(raw.select("movie id", "movie title"), path, "movie id")
             .rename({"movie title": "title"})
             .with_columns(raw.select(flagged.list.drop_nulls().list.join(", ").alias("genres")).to_series(),
                           pl.lit("").alias("tags")))
    return Source(interactions, items, files, cols, f"MovieLens ml-100k files in {files['interactions'].parent}")


def _ml100k_genres(path: Path) -> list[str]:
    """Genre names in flag order from ``u.genre`` (``Action|1`` lines, indices 0, 1, ... in any order)."""
    table = _read_headerless(path, "|", ["genre", "index"], "an ml-100k u.genre file (name|index lines)")
    index = table["index"].str.strip_chars().cast(pl.Int64, strict=False)
    if index.is_null().any() or sorted(index) != list(range(table.height)):
        row = index.is_null().arg_true()[0] if index.is_null().any() else None
        raise DataError(f"genre indices must be 0..{table.height - 1}, each once", file=path, column="index", row=row)
    return table["genre"].str.strip_chars().gather(index.arg_sort()).to_list()


def _tag_lists(tags: pl.DataFrame, path: Path, id_col: str, tag_col: str) -> pl.DataFrame:
    """``item_id:str``, ``tags:str``: each item's distinct non-empty tags, first-seen order, ', '-joined."""
    return (pl.DataFrame([_ids(tags[id_col], path).alias("item_id"),
                          tags[tag_col].cast(pl.String).str.strip_chars().alias("tag")])
            .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
            .group_by("item_id", maintain_order=True)
            .agg(pl.col("tag").unique(maintain_order=True).str.join(", ").alias("tags")))


def _recbole(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """RecBole ``.inter`` (+ ``.item``); ``data.user_col`` etc. name the fields (RecBole's defaults).

    Item fields become text: list fields (``genre``, ``genres``, ``categories``, ``tags``: space-
    separated, in the ML-1M copy even where typed ``token``; or quoted elements as Python writes a
    list, ``'Beauty', 'Skin Care', "Women's"``, in the Amazon copies) are ', '-joined; other ``*_seq``
    fields (e.g. a title typed ``token_seq``) keep their words, single-spaced; ``movie_title`` +
    ``release_year`` become ``title`` = "Title (Year)" as in MovieLens, plus ``year``.
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
    lists = ("genre", "genres", "categories", "tags")
    items = items.rename(bare).with_columns(
        _list_text(name) if name in lists else pl.col(name).str.extract_all(r"\S+").list.join(" ")
        for header, name in bare.items() if header.endswith("_seq") or name in lists)
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


def _list_text(name: str) -> pl.Expr:
    """A list field as "a, b, c": its quoted elements ('Skin Care', "Women's") when it begins with
    a quote, else its space-separated words."""
    value = pl.col(name)
    quoted = value.str.extract_all(r"'[^']*'|\"[^\"]*\"").list.eval(
        pl.element().str.replace(r"(?s)^.(.*).$", "${1}").str.strip_chars())
    words = value.str.extract_all(r"\S+")
    return (pl.when(value.str.strip_chars_start().str.contains(r"^['\"]")).then(quoted).otherwise(words)
            .list.join(", ").alias(name))


def _unisrec(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """UniSRec's downstream files (Amazon 2018 categories such as Scientific, Office, Pantry).

    ``<name>.test.inter`` has one row per user: ``user_id:token``, ``item_id_list:token_seq`` (the
    history, space-separated item indices, at most its last 50 items in UniSRec's preprocessing)
    and ``item_id:token`` (the last item). ``<name>.item2index`` maps raw item ids to those indices
    (``<id><TAB><index>``, no header); ``<name>.text`` holds ``item_id:token`` (raw id) and
    ``text:token_seq`` (title, categories and brand in one string), which becomes the ``text``
    column. A user's sequence is its history then its last item; there are no times, so the
    timestamps are the positions 0, 1, ... (they keep the order, which is all a split needs).
    """
    path, index_path = files["interactions"], files["item_index"]
    fields = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
    rows = _read_recbole(path)
    _require_columns(rows.columns, fields, path)
    if rows.height == 0:
        raise DataError("has no data rows: expected one user per row", file=path)
    index = _read_headerless(index_path, "\t", ["item_id", "index"], "a UniSRec item2index file (item id, index)")
    index = index.with_columns(pl.col("index").str.strip_chars())
    if index["index"].is_duplicated().any():
        row = index["index"].is_duplicated().arg_true()[0]
        raise DataError(f"index {index['index'][row]!r} is given to two items", file=index_path, column="index",
                        row=row)
    long = (rows.select(pl.int_range(0, rows.height).alias("row"), pl.col(fields[0]).alias("user_id"),
                        pl.concat_list(pl.col(fields[1]).fill_null("").str.extract_all(r"\S+"),
                                       pl.col(fields[2]).str.strip_chars()).alias("index"))
            .with_columns(pl.col("index").list.eval(pl.int_range(pl.len())).alias("timestamp"))
            .explode(["index", "timestamp"])
            .join(index, on="index", how="left", maintain_order="left"))
    unknown = long.filter(pl.col("item_id").is_null())
    if unknown.height:
        raise DataError(f"item index {unknown['index'][0]!r} is not in {index_path.name}", file=path,
                        column=f"{fields[1]} / {fields[2]}", row=int(unknown["row"][0]))
    cols = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"}
    interactions = _interactions(long.select("user_id", "item_id", "timestamp"), path, cols)
    raw = _read_recbole(files["items"])
    items = _items(raw, files["items"], "item_id:token")
    items = items.rename({c: c.split(":", 1)[0] for c in items.columns[1:]})
    named = {"user_id": fields[0], "item_id": fields[1], "timestamp": fields[1]}  # for error messages
    return Source(interactions, items, files, named,
                  f"UniSRec files {path} + {index_path.name} + {files['items'].name}")


def _rechorus(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """ReChorus' layout (as in the LRD repository's Amazon Office set): ``train.csv``, ``dev.csv``
    and ``test.csv``, tab-separated despite the suffix, with the header ``user_id item_id time``
    (dev and test add ``neg_items``, sampled negatives that are not read); dev and test hold each
    user's last two interactions. The rows are read in that order (train, dev, test), so a tie in
    ``time`` keeps a user's dev and test items last. Item text, when the folder has it:
    ``<name>.item2index`` (raw item id, the files' item_id; no header) and ``<name>.text`` (header
    ``id text``), keyed by the raw id; without them the items have ids only.
    """
    cols = {"user_id": "user_id", "item_id": "item_id", "timestamp": "time"}
    # each file checked on its own (errors name it and its row), then one order over all three
    parts = [_interactions(_read_recbole(files[role], "a ReChorus interactions file"), files[role], cols)
             for role in ("interactions", "valid", "test")]
    interactions = pl.concat(parts).with_columns(pl.int_range(0, pl.len(), dtype=pl.Int64).alias("order"))
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, cols, f"ReChorus files {files['interactions'].parent}")
    index_path = files["item_index"]
    index = _read_headerless(index_path, "\t", ["raw_id", "item_id"], "an item2index file (raw item id, index)")
    index = index.with_columns(pl.col("item_id").str.strip_chars())
    text = _read_recbole(files["items"], "an item text file (id, text)")
    _require_columns(text.columns, ["id", "text"], files["items"])
    text = _items(text.select("id", "text"), files["items"], "id")  # a repeated id is named in this file
    named = index.join(text.rename({"item_id": "raw_id"}), on="raw_id", how="left", maintain_order="left")
    missing = named.filter(pl.col("text").is_null())
    if missing.height:
        raise DataError(f"item {missing['raw_id'][0]!r} has no row in {files['items'].name}", file=index_path,
                        column="raw_id", row=int(named["text"].is_null().arg_true()[0]))
    items = _items(named.select("item_id", "raw_id", "text"), index_path, "item_id")
    return Source(interactions, items, files, cols,
                  f"ReChorus files {files['interactions'].parent} + {index_path.name} + {files['items'].name}")


def _generic(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """An interactions table with configurable column names and an optional item table."""
    path = files["interactions"]
    cols = {"user_id": cfg.user_col, "item_id": cfg.item_col, "timestamp": cfg.time_col}
    df = _read_table(path, list(cols.values()), optional=[cfg.rating_col])
    if cfg.rating_col in df.columns and cfg.rating_col not in cols.values():
        cols["rating"] = cfg.rating_col
    interactions = _interactions(df, path, cols)
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, cols, f"interactions {path} (no item file)")
    id_col = cfg.items_id_col or cfg.item_col
    items = _items(_read_table(files["items"], [id_col], everything=True), files["items"], id_col)
    return Source(interactions, items, files, cols, f"interactions {path}, items {files['items']}")


def _ids_only(interactions: pl.DataFrame) -> pl.DataFrame:
    """The item table of a source without one: its distinct item ids, no text columns."""
    return interactions.select(pl.col("item_id").unique(maintain_order=True))


@dataclass(frozen=True)
class _AmazonRelease:
    """Where one Amazon reviews release keeps what :class:`Source` needs.

    Attributes:
        reviews: canonical interaction column -> review field.
        units_per_second: review timestamps count seconds (1) or milliseconds (1000).
        meta_id: the meta field holding the item id that ``reviews["item_id"]`` refers to.
        meta: meta field -> its polars type as read; lists become text below.
        text: item text column -> ``(meta field, separator joining a list, or None)``.
        literal_meta: meta lines may be Python literal dicts instead of JSON.
    """

    reviews: dict[str, str]
    units_per_second: int
    meta_id: str
    meta: dict[str, pl.DataType]
    text: dict[str, tuple[str, str | None]]
    literal_meta: bool = False


_OLD_REVIEWS = {"user_id": "reviewerID", "item_id": "asin", "timestamp": "unixReviewTime", "rating": "overall"}
_AMAZON = {
    "amazon2014": _AmazonRelease(
        _OLD_REVIEWS, 1, "asin",
        {"asin": pl.String, "title": pl.String, "brand": pl.String,
         "categories": pl.List(pl.List(pl.String)), "description": pl.String, "price": pl.Float64},
        {"title": ("title", None), "brand": ("brand", None), "categories": ("categories", ", "),
         "description": ("description", None), "price": ("price", None)},
        literal_meta=True),
    # 2018 descriptions are a list of paragraphs on most lines and a plain string on some: read as
    # text, the lists are decoded below
    "amazon2018": _AmazonRelease(
        _OLD_REVIEWS, 1, "asin",
        {"asin": pl.String, "title": pl.String, "brand": pl.String, "category": pl.List(pl.String),
         "description": pl.String, "feature": pl.List(pl.String)},
        {"title": ("title", None), "brand": ("brand", None), "categories": ("category", ", "),
         "description": ("description", " "), "features": ("feature", ", ")}),
    # 2023: ratings of variants (asin) count for their product (parent_asin), the unit meta files
    # describe; ``details`` (a free-form dict of specifications) is not item text and is skipped
    "amazon2023": _AmazonRelease(
        {"user_id": "user_id", "item_id": "parent_asin", "timestamp": "timestamp", "rating": "rating"},
        1000, "parent_asin",
        {"parent_asin": pl.String, "title": pl.String, "store": pl.String, "main_category": pl.String,
         "categories": pl.List(pl.String), "description": pl.List(pl.String), "features": pl.List(pl.String)},
        {"title": ("title", None), "brand": ("store", None), "categories": ("categories", ", "),
         "description": ("description", " "), "features": ("features", ", "),
         "main_category": ("main_category", None)}),
}


def _amazon(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """Amazon reviews (one JSON object per line) and, when given, the products' meta file.

    Items: ``item_id`` then ``title``, ``brand`` (2023: the store), ``categories`` (', '-joined;
    2014's list of category paths flattened, each name once), ``description`` (paragraphs
    space-joined), and ``price`` (2014) or ``features`` (2018, 2023; ', '-joined) and
    ``main_category`` (2023). A product listed twice in the meta file (the 2018 files repeat some)
    keeps its first line; a reviewed product missing from it gets null text. Row numbers in errors
    count non-blank lines from 0.
    """
    release = _AMAZON[layout]
    path = files["interactions"]
    reviews = _read_json_lines(path, {field: pl.String for field in release.reviews.values()})
    interactions = _interactions(reviews, path, release.reviews)
    if release.units_per_second != 1:
        interactions = interactions.with_columns(pl.col("timestamp") // release.units_per_second)
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, release.reviews,
                      f"Amazon reviews {path} (no meta file)")
    meta_path = files["items"]
    meta = _read_json_lines(meta_path, release.meta, literal_dicts=release.literal_meta)
    text = [_amazon_text(meta[field], sep, meta_path).alias(name) for name, (field, sep) in release.text.items()]
    first = _ids(meta[release.meta_id], meta_path).is_first_distinct()
    items = _items(pl.DataFrame([meta[release.meta_id], *text]).filter(first), meta_path, release.meta_id)
    # every item_id must be in the item table: reviewed products without meta get null text
    unlisted = interactions.select(pl.col("item_id").unique(maintain_order=True)).filter(
        ~pl.col("item_id").is_in(items["item_id"].implode()))
    items = pl.concat([items, unlisted], how="diagonal")
    return Source(interactions, items, files, release.reviews, f"Amazon reviews {path}, meta {meta_path}")


def _amazon_text(values: pl.Series, separator: str | None, path: Path) -> pl.Series:
    """An Amazon meta field as item text: lists (of lists) joined by ``separator``, each entry once
    for nested lists; a ``String`` field holding JSON lists (2018 descriptions) decoded first."""
    if separator is None:
        return _text(values, path)
    if values.dtype == pl.String:
        # polars writes a JSON list read into a String field as '["a", "b"]'
        listed = values.str.contains(r'^\[\s*(".*")?\s*\]$')
        if not listed.any():
            return values
        try:
            joined = values.filter(listed).str.json_decode(pl.List(pl.String)).list.join(separator)
        except pl.exceptions.PolarsError:
            return values  # a plain description that only looks like a JSON list stays as written
        return values.clone().scatter(listed.arg_true(), joined)
    if isinstance(values.dtype.inner, pl.List):
        values = values.list.eval(pl.element().list.explode(keep_nulls=False, empty_as_null=False)
                                  ).list.unique(maintain_order=True)
    return values.list.join(separator)
