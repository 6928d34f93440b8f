"""Experiment tracking (``tracking.backend``): TensorBoard event files or an MLflow run per method
and seed, fed from what a run already wrote: the per-epoch rows Ray Train workers report
(``history.json``: loss, speed, validation metrics), the test metrics (``metrics.json``), the
config as parameters, and the comparison report's plots as images / artifacts.

Names: ``train/<key>`` per epoch (step = epoch), ``test/<group>/<metric>`` once; MLflow allows no
``@`` in names, so there ``NDCG@10`` is ``NDCG_at_10``. A rerun replaces the TensorBoard folder of
that run and, in MLflow, starts a new run of the same name.

Example::

    track_run(cfg, history, metrics)                 # after the evaluate stage of (method, seed)
    track_report(cfg, [Path("runs/q/report/metrics_by_group.png")])
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import RunConfig


def _params(cfg: RunConfig) -> dict[str, str]:
    """The config flattened to ``section.key -> text`` (the tracking section left out)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", {k: v for k, v in cfg.to_dict().items() if k != "tracking"})
    return flat


def _scalars(history: dict | None, metrics: dict | None) -> tuple[list[tuple[int, str, float]], dict[str, float]]:
    """``[(epoch, "train/<key>", value)]`` from history rows and ``{"test/<group>/<metric>": value}``."""
    epochs = [(row["epoch"], f"train/{k}", float(v)) for row in (history or {}).get("epochs", [])
              for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    test = {f"test/{group}/{name}": float(v) for group, values in (metrics or {}).get("metrics", {}).items()
            for name, v in values.items() if isinstance(v, (int, float))}
    return epochs, test


def _run_name(cfg: RunConfig) -> str:
    return f"{cfg.method}-s{cfg.seed}"


def tensorboard_dir(cfg: RunConfig) -> Path:
    """The folder holding one TensorBoard run folder per method and seed."""
    return Path(cfg.tracking.uri) if cfg.tracking.uri else cfg.run_path / "tensorboard"


def mlflow_uri(cfg: RunConfig) -> str:
    """The MLflow tracking URI: ``tracking.uri``, or a file store in ``<run_dir>/mlruns``."""
    return cfg.tracking.uri or (cfg.run_path / "mlruns").absolute().as_uri()


def track_run(cfg: RunConfig, history: dict | None, metrics: dict | None) -> None:
    """Log one (method, seed) run: config, per-epoch rows, test metrics (no-op without a backend)."""
    epochs, test = _scalars(history, metrics)
    if cfg.tracking.backend == "tensorboard":
        _tensorboard(tensorboard_dir(cfg) / _run_name(cfg), _params(cfg), epochs, test)
    elif cfg.tracking.backend == "mlflow":
        mlflow = _mlflow(cfg)
        with mlflow.start_run(run_name=_run_name(cfg)):
            mlflow.log_params(_params(cfg))
            for epoch, name, value in epochs:
                mlflow.log_metric(_mlflow_name(name), value, step=epoch)
            mlflow.log_metrics({_mlflow_name(k): v for k, v in test.items()})


def track_report(cfg: RunConfig, plots: list[Path]) -> None:
    """Log the comparison report's plots: images of a ``report`` TensorBoard run, or artifacts of a
    ``report`` MLflow run."""
    if cfg.tracking.backend == "tensorboard" and plots:
        import matplotlib.image
        from torch.utils.tensorboard import SummaryWriter

        folder = tensorboard_dir(cfg) / "report"
        shutil.rmtree(folder, ignore_errors=True)
        with SummaryWriter(str(folder)) as writer:
            for path in plots:
                writer.add_image(path.stem, matplotlib.image.imread(path)[..., :3], dataformats="HWC")
    elif cfg.tracking.backend == "mlflow" and plots:
        mlflow = _mlflow(cfg)
        with mlflow.start_run(run_name="report"):
            for path in plots:
                mlflow.log_artifact(str(path))


def _tensorboard(folder: Path, params: dict[str, str], epochs: list, test: dict[str, float]) -> None:
    """A fresh event file in ``folder``: scalars per epoch and of the test, the config as hparams."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with SummaryWriter(str(tmp)) as writer:
        for epoch, name, value in epochs:
            writer.add_scalar(name, value, epoch)
        for name, value in test.items():
            writer.add_scalar(name, value, 0)
        for summary in hparams(params, {name: value for name, value in test.items() if name.startswith("test/overall/")}):
            writer.file_writer.add_summary(summary)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _mlflow_name(name: str) -> str:
    return name.replace("@", "_at_")


def _mlflow(cfg: RunConfig):
    """mlflow, pointed at this run's tracking URI and experiment."""
    import mlflow

    uri = mlflow_uri(cfg)
    if uri.startswith("file:"):
        # MLflow keeps its file store in maintenance mode behind this switch; a local run directory
        # is where a file store belongs
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment or cfg.name)
    return mlflow
