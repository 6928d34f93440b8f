"""tracking.backend: what a run reported, read back from a real TensorBoard event file and a real
MLflow file store."""
from __future__ import annotations

import pytest

from alphafuse_dist.config import load_config
from alphafuse_dist.errors import ConfigError
from alphafuse_dist.evaluate.report import build_report, write_report
from alphafuse_dist.runtime.tracking import mlflow_uri, tensorboard_dir, track_report, track_run

HISTORY = {"epochs": [{"epoch": 1, "loss": 5.5, "seconds": 3.0, "val_NDCG@10": 0.01},
                      {"epoch": 2, "loss": 4.75, "seconds": 2.5, "val_NDCG@10": 0.02}]}
METRICS = {"method": "alphafuse", "seed": 22, "split": "test", "protocol": "full", "history_masked": False,
           "similarity": "cosine", "items": 100,
           "metrics": {"overall": {"NDCG@10": 0.031, "HR@10": 0.067, "users": 671},
                       "tail": {"NDCG@10": 0.009, "HR@10": 0.02, "users": 195}}}


def config(tmp_path, backend: str):
    return load_config("quickstart", [f"tracking.backend={backend}", f"run_dir={tmp_path / 'run'}", "train.lr=0.002"])


def report_plots(tmp_path):
    written = write_report(build_report([(METRICS, HISTORY)]), tmp_path / "report")
    return [p for p in written if p.suffix == ".png"]


def test_tensorboard_event_file_holds_epochs_test_metrics_config_and_plots(tmp_path):
    pytest.importorskip("tensorboard")  # installed by .ci/setup (the test extra)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "tensorboard")
    track_run(cfg, HISTORY, METRICS)
    track_run(cfg, HISTORY, METRICS)  # a rerun replaces the run's folder: no doubled points
    track_report(cfg, report_plots(tmp_path))
    events = EventAccumulator(str(tensorboard_dir(cfg) / "alphafuse-s22")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 5.5), (2, 4.75)]
    assert [e.value for e in events.Scalars("train/val_NDCG@10")] == pytest.approx([0.01, 0.02])
    assert events.Scalars("test/tail/HR@10")[0].value == pytest.approx(0.02)
    hparams = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"train.lr" in hparams and b"0.002" in hparams
    images = EventAccumulator(str(tensorboard_dir(cfg) / "report")).Reload().Tags()["images"]
    assert sorted(images) == ["metrics_by_group", "training_curves"]


def test_mlflow_file_store_holds_epochs_test_metrics_config_and_plots(tmp_path):
    pytest.importorskip("mlflow")  # the optional [mlflow] extra
    from mlflow.tracking import MlflowClient

    cfg = config(tmp_path, "mlflow")
    track_run(cfg, HISTORY, METRICS)
    track_report(cfg, report_plots(tmp_path))
    client = MlflowClient(mlflow_uri(cfg))
    experiment = client.get_experiment_by_name("quickstart")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    run = runs["alphafuse-s22"]
    assert run.data.params["train.lr"] == "0.002" and run.data.params["method"] == "alphafuse"
    assert run.data.metrics["test/overall/NDCG_at_10"] == pytest.approx(0.031)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(1, 5.5), (2, 4.75)]
    artifacts = sorted(a.path for a in client.list_artifacts(runs["report"].info.run_id))
    assert artifacts == ["metrics_by_group.png", "training_curves.png"]


def test_none_writes_nothing_and_a_missing_package_is_a_config_error(tmp_path, monkeypatch):
    cfg = config(tmp_path, "none")
    track_run(cfg, HISTORY, METRICS)
    assert not (tmp_path / "run").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.backend=mlflow: the mlflow package is not installed"):
        config(tmp_path, "mlflow")
