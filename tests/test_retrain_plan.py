"""The plan of a retraining period (alphafuse_dist.retrain.plan) and the promotion decision
(alphafuse_dist.retrain.decision), without Ray, data or training: previous runs are folders of
small JSON files (manifests, config.json, retrain.json) and a registry."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from alphafuse_dist import __version__
from alphafuse_dist.config import load_config
from alphafuse_dist.errors import AlphaFuseError, ConfigError, DataError
from alphafuse_dist.retrain.decision import decide_promotion
from alphafuse_dist.retrain.plan import Previous, load_previous, period_run_id, plan_period, registry_root
from alphafuse_dist.retrain.registry import Registry

DAY = 86400
T0 = 1_400_000_000  # the first period: valid [T0, T0 + 10 days), test [T0 + 10 days, END0)
END0 = T0 + 20 * DAY
TINY = ["model.dim=32", "model.id_dims=16", "train.num_workers=1", "train.batch_size=8"]


def _stage(run_dir: Path, name: str, version: str = __version__) -> Path:
    folder = run_dir / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": name, "package_version": version, "digest": "d"}))
    return folder


def _previous_run(root: Path, *, method: str = "alphafuse", end: int = END0, record: bool = True,
                  register: bool = True) -> Path:
    """A finished first period <root>/runs/<id>: manifests, train config.json, retrain.json, registered
    and promoted."""
    run_id = period_run_id(end)
    run_dir = root / "runs" / run_id
    cfg = load_config("quickstart", TINY + [f"method={method}", f"run_dir={run_dir}", "data.split=time",
                                            f"data.split_times=[{T0}, {T0 + 10 * DAY}]"])
    for stage in ("prepare", "embed", "decompose"):
        _stage(run_dir, stage)
    train = _stage(run_dir, f"train-{method}-s22")
    (train / "config.json").write_text(json.dumps(cfg.to_dict()))
    if record:
        (run_dir / "retrain.json").write_text(json.dumps({"period_end": end, "method": method, "seed": 22}))
    if register:
        registry = Registry(root)
        registry.register(run_id, run_dir, data_window={"start": T0 - 100 * DAY, "end": end}, metrics={},
                          extra={"previous_dir": None})
        registry.promote(run_id, "promote: no incumbent")
    return run_dir


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "registry"


def _plan(root: Path, last_ts: int, previous: Path | None = None, **kw):
    registry = Registry(root)
    prev = load_previous(previous, registry, kw.get("overrides", ())) if previous is not None else None
    return plan_period(registry, prev, T0 - 100 * DAY, last_ts, **kw)


# ----------------------------------------------------------------------------- first period
def test_first_period_is_a_full_train_with_its_split_times(root):
    plan = _plan(root, END0 - 1, config="quickstart", overrides=TINY, split_times=[str(T0), str(T0 + 10 * DAY)])
    assert plan.run_id == period_run_id(END0) == "20140602T165320Z"
    assert plan.run_dir == root / "runs" / plan.run_id and plan.cfg.run_path == plan.run_dir
    assert plan.previous is None and plan.parent is None and plan.incumbent_cfg() is None
    cfg = plan.cfg
    assert (cfg.data.split, cfg.data.split_times) == ("time", [str(T0), str(T0 + 10 * DAY)])
    assert cfg.train.warm_start is None and cfg.data.id_map is None and cfg.decompose.reuse_basis is None
    assert cfg.train.cold_items == "neighbours"  # alphafuse: never-trained items from their neighbours
    assert cfg.embed.cache_dir == str(root / "embed-cache")
    assert plan.window["end"] == END0 and plan.window["split_times"] == [T0, T0 + 10 * DAY]
    assert plan.window["test"] == ["2014-05-23T16:53:20Z", "2014-06-02T16:53:20Z"]
    assert plan.record["previous_dir"] is None and plan.record["period_end"] == END0
    assert not plan.registered


def test_first_period_needs_split_times_and_a_registry(root):
    with pytest.raises(ConfigError, match="the first period needs --split-times T1,T2"):
        _plan(root, END0 - 1, config="quickstart", overrides=TINY)
    with pytest.raises(ConfigError, match=r"a first period .* needs the registry folder: --registry DIR$") as err:
        registry_root(None, None)
    assert "run_root" not in str(err.value)  # CLI flags, not Python names


def test_period_end_must_follow_the_newest_interaction(root):
    with pytest.raises(DataError, match=r"--period-end .* is not after the newest interaction"):
        _plan(root, END0, config="quickstart", overrides=TINY, split_times=[T0, T0 + DAY], period_end=END0)
    with pytest.raises(ConfigError, match="test period .* would be empty"):
        _plan(root, END0 - 1, config="quickstart", overrides=TINY, split_times=[T0, END0])


# ----------------------------------------------------------------------------- next period
def test_next_period_warm_starts_from_the_previous_run(root):
    prev = _previous_run(root)
    end1 = END0 + 30 * DAY
    plan = _plan(root, end1 - 1, prev)
    cfg = plan.cfg
    assert plan.parent == prev.name and plan.previous.run_dir == prev
    # valid = the previous run's test period, test = the newest period
    assert plan.window["split_times"] == [T0 + 10 * DAY, END0] and plan.window["end"] == end1
    assert cfg.data.id_map == str(prev / "prepare")
    assert cfg.train.warm_start == str(prev / "train-alphafuse-s22")
    assert cfg.decompose.reuse_basis == str(prev / "decompose")
    assert (cfg.model.dim, cfg.train.cold_items) == (32, "neighbours")  # the previous config is the base
    inc = plan.incumbent_cfg()
    assert inc.train.epochs == 0 and inc.run_path == plan.run_dir / "incumbent"
    assert inc.train.warm_start == cfg.train.warm_start and cfg.train.epochs > 0
    assert plan.record["previous_dir"] == str(prev) and plan.record["parent"] == prev.name


def test_overrides_win_and_run_dir_is_chosen_by_retrain(root):
    prev = _previous_run(root)
    plan = _plan(root, END0 + DAY, prev, overrides=["train.epochs=3", "data.train_window_days=15"])
    assert plan.cfg.train.epochs == 3
    assert plan.window["start"] == T0 + 10 * DAY - 15 * DAY  # the training window, from t1
    with pytest.raises(ConfigError, match="run_dir is chosen by retrain"):
        _plan(root, END0 + DAY, prev, overrides=["run_dir=/elsewhere"])


def test_an_id_only_method_reuses_no_basis(root):
    prev = _previous_run(root, method="sasrec_id")
    cfg = _plan(root, END0 + DAY, prev).cfg
    assert cfg.method == "sasrec_id" and cfg.decompose.reuse_basis is None and cfg.train.cold_items == "trained"


@pytest.mark.parametrize("last_ts, match", [
    (END0 - 1, "time window goes backwards: the new data ends at 2014-06-02T16:53:20Z"),
    (END0 - 5 * DAY, "time window goes backwards"),
])
def test_the_window_never_goes_backwards(root, last_ts, match):
    prev = _previous_run(root)
    with pytest.raises(DataError, match=match):
        _plan(root, last_ts, prev)


def test_a_later_registered_run_blocks_an_older_period(root):
    prev = _previous_run(root)
    (root / "runs" / "later").mkdir()
    Registry(root).register("later", root / "runs" / "later", data_window={"end": END0 + 50 * DAY}, metrics={})
    with pytest.raises(DataError, match="already holds run 'later'"):
        _plan(root, END0 + 10 * DAY, prev)


def test_previous_run_without_a_recorded_end_is_planned_from_its_split(root, caplog):
    prev = _previous_run(root, record=False, register=False)
    previous = load_previous(prev, Registry(root))
    assert previous.end == T0 + 10 * DAY  # the t2 of its time split: a lower bound
    plan = plan_period(Registry(root), Previous(prev, previous.train_dir, previous.config, None), 0, END0 + DAY)
    assert "records no period end" in caplog.text and plan.parent == prev.name


@pytest.mark.parametrize("case, match", [
    ("incomplete", "previous run .* is incomplete: stage 'decompose' has no manifest"),
    ("version", "stage 'prepare' was written by alphafuse_dist 99.0.0, this is .*another major version"),
    ("no_model", "is incomplete: no finished train stage"),
    ("two_models", "holds several trained models"),
])
def test_the_previous_run_must_be_complete_and_readable(root, case, match):
    prev = _previous_run(root)
    if case == "incomplete":
        (prev / "decompose" / "manifest.json").unlink()
    elif case == "version":
        (prev / "prepare" / "manifest.json").write_text(json.dumps({"package_version": "99.0.0", "digest": "d"}))
    elif case == "no_model":
        (prev / "train-alphafuse-s22" / "config.json").unlink()
    else:
        (prev / "retrain.json").unlink()
        other = _stage(prev, "train-alphafuse-s23")
        (other / "config.json").write_text((prev / "train-alphafuse-s22" / "config.json").read_text())
    with pytest.raises(AlphaFuseError, match=match) as err:
        load_previous(prev, Registry(root))
    assert "\n" not in str(err.value)
    if case == "two_models":
        assert load_previous(prev, Registry(root), ["seed=23"]).train_dir.name == "train-alphafuse-s23"


def test_a_registered_period_reruns_only_as_it_was(root, caplog):
    prev = _previous_run(root)
    plan = _plan(root, END0 + DAY, prev)
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "retrain.json").write_text(json.dumps(plan.record))
    train = plan.run_dir / "train-alphafuse-s22"
    train.mkdir()
    (train / "config.json").write_text(json.dumps(plan.cfg.to_dict()))
    Registry(root).register(plan.run_id, plan.run_dir, data_window=plan.window, metrics={},
                            extra={"previous_dir": str(prev)})
    again = _plan(root, END0 + DAY, prev)
    assert again.registered and again.cfg == plan.cfg
    with pytest.raises(ConfigError, match="already registered .* with other inputs or settings"):
        _plan(root, END0 + DAY, prev, overrides=["train.lr=0.01"])
    # named through the registry (by_pointer), a rerun starts from the previous run it recorded,
    # whatever the pointer gave (LATEST may be the period itself)
    caplog.set_level(logging.INFO, logger="alphafuse_dist")
    rerun = plan_period(Registry(root), None, 0, END0 + DAY, by_pointer=True)
    assert rerun.registered and rerun.previous.run_dir == prev and rerun.cfg == plan.cfg
    assert "already registered: rerunning it from its recorded previous run" in caplog.text


def test_registry_root_from_previous(root):
    prev = _previous_run(root)
    assert registry_root(root, None) == root.absolute()
    assert registry_root(root / "LATEST", None) == root.absolute()
    assert registry_root(prev, None) == root.absolute()
    with pytest.raises(ConfigError, match="outside a registry"):
        registry_root(root.parent, None)


# ----------------------------------------------------------------------------- the decision
@pytest.mark.parametrize("candidate, incumbent, tolerance, promote", [
    (0.100, 0.100, 0.0, True),
    (0.099, 0.100, 0.002, True),
    (0.097, 0.100, 0.002, False),
    (0.0, None, 0.0, True),
    (float("nan"), 0.1, 0.0, False),
])
def test_decision(candidate, incumbent, tolerance, promote):
    metrics = lambda v: {"overall": {"NDCG@10": v}}  # noqa: E731
    ok, reason = decide_promotion(metrics(candidate), None if incumbent is None else metrics(incumbent),
                                  metric="overall/NDCG@10", tolerance=tolerance)
    assert ok is promote and "\n" not in reason


def test_planning_needs_neither_ray_nor_torch():
    code = ("import sys, alphafuse_dist.retrain, alphafuse_dist.retrain.plan, alphafuse_dist.retrain.decision; "
            "heavy = {'ray', 'torch', 'numpy', 'polars'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
