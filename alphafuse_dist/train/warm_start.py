"""Warm start of a retraining run from the previous period's model (``train.warm_start``).

The previous train stage folder holds ``model.safetensors`` (the fused item table [N_old, d] and
the encoder) and ``config.json``. Item ids are stable across periods (``data.id_map``: old items
keep their index, new ones are appended), so row i < N_old of this run is row i of the previous
one. What a warm start sets, before the first step:

- **encoder**: the previous weights (same backbone and shapes, else a ConfigError).
- **ID rows of old items**: their previous ID part. The fused table stores ``semantic + [0, id]``
  (injection "add") or ``[semantic_s, id]`` ("cover"), so for alphafuse the ID part is recovered
  with the previous run's ``decompose/semantic.safetensors``; for sasrec_id and llminit the fused
  row *is* the ID row.
- **ID rows of new items**: the method's usual initialisation (alphafuse: zero, so a new item
  starts as its semantic vector alone: cold-start ready).
- **after a basis refit** (the decompose stage wrote ``drift.json`` with ``refit: true`` and kept
  the old basis in ``previous_basis/``): ``train.warm_start_ids=carry`` maps each old ID vector
  into the new null space (``decompose.drift.carry_id_vectors``), ``reset`` zeroes them.

With ``train.epochs=0`` the saved model is this initial state: the previous model applied to the
new catalogue (what serving would use without a retrain).

Example::

    info = apply_warm_start(cfg, net.items, net.encoder, semantic_path="runs/feb/decompose/semantic.safetensors")
    # {"previous_items": 9000, "items": 9100, "ids": "previous", ...}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..config import RunConfig
from ..errors import ConfigError

WARM_METHODS = ("alphafuse", "sasrec_id", "llminit")
# model keys that must agree with the previous run for its weights to mean the same thing
_SAME_MODEL_KEYS = ("dim", "backbone", "num_blocks", "num_heads", "max_len", "injection", "similarity")
# and for alphafuse, whose fused rows hold an ID part of this width
_ALPHAFUSE_MODEL_KEYS = ("id_dims",)


def _previous(cfg: RunConfig) -> tuple[Path, dict, dict]:
    folder = Path(cfg.train.warm_start).expanduser()
    model_path, config_path = folder / "model.safetensors", folder / "config.json"
    for p in (model_path, config_path):
        if not p.is_file():
            raise ConfigError(f"train.warm_start={folder}: {p.name} is missing; expected a finished train stage "
                              "folder (train-<method>-s<seed>) of the previous run")
    try:
        prev_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.warm_start={folder}: config.json is not valid JSON ({e})") from None
    return folder, prev_cfg, load_file(str(model_path))


def _check_compatible(cfg: RunConfig, folder: Path, prev_cfg: dict) -> None:
    if cfg.method not in WARM_METHODS:
        raise ConfigError(f"train.warm_start: method={cfg.method} cannot warm-start (supported: {', '.join(WARM_METHODS)})")
    if prev_cfg.get("method") != cfg.method:
        raise ConfigError(f"train.warm_start={folder}: the previous model is method={prev_cfg.get('method')}, "
                          f"this run method={cfg.method}")
    if not cfg.data.id_map:
        raise ConfigError("train.warm_start needs data.id_map (the previous run's prepare folder): without "
                          "stable ids, row i of the previous model is not item i of this run")
    prev_model = prev_cfg.get("model", {})
    now = cfg.to_dict()["model"]
    keys = _SAME_MODEL_KEYS + (_ALPHAFUSE_MODEL_KEYS if cfg.method == "alphafuse" else ())
    differ = [f"model.{k}: {prev_model.get(k)!r} -> {now[k]!r}" for k in keys if prev_model.get(k) != now[k]]
    if differ:
        raise ConfigError(f"train.warm_start={folder}: the previous model has another shape; " + "; ".join(differ))


def previous_id_rows(cfg: RunConfig, folder: Path, tensors: dict, id_dim: int) -> torch.Tensor:
    """The previous model's ID part [N_old, id_dim] (see the module docstring)."""
    table = tensors["item_table"].to(torch.float32)
    if cfg.method != "alphafuse":
        return table
    sem_dim = cfg.model.dim - id_dim
    if cfg.model.injection == "cover":
        return table[:, sem_dim:].clone()
    sem_path = folder.parent / "decompose" / "semantic.safetensors"
    if not sem_path.is_file():
        raise ConfigError(f"train.warm_start={folder}: the previous run's {sem_path} is missing; the ID part of "
                          "its fused table cannot be separated from the semantic part without it")
    semantic = load_file(str(sem_path))["semantic"].to(torch.float32)
    if semantic.shape != table.shape:
        raise ConfigError(f"train.warm_start={folder}: semantic table {tuple(semantic.shape)} does not match the "
                          f"item table {tuple(table.shape)} of the previous model")
    return table[:, sem_dim:] - semantic[:, sem_dim:]


def _after_refit(cfg: RunConfig, rows: torch.Tensor, decompose_dir: Path) -> tuple[torch.Tensor, str]:
    """ID rows in this run's null space when the decompose stage refitted the basis."""
    drift_path = decompose_dir / "drift.json"
    if cfg.method != "alphafuse" or not drift_path.is_file() or not json.loads(drift_path.read_text()).get("refit"):
        return rows, "previous"
    from ..decompose.basis import NullSpaceBasis
    from ..decompose.drift import id_vectors_after_refit

    id_dims = cfg.model.id_dims
    old = NullSpaceBasis.load(decompose_dir / "previous_basis").with_id_dims(id_dims, "the previous basis")
    new = NullSpaceBasis.load(decompose_dir).with_id_dims(id_dims, "decompose/basis.json")
    mapped = id_vectors_after_refit(old, new, rows.numpy().astype(np.float64), rule=cfg.train.warm_start_ids)
    return torch.from_numpy(np.asarray(mapped, dtype=np.float32)), f"refit: {cfg.train.warm_start_ids}"


@torch.no_grad()
def apply_warm_start(cfg: RunConfig, items: torch.nn.Module, encoder: torch.nn.Module, *,
                     semantic_path: str | None) -> dict:
    """Load the previous encoder and old items' ID rows into a freshly built model (in place).

    Args:
        items: a ``FusedItemTable`` (alphafuse, sasrec_id, llminit) of this run's N items.
        semantic_path: this run's ``decompose/semantic.safetensors`` (alphafuse; its folder tells
            whether the basis was refitted), else None.

    Returns:
        facts for the log and the stage manifest.

    Raises:
        ConfigError: naming ``train.warm_start`` when the previous run is incomplete, of another
            method or shape, or has more items than this one.
    """
    folder, prev_cfg, tensors = _previous(cfg)
    _check_compatible(cfg, folder, prev_cfg)
    rows = previous_id_rows(cfg, folder, tensors, items.id_dim)
    n_old = rows.shape[0]
    if n_old > items.num_items:
        raise ConfigError(f"train.warm_start={folder}: the previous model has {n_old} items, this run "
                          f"{items.num_items}; data.id_map must be the previous run's prepare folder")
    how = "previous"
    if semantic_path is not None:
        rows, how = _after_refit(cfg, rows, Path(semantic_path).parent)
    items.initial_ids[:n_old] = rows
    if items.backend == "torch":
        items.ids.weight[:n_old] = rows.to(items.ids.weight.device)
    state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"train.warm_start={folder}: the previous encoder does not fit this one: "
                          f"{str(e).splitlines()[0]}") from None
    return {"previous": str(folder), "previous_items": n_old, "items": items.num_items, "ids": how}
