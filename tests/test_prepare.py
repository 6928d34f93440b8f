"""The prepare stage's filters, splits, id maps, item groups and text, on hand-worked data.

Every case writes a tiny ``interactions`` source (Parquet) whose expected output is worked out by
hand in the comments. Item and user ids sort as strings, so ``item_idx`` follows the id order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from alphafuse_dist.config import DataConfig
from alphafuse_dist.data.prepare import prepare
from alphafuse_dist.data.splits import unit_hash
from alphafuse_dist.errors import ConfigError, DataError


def source(tmp_path: Path, rows, items=None, name: str = "src") -> dict:
    """``rows`` = (user, item, timestamp[, rating]) in file order; ``items`` = (item_id, title)."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["user_id", "item_id", "timestamp", "rating"][:len(rows[0])]
    pl.DataFrame(rows, schema=columns, orient="row").write_parquet(folder / "inter.parquet")
    paths = {"path": str(folder / "inter.parquet")}
    if items is not None:
        pl.DataFrame(items, schema=["item_id", "title"], orient="row").write_parquet(folder / "items.parquet")
        paths["items_path"] = str(folder / "items.parquet")
    return paths


def run(tmp_path: Path, rows, items=None, out: str = "out", **kw) -> tuple[Path, dict]:
    kw.setdefault("text_template", "{title}" if items is not None else "{item_id}")
    cfg = DataConfig(source="interactions", **source(tmp_path, rows, items, name=f"src-{out}"), **kw)
    prepare(cfg, tmp_path / out)
    return tmp_path / out, json.loads((tmp_path / out / "stats.json").read_text())


def read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / f"{name}.parquet")


def rows_of(out: Path, name: str) -> list[tuple]:
    return read(out, name).rows()


# ----------------------------------------------------------------------------- filters

