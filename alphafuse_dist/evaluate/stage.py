"""The evaluate stage: rank every test user's target, by ``eval.protocol``.

Reads a trained model (``model.safetensors``: the fused item table and the encoder) and prepare's
``test.parquet``; writes ``metrics.json`` with HR / NDCG / MRR at each k, overall and per group:
head / tail target items, head / tail users (history length), never-seen target items; and
``ranks.parquet``: per test user ``user_idx:int32``, ``target:int32``, ``rank:int64`` (0-based)
and one bool column per group, so that two models scored on the same users can be compared user
by user (the retraining decision's bootstrap).

Protocols (docs/method.md section 4): ``full`` ranks the target among all N items (chunked, exact,
deterministic ties; the paper's cold-start-user table and the public baselines' leave-one-out);
``sampled`` ranks it among ``eval.sampled_negatives`` items the user never interacted with
(LLM-ESR's long-tail protocol). The history is not masked unless ``eval.exclude_history``.
Ranks are computed on ``eval.device`` (device.py: the users split over every GPU, or this
process on the CPU), equal on every device for the same user states.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from ..config import RunConfig
from ..errors import ConfigError
from ..model.backbones import build_encoder
from ..data.sequences import eval_inputs
from .device import RankJob, rank_users
from .metrics import metrics_by_group, sample_negatives


def load_model(model_path: Path, cfg: RunConfig) -> tuple[torch.Tensor, torch.nn.Module]:
    """(fused item table [N, d], encoder of ``model.backbone`` in eval mode) from a train stage's
    model.safetensors."""
    tensors = load_file(str(model_path))
    encoder = build_encoder(cfg.model)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
    return tensors["item_table"], encoder.eval()


def _groups(cfg: RunConfig, items: "pa.Table", hist_lengths: np.ndarray, targets: np.ndarray) -> tuple[dict, dict]:
    """Per-user boolean masks of the reported groups, and the rules that made them."""
    e = cfg.eval
    popularity = items.column("popularity").to_numpy().astype(np.int64)
    if e.tail_item_threshold is not None:
        head_items = popularity >= e.tail_item_threshold
        item_rule = f"tail items: training popularity < {e.tail_item_threshold}"
    else:
        head_items = items.column("is_head").to_numpy(zero_copy_only=False)
        item_rule = f"head items: prepare's is_head (data.head_rule={cfg.data.head_rule})"
    if e.tail_user_threshold is not None:
        user_threshold = e.tail_user_threshold
    else:  # the 20% of users with the longest histories are the head
        user_threshold = int(np.quantile(hist_lengths, 0.8, method="higher")) if len(hist_lengths) else 1
    tail_users = hist_lengths < user_threshold
    never_seen = popularity == 0  # prepare's never_seen column, by its definition (older runs lack it)
    groups = {"head": head_items[targets], "tail": ~head_items[targets],
              "head_users": ~tail_users, "tail_users": tail_users, "never_seen": never_seen[targets]}
    rules = {"items": item_rule, "users": f"tail users: fewer than {user_threshold} history items",
             "never_seen": "targets with no training interaction"}
    return {k: torch.as_tensor(np.asarray(v, dtype=bool)) for k, v in groups.items()}, rules


def evaluate_split(cfg: RunConfig, model_path: Path, prepare_dir: Path, split: str = "test") -> dict:
    """Metrics of one split (``valid`` or ``test``) under ``eval.protocol``, overall and by group."""
    return _evaluate_split(cfg, model_path, prepare_dir, split)[0]


def _evaluate_split(cfg: RunConfig, model_path: Path, prepare_dir: Path, split: str) -> tuple[dict, pa.Table]:
    """(:func:`evaluate_split`'s result, the per-user ranks table of ``ranks.parquet``)."""
    t0 = time.time()
    e = cfg.eval
    table, encoder = load_model(model_path, cfg)
    N = table.shape[0]
    users, hist, targets = eval_inputs(prepare_dir / f"{split}.parquet", cfg.model.max_len, N)
    items = pq.read_table(prepare_dir / "items.parquet", columns=["popularity", "is_head"])
    full_hist = pq.read_table(prepare_dir / f"{split}.parquet", columns=["history"]).column("history")
    hist_lengths = pc.list_value_length(full_hist).to_numpy(zero_copy_only=False).astype(np.int64)
    histories = None
    if e.exclude_history or e.protocol == "sampled":
        histories = [np.asarray(h, dtype=np.int64) for h in full_hist.to_pylist()]
    negatives = None
    if e.protocol == "sampled":
        # the user's whole history AND the target are never negatives
        seen = [np.append(h, t) for h, t in zip(histories, targets)]
        try:
            negatives = torch.as_tensor(sample_negatives(N, seen, users, e.sampled_negatives, e.negative_seed))
        except ValueError as err:
            raise ConfigError(f"eval.sampled_negatives={e.sampled_negatives}: {err}") from None
    # user states per batch from the encoder, ranks by the exact scores; on eval.device (see
    # device.py: one shard of users per GPU, the ranks of the CPU path)
    job = RankJob(targets=targets, similarity=cfg.model.similarity, user_batch=e.user_batch,
                  item_chunk=e.item_chunk, hist=hist, encoder=encoder,
                  exclude=histories if e.exclude_history and negatives is None else None,
                  negatives=negatives.numpy() if negatives is not None else None)
    ranks, placement = rank_users(job, table, e.device)
    ranks = torch.as_tensor(ranks)
    groups, rules = _groups(cfg, items, hist_lengths, targets)
    metrics = metrics_by_group(ranks, groups, e.ks)
    per_user = pa.table({"user_idx": pa.array(users, pa.int32()), "target": pa.array(targets, pa.int32()),
                         "rank": pa.array(ranks.numpy().astype(np.int64)),
                         **{name: pa.array(mask.numpy()) for name, mask in groups.items()}})
    return {"split": split, "method": cfg.method, "seed": cfg.seed, "items": N, "protocol": e.protocol,
            "sampled_negatives": e.sampled_negatives if e.protocol == "sampled" else None,
            "history_masked": e.exclude_history, "similarity": cfg.model.similarity, "data_split": cfg.data.split,
            "groups": rules, "device": placement["device"], "gpus": placement["gpus"],
            "seconds": round(time.time() - t0, 2), "metrics": metrics}, per_user


def evaluate(cfg: RunConfig, model_path: Path, prepare_dir: Path, out_dir: Path) -> dict:
    """Write ``metrics.json`` and ``ranks.parquet`` (test split) into out_dir; returns the manifest info."""
    if cfg.data.split == "all":
        raise ConfigError("data.split=all holds nothing out: there is no test part to evaluate (run the stages "
                          "up to train)")
    result, per_user = _evaluate_split(cfg, model_path, prepare_dir, "test")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    pq.write_table(per_user, out_dir / "ranks.parquet")
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
