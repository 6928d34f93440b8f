"""The data layer: every source layout, the prepare stage's numbers, and one error per bad input.

Most tests use one hand-made data set (``RATINGS``) written in each original layout, whose
expected sequences are worked out by hand below.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from alphafuse_dist.config import DataConfig, load_config
from alphafuse_dist.data.embedded import build_embedded, embedded_path
from alphafuse_dist.data.prepare import SCHEMAS, prepare
from alphafuse_dist.data.sources import load_source, source_inputs
from alphafuse_dist.errors import ConfigError, DataError

# (user, movie, rating, timestamp), in file order. Worked out by hand:
# - user 1: (20, t50), (10, t100, row 0), (30, t100, row 3) -> the t100 tie keeps file order
#   -> [20, 10, 30, 40, 50]
# - user 2: row 8 repeats row 6 exactly (dropped) -> [20 (t5), 30 (t10, row 2), 10 (t10, row 4)]
# - user 3: two interactions -> dropped (min_user_interactions = 3)
# - user 10: three interactions at the same second -> file order [50, 40, 30]
# Ids sort as strings: items "10" "20" "30" "40" "50" -> 0..4 (movie 60 is never rated);
# users "1" "10" "2" -> 0..2.
RATINGS = [
    (1, 10, 4.0, 100), (1, 20, 3.0, 50), (2, 30, 5.0, 10), (1, 30, 2.0, 100), (2, 10, 1.0, 10),
    (3, 10, 4.0, 7), (2, 20, 3.0, 5), (1, 40, 4.5, 200), (2, 20, 3.0, 5), (10, 50, 4.0, 1),
    (10, 40, 3.0, 1), (3, 20, 4.0, 8), (10, 30, 2.0, 1), (1, 50, 5.0, 300),
]
MOVIES = [
    (10, "Misérables, Les (1995)", "Drama|Musical"),
    (20, "Star Wars: Episode IV - A New Hope (1977)", "Action|Sci-Fi"),
    (30, 'Say "Anything" (1989)', "Comedy"),
    (40, "American President, The (1995)", "(no genres listed)"),
    (50, "Heat (1995)", "Crime"),
    (60, "Never Rated (2000)", "Drama"),
]
TAGS = [(1, 10, "musical", 5), (2, 10, " Hugo ", 6), (3, 10, "musical", 7), (1, 50, "heist", 8)]
SEQUENCES = {0: [1, 0, 2, 3, 4], 1: [4, 3, 2], 2: [1, 2, 0]}  # user_idx -> item_idx, time order
POPULARITY = [1, 2, 1, 0, 1]  # training interactions per item_idx


def write_movielens_csv(folder: Path, ratings=RATINGS, tags=TAGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in ratings))
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f'{m},"{title.replace(chr(34), chr(34) * 2)}",{g}\n' for m, title, g in MOVIES))
    if tags is not None:
        (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n"
                                         + "".join(f"{u},{m},{tag},{t}\n" for u, m, tag, t in tags))
    return folder


def write_movielens_dat(folder: Path) -> Path:
    """The ml-1m layout: '::'-separated, no header, latin-1, integer ratings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_bytes("".join(f"{u}::{m}::{r:g}::{t}\n" for u, m, r, t in RATINGS).encode("latin-1"))
    (folder / "movies.dat").write_bytes("".join(f"{m}::{title}::{g}\n" for m, title, g in MOVIES).encode("latin-1"))
    return folder


