"""The run registry: round trips, atomic LATEST, conflicts, concurrent writers, the promotion rule."""
from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

from alphafuse_dist.errors import AlphaFuseError, ConfigError, DataError
from alphafuse_dist.retrain.decision import decide_promotion
from alphafuse_dist.retrain.registry import LATEST_FILE, REGISTRY_FILE, Registry, resolve_previous

WINDOW = {"start": "2000-04-25", "end": "2000-12-31"}


def make_run(root, name):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    return run_dir


def test_register_promote_latest_round_trip(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.runs() == [] and reg.latest() is None and "a" not in reg
    a = reg.register("a", make_run(tmp_path / "reg", "a"), data_window=WINDOW, metrics={"NDCG@10": np.float32(0.1)},
                     extra={"basis": "reused"})
    b = reg.register("b", make_run(tmp_path, "elsewhere/b"), data_window=WINDOW, metrics={"NDCG@10": 0.12},
                     parent="a")
    assert a.metrics == {"NDCG@10": pytest.approx(0.1)} and isinstance(a.metrics["NDCG@10"], float)
    assert [r.run_id for r in reg.runs()] == ["a", "b"] and "b" in reg
    assert reg.get("b") == b and b.parent == "a" and b.promotions == []
    # inside the root: stored relative (the registry moves with its runs); outside: absolute
    stored = json.loads((tmp_path / "reg" / REGISTRY_FILE).read_text())["runs"]
    assert stored[0]["run_dir"] == "a" and stored[1]["run_dir"] == str(tmp_path / "elsewhere" / "b")
    assert reg.get("a").run_dir == tmp_path / "reg" / "a"

    reg.promote("a", "first run")
    promoted = reg.promote("b", "NDCG@10 0.12 vs 0.1")
    assert reg.latest() == promoted and promoted.run_dir == tmp_path / "elsewhere" / "b"
    assert [(p["reason"], p["previous"]) for p in promoted.promotions] == [("NDCG@10 0.12 vs 0.1", "a")]
    assert reg.get("a").promotions[0]["previous"] is None
    pointer = json.loads((tmp_path / "reg" / LATEST_FILE).read_text())
    assert pointer["run_id"] == "b" and pointer["promoted_at"] == promoted.promotions[-1]["promoted_at"]
    with pytest.raises(DataError, match="'c' is not registered"):
        reg.promote("c", "typo")


def test_re_register_is_idempotent_and_conflicts_are_errors(tmp_path):
    reg = Registry(tmp_path)
    run = make_run(tmp_path, "r1")
    first = reg.register("r1", run, data_window=WINDOW, metrics={"NDCG@10": 0.1})
    assert reg.register("r1", run, data_window=dict(WINDOW), metrics={"NDCG@10": np.float64(0.1)}) == first
    assert len(reg.runs()) == 1
    with pytest.raises(DataError, match=rf"{REGISTRY_FILE}.*'r1' is already registered with other metrics"):
        reg.register("r1", run, data_window=WINDOW, metrics={"NDCG@10": 0.2})
    with pytest.raises(DataError, match="other run_dir, parent"):
        reg.register("r1", make_run(tmp_path, "r2"), data_window=WINDOW, metrics={"NDCG@10": 0.1}, parent="r0")
    with pytest.raises(DataError, match="is not a directory"):
        reg.register("r3", tmp_path / "missing")
    with pytest.raises(ValueError, match="without whitespace"):
        reg.register("r 3", run)
    with pytest.raises(ValueError, match="metrics must be JSON serialisable"):
        reg.register("r3", run, metrics={"x": object()})
    assert [r.run_id for r in reg.runs()] == ["r1"]


def test_failed_pointer_replace_leaves_the_old_pointer_and_history(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    for name in ("old", "new"):
        reg.register(name, make_run(tmp_path, name), metrics={"NDCG@10": 0.1})
    reg.promote("old", "first")
    pointer_before = (tmp_path / LATEST_FILE).read_bytes()
    registry_before = json.loads((tmp_path / REGISTRY_FILE).read_text())
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(dst) == LATEST_FILE:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        reg.promote("new", "better")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / LATEST_FILE).read_bytes() == pointer_before
    assert reg.latest().run_id == "old"
    # the registry does not claim the promotion that did not happen, and no temporary is left
    assert json.loads((tmp_path / REGISTRY_FILE).read_text()) == registry_before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".registry.lock", LATEST_FILE, "new", "old", REGISTRY_FILE]


