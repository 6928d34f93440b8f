"""Properties of the prepare stage on random data (hypothesis): the k-core equals a plain-Python
reference, no split leaks future or held-out interactions, and an id map keeps every old index.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from alphafuse_dist.config import DataConfig
from alphafuse_dist.data.filters import k_core
from alphafuse_dist.data.prepare import prepare
from alphafuse_dist.errors import DataError

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# (user, item, timestamp): few users and items so that ties, repeats and k-core cascades are common
interactions = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(0, 40)), min_size=1,
                        max_size=60)


def logs(users: tuple[int, int], length: tuple[int, int]) -> st.SearchStrategy:
    """(user, item, timestamp) rows of ``users`` users with ``length`` interactions each, shuffled;
    most examples then survive the filters and splits, so few are thrown away."""
    per_user = st.lists(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 40)), min_size=length[0],
                                 max_size=length[1]), min_size=users[0], max_size=users[1])
    return per_user.map(lambda seqs: [(u, i, t) for u, seq in enumerate(seqs) for i, t in seq]).flatmap(
        st.permutations)


def reference_k_core(rows: list[tuple[int, int]], min_user: int, min_item: int) -> set[int]:
    """Row numbers of the k-core: drop any user or item below its limit until none is."""
    alive = set(range(len(rows)))
    while True:
        users: dict[int, int] = {}
        items: dict[int, int] = {}
        for r in alive:
            users[rows[r][0]] = users.get(rows[r][0], 0) + 1
            items[rows[r][1]] = items.get(rows[r][1], 0) + 1
        keep = {r for r in alive if users[rows[r][0]] >= min_user and items[rows[r][1]] >= min_item}
        if keep == alive:
            return alive
        alive = keep


@settings(SETTINGS, max_examples=200)
@given(interactions, st.integers(1, 4), st.integers(1, 4))
def test_k_core_equals_reference(rows, min_user, min_item):
    frame = pl.DataFrame({"order": range(len(rows)), "user": [u for u, _, _ in rows],
                          "item": [i for _, i, _ in rows]}, schema={"order": pl.Int64, "user": pl.UInt32,
                                                                     "item": pl.UInt32})
    kept, _ = k_core(frame, min_user, min_item)
    assert set(kept["order"]) == reference_k_core([(u, i) for u, i, _ in rows], min_user, min_item)
    assert kept["order"].is_sorted()  # input order kept


def run(folder: Path, rows, **kw) -> Path | None:
    """prepare over ``rows`` (user, item, timestamp); None when the data leaves a part empty."""
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"user_id": [f"u{u}" for u, _, _ in rows], "item_id": [f"i{i}" for _, i, _ in rows],
                  "timestamp": [t for *_, t in rows]}).write_parquet(folder / "inter.parquet")
    out = folder / "out"
    try:
        prepare(DataConfig(source="interactions", path=str(folder / "inter.parquet"), text_template="{item_id}",
                           **kw), out)
    except DataError as e:
        if "is empty" in str(e) or "no interaction is left" in str(e):
            return None
        raise
    return out


def decoded(out: Path, name: str) -> list[dict]:
    """A split file's rows with user and item ids instead of indices."""
    users = dict(pl.read_parquet(out / "users.parquet").iter_rows())
    items = dict(pl.read_parquet(out / "items.parquet").select("item_idx", "item_id").iter_rows())
    rows = pl.read_parquet(out / f"{name}.parquet").to_dicts()
    for r in rows:
        r["user_idx"] = users[r["user_idx"]]
        for key in ("items", "history"):
            if key in r:
                r[key] = [items[i] for i in r[key]]
        if "target" in r:
            r["target"] = items[r["target"]]
    return rows