def write_recbole(folder: Path) -> Path:
    """RecBole atomic files; float timestamps and a space-separated genre field as in the ML-1M copy."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{folder.name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{m}\t{r}\t{t}.0\n" for u, m, r, t in RATINGS))
    (folder / f"{folder.name}.item").write_text(
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        + "".join(f"{m}\t{title[:-7]}\t{title[-5:-1]}\t{g.replace('|', ' ')}\n" for m, title, g in MOVIES))
    return folder


def generic_frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    """The data set with renamed columns (uid, iid, ts, rating) and an item table keyed by 'iid'."""
    inter = pl.DataFrame(RATINGS, schema=["uid", "iid", "rating", "ts"], orient="row")
    items = pl.DataFrame(MOVIES, schema=["iid", "name", "kind"], orient="row").with_columns(
        year=pl.Series([1995, 1977, 1989, 1995, 1995, 2000]))
    return inter, items


def generic_cfg(inter: Path, items: Path | None, **kw) -> DataConfig:
    return DataConfig(source="interactions", path=str(inter), items_path=items and str(items),
                      user_col="uid", item_col="iid", time_col="ts", **kw)


def data_error(message: str):
    """``pytest.raises`` for a :class:`DataError` whose text contains ``message`` literally."""
    return pytest.raises(DataError, match=re.escape(message))


def read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / f"{name}.parquet")


def assert_split(out: Path) -> None:
    """The hand-worked sequences, split and popularity of RATINGS."""
    train, valid, test = read(out, "train"), read(out, "valid"), read(out, "test")
    for u, seq in SEQUENCES.items():
        assert train.row(u) == (u, seq[:-2])
        assert valid.row(u) == (u, seq[:-2], seq[-2])
        assert test.row(u) == (u, seq[:-1], seq[-1])
    items = read(out, "items")
    assert items["item_idx"].to_list() == [0, 1, 2, 3, 4]
    assert items["item_id"].to_list() == ["10", "20", "30", "40", "50"]
    assert items["popularity"].to_list() == POPULARITY
    assert read(out, "users")["user_id"].to_list() == ["1", "10", "2"]


# ----------------------------------------------------------------------------- sources

def test_movielens_csv_with_tags(tmp_path):
    src = load_source(DataConfig(source="movielens", path=str(write_movielens_csv(tmp_path / "ml"))))
    assert src.interactions.schema == pl.Schema({"order": pl.Int64, "user_id": pl.String, "item_id": pl.String,
                                                 "timestamp": pl.Int64, "rating": pl.Float64})
    assert src.interactions["order"].to_list() == list(range(len(RATINGS)))
    assert src.interactions["rating"].to_list() == [r for _, _, r, _ in RATINGS]
    items = {row["item_id"]: row for row in src.items.to_dicts()}
    assert items["10"] == {"item_id": "10", "title": "Misérables, Les (1995)", "genres": "Drama, Musical",
                           "tags": "musical, Hugo"}
    assert items["30"]["title"] == 'Say "Anything" (1989)'
    assert items["40"]["genres"] == ""  # "(no genres listed)" is a missing value
    assert items["20"]["tags"] == ""
    assert set(src.files) == {"interactions", "items", "tags"}
    assert set(source_inputs(DataConfig(source="movielens", path=str(tmp_path / "ml")))) == {
        "interactions", "items", "tags"}


def test_movielens_dat_latin1(tmp_path):
    folder = write_movielens_dat(tmp_path / "ml-1m")
    src = load_source(DataConfig(source="movielens", path=str(folder)))
    titles = dict(zip(src.items["item_id"], src.items["title"]))
    assert titles["10"] == "Misérables, Les (1995)"
    assert titles["20"] == "Star Wars: Episode IV - A New Hope (1977)"
    assert src.items.filter(pl.col("item_id") == "20")["genres"].item() == "Action, Sci-Fi"
    assert src.items["tags"].to_list() == [""] * len(MOVIES)  # ml-1m has no tags
    assert src.columns["item_id"] == "MovieID"
    with pytest.raises(UnicodeDecodeError):  # the fixture really is latin-1, as ml-1m is
        (folder / "movies.dat").read_bytes().decode("utf-8")
    prepare(DataConfig(source="movielens", path=str(folder)), tmp_path / "out")
    assert_split(tmp_path / "out")
    (folder / "tags.dat").write_text("1::10::musical::5\n2::50::heist::6\n")  # the ml-10m layout
    tags = load_source(DataConfig(source="movielens", path=str(folder))).items.select("item_id", "tags")
    assert tags.filter(pl.col("tags") != "").rows() == [("10", "musical"), ("50", "heist")]


def test_recbole_atomic_files(tmp_path):
    folder = write_recbole(tmp_path / "ml-1m")
    src = load_source(DataConfig(source="recbole", path=str(folder)))
    item = src.items.filter(pl.col("item_id") == "10").row(0, named=True)
    assert item == {"item_id": "10", "title": "Misérables, Les (1995)", "year": "1995", "genres": "Drama, Musical"}
    assert src.columns["timestamp"] == "timestamp:float"
    assert src.interactions["timestamp"].to_list() == [t for *_, t in RATINGS]
    prepare(DataConfig(source="recbole", path=str(folder), text_template="{title} | {genres} | {year}"),
            tmp_path / "out")
    assert_split(tmp_path / "out")
    assert read(tmp_path / "out", "items")["text"][1] == (
        "Star Wars: Episode IV - A New Hope (1977) | Action, Sci-Fi | 1977")


def write_amazon_recbole(folder: Path) -> Path:
    """The RecBole Amazon_Beauty layout as pandas writes it: the fields of the RecBole_SAE copy,
    CSV-style quotes around fields holding a tab, a newline or a '"', categories as Python lists."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, i, 5.0, 100 * u + k) for u in (1, 2, 3) for k, i in enumerate(("B01", "B02", "B03"))]
    (folder / f"{folder.name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"U{u}\t{i}\t{r}\t{t}.0\n" for u, i, r, t in rows))
    (folder / f"{folder.name}.item").write_text(
        "item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\tcategories:token_seq\tprice:float\t"
        "brand:token\n"
        "B01\tPrada Candy Eau De Parfum\tBeauty\t78916.0\t\"'Beauty', 'Fragrance', \"\"Women's\"\", "
        "'Eau de Parfum'\"\t65.86\tPrada\n"
        "B02\t\"TheraNeem Cream 2 oz \nVanilla\"\t\t\t'Beauty', 'Skin Care', 'Body'\t11.28\tOrganix\n"
        "B03\t\"- \t DESIGNER SKIN LOTION 20 OZ\"\tToys & Games\t1679205.0\t'Beauty', 'Skin Care'\t7.97\t"
        "Designer Skin\n")
    return folder


def test_recbole_amazon_beauty_layout(tmp_path):
    """The amazon-beauty preset's text template over the RecBole Amazon item fields: quoted fields
    with tabs and newlines read whole, list elements kept whole (not split at spaces)."""
    folder = write_amazon_recbole(tmp_path / "Amazon_Beauty")
    cfg = load_config("amazon-beauty", [f"data.path={folder}", "data.min_user_interactions=3",
                                        "data.min_item_interactions=1"])
    items = load_source(cfg.data).items
    assert items.columns == ["item_id", "title", "sales_type", "sales_rank", "categories", "price", "brand"]
    assert items["categories"].to_list() == ["Beauty, Fragrance, Women's, Eau de Parfum",
                                             "Beauty, Skin Care, Body", "Beauty, Skin Care"]
    assert items["title"].to_list() == ["Prada Candy Eau De Parfum", "TheraNeem Cream 2 oz \nVanilla",
                                        "- \t DESIGNER SKIN LOTION 20 OZ"]
    prepare(cfg.data, tmp_path / "out")
    texts = dict(read(tmp_path / "out", "items").select("item_id", "text").iter_rows())
    assert texts["B01"] == "Prada Candy Eau De Parfum. Beauty, Fragrance, Women's, Eau de Parfum. Prada."
    assert texts["B03"].endswith(". Beauty, Skin Care. Designer Skin.")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_generic_renamed_columns(tmp_path, suffix):
    inter, items = generic_frames()
    if suffix == ".parquet":  # typed columns: date-times, a list of genres, a float year
        inter = inter.with_columns(pl.from_epoch("ts", time_unit="s"))
        items = items.with_columns(pl.col("kind").str.split("|"), pl.col("year").cast(pl.Float64))
    paths = tmp_path / f"inter{suffix}", tmp_path / f"items{suffix}"
    for frame, path in zip((inter, items), paths):
        frame.write_parquet(path) if suffix == ".parquet" else frame.write_csv(path)
    cfg = generic_cfg(*paths, text_template="{name} ({kind}) {year}")
    src = load_source(cfg)
    assert src.items.columns == ["item_id", "name", "kind", "year"]
    assert src.columns == {"user_id": "uid", "item_id": "iid", "timestamp": "ts", "rating": "rating"}
    prepare(cfg, tmp_path / "out")
    assert_split(tmp_path / "out")
    texts = read(tmp_path / "out", "items")["text"]
    assert texts[4] == "Heat (1995) (Crime) 1995"
    assert texts[0] == f"Misérables, Les (1995) (Drama{', ' if suffix == '.parquet' else '|'}Musical) 1995"


def test_generic_without_items_or_ratings_and_iso_dates(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("uid,iid,ts\na,x,2024-01-03\na,y,2024-01-01\na,z,2024-01-02T12:00:00\n")
    cfg = generic_cfg(path, None, text_template="item {item_id}")
    src = load_source(cfg)
    assert src.interactions["timestamp"].to_list() == [1704240000, 1704067200, 1704196800]
    assert src.interactions["rating"].null_count() == 3 and "rating" not in src.columns
    prepare(cfg, tmp_path / "out")
    assert read(tmp_path / "out", "test").row(0) == (0, [1, 2], 0)  # y, z, then x
    assert read(tmp_path / "out", "items")["text"].to_list() == ["item x", "item y", "item z"]
    with pytest.raises(DataError, match=r"clicks.csv: data.min_rating=3.0 is set but the interactions have no "
                                         r"column 'rating' \(data.rating_col\)"):
        prepare(generic_cfg(path, None, min_rating=3.0, text_template="{item_id}"), tmp_path / "out2")


# ----------------------------------------------------------------------------- prepare

def test_prepare_sequences_split_and_outputs(tmp_path):
    out = tmp_path / "out"
    info = prepare(DataConfig(source="movielens", path=str(write_movielens_csv(tmp_path / "ml")),
                              head_fraction=0.4, text_template="{title}. Genres: {genres}. Tags: {tags}."), out)
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet", "stats.json", "test.parquet",
                                                     "train.parquet", "users.parquet", "valid.parquet"]
    for name, schema in SCHEMAS.items():
        assert pq.read_schema(out / f"{name}.parquet").remove_metadata() == schema
    assert_split(out)
    items = read(out, "items")
    # popularity [1, 2, 1, 0, 1], head = round(0.4 * 5) = 2 items: idx 1, then idx 0 wins the tie at 1
    assert items["is_head"].to_list() == [True, True, False, False, False]
    assert items["text"][0] == "Misérables, Les (1995). Genres: Drama, Musical. Tags: musical, Hugo."
    assert items["text"][3] == "American President, The (1995). Genres: . Tags: ."
    assert info == {"rows": {"items": 5, "users": 3, "interactions": 11, "train": 5, "valid": 3, "test": 3},
                    "source": f"MovieLens CSV files in {tmp_path / 'ml'}"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["interactions_read"] == 14 and stats["catalogue_items"] == 6
    assert stats["dropped"] == {"duplicates": 1, "k_core_interactions": 2, "k_core_users": 1, "k_core_items": 0}
    assert stats["k_core_rounds"] == 2 and stats["split"] == {"kind": "leave_one_out"}
    assert stats["sequence_length"] == {"min": 3, "median": 3.0, "mean": 3.667, "max": 5}


def test_prepare_min_rating(tmp_path):
    cfg = DataConfig(source="movielens", path=str(write_movielens_csv(tmp_path / "ml")), min_rating=3.0)
    info = prepare(cfg, tmp_path / "out")
    # ratings < 3 go (rows 3, 4, 12); users 2, 3 and 10 then have two interactions left
    assert info["rows"] == {"items": 4, "users": 1, "interactions": 4, "train": 2, "valid": 1, "test": 1}
    assert read(tmp_path / "out", "test").row(0) == (0, [1, 0, 2], 3)  # 20, 10, 40 -> 50
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped"] == {"below_min_rating": 3, "duplicates": 1, "k_core_interactions": 6,
                                "k_core_users": 3, "k_core_items": 1}


def test_ids_deterministic(tmp_path):
    cfg = DataConfig(source="movielens", path=str(write_movielens_csv(tmp_path / "ml")))
    prepare(cfg, tmp_path / "a")
    prepare(cfg, tmp_path / "b")
    for name in ("items", "users", "train", "valid", "test"):
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == (tmp_path / "b" / f"{name}.parquet").read_bytes()
    # the ids depend on the id values only, not on the file order
    shuffled = RATINGS[:]
    random.Random(0).shuffle(shuffled)
    prepare(DataConfig(source="movielens", path=str(write_movielens_csv(tmp_path / "ml2", shuffled))), tmp_path / "c")
    for name in ("items", "users"):
        assert read(tmp_path / "c", name).drop("popularity", "is_head", "never_seen", strict=False).equals(
            read(tmp_path / "a", name).drop("popularity", "is_head", "never_seen", strict=False))


def test_text_template(tmp_path):
    folder = write_movielens_csv(tmp_path / "ml")
    cfg = DataConfig(source="movielens", path=str(folder), text_template="  {title:.4}\n\t{tags!r}   [{genres}]  ")
    prepare(cfg, tmp_path / "out")
    assert read(tmp_path / "out", "items")["text"].to_list()[:2] == ["Misé 'musical, Hugo' [Drama, Musical]",
                                                                     "Star '' [Action, Sci-Fi]"]
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source="movielens", path=str(folder), text_template="{title} {plot}"), tmp_path / "o2")
    assert str(e.value) == (f"file {folder / 'movies.csv'}, column 'plot': data.text_template names an item "
                            "column that does not exist; item columns: item_id, title, genres, tags "
                            "(data.text_template=null builds the template from them)")
    with pytest.raises(ConfigError, match="fields must name item columns"):
        prepare(DataConfig(source="movielens", path=str(folder), text_template="{} {0}"), tmp_path / "o3")