@pytest.mark.parametrize("rule, sequence, dropped", [
    # a: x@1 (row 0), x@1 (row 1, exact repeat), y@2, z@3, x@5; items x y z -> 0 1 2
    ("exact", [0, 1, 2, 0], 1),
    ("user_item", [0, 1, 2], 2),  # x@5 repeats the pair (a, x) too
    ("none", [0, 0, 1, 2, 0], 0),
])
def test_dedupe(tmp_path, rule, sequence, dropped):
    rows = [("a", "x", 1), ("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "x", 5)]
    out, stats = run(tmp_path, rows, dedupe=rule, min_user_interactions=3)
    assert rows_of(out, "test") == [(0, sequence[:-1], sequence[-1])]
    assert stats["dropped"]["duplicates"] == dropped


def test_iterative_k_core(tmp_path):
    # min_user=3, min_item=2. Pass 1: E, F, G occur once -> their rows go; u3 keeps A, D and u4
    # keeps D. Pass 2: u3 and u4 are below 3 -> their rows go (a single user pass would have kept
    # u3). Pass 3 drops nothing: u1, u2 with A, B, C remain.
    rows = [("u1", "A", 1), ("u1", "B", 2), ("u1", "C", 3), ("u2", "A", 1), ("u2", "B", 2), ("u2", "C", 3),
            ("u3", "A", 1), ("u3", "D", 2), ("u3", "E", 3), ("u4", "D", 1), ("u4", "F", 2), ("u4", "G", 3)]
    out, stats = run(tmp_path, rows, min_user_interactions=3, min_item_interactions=2)
    assert read(out, "items")["item_id"].to_list() == ["A", "B", "C"]
    assert read(out, "users")["user_id"].to_list() == ["u1", "u2"]
    assert stats["dropped"] == {"duplicates": 0, "k_core_interactions": 6, "k_core_users": 2, "k_core_items": 4}
    assert stats["k_core_rounds"] == 3


def test_max_history_keeps_the_last_by_time(tmp_path):
    # a: p@5, q@1, r@3, s@3, t@9 -> time order q r s p t (r before s: file order) -> last 3: s p t
    rows = [("a", "p", 5), ("a", "q", 1), ("a", "r", 3), ("a", "s", 3), ("a", "t", 9),
            ("b", "p", 1), ("b", "q", 2), ("b", "r", 3)]
    out, stats = run(tmp_path, rows, max_history=3)
    ids = dict(zip(read(out, "items")["item_id"], read(out, "items")["item_idx"]))
    assert rows_of(out, "test")[0] == (0, [ids["s"], ids["p"]], ids["t"])
    assert rows_of(out, "test")[1] == (1, [ids["p"], ids["q"]], ids["r"])
    assert stats["dropped"]["max_history_interactions"] == 2
    with pytest.raises(ConfigError, match=r"data.max_history=2: must be >= data.min_user_interactions=3"):
        run(tmp_path, rows, out="o2", max_history=2)


def test_min_rating_then_dedupe(tmp_path):
    rows = [("a", "x", 1, 5.0), ("a", "y", 2, 1.0), ("a", "z", 3, 4.0), ("a", "w", 4, 3.0), ("a", "y", 5, 4.5)]
    out, stats = run(tmp_path, rows, min_rating=3.0)  # y@2 goes: x z w y -> items w x y z = 0..3
    assert rows_of(out, "test") == [(0, [1, 3, 0], 2)]
    assert stats["dropped"]["below_min_rating"] == 1


# ----------------------------------------------------------------------------- splits

def test_time_split(tmp_path):
    # u1: x@10 y@20 z@30 w@40; u2: y@15 x@25; u3: z@35. t1 = 20, t2 = 35 (given as ISO 8601).
    # train (< 20): u1 [x], u2 [y]. valid [20, 35): u1 y@20 after [x]; u2 x@25 after [y].
    # test [35, ...): u1 w@40 after [x y z]; u3 z@35 has no history -> left out.
    # items w x y z -> 0..3, users u1 u2 u3 -> 0..2
    rows = [("u1", "x", 10), ("u1", "y", 20), ("u1", "z", 30), ("u1", "w", 40), ("u2", "y", 15), ("u2", "x", 25),
            ("u3", "z", 35)]
    out, stats = run(tmp_path, rows, split="time", split_times=["20", "1970-01-01T00:00:35"],
                     min_user_interactions=1)
    assert rows_of(out, "train") == [(0, [1]), (1, [2])]
    assert rows_of(out, "valid") == [(0, [1], 2), (1, [2], 1)]
    assert rows_of(out, "test") == [(0, [1, 2, 3], 0)]
    items = read(out, "items")
    assert items["popularity"].to_list() == [0, 1, 1, 0]  # training interactions only
    assert items["never_seen"].to_list() == [True, False, False, True]
    assert stats["split"] == {"kind": "time", "t1": 20, "t2": 35, "without_history": {"valid": 0, "test": 1}}


def test_time_split_history_is_strictly_before_the_target_time(tmp_path):
    # a: p@5, q@20, r@20 (same second, file order q first), t1 = 20: target q, history [p] only
    rows = [("a", "p", 5), ("a", "q", 20), ("a", "r", 20), ("a", "s", 50)]
    out, _ = run(tmp_path, rows, split="time", split_times=["20", "40"], min_user_interactions=1)
    assert rows_of(out, "valid") == [(0, [0], 1)]
    assert rows_of(out, "test") == [(0, [0, 1, 2], 3)]


def _reference_unit_hash(user_id: str, seed: int) -> float:
    """FNV-1a over the UTF-8 bytes (offset basis xor seed), splitmix64 finaliser, top 53 bits."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325 ^ (seed & mask)
    for byte in user_id.encode():
        h = ((h ^ byte) * 0x100000001B3) & mask
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
    return ((h ^ (h >> 31)) >> 11) / float(1 << 53)


def test_cold_start_users_split(tmp_path):
    users = [f"user{k}" for k in range(40)] + ["é", "a-much-longer-user-id-0123456789"]
    expected = [_reference_unit_hash(u, 7) for u in users]
    assert unit_hash(pl.Series(users), 7).tolist() == expected
    # each user: three items at times 1, 2, 3 -> item ids "i<k>-1" etc.
    rows = [(u, f"i{k % 5}", t) for k, u in enumerate(users) for t in (1, 2, 3)]
    rows = [(u, f"{item}-{t}", t) for u, item, t in rows]
    out, stats = run(tmp_path, rows[::-1], split="cold_start_users", split_fractions=[0.5, 0.25, 0.25],
                     split_seed=7)
    part = {u: 0 if h < 0.5 else 1 if h < 0.75 else 2 for u, h in zip(users, expected)}
    user_idx = dict(zip(read(out, "users")["user_id"], read(out, "users")["user_idx"]))
    item_idx = dict(zip(read(out, "items")["item_id"], read(out, "items")["item_idx"]))

    def seq(u):
        return [item_idx[f"i{users.index(u) % 5}-{t}"] for t in (1, 2, 3)]

    by_part = {p: sorted(user_idx[u] for u in users if part[u] == p) for p in (0, 1, 2)}
    assert sorted(rows_of(out, "train")) == [(user_idx[u], seq(u)) for u in sorted(users, key=user_idx.get)
                                            if part[u] == 0]
    for name, p in (("valid", 1), ("test", 2)):
        got = sorted(rows_of(out, name))
        assert [r[0] for r in got] == by_part[p]
        assert got == sorted((user_idx[u], seq(u)[:-1], seq(u)[-1]) for u in users if part[u] == p)
    assert stats["split"]["users"] == {"train": len(by_part[0]), "valid": len(by_part[1]), "test": len(by_part[2])}
    # popularity counts the train users' interactions only
    assert read(out, "items")["popularity"].sum() == 3 * len(by_part[0])
    with pytest.raises(ConfigError, match=re.escape("data.split_fractions=[0.5, 0.5]")):
        run(tmp_path, rows, out="o2", split="cold_start_users", split_fractions=[0.5, 0.5])


# ----------------------------------------------------------------------------- item groups

def head_data():
    """Training popularity A 5, B 3, C 1, D 1, T 0: every user is [X, T, T] (leave-one-out)."""
    rows = []
    for k, item in enumerate("AAAAABBBCD"):
        rows += [(f"u{k}", item, 1), (f"u{k}", "T", 2), (f"u{k}", "T", 3)]
    return rows


@pytest.mark.parametrize("kw, head", [
    ({"head_rule": "top_items", "head_fraction": 0.4}, "AB"),  # round(0.4 * 5) = 2
    ({"head_rule": "top_items", "head_fraction": 0.6}, "ABC"),  # C wins the tie with D: lower idx
    ({"head_rule": "top_interactions", "head_fraction": 0.5}, "A"),  # A alone holds 5 of 10
    ({"head_rule": "top_interactions", "head_fraction": 0.6}, "AB"),  # A + B hold 8 >= 6
    ({"head_rule": "top_interactions", "head_fraction": 1.0}, "ABCD"),  # never a 0-popularity item
    ({"head_rule": "threshold", "head_threshold": 1}, "AB"),
    ({"head_rule": "threshold", "head_threshold": 0}, "ABCD"),
])
def test_head_rules(tmp_path, kw, head):
    out, stats = run(tmp_path, head_data(), **kw)
    items = read(out, "items")
    assert items["popularity"].to_list() == [5, 3, 1, 1, 0]
    assert items.filter("is_head")["item_id"].to_list() == list(head)
    assert stats["head_items"] == len(head) and stats["head_rule"] == kw["head_rule"]


def test_threshold_rule_needs_a_threshold(tmp_path):
    with pytest.raises(ConfigError, match="data.head_threshold=None: required for data.head_rule=threshold"):
        run(tmp_path, head_data(), head_rule="threshold")


def test_catalogue_all_and_never_seen(tmp_path):
    # b's last item z is a test target only: no training interaction. Item "n" has none at all.
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "x", 3), ("b", "x", 1), ("b", "y", 2), ("b", "z", 3)]
    items = [("n", "Never"), ("x", "X"), ("y", "Y"), ("z", "Z")]
    out, stats = run(tmp_path, rows, items)
    assert read(out, "items").select("item_id", "never_seen").rows() == [("x", False), ("y", True), ("z", True)]
    out, stats = run(tmp_path, rows, items, out="all", catalogue="all")
    assert read(out, "items").select("item_idx", "item_id", "text", "popularity", "never_seen").rows() == [
        (0, "n", "Never", 0, True), (1, "x", "X", 2, False), (2, "y", "Y", 0, True), (3, "z", "Z", 0, True)]
    assert rows_of(out, "test") == [(0, [1, 2], 1), (1, [1, 2], 3)]
    assert stats["never_seen_items"] == 3 and stats["catalogue"] == "all"


# ----------------------------------------------------------------------------- stable ids

def test_id_map_keeps_old_ids_retires_and_appends(tmp_path):
    first = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "b", 1), ("u2", "c", 2), ("u2", "a", 3)]
    old, _ = run(tmp_path, first, [("a", "Apple"), ("b", "Banana"), ("c", "Cherry")], out="old")
    # a month later: item a is gone (and so is its text), d and e are new; u0 is a new user
    second = [("u2", "e", 4), ("u2", "b", 5), ("u2", "d", 6), ("u0", "c", 1), ("u0", "d", 2), ("u0", "e", 3)]
    new, stats = run(tmp_path, second, [("b", "Banana v2"), ("c", "Cherry"), ("d", "Date"), ("e", "Elder")],
                     out="new", id_map=str(old))
    assert read(new, "items").select("item_idx", "item_id", "text", "retired").rows() == [
        (0, "a", "Apple", True), (1, "b", "Banana v2", False), (2, "c", "Cherry", False),
        (3, "d", "Date", False), (4, "e", "Elder", False)]
    assert read(new, "users").rows() == [(0, "u1"), (1, "u2"), (2, "u0")]
    # u0: c d e = 2 3 4; u2: e b d = 4 1 3; u1 is retired and has no rows
    assert rows_of(new, "test") == [(1, [4, 1], 3), (2, [2, 3], 4)]
    items = read(new, "items")
    assert not items.filter("retired")["is_head"].any()
    assert stats["id_map"] == {"path": str(old), "new_items": 2, "retired_items": 1, "new_users": 1,
                               "retired_users": 1}


def test_id_map_must_be_a_prepare_folder(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=re.escape(f"file {tmp_path / 'nothing' / 'items.parquet'}: data.id_map")):
        run(tmp_path, head_data(), id_map=str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- item text

ROWS3 = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3)]


def test_text_cleaning(tmp_path):
    items = [("x", "Tom &amp; Jerry\x00 \t\n  Show&#233;"), ("y", "bell\x07s &lt;b&gt; \r\n"), ("z", "   ")]
    out, stats = run(tmp_path, ROWS3, items, placeholder_text="item #{item_id}")
    assert read(out, "items")["text"].to_list() == ["Tom & Jerry Showé", "bells <b>", "item #z"]
    assert stats["placeholder_texts"] == 1


def test_missing_text_error(tmp_path):
    items = [("x", "X"), ("y", " \x00 "), ("z", None)]
    with pytest.raises(DataError) as e:
        run(tmp_path, ROWS3, items, missing_text="error")
    assert str(e.value).startswith(f"file {tmp_path / 'src-out' / 'items.parquet'}, column 'text': 2 items "
                                   "have no text after cleaning")
    assert "item ids 'y', 'z'" in str(e.value)


def test_text_max_tokens_with_minilm(tmp_path):
    # MiniLM's uncased WordPiece: "Café" "##s" would be two tokens; the cut keeps the original case
    items = [("x", "Hello World, this is Toy Story"), ("y", "Crème Brûlée"), ("z", "Go")]
    out, stats = run(tmp_path, ROWS3, items, text_max_tokens=3)
    # x: hello | world | , -> "Hello World,"; y: cr ##em ##e | ... -> the first three pieces; z: 1 token
    texts = read(out, "items")["text"].to_list()
    assert texts[0] == "Hello World,"
    assert texts[2] == "Go"
    from transformers import AutoTokenizer

    from alphafuse_dist.embed.encoder import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"), local_files_only=True)
    assert tok.tokenize(texts[1]) == tok.tokenize("Crème Brûlée")[:3]
    assert stats["truncated_texts"] == 2 and stats["text_max_tokens"] == 3


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("rows, message", [
    ([("a", None, 1), ("a", "y", 2), ("a", "z", 3)], "column 'item_id', row 0: missing id (null or empty)"),
    ([("a", "x", 1), ("", "y", 2), ("a", "z", 3)], "column 'user_id', row 1: missing id (null or empty)"),
    ([("a", "x", 1), ("a", "y", -2), ("a", "z", 3)], "column 'timestamp', row 1: negative timestamp -2"),
    ([("a", "x", 1), ("a", "y", 2), ("b", "z", 3)], "no interaction is left after filtering"),
])
def test_bad_interactions(tmp_path, rows, message):
    with pytest.raises(DataError) as e:
        run(tmp_path, rows)
    assert str(e.value).startswith(f"file {tmp_path / 'src-out' / 'inter.parquet'}")
    assert message in str(e.value)


def test_duplicate_item_rows_with_different_text(tmp_path):
    with pytest.raises(DataError, match=r"items.parquet, column 'item_id', row 2: item id 'x' repeats the item "
                                        "of row 0"):
        run(tmp_path, ROWS3, [("x", "X"), ("y", "Y"), ("x", "another X"), ("z", "Z")])


@pytest.mark.parametrize("times, message", [
    (["40", "20"], "data.split_times=['40', '20']: t1 must be before t2"),
    (["2024-02-01", "2024-01-01"], "t1 must be before t2"),
    (["20"], "data.split_times=['20']: the time split needs [t1, t2]"),
    (["20", "soon"], "cannot read 'soon' as epoch seconds or an ISO 8601 date"),
])
def test_bad_split_times(tmp_path, times, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(tmp_path, ROWS3, split="time", split_times=times, min_user_interactions=1)


# ----------------------------------------------------------------------------- synthetic data

def test_write_synthetic(tmp_path):
    from alphafuse_dist.data.synthetic import write_synthetic

    paths = write_synthetic(tmp_path, n_interactions=50_000, n_items=5_000, n_users=1_000, seed=3)
    inter, items = pl.read_parquet(paths["interactions"]), pl.read_parquet(paths["items"])
    assert inter.schema == pl.Schema({"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64})
    assert items.columns == ["item_id", "title", "categories", "brand"] and items.height == 5_000
    assert inter.height == 50_000 and inter["item_id"].is_in(items["item_id"].implode()).all()
    counts = inter["item_id"].value_counts(sort=True)["count"]
    assert counts.head(50).sum() > 0.15 * inter.height  # power law: 1% of the items, > 15% of the use
    assert write_synthetic(tmp_path / "again", 50_000, 5_000, 1_000, seed=3) and pl.read_parquet(
        tmp_path / "again" / "interactions.parquet").equals(inter)  # the seed fixes everything