def test_corrupt_files_and_dangling_pointer_name_the_file(tmp_path):
    reg = Registry(tmp_path)
    run = make_run(tmp_path, "r1")
    reg.register("r1", run)
    reg.promote("r1", "first")
    (tmp_path / LATEST_FILE).write_text('{"run_id": "r1", "run_d')
    with pytest.raises(DataError, match=rf"file {tmp_path / LATEST_FILE}: not a readable pointer"):
        reg.latest()
    reg.promote("r1", "repair")  # promoting rewrites a damaged pointer
    assert reg.latest().run_id == "r1"
    (tmp_path / LATEST_FILE).write_text(json.dumps({"run_id": "gone", "run_dir": "gone"}))
    with pytest.raises(DataError, match=rf"file {tmp_path / LATEST_FILE}: points to run 'gone'"):
        reg.latest()
    reg.promote("r1", "again")
    run.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=rf"{LATEST_FILE}: points to run 'r1' whose directory .* does not exist"):
        reg.latest()
    (tmp_path / REGISTRY_FILE).write_text("{not json")
    with pytest.raises(DataError, match=rf"file {tmp_path / REGISTRY_FILE}: not a readable registry"):
        reg.runs()
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"format_version": 99, "runs": []}))
    with pytest.raises(DataError, match="format_version 99"):
        reg.runs()
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"format_version": 1, "runs": [{"run_id": "x"}]}))
    with pytest.raises(DataError, match="run entry 0 lacks"):
        reg.get("x")


def _register_and_promote(root, worker, rounds, barrier):
    reg = Registry(root)
    barrier.wait()
    for i in range(rounds):
        run_id = f"w{worker}-{i}"
        run_dir = root / run_id
        run_dir.mkdir()
        reg.register(run_id, run_dir, metrics={"NDCG@10": i / 100})
        reg.promote(run_id, f"worker {worker} round {i}")