def test_embedded_ml_latest_small(tmp_path):
    src = load_source(DataConfig())
    assert src.interactions.height == 100_004
    assert src.interactions["user_id"].n_unique() == 671
    assert src.items.height == 9_125
    assert (src.items["tags"] != "").sum() == 689  # movies with at least one of the 1,296 tags
    info = prepare(DataConfig(), tmp_path / "out")
    assert info["rows"] == {"items": 9_066, "users": 671, "interactions": 100_004, "train": 100_004 - 2 * 671,
                            "valid": 671, "test": 671}
    items = read(tmp_path / "out", "items")
    assert items["item_id"][0] == "1" and items["text"][0] == (
        "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. Tags: Pixar.")
    assert items["popularity"].sum() == 100_004 - 2 * 671
    head = items.filter("is_head")
    assert head.height == round(0.2 * 9_066) == 1_813
    assert head["popularity"].min() >= items.filter(~pl.col("is_head"))["popularity"].max()
    train, valid, test = (read(tmp_path / "out", name) for name in ("train", "valid", "test"))
    assert test["history"].list.len().min() == 19  # every user rated at least 20 movies
    split = train.join(valid, on="user_idx").join(test, on="user_idx", suffix="_test")
    assert split.select((pl.col("history") == pl.col("items")).all()).item()
    assert split.select((pl.col("history_test") == pl.concat_list("items", "target")).all()).item()
    # user "1" rebuilt by hand from the raw ratings: time order, ties in file order
    ids = dict(zip(items["item_id"], items["item_idx"]))
    raw = src.interactions.filter(pl.col("user_id") == "1").rows(named=True)
    expected = [ids[r["item_id"]] for r in sorted(raw, key=lambda r: (r["timestamp"], r["order"]))]
    assert test.row(0) == (0, expected[:-1], expected[-1])


