"""Config validation: every numeric key has a range in config.RANGES, every rule across keys is in
config.validate, each error is one exact line naming the key; the CLI stops before any work with
exit status 2, also for errors raised inside Ray tasks and Ray Train workers."""
from __future__ import annotations

import dataclasses
import re
import types
import typing

import pytest

from alphafuse_dist import config
from alphafuse_dist.cli import main
from alphafuse_dist.config import RANGES, UNBOUNDED, RunConfig, check_against_data, load_config
from alphafuse_dist.errors import ConfigError, DataError, user_error

CASES = [  # override(s) -> the exact message
    ("train.lr=-1", "train.lr=-1: must be > 0"),
    ("train.lr=0", "train.lr=0: must be > 0"),
    ("train.lr=.nan", "train.lr=nan: must be a finite number"),
    ("train.lr=.inf", "train.lr=inf: must be a finite number"),
    ("train.id_lr=0", "train.id_lr=0: must be > 0"),
    ("train.weight_decay=-0.5", "train.weight_decay=-0.5: must be >= 0"),
    ("train.epochs=20000", "train.epochs=20000: must be in [0, 10000]"),
    ("train.epochs=-1", "train.epochs=-1: must be in [0, 10000]"),
    ("train.epochs=0", "train.epochs=0: must be >= 1 (0 only with train.warm_start: the previous model "
                       "applied to this run's catalogue)"),
    ("train.num_workers=0", "train.num_workers=0: must be >= 1"),
    ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("train.num_negatives=0", "train.num_negatives=0: must be >= 1"),
    ("train.popularity_alpha=-1", "train.popularity_alpha=-1: must be >= 0"),
    ("train.ce_chunk=0", "train.ce_chunk=0: must be >= 1"),
    ("train.patience=0", "train.patience=0: must be >= 1"),
    ("train.eval_every=0", "train.eval_every=0: must be >= 1"),
    ("train.log_every=-1", "train.log_every=-1: must be >= 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: must be >= 1"),
    ("train.max_failures=-1", "train.max_failures=-1: must be >= 0"),
    ("train.timeout_s=0", "train.timeout_s=0: must be >= 1"),
    ("train.cold_neighbours=0", "train.cold_neighbours=0: must be >= 1"),
    ("model.dropout=1", "model.dropout=1: must be in [0, 1)"),
    ("model.dropout=-0.1", "model.dropout=-0.1: must be in [0, 1)"),
    ("model.temperature=0", "model.temperature=0: must be > 0"),
    ("model.mask_prob=0", "model.mask_prob=0: must be in (0, 1]"),
    ("model.mask_prob=1.5", "model.mask_prob=1.5: must be in (0, 1]"),
    ("model.dim=0", "model.dim=0: must be >= 1"),
    ("model.max_len=0", "model.max_len=0: must be >= 1"),
    ("model.num_blocks=0", "model.num_blocks=0: must be >= 1"),
    ("model.num_heads=0", "model.num_heads=0: must be >= 1"),
    ("model.id_init_std=0", "model.id_init_std=0: must be > 0"),
    ("model.unisrec_experts=0", "model.unisrec_experts=0: must be >= 1"),
    ("model.rlmrec_weight=-1", "model.rlmrec_weight=-1: must be >= 0"),
    ("model.num_heads=3", "model.num_heads=3: must divide model.dim=128"),
    ("train.id_optimizer=rowwise_adagrad method=sasrec_id model.dim=130",
     "model.dim=130: must be a multiple of 4 with train.id_optimizer=rowwise_adagrad and train.backend=torchrec "
     "(TorchRec pads narrower tables and the row-wise state would average over the padding; adagrad, sgd and adam "
     "take any width)"),
    ("train.id_optimizer=rowwise_adagrad model.id_dims=18",
     "model.id_dims=18: must be a multiple of 4 with train.id_optimizer=rowwise_adagrad and train.backend=torchrec "
     "(TorchRec pads narrower tables and the row-wise state would average over the padding; adagrad, sgd and adam "
     "take any width)"),
    ("method=llmesr model.dim=13 model.id_dims=4 model.num_heads=1",
     "model.dim=13: method=llmesr splits it into two halves: must be even"),
    ("train.id_optimizer=rowwise_adagrad method=llmesr model.dim=132",
     "model.dim=132: must be a multiple of 8 with train.id_optimizer=rowwise_adagrad and train.backend=torchrec "
     "(TorchRec pads narrower tables and the row-wise state would average over the padding; adagrad, sgd and adam "
     "take any width)"),
    ("model.id_dims=128", "model.id_dims=128: must be < model.dim=128"),
    ("model.id_dims=0", "model.id_dims=0: must be >= 1"),
    ("decompose.scale=0", "decompose.scale=0: must be > 0"),
    ("decompose.oversample=-2", "decompose.oversample=-2: must be >= 0"),
    ("decompose.power_iters=-1", "decompose.power_iters=-1: must be >= 0"),
    ("decompose.refit_threshold=1.5", "decompose.refit_threshold=1.5: must be in [0, 1]"),
    ("decompose.null_rule=threshold", "decompose.null_threshold=None: required for decompose.null_rule=threshold "
                                      "(DreamRec: 0.25 with decompose.scale=40)"),
    ("embed.batch_size=0", "embed.batch_size=0: must be >= 1"),
    ("embed.num_actors=0", "embed.num_actors=0: must be >= 1"),
    ("embed.actors_per_gpu=0", "embed.actors_per_gpu=0: must be >= 1"),
    ("embed.gpu_batch_size=0", "embed.gpu_batch_size=0: must be >= 1"),
    ("embed.rows_per_file=0", "embed.rows_per_file=0: must be >= 1"),
    ("eval.ks=[0, 10]", "eval.ks=[0, 10]: each element must be >= 1"),
    ("eval.ks=[]", "eval.ks=[]: must name at least one cut-off"),
    ("eval.user_batch=0", "eval.user_batch=0: must be >= 1"),
    ("eval.sampled_negatives=0", "eval.sampled_negatives=0: must be >= 1"),
    ("eval.tail_item_threshold=0", "eval.tail_item_threshold=0: must be >= 1"),
    ("ray.num_cpus=0", "ray.num_cpus=0: must be >= 1"),
    ("ray.ready_timeout_s=0", "ray.ready_timeout_s=0: must be > 0"),
    ("seed=-1", "seed=-1: must be >= 0"),
    ("data.head_fraction=1.5", "data.head_fraction=1.5: must be in [0, 1]"),
    ("data.min_item_interactions=0", "data.min_item_interactions=0: must be >= 1"),
    ("data.text_max_tokens=0", "data.text_max_tokens=0: must be >= 1"),
    ("data.min_user_interactions=2", "data.min_user_interactions=2: must be >= 3 for data.split=leave_one_out"),
    ("data.min_user_interactions=0", "data.min_user_interactions=0: must be >= 1"),
    ("data.max_history=2", "data.max_history=2: must be >= data.min_user_interactions=3, or the users it cuts "
                           "would fail the k-core"),
    ("data.split=time", "data.split_times=[]: the time split needs [t1, t2] (epoch seconds or ISO 8601), valid = "
                        "[t1, t2), test = [t2, ...)"),
    ("data.split_times=[1, 2]", "data.split_times=['1', '2']: only for data.split=time, not "
                                "data.split=leave_one_out"),
    ("data.train_window_days=7", "data.train_window_days=7: only for data.split=time (the window is counted back "
                                 "from t1 of data.split_times) or all, not data.split=leave_one_out"),
    ("data.head_rule=threshold", "data.head_threshold=None: required for data.head_rule=threshold (head items have "
                                 "more training interactions than this)"),
    ("train.warm_start=/prev/train", "train.warm_start=/prev/train: needs data.id_map (the previous run's prepare "
                                     "folder): without stable ids, item i of this run is not item i of the previous "
                                     "one"),
    ("decompose.reuse_basis=/prev/decompose", "decompose.reuse_basis=/prev/decompose: needs data.id_map (the previous "
                                              "run's prepare folder): without stable ids, item i of this run is not "
                                              "item i of the previous one"),
    ("train.batch_size=5", "train.batch_size=5: must be a multiple of train.num_workers=2"),
    ("train.logq=true train.loss=full_ce", "train.logq=true: only for the sampled losses (train.loss=infonce or "
                                           "bce), full_ce samples no negatives"),
    ("model.backbone=bert4rec train.loss_positions=last",
     "train.loss_positions=last: only for causal backbones (sasrec, gru4rec); bert4rec is trained at its masked "
     "positions (model.mask_prob)"),
    ("method=sasrec_id train.cold_items=neighbours",
     "train.cold_items=neighbours: only for method=alphafuse (its ID parts live beside a frozen semantic table), "
     "not method=sasrec_id"),
    ("data.split=cold_start_users data.min_user_interactions=1",
     "data.min_user_interactions=1: must be >= 2 for data.split=cold_start_users"),
    ("data.split=cold_start_users data.split_fractions=[0.5, 0.6, 0.1]",
     "data.split_fractions=[0.5, 0.6, 0.1]: expected three fractions >= 0 (train, valid, test users) that sum to 1"),
    ("data.split=cold_start_users data.split_fractions=[0.5, 0.5]",
     "data.split_fractions=[0.5, 0.5]: expected three fractions >= 0 (train, valid, test users) that sum to 1"),
    ("data.split=time data.split_times=[20, 10]",
     "data.split_times=['20', '10']: t1 must be before t2 (got 20 >= 10 epoch seconds)"),
    ("data.split=time data.split_times=[1, 2] data.train_window_days=0",
     "data.train_window_days=0: must be > 0"),
    ("decompose.null_rule=threshold decompose.null_threshold=0.25 decompose.method=randomized",
     "decompose.method=randomized: decompose.null_rule=threshold counts small eigenvalues, which only "
     "decompose.method=exact computes"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[c[0] for c in CASES])
def test_each_rule_is_one_exact_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", re.split(r" (?=[a-z_.]+=)", overrides))
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    ["data.split=time", "data.split_times=[1, 2]", "data.min_user_interactions=1"],
    ["data.split=cold_start_users", "data.min_user_interactions=2"],
    ["data.train_window_days=7", "data.split=time", "data.split_times=[1577836800, 1580515200]"],
    ["train.epochs=0", "train.warm_start=/prev/train", "data.id_map=/prev/prepare"],
    ["train.epochs=10000", "model.dropout=0", "train.log_every=0", "train.max_failures=0"],
    ["train.backend=torch", "model.id_dims=18"],  # e.g. the d_n the threshold rule derives
])
def test_the_edges_of_the_rules_are_allowed(overrides):
    load_config("quickstart", overrides)


