"""The ml-100k and Amazon sources, compressed files, and one error per kind of bad input.

Every fixture is a tiny file written here in the original layout of its release; the expected
rows are spelled out in full.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from alphafuse_dist.config import DataConfig
from alphafuse_dist.data.prepare import prepare
from alphafuse_dist.data.sources import load_source, source_inputs
from alphafuse_dist.errors import DataError

CODECS = {"": None, ".gz": "gzip", ".zst": "zstd"}  # file suffix -> pyarrow codec


def write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path``, compressed as its suffix says (.gz, .zst) and UTF-8 if text."""
    raw = data.encode() if isinstance(data, str) else data
    codec = CODECS.get(path.suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec is None:
        path.write_bytes(raw)
    else:
        with pa.CompressedOutputStream(str(path), codec) as out:
            out.write(raw)
    return path


def interactions(src) -> list[tuple]:
    return src.interactions.rows()


def items(src) -> list[dict]:
    return src.items.to_dicts()


# ----------------------------------------------------------------------------- MovieLens ml-100k

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def write_ml100k(folder: Path, suffix: str = "", genre_file: bool = True) -> Path:
    """u.data (tab-separated, no header), u.item ('|', latin-1, 19 flags) and u.genre as in ml-100k."""
    write(folder / f"u.data{suffix}", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t1\t5\t881251000\n")
    toy_story = flags("Animation", "Children's", "Comedy")
    write(folder / f"u.item{suffix}", (
        f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{toy_story}\n"
        f"242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|{flags('Comedy')}\n"
        f"302|L.A. Confidential (1997)|01-Jan-1997||http://x|{flags('Crime', 'Film-Noir', 'Mystery', 'Thriller')}\n"
        f"267|unknown||||{flags('unknown')}\n"
        f"1300|Misérables, Les (1995)|01-Jan-1995||http://x|{flags('Drama', 'Musical')}\n").encode("latin-1"))
    if genre_file:  # the real u.genre ends in a blank line
        write(folder / f"u.genre{suffix}", "".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    return folder


ML100K_INTERACTIONS = [(0, "196", "242", 881250949, 3.0), (1, "186", "302", 891717742, 3.0),
                       (2, "196", "1", 881251000, 5.0)]
ML100K_ITEMS = [
    {"item_id": "1", "title": "Toy Story (1995)", "genres": "Animation, Children's, Comedy", "tags": ""},
    {"item_id": "242", "title": "Kolya (1996)", "genres": "Comedy", "tags": ""},
    {"item_id": "302", "title": "L.A. Confidential (1997)", "genres": "Crime, Film-Noir, Mystery, Thriller",
     "tags": ""},
    {"item_id": "267", "title": "unknown", "genres": "", "tags": ""},  # genre "unknown" is a missing value
    {"item_id": "1300", "title": "Misérables, Les (1995)", "genres": "Drama, Musical", "tags": ""},
]


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_ml100k(tmp_path, suffix):
    folder = write_ml100k(tmp_path / "ml-100k", suffix)
    cfg = DataConfig(source="movielens", path=str(folder))
    src = load_source(cfg)
    assert interactions(src) == ML100K_INTERACTIONS
    assert items(src) == ML100K_ITEMS
    assert src.files == {"interactions": folder / f"u.data{suffix}", "items": folder / f"u.item{suffix}",
                         "genres": folder / f"u.genre{suffix}"}
    assert set(source_inputs(cfg)) == {"interactions", "items", "genres"}
    assert src.description == f"MovieLens ml-100k files in {folder}"


def test_ml100k_genre_names(tmp_path):
    """Without u.genre the standard names apply; with it, its names in index order (any line order)."""
    folder = write_ml100k(tmp_path / "ml-100k", genre_file=False)
    assert items(load_source(DataConfig(source="movielens", path=str(folder)))) == ML100K_ITEMS
    renamed = [g.upper() for g in GENRES]
    (folder / "u.genre").write_text("".join(f"{renamed[i]}|{i}\n" for i in reversed(range(len(GENRES)))))
    src = load_source(DataConfig(source="movielens", path=str(folder)))
    assert src.items["genres"].to_list() == ["ANIMATION, CHILDREN'S, COMEDY", "COMEDY",
                                             "CRIME, FILM-NOIR, MYSTERY, THRILLER", "UNKNOWN", "DRAMA, MUSICAL"]


def test_ml100k_prepares(tmp_path):
    folder = write_ml100k(tmp_path / "ml-100k", ".gz")
    write(folder / "u.data.gz", "".join(f"196\t{m}\t4\t{t}\n" for m, t in [(242, 3), (1, 1), (302, 2)]))
    prepare(DataConfig(source="movielens", path=str(folder)), tmp_path / "out")
    # items sort as strings: "1" "242" "302" -> 0, 1, 2; time order 1 (t1), 302 (t2), 242 (t3)
    assert pl.read_parquet(tmp_path / "out" / "test.parquet").rows() == [(0, [0, 2], 1)]


# ----------------------------------------------------------------------------- compressed tables

@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_movielens_csv_and_tables(tmp_path, suffix):
    folder = tmp_path / "ml"
    write(folder / f"ratings.csv{suffix}", "userId,movieId,rating,timestamp\n1,10,4.5,100\n2,20,3,50\n")
    write(folder / f"movies.csv{suffix}", 'movieId,title,genres\n10,"Heat, The (1995)",Crime|Drama\n20,Up (2009),'
                                         "(no genres listed)\n")
    write(folder / f"tags.csv{suffix}", "userId,movieId,tag,timestamp\n1,10,heist,5\n")
    src = load_source(DataConfig(source="movielens", path=str(folder)))
    assert interactions(src) == [(0, "1", "10", 100, 4.5), (1, "2", "20", 50, 3.0)]
    assert items(src) == [{"item_id": "10", "title": "Heat, The (1995)", "genres": "Crime, Drama", "tags": "heist"},
                          {"item_id": "20", "title": "Up (2009)", "genres": "", "tags": ""}]
    inter = write(tmp_path / f"inter.tsv{suffix}", "u\ti\tt\nA\tx\t7\n")
    parquet = tmp_path / f"items.parquet{suffix}"
    buffer = pa.BufferOutputStream()
    pl.DataFrame({"i": ["x"], "name": ["Ex"]}).write_parquet(buffer)
    write(parquet, buffer.getvalue().to_pybytes())
    src = load_source(DataConfig(source="interactions", path=str(inter), items_path=str(parquet),
                                 user_col="u", item_col="i", time_col="t"))
    assert interactions(src) == [(0, "A", "x", 7, None)]
    assert items(src) == [{"item_id": "x", "name": "Ex"}]


# ----------------------------------------------------------------------------- Amazon

def test_amazon2014_literal_meta(tmp_path):
    folder = tmp_path / "beauty"
    write(folder / "reviews_Beauty_5.json.gz", "".join(json.dumps(r) + "\n" for r in [
        {"reviewerID": "A1", "asin": "B001", "reviewerName": "Jo", "helpful": [0, 0], "reviewText": "ok",
         "overall": 5.0, "summary": "s", "unixReviewTime": 1400000000, "reviewTime": "05 13, 2014"},
        {"reviewerID": "A2", "asin": "B002", "overall": 3.0, "unixReviewTime": 1300000000},
        {"reviewerID": "A1", "asin": "B404", "overall": 1.0, "unixReviewTime": 1200000000},
    ]))
    # Python literals as in the real files: single quotes, an apostrophe inside double quotes, a
    # nested category list with a repeated name, a dict field (salesRank), and one JSON line
    write(folder / "meta_Beauty.json.zst",
          "{'asin': 'B001', 'title': \"Burt's Bees Lip Balm\", 'price': 3.0, 'brand': \"Burt's Bees\", "
          "'categories': [['Beauty', 'Skin Care', 'Lips'], ['Beauty', 'Makeup']], "
          "'salesRank': {'Beauty': 123}, 'imUrl': 'http://x/1.jpg'}\n"
          "\n"
          '{"asin": "B002", "description": "A \\"good\\" soap.", "price": 4.99, "categories": [["Bath"]]}\n'
          "{'asin': 'B003', 'title': 'Never Reviewed', 'related': {'also_bought': ['B001']}}\n")
    cfg = DataConfig(source="amazon2014", path=str(folder))
    src = load_source(cfg)
    assert interactions(src) == [(0, "A1", "B001", 1400000000, 5.0), (1, "A2", "B002", 1300000000, 3.0),
                                 (2, "A1", "B404", 1200000000, 1.0)]
    assert items(src) == [
        {"item_id": "B001", "title": "Burt's Bees Lip Balm", "brand": "Burt's Bees",
         "categories": "Beauty, Skin Care, Lips, Makeup", "description": None, "price": "3"},
        {"item_id": "B002", "title": None, "brand": None, "categories": "Bath", "description": 'A "good" soap.',
         "price": "4.99"},
        {"item_id": "B003", "title": "Never Reviewed", "brand": None, "categories": None, "description": None,
         "price": None},
        # reviewed but not in the meta file: an item with no text
        {"item_id": "B404", "title": None, "brand": None, "categories": None, "description": None, "price": None},
    ]
    assert src.files == {"interactions": folder / "reviews_Beauty_5.json.gz", "items": folder / "meta_Beauty.json.zst"}
    assert src.columns == {"user_id": "reviewerID", "item_id": "asin", "timestamp": "unixReviewTime",
                           "rating": "overall"}


def test_amazon2018_file_paths(tmp_path):
    reviews = write(tmp_path / "Luxury_Beauty.json", "".join(json.dumps(r) + "\n" for r in [
        {"overall": 4.0, "verified": True, "reviewTime": "06 6, 2016", "reviewerID": "U9", "asin": "B00A",
         "style": {"Size:": " 3.4 oz"}, "unixReviewTime": 1465171200},
        {"overall": 2.0, "reviewerID": "U8", "asin": "B00B", "unixReviewTime": 1465171300, "vote": "2"},
    ]))
    meta = write(tmp_path / "meta_Luxury_Beauty.json.gz", "".join(json.dumps(m) + "\n" for m in [
        {"asin": "B00A", "title": "Rose Oil", "brand": "Acme", "category": ["Luxury Beauty", "Oils"],
         "description": ["Pure rose.", "Cold pressed."], "feature": ["30 ml", "vegan"], "also_buy": ["B00B"],
         "details": {"Item Weight:": "1 oz"}, "price": "$12.00"},
        {"asin": "B00B", "title": "Clay Mask", "description": "[Bracketed] plain text", "category": []},
        {"asin": "B00A", "title": "Rose Oil (repeated line)"},  # the 2018 meta files repeat some products
    ]))
    src = load_source(DataConfig(source="amazon2018", path=str(reviews), items_path=str(meta)))
    assert interactions(src) == [(0, "U9", "B00A", 1465171200, 4.0), (1, "U8", "B00B", 1465171300, 2.0)]
    assert items(src) == [
        {"item_id": "B00A", "title": "Rose Oil", "brand": "Acme", "categories": "Luxury Beauty, Oils",
         "description": "Pure rose. Cold pressed.", "features": "30 ml, vegan"},
        {"item_id": "B00B", "title": "Clay Mask", "brand": None, "categories": "",
         "description": "[Bracketed] plain text", "features": None},
    ]
    no_meta = load_source(DataConfig(source="amazon2018", path=str(reviews)))
    assert items(no_meta) == [{"item_id": "B00A"}, {"item_id": "B00B"}] and "items" not in no_meta.files


def test_amazon2023_parent_asin_and_milliseconds(tmp_path):
    folder = tmp_path / "All_Beauty"
    write(folder / "All_Beauty.jsonl.zst", "".join(json.dumps(r) + "\n" for r in [
        {"rating": 5.0, "title": "Great", "text": "Loved it", "images": [], "asin": "B01-RED",
         "parent_asin": "P01", "user_id": "AGKH", "timestamp": 1588687728923, "helpful_vote": 0,
         "verified_purchase": True},
        {"rating": 1, "asin": "B01-BLUE", "parent_asin": "P01", "user_id": "AFQL", "timestamp": 1588687729999},
        {"rating": 3.5, "asin": "B02", "parent_asin": "P02", "user_id": "AGKH", "timestamp": 1000},
    ]))
    write(folder / "meta_All_Beauty.jsonl.gz", "".join(json.dumps(m) + "\n" for m in [
        {"main_category": "All Beauty", "title": "Lip Tint", "average_rating": 4.1, "rating_number": 10,
         "features": ["Long lasting", "Matte"], "description": ["Tint.", "Two shades."], "price": None,
         "images": [{"large": "x"}], "videos": [], "store": "Tinty", "categories": ["Beauty", "Lips"],
         "details": {"Color": "Red", "Package Dimensions": "1 x 1 x 1"}, "parent_asin": "P01",
         "bought_together": None},
        {"main_category": "All Beauty", "title": "Soap", "features": [], "description": [], "store": None,
         "categories": [], "details": {}, "parent_asin": "P02"},
    ]))
    cfg = DataConfig(source="amazon2023", path=str(folder))
    src = load_source(cfg)
    # variants B01-RED and B01-BLUE are one product, P01; milliseconds floor to seconds
    assert interactions(src) == [(0, "AGKH", "P01", 1588687728, 5.0), (1, "AFQL", "P01", 1588687729, 1.0),
                                 (2, "AGKH", "P02", 1, 3.5)]
    assert items(src) == [
        {"item_id": "P01", "title": "Lip Tint", "brand": "Tinty", "categories": "Beauty, Lips",
         "description": "Tint. Two shades.", "features": "Long lasting, Matte", "main_category": "All Beauty"},
        {"item_id": "P02", "title": "Soap", "brand": None, "categories": "", "description": "", "features": "",
         "main_category": "All Beauty"},
    ]
    assert src.columns["item_id"] == "parent_asin"
    assert set(source_inputs(cfg)) == {"interactions", "items"}


# ----------------------------------------------------------------------------- bad input

REVIEW = '{"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1400000000}\n'


def corrupt_zst(path: Path) -> DataConfig:
    write(path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4,5\n")
    (path / "movies.csv.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"not a zstd frame" * 4)
    return DataConfig(source="movielens", path=str(path))


def truncated_gzip(path: Path) -> DataConfig:
    whole = gzip.compress(("userId,movieId,rating,timestamp\n" + "1,10,4,5\n" * 5000).encode())
    (path / "ratings.csv.gz").write_bytes(whole[: len(whole) // 2])
    write(path / "movies.csv", "movieId,title,genres\n10,A,B\n")
    return DataConfig(source="movielens", path=str(path))


def corrupt_parquet(path: Path) -> DataConfig:
    buffer = pa.BufferOutputStream()
    pl.DataFrame({"user_id": ["a"], "item_id": ["x"], "timestamp": [1]}).write_parquet(buffer)
    write(path / "inter.parquet.gz", buffer.getvalue().to_pybytes()[:-20])  # footer cut off
    return DataConfig(source="interactions", path=str(path / "inter.parquet.gz"))


def latin1_csv(path: Path) -> DataConfig:
    (path / "inter.csv").write_bytes("user_id,item_id,timestamp\na,x,1\nJosé,y,2\n".encode("latin-1"))
    return DataConfig(source="interactions", path=str(path / "inter.csv"))


def amazon(path: Path, reviews: str, meta: str | None = None, source: str = "amazon2014") -> DataConfig:
    write(path / "reviews_X.json.gz", reviews)
    if meta is not None:
        write(path / "meta_X.json.zst", meta)
    return DataConfig(source=source, path=str(path))


@pytest.mark.parametrize("make, file, message", [
    (truncated_gzip, "ratings.csv.gz", "cannot be decompressed as gzip (truncated or corrupt?)"),
    (corrupt_zst, "movies.csv.zst", "cannot be decompressed as zstd (truncated or corrupt?)"),
    (corrupt_parquet, "inter.parquet.gz", "cannot be read as Parquet"),
    (latin1_csv, "inter.csv", "cannot be read as CSV: line 3 is not UTF-8 (byte 0xe9): expected UTF-8 text"),
    (lambda p: amazon(p, REVIEW, "{'asin': 'B1'}\n{'asin': 'B2', 'title': 'unclosed}\n"), "meta_X.json.zst",
     "line 2 is neither a JSON object nor a Python literal dict (SyntaxError: unterminated string literal"),
    (lambda p: amazon(p, REVIEW, "{'asin': 'B1'}\n['B2']\n"), "meta_X.json.zst",
     "line 2 is neither a JSON object nor a Python literal dict (a list)"),
    (lambda p: amazon(p, REVIEW + '{"asin": "B2", "overall": 4.0, "unixReviewTime": 1}\n'), "reviews_X.json.gz",
     "column 'reviewerID', row 1: missing id (null or empty)"),
    (lambda p: amazon(p, REVIEW + '{"reviewerID": "A", "asin": "B", "unixReviewTime": "May 2014"}\n'),
     "reviews_X.json.gz", "column 'unixReviewTime', row 1: cannot read 'May 2014' as a timestamp"),
    (lambda p: amazon(p, REVIEW + '{"reviewerID": "A", "asin": "B", "overall": "five", "unixReviewTime": 1}\n'),
     "reviews_X.json.gz", "column 'overall', row 1: cannot read 'five' as a rating"),
    (lambda p: amazon(p, REVIEW + "{'reviewerID': 'A'}\n", source="amazon2018"), "reviews_X.json.gz",
     "line 2 is not a JSON object (Expecting property name enclosed in double quotes"),
    (lambda p: amazon(p, ""), "reviews_X.json.gz", "is empty: expected one JSON object per line"),
    (lambda p: amazon(p, "\n \n"), "reviews_X.json.gz", "is empty: expected one JSON object per line"),
    (lambda p: amazon(p, REVIEW, '{"asin": "B1", "category": "Beauty"}\n',
                      source="amazon2018"), "meta_X.json.zst", "cannot be read as JSON lines with fields"),
    (lambda p: amazon(p, REVIEW, '{"title": "no id"}\n'), "meta_X.json.zst", "column 'asin', row 0: missing id"),
])
def test_bad_input(tmp_path, make, file, message):
    cfg = make(tmp_path)
    with pytest.raises(DataError) as e:
        load_source(cfg)
    text = str(e.value)
    assert text.startswith(f"file {tmp_path / file}") and message in text, text
    assert "\n" not in text


def test_bad_ml100k(tmp_path):
    folder = write_ml100k(tmp_path / "ml-100k")
    (folder / "u.item").write_text(f"1|Toy Story (1995)|||x|{flags('Comedy').replace('1', '2')}\n")
    with pytest.raises(DataError, match=re.escape(f"file {folder / 'u.item'}, column 'Comedy', row 0: genre flag "
                                                  "'2' is not 0 or 1")):
        load_source(DataConfig(source="movielens", path=str(folder)))
    (folder / "u.item").write_text("1|Toy Story (1995)|||x|0|1\n")
    with pytest.raises(DataError, match=re.escape(f"file {folder / 'u.item'}: is not an ml-100k u.item file")):
        load_source(DataConfig(source="movielens", path=str(folder)))
    (folder / "u.genre").write_text("Action|0\nComedy|0\n")
    with pytest.raises(DataError, match=re.escape(f"file {folder / 'u.genre'}, column 'index': genre indices "
                                                  "must be 0..1, each once")):
        load_source(DataConfig(source="movielens", path=str(folder)))
    (folder / "u.item").unlink()
    with pytest.raises(DataError, match=re.escape(f"file {folder / 'u.item'}: does not exist")):
        load_source(DataConfig(source="movielens", path=str(folder)))


def test_bad_amazon_folder(tmp_path):
    write(tmp_path / "reviews_A.json.gz", REVIEW)
    write(tmp_path / "reviews_B.json", REVIEW)
    with pytest.raises(DataError, match=re.escape(f"file {tmp_path}: expected one reviews file (*.json, *.jsonl, "
                                                  "optionally .gz / .zst) and at most one meta_* file; found: "
                                                  "reviews_A.json.gz, reviews_B.json")):
        load_source(DataConfig(source="amazon2014", path=str(tmp_path)))


# ----------------------------------------------------------------------------- UniSRec layout

def write_unisrec(folder: Path, test_rows: str | None = None) -> Path:
    """<name>.test.inter (user, history as item indices, last item), <name>.item2index (no header)
    and <name>.text, as UniSRec's downstream data sets ship them."""
    write(folder / "Sci.test.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n"
          + (test_rows or "0\t0 1 2\t3\n1\t2 0\t1\n2\t3 3 1\t0\n"))
    write(folder / "Sci.item2index", "B0A\t0\nB0B\t1\nB0C\t2\nB0D\t3\nB0E\t4\n")
    write(folder / "Sci.text", "item_id:token\ttext:token_seq\n"
          "B0A\tGorilla Glue, 8 ounce. Industrial & Scientific Adhesives. Gorilla.\n"
          "B0B\tNitrile Gloves, Large. Industrial & Scientific Safety. Ammex.\n"
          "B0C\tDigital Caliper. Industrial & Scientific Measuring. Neiko.\n"
          "B0D\tLab Timer. Industrial & Scientific Lab. Traceable.\n"
          "B0E\tUnused Item. Industrial & Scientific. Nobody.\n")
    return folder


def test_unisrec_sequences_items_and_both_splits(tmp_path):
    folder = write_unisrec(tmp_path / "Sci")
    src = load_source(DataConfig(source="unisrec", path=str(folder)))
    # each user's history then its last item, positions as timestamps
    assert interactions(src) == [(0, "0", "B0A", 0, None), (1, "0", "B0B", 1, None), (2, "0", "B0C", 2, None),
                                 (3, "0", "B0D", 3, None), (4, "1", "B0C", 0, None), (5, "1", "B0A", 1, None),
                                 (6, "1", "B0B", 2, None), (7, "2", "B0D", 0, None), (8, "2", "B0D", 1, None),
                                 (9, "2", "B0B", 2, None), (10, "2", "B0A", 3, None)]
    assert items(src)[0] == {"item_id": "B0A",
                             "text": "Gorilla Glue, 8 ounce. Industrial & Scientific Adhesives. Gorilla."}
    assert set(source_inputs(DataConfig(source="unisrec", path=str(folder)))) == {"interactions", "item_index", "items"}
    prepare(DataConfig(source="unisrec", path=str(folder), text_template="{text}", dedupe="none"), tmp_path / "loo")
    test = pl.read_parquet(tmp_path / "loo" / "test.parquet")
    ids = pl.read_parquet(tmp_path / "loo" / "items.parquet")["item_id"].to_list()
    last = [ids[t] for t in test["target"].to_list()]
    assert last == ["B0D", "B0B", "B0A"]  # leave-one-out keeps the files' own test targets
    prepare(DataConfig(source="unisrec", path=str(folder), text_template="{text}", dedupe="none",
                       split="cold_start_users", split_fractions=[0.34, 0.33, 0.33], split_seed=4,
                       min_user_interactions=2),
            tmp_path / "cold")
    users = sum(pl.read_parquet(tmp_path / "cold" / f"{s}.parquet").height for s in ("train", "valid", "test"))
    assert users == 3  # split_seed 4 puts one user in each part


def test_unisrec_unknown_index_names_the_row(tmp_path):
    folder = write_unisrec(tmp_path / "Sci", test_rows="0\t0 1\t2\n1\t0 9\t1\n")
    with pytest.raises(DataError, match=r"Sci\.test\.inter, column 'item_id_list:token_seq / item_id:token', "
                                        r"row 1: item index '9' is not in Sci\.item2index$"):
        load_source(DataConfig(source="unisrec", path=str(folder)))


# ----------------------------------------------------------------------------- ReChorus layout

def write_rechorus(folder: Path, test_rows: str = "1\t3\t50\t[2, 4]\n2\t1\t60\t[3, 4]\n",
                   with_text: bool = True) -> Path:
    """train.csv / dev.csv / test.csv (tab-separated, dev and test with sampled negatives), and
    Off.item2index (raw id, index; no header) + Off.text (id, text), as the LRD repository ships them."""
    write(folder / "train.csv", "user_id\titem_id\ttime\n1\t1\t10\n2\t2\t20\n1\t2\t30\n2\t3\t30\n")
    write(folder / "dev.csv", "user_id\titem_id\ttime\tneg_items\n1\t4\t40\t[2, 3]\n2\t4\t30\t[1, 3]\n")
    write(folder / "test.csv", "user_id\titem_id\ttime\tneg_items\n" + test_rows)
    if with_text:
        write(folder / "Off.item2index", "B01\t1\nB02\t2\nB03\t3\nB04\t4\n")
        write(folder / "Off.text", "id\ttext\nB04\tStapler, black. Staplers Swingline\nB01\tHP 78 Ink Cartridge HP\n"
              "B02\tLabel maker Brother\nB03\tMouse pad, blue Mouse Pads Fellowes\n")
    return folder


def test_rechorus_reads_the_three_files_in_order_with_text(tmp_path):
    folder = write_rechorus(tmp_path / "Office")
    src = load_source(DataConfig(source="rechorus", path=str(folder)))
    assert interactions(src) == [(0, "1", "1", 10, None), (1, "2", "2", 20, None), (2, "1", "2", 30, None),
                                 (3, "2", "3", 30, None), (4, "1", "4", 40, None), (5, "2", "4", 30, None),
                                 (6, "1", "3", 50, None), (7, "2", "1", 60, None)]
    assert items(src)[3] == {"item_id": "4", "raw_id": "B04", "text": "Stapler, black. Staplers Swingline"}
    assert set(source_inputs(DataConfig(source="rechorus", path=str(folder)))) == {
        "interactions", "valid", "test", "item_index", "items"}
    prepare(DataConfig(source="rechorus", path=str(folder), text_template="{text}", dedupe="none"), tmp_path / "loo")
    test = pl.read_parquet(tmp_path / "loo" / "test.parquet")
    valid = pl.read_parquet(tmp_path / "loo" / "valid.parquet")
    raw = pl.read_parquet(tmp_path / "loo" / "items.parquet")["item_id"].to_list()
    # leave-one-out gives back the files' own split: the test file's items last, dev's before them,
    # even where dev's time ties a training row (user 2: time 30)
    assert [raw[t] for t in test["target"].to_list()] == ["3", "1"]
    assert [raw[t] for t in valid["target"].to_list()] == ["4", "4"]
    # without the text files: ids only
    bare = write_rechorus(tmp_path / "bare", with_text=False)
    assert load_source(DataConfig(source="rechorus", path=str(bare))).items.columns == ["item_id"]


def test_rechorus_bad_input_names_the_file(tmp_path):
    folder = write_rechorus(tmp_path / "a", test_rows="1\t3\n")
    with pytest.raises(DataError, match=r"test\.csv.*time"):
        load_source(DataConfig(source="rechorus", path=str(folder)))
    folder = write_rechorus(tmp_path / "b")
    (folder / "Off.text").write_text("id\ttext\nB01\tHP 78 Ink Cartridge HP\n")
    with pytest.raises(DataError, match=r"Off\.item2index, column 'raw_id', row 1: item 'B02' has no row in Off\.text$"):
        load_source(DataConfig(source="rechorus", path=str(folder)))
    (folder / "Off.text").write_text("id\ttext\nB01\tHP 78\nB02\tLabel maker\nB01\tHP 78 again\n")
    with pytest.raises(DataError, match=r"Off\.text, column 'id', row 2: item id 'B01' repeats the item of row 0"):
        load_source(DataConfig(source="rechorus", path=str(folder)))
    (folder / "dev.csv").unlink()
    with pytest.raises(DataError, match=r"dev\.csv"):
        load_source(DataConfig(source="rechorus", path=str(folder)))


def test_named_data_sets_download_from_a_mirror_verified(tmp_path, capsys):
    import hashlib

    from alphafuse_dist.cli import main
    from alphafuse_dist.data.download import DATASETS, DataFile, DataSet, download_dataset

    mirror = write_unisrec(tmp_path / "mirror")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    files = tuple(DataFile(f"https://example.org/x/{n}", d) for n, d in sorted(digest.items()))
    catalogue = {"sci": DataSet("a fixture", "unisrec", files)}
    got = download_dataset("sci", tmp_path / "data", mirror=str(mirror), progress=False, catalogue=catalogue)
    assert sorted(p.name for p in got) == sorted(digest)
    assert load_source(DataConfig(source="unisrec", path=str(tmp_path / "data"))).interactions.height == 11
    # the pinned digests of the real sets: the fixture is not the real file, so nothing is kept
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for p in mirror.iterdir():
        (renamed / p.name.replace("Sci.", "Scientific.")).write_bytes(p.read_bytes())
    assert main(["download", "amazon-scientific", "--to", str(tmp_path / "real"), "--from", str(renamed)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err and not any((tmp_path / "real").iterdir())
    with pytest.raises(DataError, match="no data set named 'beauty': known ones are amazon-beauty, amazon-office, amazon-scientific"):
        download_dataset("beauty", tmp_path / "x")
    assert main(["download", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name} (data.source={ds.source})" in listed for name, ds in DATASETS.items())
    assert all(f.url.startswith("https://") and len(f.sha256) == 64 for ds in DATASETS.values() for f in ds.files)