def test_build_embedded_roundtrip(tmp_path):
    src = write_movielens_csv(tmp_path / "src")
    (src / "README.txt").write_text("licence text\n")
    assert build_embedded(src, tmp_path / "dst") == {"ratings": len(RATINGS), "movies": len(MOVIES), "tags": len(TAGS)}
    ratings = pl.read_parquet(tmp_path / "dst" / "ratings.parquet")
    assert ratings.schema == pl.Schema({"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64,
                                        "timestamp": pl.Int64})
    assert ratings.rows() == RATINGS
    assert (tmp_path / "dst" / "README.txt").read_text() == "licence text\n"
    assert sorted(p.name for p in embedded_path().iterdir()) == ["README.txt", "movies.parquet", "ratings.parquet",
                                                                 "tags.parquet"]


# ----------------------------------------------------------------------------- bad input

def bad_ratings(tmp_path: Path, text: str) -> DataConfig:
    folder = write_movielens_csv(tmp_path / "ml", tags=None)
    (folder / "ratings.csv").write_text(text)
    return DataConfig(source="movielens", path=str(folder))


@pytest.mark.parametrize("text, message", [
    ("userId,movieId,rating\n1,10,4\n",
     "column 'timestamp': missing required column; columns found: userId, movieId, rating"),
    ("userId,movieId,rating,timestamp\n", "has no data rows"),
    ("", "is empty"),
    ("userId,movieId,rating,timestamp\n1,10,4,5\n1,99,4,6\n2,98,4,6\n",
     "column 'movieId', row 1: item id '99' is not in the item table"),
    ("userId,movieId,rating,timestamp\n1,10,4,5\n ,10,4,6\n", "column 'userId', row 1: missing id (null or empty)"),
    ("userId,movieId,rating,timestamp\n1,10,4,5\n1,20,4,6\n1,30,4,yesterday\n",
     "column 'timestamp', row 2: cannot read 'yesterday' as a timestamp"),
    ("userId,movieId,rating,timestamp\n1,10,4,5\n1,20,4,\n", "column 'timestamp', row 1: missing timestamp"),
    ("userId,movieId,rating,timestamp\n1,10,4,5\n1,20,4,-7\n", "column 'timestamp', row 1: negative timestamp -7"),
    ("userId,movieId,rating,timestamp\n1,10,good,5\n", "column 'rating', row 0: cannot read 'good' as a rating"),
    ("userId,movieId,rating,timestamp\n1,10,4,5\n1,20,4,5,extra\n", "cannot be read as CSV"),
])
def test_bad_ratings_csv(tmp_path, text, message):
    cfg = bad_ratings(tmp_path, text)
    with pytest.raises(DataError) as e:
        prepare(cfg, tmp_path / "out")
    assert str(e.value).startswith(f"file {tmp_path / 'ml' / 'ratings.csv'}")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files_and_folders(tmp_path):
    with data_error(f"file {tmp_path / 'nope'}: does not exist"):
        load_source(DataConfig(source="movielens", path=str(tmp_path / "nope")))
    folder = write_movielens_csv(tmp_path / "ml")
    (folder / "movies.csv").unlink()
    with data_error(f"file {folder / 'movies.csv'}: does not exist"):
        load_source(DataConfig(source="movielens", path=str(folder)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MovieLens ratings: .* found: nothing"):
        load_source(DataConfig(source="movielens", path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="data.path: required for data.source=recbole"):
        load_source(DataConfig(source="recbole"))
    garbage = tmp_path / "inter.parquet"
    garbage.write_bytes(b"user,item\n1,2\n")
    with data_error(f"file {garbage}: not a Parquet file: it is text (a CSV file? give it a .csv suffix)"):
        load_source(generic_cfg(garbage, None))
    latin = tmp_path / "inter.csv"
    latin.write_bytes("uid,iid,ts\nJosé,1,5\n".encode("latin-1"))
    with data_error(f"file {latin}: cannot be read as CSV"):
        load_source(generic_cfg(latin, None))
    (tmp_path / "inter.xlsx").write_text("{}")
    with data_error(f"file {tmp_path / 'inter.xlsx'}: unknown file type '.xlsx'"):
        load_source(generic_cfg(tmp_path / "inter.xlsx", None))
    (tmp_path / "inter.jsonl").write_text('{"uid": "a", "iid": 1}\n')
    with data_error(f"file {tmp_path / 'inter.jsonl'}, column 'ts': missing required column; columns found: uid, iid"):
        load_source(generic_cfg(tmp_path / "inter.jsonl", None))
    folder = write_movielens_csv(tmp_path / "ml2")
    (folder / "movies.csv").write_text("movieId,name\n10,x\n")
    with data_error(f"file {folder / 'movies.csv'}, column 'title': missing required column; "
                    "columns found: movieId, name"):
        load_source(DataConfig(source="movielens", path=str(folder)))


def test_bad_parquet_values(tmp_path):
    inter, items = generic_frames()
    cases = [
        (inter.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise("uid").alias("uid")),
         "column 'uid', row 3: missing id (null or empty)"),
        (inter.with_columns(pl.col("iid").cast(pl.Float64) + (pl.int_range(pl.len()) == 5) * 0.5),
         "column 'iid', row 5: id 10.5 is not a whole number"),
        (inter.with_columns(pl.col("ts") - 10), "column 'ts', row 5: negative timestamp -3"),
    ]
    items_path = tmp_path / "items.parquet"
    items.write_parquet(items_path)
    for frame, message in cases:
        path = tmp_path / "inter.parquet"
        frame.write_parquet(path)
        with pytest.raises(DataError) as e:
            load_source(generic_cfg(path, items_path))
        assert str(e.value).startswith(f"file {path}, ") and message in str(e.value)
    inter.write_parquet(tmp_path / "inter.parquet")
    pl.concat([items, items.tail(1)]).write_parquet(items_path)
    with data_error(f"file {items_path}, column 'iid', row 6: item id '60' repeats the item of row 5"):
        load_source(generic_cfg(tmp_path / "inter.parquet", items_path))


def test_bad_dat_and_recbole(tmp_path):
    folder = write_movielens_dat(tmp_path / "ml-1m")
    (folder / "ratings.dat").write_text("1::10::4::5\n1::10::4\n")
    with data_error(f"file {folder / 'ratings.dat'}, column 'Timestamp', row 1: missing timestamp"):
        load_source(DataConfig(source="movielens", path=str(folder)))
    rb = write_recbole(tmp_path / "rb")
    (rb / "rb.inter").write_text("user_id:token\titem_id:token\n1\t10\n")
    with data_error(f"file {rb / 'rb.inter'}, column 'timestamp': missing required column; "
                    "columns found: user_id:token, item_id:token"):
        load_source(DataConfig(source="recbole", path=str(rb)))
