"""Launch training: Ray Train ``TorchTrainer`` workers (the product path) or one local process.

Ray Train starts ``train.num_workers`` workers with a gloo (CPU) or NCCL (GPU) process group (whose
rendezvous store listens on rank 0's node address: :mod:`.rendezvous`); each
runs :func:`alphafuse_dist.train.recipe.train_model`. The best model travels back to the driver as
a Ray Train checkpoint (so it works on multi-node clusters whose storage path is shared), and is
written into the stage folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..config import RunConfig, config_from_dict
from ..runtime.progress import Progress
from .inputs import TrainInputs
from .recipe import train_model


def quiet_libraries() -> None:
    """fbgemm/TorchRec log every table's full argument list at INFO, and Ray Train each report:
    keep their warnings, drop the chatter, so that progress lines stay readable."""
    import logging
    import warnings

    for name in ("", "torchrec", "fbgemm_gpu", "ray.train", "ray.data", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")


def _ray_worker_loop(payload: dict) -> None:
    import ray.train
    import torch

    quiet_libraries()
    cfg = config_from_dict(payload["config"])
    inputs = TrainInputs(**payload["inputs"])
    torch.set_num_threads(max(1, payload["threads"]))
    rank = ray.train.get_context().get_world_rank()
    progress = payload.get("progress")  # runtime.progress.Reporter: the driver's bar

    def report(row: dict, write_checkpoint) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if write_checkpoint is None:
            ray.train.report(metrics)
            return
        # every worker writes its own shards into its own folder and reports it; Ray Train
        # gathers the folders into one checkpoint in the run's storage
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def train(resume_from: str | None, folder: str | None):
        result = train_model(cfg, inputs, report=report, resume_from=resume_from, folder=folder, progress=progress)
        if progress is not None and rank == 0:
            progress.flush(wait=True)  # the bar's last steps reach the driver before the run ends
        return result

    # rank 0 writes the best model (early stopping may end any epoch) and reports it with the
    # whole history as the run's final checkpoint
    with tempfile.TemporaryDirectory() as d:
        folder = d if rank == 0 else None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as resume_from:
                result = train(resume_from, folder)
        else:
            result = train(None, folder)
        final = {"final": 1, "best_epoch": result.best_epoch}
        if rank == 0:
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(final)


def ray_run_name(cfg: RunConfig, identity: str) -> str:
    """``train-<method>-s<seed>-<identity>``: the Ray Train run of the train stage whose full identity
    (``pipeline.train_identity``: config hash, inputs' digests, code fingerprint) is ``identity``."""
    return f"train-{cfg.method}-s{cfg.seed}-{identity}"


def remove_stale_runs(storage: str | Path, cfg: RunConfig, run_name: str, filesystem=None) -> None:
    """Remove the Ray Train runs of this method and seed under ``storage`` (a folder of the pyarrow
    ``filesystem``, default the local one) other than ``run_name``: checkpoints of another identity
    are never resumed."""
    import fnmatch

    import pyarrow.fs as pa_fs

    fs = filesystem or pa_fs.LocalFileSystem()
    for info in fs.get_file_info(pa_fs.FileSelector(str(storage), allow_not_found=True)):
        if fnmatch.fnmatchcase(info.base_name, ray_run_name(cfg, "*")) and info.base_name != run_name:
            _delete_run(fs, info.path)


def _delete_run(fs, folder: str) -> None:
    """Delete a Ray Train run's ``folder`` of the pyarrow file system ``fs``, absent or not."""
    fs.delete_dir_contents(folder, missing_dir_ok=True)
    try:
        fs.delete_dir(folder)
    except FileNotFoundError:  # S3: the folder's marker may be gone with its contents
        pass


def train_with_ray(cfg: RunConfig, inputs: TrainInputs, out_dir: Path, *, identity: str,
                   storage: tuple[str, object] | None = None) -> dict:
    """Run distributed training under Ray Train; write model.safetensors + history.json to out_dir.

    The Ray Train run is named by ``identity`` (:func:`ray_run_name`): a rerun of the same stage
    resumes from its last checkpoint, and the runs of this method and seed under any other identity
    (another config, other input data, other code) are removed before training, never resumed.
    ``storage``: (path, pyarrow file system) of the runs (a run_dir on an object store), default
    ``<run directory>/.ray-train``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import pyarrow.fs as pa_fs
    import ray

    from .rendezvous import BoundTorchConfig

    t = cfg.train
    # auto: GPUs when the cluster has one for every worker
    use_gpu = t.device == "cuda" or (t.device == "auto" and ray.cluster_resources().get("GPU", 0) >= t.num_workers)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    # more workers than cores (e.g. 4 on this 2-core machine) must still be schedulable
    cpu_per_worker = min(1.0, cpus / t.num_workers)
    threads = max(1, int(cpus) // t.num_workers)
    # Outside the stage's temporary folder, keyed by the stage's identity: a rerun after a crash of
    # the whole job finds the same Ray Train run and resumes from its last checkpoint.
    path, fs = storage or (str((out_dir.parent / ".ray-train").resolve()), pa_fs.LocalFileSystem())
    run_name = ray_run_name(cfg, identity)
    remove_stale_runs(path, cfg, run_name, fs)
    with Progress("[train]", unit="step") as bar:
        trainer = TorchTrainer(
            _ray_worker_loop,
            train_loop_config={"config": cfg.to_dict(), "inputs": vars(inputs), "threads": threads,
                               "progress": bar.remote()},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpu_per_worker} if not use_gpu else None),
            # the rendezvous store listens on rank 0's node address only, not on every interface
            torch_config=BoundTorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=t.timeout_s),
            run_config=RayRunConfig(name=run_name, storage_path=path,
                                    storage_filesystem=fs if storage else None,
                                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                                    failure_config=FailureConfig(max_failures=t.max_failures)),
        )
        result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        for name in ("model.safetensors", "history.json"):
            shutil.copy2(os.path.join(d, name), out_dir / name)
    # the stage output is the model; the run's checkpoints are removed once it is written
    try:
        _delete_run(fs, f"{path}/{run_name}")
    except OSError:  # best effort: the model is written
        pass
    return {"workers": t.num_workers}


def train_local(cfg: RunConfig, inputs: TrainInputs, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """One process, no Ray (plain-torch backend): debugging, and GPU machines without Ray/fbgemm."""
    quiet_libraries()
    with Progress("[train]", unit="step") as bar:
        train_model(cfg, inputs, log=log, folder=out_dir, progress=bar.update)
    return {"workers": 1}