def test_concurrent_promotions_from_two_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rounds, barrier = 15, ctx.Barrier(2)
    workers = [ctx.Process(target=_register_and_promote, args=(tmp_path, w, rounds, barrier)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0]
    reg = Registry(tmp_path)
    runs = reg.runs()
    assert sorted(r.run_id for r in runs) == sorted(f"w{w}-{i}" for w in range(2) for i in range(rounds))
    assert all(len(r.promotions) == 1 for r in runs)
    assert reg.latest().run_id in {f"w0-{rounds - 1}", f"w1-{rounds - 1}"}
    # the promotions form one chain: each names the run promoted just before it
    chain = sorted((r.promotions[0]["promoted_at"], r.run_id, r.promotions[0]["previous"]) for r in runs)
    assert chain[0][2] is None
    assert all(prev == earlier[1] for earlier, (_, _, prev) in zip(chain, chain[1:]))
    assert chain[-1][1] == reg.latest().run_id


def test_decide_promotion_rule():
    incumbent = {"NDCG@10": 0.100, "HR@10": 0.2}
    assert decide_promotion({"NDCG@10": 0.100}, incumbent)[0]  # equal: not worse
    ok, reason = decide_promotion({"NDCG@10": 0.099}, incumbent, tolerance=0.002)
    assert ok and "<= tolerance 0.002" in reason
    ok, reason = decide_promotion({"NDCG@10": 0.097}, incumbent, tolerance=0.002)
    assert not ok and "keep the incumbent" in reason and "0.097" in reason
    assert not decide_promotion({"NDCG@10": 0.0999}, incumbent)[0]
    assert decide_promotion({"NDCG@10": 0.0}, None)[0]
    # a lower-is-better metric, and a nested metrics.json path
    assert decide_promotion({"loss": 1.0}, {"loss": 1.1}, metric="loss", higher_is_better=False)[0]
    assert not decide_promotion({"loss": 1.2}, {"loss": 1.1}, metric="loss", higher_is_better=False)[0]
    nested = {"metrics": {"overall": {"NDCG@10": 0.11}}}
    assert decide_promotion(nested, {"metrics": {"overall": {"NDCG@10": 0.1}}}, metric="metrics/overall/NDCG@10")[0]
    assert not decide_promotion({"NDCG@10": float("nan")}, incumbent)[0]
    assert decide_promotion({"NDCG@10": 0.05}, {"NDCG@10": float("nan")})[0]
    with pytest.raises(ConfigError, match=r"'NDCG@20' is not in the candidate's metrics .*keys there: HR@10, NDCG@10"):
        decide_promotion(incumbent, incumbent, metric="NDCG@20")
    with pytest.raises(ConfigError, match="incumbent's metrics"):
        decide_promotion({"NDCG@10": 0.1}, {"HR@10": 0.2})
    with pytest.raises(ConfigError, match="not a number"):
        decide_promotion({"NDCG@10": "high"}, incumbent)
    with pytest.raises(ConfigError, match="tolerance -0.1"):
        decide_promotion(incumbent, incumbent, tolerance=-0.1)


def test_resolve_previous_accepts_a_run_dir_or_a_registry(tmp_path):
    run = make_run(tmp_path, "runs/r1")
    assert resolve_previous(run) == run
    reg = Registry(tmp_path / "reg")
    reg.register("r1", run)
    with pytest.raises(DataError, match="no run was promoted"):
        resolve_previous(tmp_path / "reg")
    reg.promote("r1", "first")
    assert resolve_previous(tmp_path / "reg") == run
    assert resolve_previous(tmp_path / "reg" / LATEST_FILE) == run
    assert resolve_previous(reg) == run
    with pytest.raises(DataError, match="does not exist"):
        resolve_previous(tmp_path / "nope")
    with pytest.raises(AlphaFuseError, match=r"previous run .*r1 is incomplete: stage 'train' has no manifest"):
        resolve_previous(run, required_stages=("train",))
    (run / "train").mkdir()
    (run / "train" / "manifest.json").write_text("{}")
    assert resolve_previous(tmp_path / "reg", required_stages=("train",)) == run



def _ranks(users, ranks, tail=None):
    import pyarrow as pa

    cols = {"user_idx": pa.array(users, pa.int32()), "rank": pa.array(ranks, pa.int64())}
    if tail is not None:
        cols["tail"] = pa.array(tail)
    return pa.table(cols)


def test_bootstrap_difference_is_paired_seeded_and_matches_numpy():
    from alphafuse_dist.retrain.decision import bootstrap_difference, describe, per_user_values

    rng = np.random.default_rng(3)
    users = np.arange(400)
    inc = rng.integers(0, 40, 400)
    cand = np.maximum(inc - rng.integers(-1, 4, 400), 0)  # mostly better ranks for the same users
    a, b = _ranks(users, cand, tail=users % 2 == 0), _ranks(users, inc, tail=users % 2 == 0)
    ndcg = lambda r: np.where(r < 10, 1 / np.log2(r + 2.0), 0.0)  # noqa: E731
    assert np.allclose(per_user_values(a, "overall/NDCG@10"), ndcg(cand))
    assert np.allclose(per_user_values(a, "tail/HR@5"), (cand < 5)[users % 2 == 0])
    assert per_user_values(a, "overall/users") is None and per_user_values(a, "nogroup/NDCG@10") is None

    ci = bootstrap_difference(a, b, "overall/NDCG@10", samples=1000, seed=5)
    diff = ndcg(cand) - ndcg(inc)
    assert ci["paired"] and ci["users"] == 400 and ci["samples"] == 1000
    assert ci["difference"] == pytest.approx(diff.mean())
    assert ci["low"] < ci["difference"] < ci["high"]
    # the paired interval is about the normal one of the per-user differences
    se = diff.std(ddof=1) / np.sqrt(400)
    assert ci["low"] == pytest.approx(diff.mean() - 1.96 * se, abs=0.6 * se)
    assert ci["high"] == pytest.approx(diff.mean() + 1.96 * se, abs=0.6 * se)
    assert bootstrap_difference(a, b, "overall/NDCG@10", samples=1000, seed=5) == ci  # seeded
    # the same models scored on other users: unpaired, and wider than paired
    unpaired = bootstrap_difference(a, _ranks(users + 1000, inc), "overall/NDCG@10", samples=1000, seed=5)
    assert not unpaired["paired"] and unpaired["high"] - unpaired["low"] > ci["high"] - ci["low"]
    text = describe(ci, "overall/NDCG@10")
    assert "95% CI" in text and "400 test users" in text and "paired bootstrap, 1000 resamples" in text
    equal = bootstrap_difference(b, b, "overall/NDCG@10", samples=200, seed=0)
    assert equal["difference"] == equal["low"] == equal["high"] == 0.0
    assert "includes 0" in describe(equal, "overall/NDCG@10")


def test_few_users_flag_names_the_part_and_the_config_key():
    from alphafuse_dist.retrain.decision import few_users_flag

    assert few_users_flag({"valid": 120, "test": 100}, 100) is None
    flag = few_users_flag({"valid": 120, "test": 17}, 100)
    assert "test 17" in flag and "valid" not in flag and "retrain.min_eval_users=100" in flag


def test_serving_dir_is_the_deployed_model_of_the_run(tmp_path):
    registry = Registry(tmp_path / "reg")
    run = make_run(tmp_path / "reg", "r1")
    registry.register("r1", run, extra={"deployed": {"dir": "deploy", "model": "the candidate refit"}})
    registry.register("r0", make_run(tmp_path / "reg", "r0"))
    assert registry.get("r1").serving_dir == run / "deploy"
    assert registry.get("r0").serving_dir == tmp_path / "reg" / "r0"  # no deployment recorded: the run itself
