"""Periodic retraining (alphafuse_dist.retrain.job running pipeline.run_pipeline): the shipped
ml-latest-small ratings cut by time into an initial period and two more (full snapshots, a subset
of the movies so that the embed stage is quick), real MiniLM embeddings, one-process training of a
tiny model for one epoch.

Period 0 is a full train, registered and promoted; period 1 warm-starts from it, is compared with
the previous model on the newest period and promoted or not by the rule; rerunning a period skips
every finished stage; a job killed after its candidate finished is resumed without redoing the
candidate and without touching LATEST before the promotion; bad inputs are clear errors that leave
the registry and LATEST as they were."""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from alphafuse_dist.errors import AlphaFuseError, DataError
from alphafuse_dist.pipeline import STAGES, run_pipeline
from alphafuse_dist.retrain import Registry, decide_promotion
from alphafuse_dist.retrain.job import retrain as retrain_with
from alphafuse_dist.retrain.plan import period_run_id
from alphafuse_dist.runtime.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "alphafuse_dist" / "datasets" / "ml-latest-small"
TINY = ["data.source=interactions", "data.text_template={title}. Genres: {genres}.", "model.dim=32",
        "model.id_dims=16", "model.max_len=20", "model.dropout=0.0", "train.backend=torch",
        "train.num_workers=1", "train.device=cpu", "train.epochs=1", "train.batch_size=64",
        "train.num_negatives=32", "train.log_every=0", "embed.device=cpu", "ray.num_cpus=2"]
TOLERANCE = 1.0  # period 1's candidate is promoted by the rule, whatever its metric
PERIOD1 = ["retrain.min_eval_users=1"]  # and not flagged for its few test users
SHARED = ("prepare", "embed", "decompose")


def _ts(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp())


ENDS = [_ts("2014-01-01"), _ts("2015-01-01"), _ts("2016-01-01")]  # snapshots: ratings before these


def _write_data(folder: Path) -> list[Path]:
    """Snapshots p0..p2 (CSV, Parquet, CSV) of the 250 most rated movies before 2014 plus the 40 most
    rated ones first rated later (the new items of periods 1 and 2); items.csv holds them all."""
    ratings = pl.read_parquet(DATA / "ratings.parquet")
    old = ratings.filter(pl.col("timestamp") < ENDS[0])
    top = old.group_by("movieId").len().sort(["len", "movieId"], descending=[True, False]).head(250)["movieId"]
    later = (ratings.group_by("movieId").agg(pl.col("timestamp").min().alias("first"), pl.len())
             .filter(pl.col("first") >= ENDS[0]).sort(["len", "movieId"], descending=[True, False]).head(40))
    keep = pl.concat([top, later["movieId"]]).implode()
    kept = (ratings.filter(pl.col("movieId").is_in(keep))
            .select(pl.col("userId").alias("user_id"), pl.col("movieId").alias("item_id"), "timestamp", "rating"))
    files = []
    for i, end in enumerate(ENDS):
        part = kept.filter(pl.col("timestamp") < end)
        path = folder / (f"p{i}.parquet" if i == 1 else f"p{i}.csv")
        part.write_parquet(path) if path.suffix == ".parquet" else part.write_csv(path)
        files.append(path)
    movies = pl.read_parquet(DATA / "movies.parquet").filter(pl.col("movieId").is_in(keep))
    movies.rename({"movieId": "item_id"}).write_csv(folder / "items.csv")
    # the same log with a renamed column (another schema)
    kept.rename({"user_id": "uid"}).filter(pl.col("timestamp") < ENDS[2]).write_csv(folder / "renamed.csv")
    return files


def retrain(*args, **kw) -> dict:
    return retrain_with(*args, pipeline=run_pipeline, **kw)