def _numeric(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list):
        return any(_numeric(a) for a in typing.get_args(tp))
    return tp in (int, float)


def _keys(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def test_every_numeric_key_has_a_range():
    numeric = {key for key, tp in _keys(RunConfig) if _numeric(tp)}
    assert numeric - set(RANGES) - UNBOUNDED == set()
    assert set(RANGES) <= numeric and not UNBOUNDED & set(RANGES)


def test_min_user_interactions_is_one_rule_per_split():
    assert config.MIN_USER_INTERACTIONS == {"leave_one_out": 3, "cold_start_users": 2, "time": 1, "all": 1}
    # the prepare stage checks a DataConfig with the same rule
    from alphafuse_dist.data.prepare import prepare

    with pytest.raises(ConfigError, match=r"^data.min_user_interactions=2: must be >= 3 for data.split=leave_one_out$"):
        prepare(config.DataConfig(min_user_interactions=2), "unused")


def test_data_dependent_rules():
    cfg = load_config("quickstart", ["eval.protocol=sampled", "eval.sampled_negatives=100"])
    check_against_data(cfg, num_items=500, language_dim=384)
    with pytest.raises(ConfigError, match=r"^eval.sampled_negatives=100: must be < 80, the number of items$"):
        check_against_data(cfg, num_items=80, language_dim=384)
    with pytest.raises(ConfigError, match=r"^model.dim=128: must be <= 64, the width of the language embeddings$"):
        check_against_data(cfg, num_items=500, language_dim=64)
    check_against_data(load_config("quickstart", ["method=sasrec_id"]), num_items=500)
    with pytest.raises(ConfigError, match=r"^model.id_dims=64: decompose.null_rule=threshold derived d_n=40 "
                                          r"\(decompose/basis.json\); set model.id_dims=40$"):
        check_against_data(load_config("quickstart"), num_items=500, language_dim=384, derived_id_dims=40)
    check_against_data(load_config("quickstart", ["model.id_dims=40"]), num_items=500, derived_id_dims=40)


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr=-1: must be > 0"),
    ("model.num_heads=3", "model.num_heads=3: must divide model.dim=128"),
    ("data.min_user_interactions=2", "data.min_user_interactions=2: must be >= 3 for data.split=leave_one_out"),
])
def test_cli_refuses_a_bad_config_before_any_work(override, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--config", "quickstart", override, f"run_dir={run_dir}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"alphafuse: error: {message}"]
    assert not run_dir.exists()


