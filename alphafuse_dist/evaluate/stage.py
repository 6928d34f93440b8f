"""The evaluate stage: full ranking of every test user's target over all items.

Reads a trained model (``model.safetensors``: the fused item table and the encoder) and prepare's
``test.parquet``; writes ``metrics.json`` with HR / NDCG / MRR at each k, overall and for head and
tail target items. The history is not masked unless ``eval.exclude_history`` (as in the paper).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from ..config import RunConfig
from ..model.sasrec import SASRecEncoder, user_states_from_table
from ..train.data import eval_inputs
from .metrics import grouped_metrics, target_ranks


def load_model(model_path: Path, cfg: RunConfig) -> tuple[torch.Tensor, SASRecEncoder]:
    """(fused item table [N, d], encoder in eval mode) from a train stage's model.safetensors."""
    tensors = load_file(str(model_path))
    m = cfg.model
    encoder = SASRecEncoder(m.dim, m.max_len, m.num_blocks, m.num_heads, m.dropout,
                            normalize_inputs=m.similarity == "cosine")
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
    return tensors["item_table"], encoder.eval()


def evaluate_split(cfg: RunConfig, model_path: Path, prepare_dir: Path, split: str = "test") -> dict:
    """Metrics of one split (``valid`` or ``test``) with the run's similarity and k values."""
    t0 = time.time()
    table, encoder = load_model(model_path, cfg)
    N = table.shape[0]
    users, hist, targets = eval_inputs(prepare_dir / f"{split}.parquet", cfg.model.max_len, N)
    is_head = torch.as_tensor(pq.read_table(prepare_dir / "items.parquet", columns=["is_head"])
                              .column("is_head").to_numpy(zero_copy_only=False))
    hist_t, tgt_t = torch.as_tensor(hist), torch.as_tensor(targets)
    exclude_all = None
    if cfg.eval.exclude_history:
        full = pq.read_table(prepare_dir / f"{split}.parquet", columns=["history"]).column("history").to_pylist()
        exclude_all = [torch.as_tensor(h, dtype=torch.long) for h in full]
    ranks = []
    step = cfg.eval.user_batch
    for s in range(0, len(users), step):
        with torch.no_grad():
            states = user_states_from_table(encoder, table, hist_t[s:s + step])
        ranks.append(target_ranks(states, table, tgt_t[s:s + step], similarity=cfg.model.similarity,
                                  item_chunk=cfg.eval.item_chunk,
                                  exclude=exclude_all[s:s + step] if exclude_all else None))
    ranks = torch.cat(ranks)
    metrics = grouped_metrics(ranks, tgt_t, is_head, cfg.eval.ks)
    return {"split": split, "method": cfg.method, "seed": cfg.seed, "items": N,
            "history_masked": cfg.eval.exclude_history, "similarity": cfg.model.similarity,
            "seconds": round(time.time() - t0, 2), "metrics": metrics}


def evaluate(cfg: RunConfig, model_path: Path, prepare_dir: Path, out_dir: Path) -> dict:
    """Write ``metrics.json`` (test split) into out_dir; returns the manifest info."""
    result = evaluate_split(cfg, model_path, prepare_dir, "test")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return {"rows": {"users": result["metrics"]["overall"]["users"]}}


def format_table(rows: list[tuple[str, dict]], ks=(10, 20)) -> str:
    """A plain-text table, one row per (label, metrics.json content): every metric overall, then
    HR and NDCG at the first k for tail and head target items (with their user counts)."""
    overall = [(f"{m}@{k}", "overall", f"{m}@{k}") for k in ks for m in ("HR", "NDCG", "MRR")]
    k0 = ks[0]
    grouped = [(f"{g}:{m}@{k0}", g, f"{m}@{k0}") for g in ("tail", "head") for m in ("HR", "NDCG")]
    cols = overall + grouped
    width = max(len(c[0]) for c in cols) + 2
    head = f"{'run':<22}" + "".join(f"{c[0]:>{width}}" for c in cols) + f"{'users':>8}"
    lines = [head, "-" * len(head)]
    for label, res in rows:
        mets = res["metrics"]
        cells = "".join(f"{mets.get(g, {}).get(key, float('nan')):>{width}.4f}" for _, g, key in cols)
        lines.append(f"{label:<22}{cells}{mets['overall'].get('users', 0):>8}")
    groups = rows[0][1]["metrics"] if rows else {}
    lines.append(f"(tail/head: target items outside/inside the top share of items by training "
                 f"popularity; users: tail {groups.get('tail', {}).get('users', 0)}, "
                 f"head {groups.get('head', {}).get('users', 0)})")
    return "\n".join(lines)
