"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), and the trained model
files of a train stage (``save_model``).

What a checkpoint holds, every worker writing only the shards it holds:

- the model's state (:func:`model_state`): encoder, adapters, trainable ID table (TorchRec
  ``ShardedTensor``s or a plain tensor). Frozen tables (the item module's ``frozen_modules``:
  alphafuse's semantic table, the baselines' language features) are NOT saved: they are rebuilt
  from the embed / decompose stage outputs, which is as fast as loading them and keeps
  checkpoints small;
- the optimiser's state (``train.optim``: keyed by parameter name), tensors only: DCP cannot store
  param groups, and table-wise loading fails on empty entries;
- progress counters (epochs done, best metric/epoch, validations without gain) as tensors.

Rank 0 also writes the best model so far (``model.safetensors``) and the history (``history.json``)
beside the DCP files, so a resumed run still returns the best model. Loading is in place into the
live tensors, so a checkpoint written by N workers loads into M workers with any row-wise or
table-wise plan (DCP reshards); column-wise optimiser state does not reshard (TorchRec 1.8).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..model.io import MODEL_FILE, load_model_file, save_model_file
from ..runtime.dist import rank_world

PROGRESS_KEYS = ("epochs_done", "best_metric", "best_epoch", "bad_epochs")
HISTORY_FILE = "history.json"


def _tensors_only(opt_state: dict) -> dict:
    """{"<param>/<name>": tensor} of an optimiser state_dict's ``state`` part."""
    return {f"{p}/{name}": v for p, entry in opt_state["state"].items() for name, v in entry.items()
            if isinstance(v, torch.Tensor)}


def model_state(net: torch.nn.Module) -> dict:
    """The state a checkpoint keeps of an unwrapped recommender: its state dict without the item
    module's frozen tables."""
    frozen = tuple(f"items.{name}." for name in net.items.frozen_modules)
    return {k: v for k, v in net.state_dict().items() if not k.startswith(frozen)}


def save_model(folder: Path, result) -> None:
    """``model.safetensors`` (the fused item table + encoder of ``result``, a ``TrainResult``) and
    ``history.json`` (best epoch, its validation NDCG@10, every epoch's row)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model_file(folder / MODEL_FILE, result.item_table, result.encoder_state)
    _write_history(folder, result, result.history)


def _write_history(folder: Path, best, history: list) -> None:
    (folder / HISTORY_FILE).write_text(json.dumps({"best_epoch": best.best_epoch, "best_val_ndcg10": best.best_metric,
                                                   "epochs": history}, indent=2))


def save_checkpoint(folder: Path, *, net, optimizer, progress: dict, best, history: list) -> None:
    """Write this worker's part of a checkpoint into ``folder`` (a collective: all workers call it).

    Args:
        net: the unwrapped recommender; optimizer: the run's (``train.optim.build_optimizer``);
        progress: the ``PROGRESS_KEYS`` counters; best: the ``TrainResult`` of the best epoch so far.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"model": model_state(net),
             "progress": {k: torch.tensor(float(progress[k]), dtype=torch.float64) for k in PROGRESS_KEYS},
             "optimizer": _tensors_only(optimizer.state_dict())}
    dcp.save(state, checkpoint_id=str(folder))
    if rank_world()[0] == 0:
        if best.item_table is not None:
            save_model_file(folder / MODEL_FILE, best.item_table, best.encoder_state)
        _write_history(folder, best, history)


def load_checkpoint(folder: Path, *, net, optimizer, best) -> tuple[dict, list]:
    """Load a checkpoint into the live model and optimiser (in place); fill ``best`` with the best
    model so far. Returns (progress counters, history)."""
    folder = Path(folder)
    opt_sd = optimizer.state_dict()
    state = {"model": model_state(net),
             "progress": {k: torch.tensor(0.0, dtype=torch.float64) for k in PROGRESS_KEYS},
             "optimizer": _tensors_only(opt_sd)}
    dcp.load(state, checkpoint_id=str(folder))  # in place: state_dict tensors share the live storage
    optimizer.load_state_dict(opt_sd)  # the dict whose tensors dcp filled in place
    progress = {k: v.item() for k, v in state["progress"].items()}
    history = []
    if (folder / HISTORY_FILE).is_file():
        history = json.loads((folder / HISTORY_FILE).read_text())["epochs"]
    if (folder / MODEL_FILE).is_file():
        best.item_table, best.encoder_state = load_model_file(folder / MODEL_FILE)
        best.best_metric, best.best_epoch = progress["best_metric"], int(progress["best_epoch"])
    return progress, history