@SETTINGS
@given(logs((1, 6), (3, 10)))
def test_leave_one_out_has_no_leak(rows):
    with tempfile.TemporaryDirectory() as tmp:
        out = run(Path(tmp), rows, dedupe="none")
        assume(out is not None)
        train, valid, test = (pl.read_parquet(out / f"{n}.parquet") for n in ("train", "valid", "test"))
        assert train["user_idx"].to_list() == valid["user_idx"].to_list() == test["user_idx"].to_list()
        # train = seq[:-2], valid target = seq[-2], test target = seq[-1]
        assert train["items"].to_list() == valid["history"].to_list()
        assert test["history"].to_list() == [h + [t] for h, t in zip(valid["history"].to_list(), valid["target"])]
        # the sequences are each user's interactions in time order, ties in file order
        for r in decoded(out, "test"):
            mine = sorted((t, k, f"i{i}") for k, (u, i, t) in enumerate(rows) if f"u{u}" == r["user_idx"])
            assert r["history"] + [r["target"]] == [i for *_, i in mine]


@SETTINGS
@given(logs((10, 16), (2, 6)), st.integers(0, 2**32))
def test_cold_start_users_are_held_out(rows, seed):
    with tempfile.TemporaryDirectory() as tmp:
        out = run(Path(tmp), rows, split="cold_start_users", split_fractions=[0.4, 0.3, 0.3], split_seed=seed,
                  min_user_interactions=2)
        assume(out is not None)
        parts = {n: set(pl.read_parquet(out / f"{n}.parquet")["user_idx"]) for n in ("train", "valid", "test")}
        assert not parts["train"] & parts["valid"] and not parts["train"] & parts["test"]
        assert not parts["valid"] & parts["test"]
        assert len(parts["train"] | parts["valid"] | parts["test"]) == pl.read_parquet(out / "users.parquet").height
        for name in ("valid", "test"):
            for r in decoded(out, name):
                mine = sorted((t, k, f"i{i}") for k, (u, i, t) in enumerate(rows) if f"u{u}" == r["user_idx"])
                mine = [i for *_, i in dict(((t, i), (t, k, i)) for t, k, i in mine).values()]  # exact repeats go
                assert r["history"] + [r["target"]] == mine


@SETTINGS
@given(logs((4, 8), (1, 10)), st.integers(5, 25), st.integers(1, 15))
def test_time_split_has_no_leak(rows, t1, gap):
    t2 = t1 + gap
    with tempfile.TemporaryDirectory() as tmp:
        out = run(Path(tmp), rows, split="time", split_times=[str(t1), str(t2)], min_user_interactions=1,
                  dedupe="none")
        assume(out is not None)
        for r in decoded(out, "train"):  # every training interaction is before t1
            mine = sorted((t, k, f"i{i}") for k, (u, i, t) in enumerate(rows) if f"u{u}" == r["user_idx"])
            assert r["items"] == [i for t, _, i in mine if t < t1]
        for name, lo, hi in (("valid", t1, t2), ("test", t2, 10**9)):
            for r in decoded(out, name):
                mine = sorted((t, k, f"i{i}") for k, (u, i, t) in enumerate(rows) if f"u{u}" == r["user_idx"])
                first = next(x for x in mine if lo <= x[0] < hi)  # the target: inside its window
                assert r["target"] == first[2]
                assert r["history"] == [i for t, _, i in mine if t < first[0]]  # strictly before it
                assert r["history"]


@SETTINGS
@given(logs((1, 6), (3, 8)), logs((1, 6), (3, 8)))
def test_id_map_keeps_every_old_id(first, second):
    with tempfile.TemporaryDirectory() as tmp:
        old = run(Path(tmp) / "old", first, min_user_interactions=3)
        assume(old is not None)
        new = run(Path(tmp) / "new", second, min_user_interactions=3, id_map=str(old))
        assume(new is not None)
        for name, idx, key in (("items", "item_idx", "item_id"), ("users", "user_idx", "user_id")):
            before = pl.read_parquet(old / f"{name}.parquet")
            after = pl.read_parquet(new / f"{name}.parquet")
            assert after[idx].to_list() == list(range(after.height))
            assert after.head(before.height).select(idx, key).equals(before.select(idx, key))
            appended = after[key].slice(before.height).to_list()
            assert appended == sorted(appended) and not set(appended) & set(before[key])
        items = pl.read_parquet(new / "items.parquet")
        used = set(pl.read_parquet(new / "test.parquet")["target"]) | {
            i for h in pl.read_parquet(new / "test.parquet")["history"] for i in h}
        assert set(items.filter(~pl.col("retired"))["item_idx"]) == used