def test_user_errors_are_unwrapped_from_ray_exceptions():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    original = DataError("no data rows", file="inter.csv")
    task_error = RayTaskError("build", "Traceback (most recent call last):\n  ...\nDataError: no data rows",
                              original).as_instanceof_cause()
    assert isinstance(task_error, DataError) and "\n" in str(task_error)  # what Ray raises on the driver
    assert user_error(task_error) is original
    assert user_error(WorkerGroupError("rank 1 failed", {1: task_error})) is original
    assert user_error(ControllerError(task_error)) is original
    assert user_error(RuntimeError("a bug")) is None
    try:  # a bug while handling an input error is still a bug
        try:
            raise original
        except DataError:
            raise KeyError("bug") from None
    except KeyError as e:
        assert user_error(e) is None


def test_cli_prints_an_error_from_a_ray_worker_in_one_line(monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    import alphafuse_dist.pipeline as pipeline

    def failing(cfg, **kw):
        raise RayTaskError("train", "Traceback ...\nConfigError: train.batch_size=128: larger than the 3 training "
                                    "windows", ConfigError("train.batch_size=128: larger than the 3 training windows")
                           ).as_instanceof_cause()

    monkeypatch.setattr(pipeline, "run_pipeline", failing)
    assert main(["run", "--config", "quickstart"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "alphafuse: error: train.batch_size=128: larger than the 3 training windows"]


def test_progress_is_logged_to_stderr_and_verbose_adds_debug_lines(capsys):
    import logging

    from alphafuse_dist.cli import configure_logging

    log = logging.getLogger("alphafuse_dist.some_module")
    try:
        configure_logging()
        log.info("[stage] done")
        log.debug("details")
        assert capsys.readouterr().err.splitlines() == ["[stage] done"]
        configure_logging(verbose=True)
        log.debug("details")
        assert capsys.readouterr().err.splitlines() == ["DEBUG alphafuse_dist.some_module: details"]
        assert main(["presets", "-v"]) == 0 and logging.getLogger("alphafuse_dist").level == logging.DEBUG
    finally:
        configure_logging()
    assert "quickstart" in capsys.readouterr().out


def test_an_input_error_in_a_ray_train_worker_is_one_line_with_exit_status_2(ray_session, write_cycle_data,
                                                                              tmp_path, capsys):
    """A ConfigError raised by the training loop inside a Ray Train worker (more sequences per step
    than training windows) reaches the user as its own one-line message."""
    import numpy as np

    write_cycle_data(tmp_path, 20, 10, (4, 6), np.random.default_rng(0))
    run_dir = tmp_path / "run"
    code = main(["run", "--stages", "prepare,train", "method=sasrec_id", "data.source=interactions",
                 f"data.path={tmp_path / 'inter.csv'}", f"data.items_path={tmp_path / 'items.csv'}",
                 "data.text_template={title}", f"run_dir={run_dir}", "train.backend=torchrec", "train.num_workers=2",
                 "train.batch_size=100000", "train.max_failures=0", "model.dim=16", "model.id_dims=8"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.fullmatch(r"alphafuse: error: train\.batch_size=100000: [^\n]+", lines[-1]), lines[-3:]
    assert not (run_dir / "train-sasrec_id-s22").exists()


def test_compare_children_log_their_progress_with_the_run_they_belong_to(write_cycle_data, tmp_path, capfd):
    """``compare --jobs 2`` runs its (method, seed) pairs in child processes; their lines reach the
    same stderr, each starting with its run."""
    import numpy as np

    write_cycle_data(tmp_path, 40, 20, (5, 9), np.random.default_rng(0))
    code = main(["compare", "--methods", "sasrec_id", "--seeds", "1,2", "--jobs", "2",
                 "data.source=interactions", f"data.path={tmp_path / 'inter.csv'}",
                 f"data.items_path={tmp_path / 'items.csv'}", "data.text_template={title}",
                 f"run_dir={tmp_path / 'run'}", "train.backend=torch", "train.num_workers=1", "train.epochs=1",
                 "train.batch_size=8", "model.dim=16", "model.id_dims=8"])
    err = capfd.readouterr().err.splitlines()
    assert code == 0
    for seed in (1, 2):
        assert any(line.startswith(f"[sasrec_id s{seed}] [train-sasrec_id-s{seed}] done in") for line in err), err


@pytest.mark.parametrize("overrides, message", [
    (["train.sharding=data_parallel", "train.device=cpu"], "train.sharding=data_parallel: needs train.device=cuda"),
    (["train.sharding=data_parallel", "train.device=auto"], "train.sharding=data_parallel: needs train.device=cuda"),
    (["train.sharding=data_parallel", "train.device=cuda", "train.num_workers=2"],
     "train.sharding=data_parallel: train.num_workers=2: it has run on one GPU only"),
    (["train.id_optimizer=adam", "train.device=cpu"], "train.id_optimizer=adam: TorchRec has no fused Adam on CPU"),
])
def test_torchrec_choices_that_cannot_train_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config("quickstart", overrides)
    load_config("quickstart", [*overrides, "train.backend=torch"])  # the plain-torch path takes them
