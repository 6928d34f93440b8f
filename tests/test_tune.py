"""``alphafuse tune``: Ray Tune trials on shared upstream stages, ASHA stopping a hopeless trial
on validation NDCG, the results table with its budget, the best configuration as a loadable preset."""
from __future__ import annotations

import json

import pytest

from alphafuse_dist.cli import main
from alphafuse_dist.config import load_config
from alphafuse_dist.errors import ConfigError
from alphafuse_dist.tune import load_space


def _space(tmp_path, body: str):
    path = tmp_path / "space.yaml"
    path.write_text(body)
    return path


@pytest.mark.slow
def test_tune_stops_the_bad_trial_and_writes_a_loadable_best_preset(tmp_path, ray_session, capsys):
    # two trials, one at a time so the good one reaches ASHA's first rung (epoch 1) first; the
    # second's ID rows barely move (id_lr 1e-6): behind at the rung, it is stopped there
    space = _space(tmp_path, """
budget: {num_samples: 1, max_concurrent: 1}
scheduler: {grace_period: 1, reduction_factor: 2}
resources: {cpu: 1}
space:
  train.id_lr: {grid: [0.2, 1.0e-6]}
""")
    run_dir = tmp_path / "run"
    assert main(["tune", "--config", "quickstart", "--space", str(space), "--methods", "sasrec_id",
                 f"run_dir={run_dir}", "train.epochs=2", "train.eval_every=1", "model.max_len=20",
                 "train.batch_size=64"]) == 0
    results = json.loads((run_dir / "tune" / "results.json").read_text())
    trials = {t["params"]["train.id_lr"]: t for t in results["results"][0]["trials"]}
    good, bad = trials[0.2], trials[1.0e-6]
    assert good["ended"].startswith("finished") and good["epochs"] == 2
    assert bad["ended"] == "stopped by ASHA or the time budget" and bad["epochs"] == 1
    assert good["best"] > bad["best"]
    # the shared stage ran once, in the run directory; trials trained on it (no train stage folder)
    assert (run_dir / "prepare" / "manifest.json").is_file() and not list(run_dir.glob("train-*"))
    table = (run_dir / "tune" / "results.md").read_text()
    assert "Budget (the same for every method): 2 trials per method; ASHA (grace period 1 epochs, reduction " \
           "factor 2) on validation NDCG; 1 cpu per trial." in table
    assert "| train.id_lr | val_NDCG@10 | epochs | ended |" in table
    preset = load_config(str(run_dir / "tune" / "sasrec_id.yaml"))
    assert preset.method == "sasrec_id" and preset.train.id_lr == 0.2 and preset.train.epochs == 2
    assert preset.train.backend == "torchrec"  # the user's settings, not the trials' one-process ones
    assert "best of sasrec_id's trials by val_NDCG@10" in (run_dir / "tune" / "sasrec_id.yaml").read_text()
    assert "sasrec_id.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("body, message", [
    ("space: {}", "space: no parameters to search"),
    ("space: {train.lr: {normal: [0, 1]}}", "space.train.lr: expected one of choice, grid, uniform, loguniform"),
    ("space: {train.lr: {uniform: [0.1]}}", r"space.train.lr.uniform: expected a list of values \(\[low, high\]\)"),
    ("spaces: {train.lr: {choice: [0.1]}}", "unknown entries spaces"),
    ("space: {train.lr: {choice: [0.1]}}\nresources: {tpu: 1}", "resources: expected cpu and/or gpu"),
])
def test_bad_space_files_name_the_entry(tmp_path, body, message):
    """Each mistake is one error naming the file's entry."""
    with pytest.raises(ConfigError, match=message):
        load_space(_space(tmp_path, body))


def test_space_values_are_checked_against_the_config_before_any_trial(tmp_path, capsys):
    space = _space(tmp_path, "space: {model.dropout: {choice: [0.1, 1.5]}}")
    assert main(["tune", "--space", str(space), "--methods", "sasrec_id", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "space.model.dropout" in err and "model.dropout" in err and "1.5" in err
    space = _space(tmp_path, "space: {train.nope: {choice: [1]}}")
    assert main(["tune", "--space", str(space), "--methods", "sasrec_id", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "space.train.nope: space: train.nope: not a config key" in capsys.readouterr().err


def test_budget_counts_grid_points_and_states_resources(tmp_path):
    space = load_space(_space(tmp_path, """
budget: {num_samples: 3, time_budget_s: 600}
resources: {cpu: 2, gpu: 0.5}
space:
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
  model.dropout: {grid: [0.1, 0.2]}
  model.num_blocks: {grid: [1, 2, 3]}
"""))
    assert space.trials() == 18
    assert space.budget() == ("18 trials per method, at most 600 s; ASHA (grace period 4 epochs, reduction factor 2) "
                              "on validation NDCG; 2 cpu, 0.5 gpu per trial")


def test_a_trial_invalid_for_the_users_back_end_fails_before_training():
    """Trials train with plain torch, which takes widths TorchRec's row-wise Adagrad refuses: a trial
    value the user's own (TorchRec) config refuses fails at once, so it can never become the best preset."""
    from alphafuse_dist.tune import _trial

    user = load_config("quickstart", ["train.backend=torchrec", "train.id_optimizer=rowwise_adagrad"]).to_dict()
    base = load_config("quickstart", ["train.backend=torch", "train.num_workers=1",
                                      "train.id_optimizer=rowwise_adagrad"]).to_dict()
    with pytest.raises(ConfigError, match="model.id_dims=18: must be a multiple of 4 with train.id_optimizer="
                                          "rowwise_adagrad and train.backend=torchrec"):
        _trial({"model.id_dims": 18}, base=base, user=user, inputs={}, metric="val_NDCG@10", threads=1)