class Log(logging.Handler):
    """The lines of alphafuse_dist's loggers while inside ``with``, the log file's DEBUG ones included
    (training in one process logs its lines at DEBUG: the terminal shows its progress bar)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "Log":
        logger = logging.getLogger("alphafuse_dist")
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("alphafuse_dist")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _state(root: Path) -> tuple[bytes, bytes]:
    return (root / "LATEST").read_bytes(), (root / "registry.json").read_bytes()


def _finished(run_dir: Path) -> dict[str, str]:
    return {p.name: read_manifest(p)["finished_at"] + str(read_manifest(p)["digest"])
            for p in sorted(run_dir.iterdir()) if p.is_dir() and not p.is_symlink() and read_manifest(p)}


def _embeddings(stage: Path) -> np.ndarray:
    table = pl.concat([pl.read_parquet(p) for p in sorted(stage.glob("part-*.parquet"))]).sort("item_idx")
    return np.stack(table["vector"].to_list()).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    data = tmp_path_factory.mktemp("retrain-data")
    files = _write_data(data)
    root = tmp_path_factory.mktemp("retrain") / "registry"
    with Log() as log0:
        out0 = retrain(None, files[0], data / "items.csv", run_root=root, overrides=TINY,
                       split_times=["2012-01-01", "2013-01-01"])
    state0 = _state(root)
    with Log() as log1:
        out1 = retrain(root, files[1], promote_tolerance=TOLERANCE, overrides=PERIOD1)  # items: the previous run's
    return {"data": data, "files": files, "root": root, "out0": out0, "out1": out1, "log0": log0, "log1": log1,
            "state0": state0}


def test_first_period_is_a_full_train_registered_and_promoted(world):
    out0, root = world["out0"], world["root"]
    run0 = Path(out0["run_dir"])
    assert out0["promoted"] and out0["incumbent"] is None and out0["previous"] is None
    assert out0["run_id"] == period_run_id(out0["data_window"]["end"]) == Path(out0["run_dir"]).name
    assert run0 == root / "runs" / out0["run_id"]
    entry = Registry(root).get(out0["run_id"])
    assert entry.parent is None and entry.metrics["candidate"] == out0["candidate"]
    assert entry.data_window["end"] < ENDS[0] + 1 and entry.data_window["split_times"][1] == _ts("2013-01-01")
    config = json.loads((run0 / "train-alphafuse-s22" / "config.json").read_text())
    assert config["train"]["warm_start"] is None and config["data"]["id_map"] is None
    assert config["embed"]["cache_dir"] == str(root / "embed-cache")
    assert json.loads((run0 / "promotion.json").read_text())["promote"] is True


def test_each_period_deploys_its_configuration_refit_on_all_its_data(world):
    out0, root = world["out0"], world["root"]
    run0 = Path(out0["run_dir"])
    deploy = run0 / "deploy"
    assert out0["deployed"]["dir"] == "deploy" and out0["serving_dir"] == str(deploy)
    config = json.loads((run0 / "train-alphafuse-s22" / "config.json").read_text())
    dep = json.loads((deploy / "train-alphafuse-s22" / "config.json").read_text())
    history = json.loads((run0 / "train-alphafuse-s22" / "history.json").read_text())
    # nothing held out, the candidate's best epoch count, the candidate's catalogue and shared stages
    assert dep["data"]["split"] == "all" and dep["data"]["split_times"] == []
    assert dep["train"]["epochs"] == out0["deployed"]["epochs"] == max(1, history["best_epoch"])
    assert dep["data"]["id_map"] == str(run0 / "prepare")
    trained = json.loads((deploy / "train-alphafuse-s22" / "history.json").read_text())
    assert len(trained["epochs"]) == trained["best_epoch"] == dep["train"]["epochs"]  # no validation: all epochs
    assert not any(k.startswith("val_") for row in trained["epochs"] for k in row)
    assert {k: v for k, v in dep["model"].items()} == config["model"]
    for stage in ("embed", "decompose"):
        assert (deploy / stage).is_symlink() and (deploy / stage).resolve() == (run0 / stage).resolve()
    rows = read_manifest(deploy / "prepare")["rows"]
    cand_rows = read_manifest(run0 / "prepare")["rows"]
    assert rows["items"] == cand_rows["items"] and rows["valid"] == rows["test"] == 0
    # every interaction trains the deployed model, the candidate's train part only the oldest
    assert rows["train"] == rows["interactions"] > cand_rows["train"]
    entry = Registry(root).get(out0["run_id"])
    assert entry.extra["deployed"] == out0["deployed"] and entry.serving_dir == deploy
    assert out0["evidence"]["interval"] is None  # no incumbent to compare with
    if out0["evidence"]["flag"]:  # a first period is served all the same, flagged
        assert "FLAGGED: too few users" in out0["reason"] and out0["promoted"]
    assert entry.metrics["evidence"]["users"] == {"valid": cand_rows["valid"], "test": cand_rows["test"]}


def test_second_period_warm_starts_and_is_promoted_by_the_rule(world):
    out0, out1, root = world["out0"], world["out1"], world["root"]
    run0, run1 = Path(out0["run_dir"]), Path(out1["run_dir"])
    assert out1["parent"] == out0["run_id"] and out1["previous"] == str(run0)
    config = json.loads((run1 / "train-alphafuse-s22" / "config.json").read_text())
    # from the model period 0 deployed (its refit on all its data), in the candidate's config
    assert config["train"]["warm_start"] == str(run0 / "deploy" / "train-alphafuse-s22")
    assert config["data"]["id_map"] == str(run0 / "deploy" / "prepare")
    assert config["decompose"]["reuse_basis"] == str(run0 / "decompose")
    assert config["data"]["split"] == "time" and config["train"]["epochs"] == 1
    # never-trained items (this period's new ones) take their semantic neighbours' ID part
    assert config["train"]["cold_items"] == "neighbours"
    assert "items without training interactions" in world["log1"].text
    # valid = the previous test period, test = the newest period
    assert config["data"]["split_times"] == ["1356998400", str(out0["data_window"]["end"])]
    assert "warm start" in world["log1"].text
    drift = json.loads((run1 / "decompose" / "drift.json").read_text())
    # 40 new items at most, d = 32: too few for the drift figures to mean much, and it says so
    assert drift["new_items"] < 64 and drift["reliable"] is False and "< 64 (2 d, d=32)" in drift["reliability"]

    # the incumbent: the previous model (0 epochs) on the same test split, sharing the data stages
    inc = run1 / "incumbent"
    for stage in SHARED:
        assert (inc / stage).is_symlink() and (inc / stage).resolve() == (run1 / stage).resolve()
    inc_config = json.loads((inc / "train-alphafuse-s22" / "config.json").read_text())
    assert inc_config["train"]["epochs"] == 0 and inc_config["train"]["warm_start"] == config["train"]["warm_start"]
    assert out1["incumbent"] is not None and out1["incumbent"]["overall"]["users"] == out1["candidate"]["overall"]["users"]

    promote, reason = decide_promotion(out1["candidate"], out1["incumbent"], metric="overall/NDCG@10",
                                       tolerance=TOLERANCE)
    flag = out1["evidence"]["flag"]  # too few valid/test users: never promoted silently
    assert not flag and out1["reason"].startswith(reason)
    # the evidence: the paired bootstrap interval of the difference over the same test users
    ci = out1["evidence"]["interval"]
    assert ci["paired"] and ci["users"] == out1["candidate"]["overall"]["users"] and ci["samples"] == 1000
    assert ci["difference"] == pytest.approx(out1["candidate"]["overall"]["NDCG@10"]
                                             - out1["incumbent"]["overall"]["NDCG@10"])
    assert ci["low"] <= ci["difference"] <= ci["high"] and "95% CI" in out1["reason"]
    # promoted: LATEST names the period, whose candidate configuration was refit on all its data
    assert promote and out1["promoted"] and out1["deployed"]["dir"] == "deploy"
    registry = Registry(root)
    assert registry.latest().run_id == out1["run_id"] and registry.latest().serving_dir == run1 / "deploy"
    dep = json.loads((run1 / "deploy" / "train-alphafuse-s22" / "config.json").read_text())
    assert dep["train"]["warm_start"] == config["train"]["warm_start"] and dep["data"]["split"] == "all"
    # the period's new items: never trained by the candidate (test part), trained by the deployed model
    counts = {name: set(pl.read_parquet(folder / "prepare" / "train.parquet")["items"].explode().to_list())
              for name, folder in (("candidate", run1), ("deploy", run1 / "deploy"))}
    items1 = pl.read_parquet(run1 / "prepare" / "items.parquet")
    untrained = set(range(items1.height)) - counts["candidate"]
    assert untrained and untrained <= counts["deploy"]
    entry = registry.get(out1["run_id"])
    assert entry.metrics["incumbent"] == out1["incumbent"] and entry.data_window["end"] == out1["data_window"]["end"]
    assert entry.metrics["evidence"] == out1["evidence"]

    # stable ids: old items keep their index; only new texts are embedded; unchanged items'
    # vectors are byte-identical
    items0 = pl.read_parquet(run0 / "prepare" / "items.parquet")
    items1 = pl.read_parquet(run1 / "prepare" / "items.parquet")
    assert items1.head(items0.height).select("item_idx", "item_id").equals(items0.select("item_idx", "item_id"))
    new = items1.height - items0.height
    assert new > 0
    info1 = read_manifest(run1 / "embed")
    assert info1["encoded"] <= new + int((items1.head(items0.height)["text"] != items0["text"]).sum())
    same = (items1.head(items0.height)["text"] == items0["text"]).to_numpy()
    E0, E1 = _embeddings(run0 / "embed"), _embeddings(run1 / "embed")
    assert E0[same].tobytes() == E1[:items0.height][same].tobytes()


def test_export_of_the_registry_serves_the_newest_periods_items(world, capsys):
    from alphafuse_dist import cli

    root, run0, run1 = world["root"], Path(world["out0"]["run_dir"]), Path(world["out1"]["run_dir"])
    items0 = set(pl.read_parquet(run0 / "prepare" / "items.parquet")["item_id"].to_list())
    items1 = pl.read_parquet(run1 / "prepare" / "items.parquet")["item_id"].to_list()
    new = sorted(set(items1) - items0)  # first rated in period 1's newest part
    assert new
    assert cli.main(["export", "--run", str(root)]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder.parent == Registry(root).latest().serving_dir
    exported = pl.read_parquet(folder / "items.parquet")["item_id"].to_list()
    assert set(items1) <= set(exported) and set(new) <= set(exported)
    # a new item as the history, and among the candidates
    assert cli.main(["recommend", "--run", str(root), "--item", new[0], "--k", str(len(exported)), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(exported) and set(new) <= {r["item_id"] for r in rows}
    assert all(np.isfinite(r["score"]) for r in rows)


def test_rerun_skips_every_finished_stage_and_changes_nothing(world, capsys):
    out1, root = world["out1"], world["root"]
    run1 = Path(out1["run_dir"])
    before, state = _finished(run1), _state(root)
    inc_before = _finished(run1 / "incumbent")
    spec = importlib.util.spec_from_file_location("retrain_job_entry", REPO / "jobs" / "retrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    # the Ray job entry point, same inputs (it adds ray.address=auto: the stages are all up to date)
    assert job.main(["--previous", str(root), "--interactions", str(world["files"][1]),
                     "--tolerance", str(TOLERANCE), *PERIOD1]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"registry: {root}"
    assert ("promoted: " if out1["promoted"] else "not promoted: ") in captured.out
    for stage in ("prepare", "embed", "decompose", "train-alphafuse-s22", "evaluate-alphafuse-s22"):
        assert f"[{stage}] up to date" in captured.err, captured.err
    assert _finished(run1) == before and _finished(run1 / "incumbent") == inc_before
    assert _state(root) == state  # nothing registered or promoted again

    # the registered run is not rebuilt with other settings
    with pytest.raises(AlphaFuseError, match="already registered"):
        retrain(root, world["files"][1], overrides=PERIOD1 + ["train.lr=0.01"])
    assert _finished(run1) == before and _state(root) == state


FEW = ["retrain.min_eval_users=100000"]


def test_a_killed_job_resumes_without_redoing_stages_and_a_flagged_period_is_not_promoted(world, monkeypatch):
    root, files = world["root"], world["files"]
    state, latest_before = _state(root), Registry(root).latest().run_id
    def killed(cfg, stages=STAGES):  # after the candidate's five stages, before the incumbent's
        if stages == ("train", "evaluate"):
            raise KeyboardInterrupt("killed before the incumbent")
        return run_pipeline(cfg, stages=stages)

    with pytest.raises(KeyboardInterrupt):
        retrain_with(root, files[2], pipeline=killed, promote_tolerance=TOLERANCE, overrides=FEW)
    assert (root / "runs" / period_run_id(int(pl.read_csv(files[2])["timestamp"].max()) + 1)).is_dir()  # kept
    assert _state(root) == state  # not registered, LATEST untouched
    run_id = period_run_id(int(pl.read_csv(files[2])["timestamp"].max()) + 1)
    run2 = root / "runs" / run_id
    before = _finished(run2)
    assert {"prepare", "embed", "decompose", "train-alphafuse-s22", "evaluate-alphafuse-s22"} <= set(before)

    # the resumed job's candidate wins by the rule, but the period has fewer users than
    # retrain.min_eval_users: registered, flagged, not promoted; the incumbent on the new catalogue serves
    from alphafuse_dist.retrain import decision

    monkeypatch.setattr(decision, "decide_promotion", lambda *a, **k: (True, "promote: forced by the test"))
    with Log() as resumed:
        out2 = retrain(root, files[2], promote_tolerance=TOLERANCE, overrides=FEW)
    assert out2["run_id"] == run_id and _finished(run2) == before
    for stage in ("prepare", "embed", "decompose", "train-alphafuse-s22", "evaluate-alphafuse-s22"):
        assert f"[{stage}] up to date" in resumed.text
    registry = Registry(root)
    assert out2["parent"] == latest_before and run_id in registry and out2["incumbent"] is not None
    assert not out2["promoted"] and out2["latest"] == run_id and registry.latest().run_id == run_id
    assert registry.latest().serving_dir == run2 / "incumbent" and not (run2 / "deploy").exists()
    assert out2["evidence"]["flag"] and "retrain.min_eval_users=100000" in out2["reason"]
    assert out2["reason"].startswith("keep the incumbent: too few users") and "promote_few_users" in out2["reason"]
    assert registry.get(run_id).promotions[-1]["reason"].startswith("serve the incumbent: keep the incumbent")
    assert "warning" in resumed.text and "too few users" in resumed.text
    promotion = json.loads((run2 / "promotion.json").read_text())
    assert promotion["promote"] is False and promotion["deployed"]["dir"] == "incumbent"
    assert "NOT promoted" in resumed.text


@pytest.mark.parametrize("case", ["backwards", "schema", "incomplete", "version"])
def test_bad_input_is_a_clear_error_and_leaves_latest(world, tmp_path, case):
    root, data, files = world["root"], world["data"], world["files"]
    state = _state(root)
    runs_before = sorted(p.name for p in (root / "runs").iterdir())
    previous: Path | str = root
    interactions = files[2]
    if case == "backwards":
        interactions, match = files[0], "time window goes backwards"
    elif case == "schema":
        interactions, match = data / "renamed.csv", "schema.*user_id"
    else:
        previous = tmp_path / "copy"
        shutil.copytree(Path(world["out0"]["run_dir"]), previous, symlinks=True)
        if case == "incomplete":
            shutil.rmtree(previous / "decompose")
            match = "incomplete.*decompose"
        else:
            manifest = previous / "train-alphafuse-s22" / "manifest.json"
            body = json.loads(manifest.read_text())
            manifest.write_text(json.dumps(body | {"package_version": "99.0.0"}))
            match = "another major version"
    with pytest.raises(AlphaFuseError, match=match) as err:
        retrain(previous, interactions, run_root=root)
    assert "\n" not in str(err.value)
    if case in ("backwards", "schema"):
        assert isinstance(err.value, DataError)
    assert _state(root) == state
    assert sorted(p.name for p in (root / "runs").iterdir()) == runs_before


def test_cli_reports_bad_input_in_one_line(world, capsys):
    root = world["root"]
    state = _state(root)
    from alphafuse_dist import cli

    assert cli.main(["retrain", "--previous", str(root), "--interactions", str(world["files"][0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("alphafuse: error: ") and "goes backwards" in err[-1]
    assert _state(root) == state


def test_train_window_keeps_recent_training_interactions(tmp_path):
    from alphafuse_dist.config import DataConfig
    from alphafuse_dist.data.splits import split
    from alphafuse_dist.errors import ConfigError

    day = 86400
    seq = pl.DataFrame({"user_idx": [0, 0, 0, 0, 0, 1, 1], "item_idx": [0, 1, 2, 3, 0, 1, 2],
                        "timestamp": [0, 8 * day, 9 * day, 10 * day + 5, 11 * day + 1, 9 * day + 5, 12 * day]},
                       schema={"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64})
    users = pl.DataFrame({"user_idx": [0, 1], "user_id": ["a", "b"]}, schema={"user_idx": pl.Int32, "user_id": pl.String})
    cfg = DataConfig(split="time", split_times=[str(10 * day), str(11 * day)], train_window_days=2.0)
    (train, valid, test), facts = split(seq, users, cfg, "f")
    assert train.sort("user_idx")["items"].to_list() == [[1, 2], [1]]
    assert facts["train_start"] == 8 * day and facts["dropped_before_window"] == 1
    assert valid["history"].to_list() == [[0, 1, 2]]  # histories are not cut
    assert test.sort("user_idx")["history"].to_list() == [[0, 1, 2, 3], [1]]
    with pytest.raises(ConfigError, match="train_window_days"):
        split(seq, users, DataConfig(split="leave_one_out", train_window_days=2.0), "f")
    with pytest.raises(ConfigError, match="train_window_days"):
        split(seq, users, DataConfig(split="time", split_times=["1", "2"], train_window_days=0.0), "f")


def test_new_rows_alone_fail_cleanly_without_the_flag_and_are_appended_with_it(world, tmp_path):
    """The rows since period 0 only: read as the full log, the train part is empty (a one-line error,
    no run folder left); with new_rows they are appended to period 0's log."""
    files, run0 = world["files"], Path(world["out0"]["run_dir"])
    full = pl.read_parquet(files[1])
    new = full.filter(pl.col("timestamp") >= ENDS[0])
    new.write_parquet(tmp_path / "new.parquet")
    root = tmp_path / "registry"
    run_dir = root / "runs" / period_run_id(int(full["timestamp"].max()) + 1)
    with pytest.raises(DataError, match="the train part is empty") as err:
        retrain(run0, tmp_path / "new.parquet", run_root=root)
    assert "\n" not in str(err.value) and not run_dir.exists()

    seen = []

    def killed(cfg, stages=STAGES):
        seen.append(cfg)
        raise KeyboardInterrupt("killed in prepare")

    with pytest.raises(KeyboardInterrupt):
        retrain_with(run0, tmp_path / "new.parquet", pipeline=killed, run_root=root, new_rows=True)
    log = Path(seen[0].data.path)
    assert log.parent == root / "logs" and seen[0].run_path == run_dir and run_dir.is_dir()  # a kill keeps it
    appended = pl.read_parquet(log)
    assert appended.height == pl.read_csv(files[0]).height + new.height
    assert appended["timestamp"].cast(pl.Int64).sort().to_list() == full["timestamp"].sort().to_list()
    with pytest.raises(AlphaFuseError, match="--new-rows appends --interactions"):
        retrain_with(run0, None, pipeline=killed, run_root=root, new_rows=True)


def test_split_all_trains_on_every_interaction_and_holds_nothing_out():
    from alphafuse_dist.config import DataConfig
    from alphafuse_dist.data.splits import split

    day = 86400
    seq = pl.DataFrame({"user_idx": [0, 0, 0, 1, 1], "item_idx": [0, 1, 2, 1, 3],
                        "timestamp": [0, 5 * day, 9 * day, 8 * day, 10 * day]},
                       schema={"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64})
    users = pl.DataFrame({"user_idx": [0, 1], "user_id": ["a", "b"]}, schema={"user_idx": pl.Int32, "user_id": pl.String})
    (train, valid, test), facts = split(seq, users, DataConfig(split="all", min_user_interactions=1), "f")
    assert train.sort("user_idx")["items"].to_list() == [[0, 1, 2], [1, 3]] and valid.height == test.height == 0
    assert facts["kind"] == "all" and facts["t1"] == 10 * day + 1
    # a training window counts back from the newest interaction
    (train, _, _), facts = split(seq, users, DataConfig(split="all", min_user_interactions=1, train_window_days=3.0), "f")
    assert train.sort("user_idx")["items"].to_list() == [[2], [1, 3]] and facts["dropped_before_window"] == 2
