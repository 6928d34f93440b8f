"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP).

What is saved, every worker writing only the shards it holds:

- the model's state: encoder, adapters, trainable ID table (TorchRec ``ShardedTensor``s or a plain
  tensor). Frozen tables (the item module's ``frozen_modules``: alphafuse's semantic table, the
  baselines' language features) are NOT saved: they are rebuilt from the embed / decompose stage
  outputs, which is as fast as loading them and keeps checkpoints small;
- the optimiser states (dense Adam; the ID table's fused or plain optimiser), tensors only: DCP
  cannot store param groups, and table-wise loading fails on empty entries;
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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

PROGRESS_KEYS = ("epochs_done", "best_metric", "best_epoch", "bad_epochs")


def _init_adam_state(opt: torch.optim.Optimizer) -> None:
    """Adam creates its state lazily at the first step; loading needs the tensors to exist."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p not in opt.state and isinstance(opt, torch.optim.Adam):
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}


def _tensors_only(opt_state: dict) -> dict:
    """{"<param>/<name>": tensor} of an optimiser state_dict's ``state`` part."""
    return {f"{p}/{name}": v for p, entry in opt_state["state"].items() for name, v in entry.items()
            if isinstance(v, torch.Tensor)}


def _model_state(net: torch.nn.Module) -> dict:
    """The model's state without the item module's frozen tables."""
    frozen = tuple(f"items.{name}." for name in net.items.frozen_modules)
    return {k: v for k, v in net.state_dict().items() if not k.startswith(frozen)}


def _optimizers(model, dense_opt, id_opt) -> dict:
    """name -> optimiser whose state is checkpointed (the fused one lives on the DMP wrapper)."""
    opts = {"dense_opt": dense_opt}
    if id_opt is not None:
        opts["id_opt"] = id_opt
    elif hasattr(model, "fused_optimizer"):
        opts["id_opt"] = model.fused_optimizer
    return opts


def save_checkpoint(folder: Path, *, model, net, dense_opt, id_opt, progress: dict, best, history: list) -> None:
    """Write this worker's part of a checkpoint into ``folder`` (a collective: all workers call it)."""
    from .loop import save_model  # the best-model file format is the stage's own

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    opts = _optimizers(model, dense_opt, id_opt)
    _init_adam_state(dense_opt)
    state = {"model": _model_state(net),
             "progress": {k: torch.tensor(float(progress[k]), dtype=torch.float64) for k in PROGRESS_KEYS}}
    state |= {name: _tensors_only(opt.state_dict()) for name, opt in opts.items()}
    dcp.save(state, checkpoint_id=str(folder))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if best.item_table is not None:
            save_model(folder, best)
        (folder / "history.json").write_text(json.dumps({"best_epoch": best.best_epoch,
                                                         "best_val_ndcg10": best.best_metric,
                                                         "epochs": history}, indent=2))


def load_checkpoint(folder: Path, *, model, net, dense_opt, id_opt, best) -> tuple[dict, list]:
    """Load a checkpoint into the live model and optimisers (in place); fill ``best`` with the best
    model so far. Returns (progress counters, history)."""
    folder = Path(folder)
    opts = _optimizers(model, dense_opt, id_opt)
    _init_adam_state(dense_opt)
    opt_sds = {name: opt.state_dict() for name, opt in opts.items()}
    state = {"model": _model_state(net),
             "progress": {k: torch.tensor(0.0, dtype=torch.float64) for k in PROGRESS_KEYS}}
    state |= {name: _tensors_only(sd) for name, sd in opt_sds.items()}
    dcp.load(state, checkpoint_id=str(folder))  # in place: state_dict tensors share the live storage
    for name, opt in opts.items():
        opt.load_state_dict(opt_sds[name])  # same dict whose tensors dcp filled in place
    progress = {k: v.item() for k, v in state["progress"].items()}
    history = []
    if (folder / "history.json").is_file():
        history = json.loads((folder / "history.json").read_text())["epochs"]
    if (folder / "model.safetensors").is_file():
        tensors = load_file(str(folder / "model.safetensors"))
        best.item_table = tensors["item_table"]
        best.encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        best.best_metric, best.best_epoch = progress["best_metric"], int(progress["best_epoch"])
    return progress, history
