"""The evaluate stage: rank every test user's target, by ``eval.protocol``.

Reads a trained model (``model.safetensors``: the fused item table and the encoder) and prepare's
``test.parquet``; writes ``metrics.json`` with HR / NDCG / MRR at each k, overall and per group:
head / tail target items, head / tail users (history length), never-seen target items; beside
them, what the top-k lists hold (k = the first of ``eval.ks``): the share of slots going to head
items (``PopShare@k``) and the share of the catalogue the lists cover (``Coverage@k``). And
``ranks.parquet``: per test user ``user_idx:int32``, ``target:int32``, ``rank:int64`` (0-based,
the lead protocol's) and one bool column per group, so that two models scored on the same users
can be compared user by user (the retraining decision's bootstrap).

Protocols (docs/method.md section 4): ``full`` ranks the target among all N items (chunked, exact,
deterministic ties; the paper's cold-start-user table and the public baselines' leave-one-out);
``sampled`` ranks it among ``eval.sampled_negatives`` items the user never interacted with
(LLM-ESR's long-tail protocol). ``full`` is reported both ways from the same scores, under
``by_protocol``: ``filtered`` (the user's history removed from the ranking, as SASRec, HSTU and
gSASRec report) and ``unfiltered`` (every item ranked, as the AlphaFuse paper); ``metrics`` holds the
lead one, ``filtered`` when ``eval.exclude_history``. Ranks are computed on ``eval.device``
(device.py: the users split over every GPU, or this process on the CPU), equal on every device for
the same user states.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file

from ..config import RunConfig
from ..errors import ConfigError
from ..model.backbones import build_encoder
from ..data.sequences import eval_inputs
from ..runtime.parquet import read_table, write_table
from ..runtime.progress import Progress
from .device import RankJob, rank_users
from .metrics import metrics_by_group, sample_negatives
from .sharded import read_histories
from .report import protocol_label


def load_model(model_path: Path, cfg: RunConfig) -> tuple[torch.Tensor, torch.nn.Module]:
    """(fused item table [N, d], encoder of ``model.backbone`` in eval mode) from a train stage's
    model.safetensors."""
    tensors = load_file(str(model_path))
    encoder = build_encoder(cfg.model)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
    return tensors["item_table"], encoder.eval()


def _groups(cfg: RunConfig, items: "pa.Table", hist_lengths: np.ndarray, targets: np.ndarray
            ) -> tuple[dict, dict, np.ndarray]:
    """Per-user boolean masks of the reported groups, the rules that made them, and the ``[N]``
    head-item mask."""
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
    masks = {k: torch.as_tensor(np.asarray(v, dtype=bool)) for k, v in groups.items()}
    return masks, rules, np.asarray(head_items, dtype=bool)


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
    items = read_table(prepare_dir / "items.parquet", columns=["popularity", "is_head"])
    histories = read_histories(prepare_dir / f"{split}.parquet")  # every user's whole history
    hist_lengths = histories.lengths()
    full = e.protocol == "full"
    negatives = None
    if e.protocol == "sampled":
        # the user's whole history AND the target are never negatives
        seen = [np.append(h, t) for h, t in zip(histories.tolist(), targets)]
        try:
            negatives = torch.as_tensor(sample_negatives(N, seen, users, e.sampled_negatives, e.negative_seed))
        except ValueError as err:
            raise ConfigError(f"eval.sampled_negatives={e.sampled_negatives}: {err}") from None
    # user states per batch from the encoder, ranks and top-k lists by the exact scores, both
    # protocols in one pass; on eval.device (see device.py: one shard of users per GPU, the ranks
    # of the CPU path)
    k = min(e.ks[0], N)
    job = RankJob(targets=targets, similarity=cfg.model.similarity, user_batch=e.user_batch,
                  item_chunk=e.item_chunk, hist=hist, encoder=encoder, exclude=histories if full else None,
                  negatives=negatives.numpy() if negatives is not None else None, unfiltered=full,
                  top_k=k if full else 0)
    with Progress(f"[evaluate] {split} users", total=len(targets), unit="user") as bar:
        out, placement = rank_users(job, table, e.device, progress=bar)
    groups, rules, head_items = _groups(cfg, items, hist_lengths, targets)
    if full:
        by_protocol = {name: metrics_by_group(torch.as_tensor(out[f"ranks{suffix}"]), groups, e.ks,
                                              top=torch.as_tensor(out[f"top{suffix}"]),
                                              head_items=torch.as_tensor(head_items))
                       for name, suffix in (("filtered", ""), ("unfiltered", "_unfiltered"))}
        ranking = "filtered" if e.exclude_history else "unfiltered"
        by_protocol = {ranking: by_protocol[ranking]} | by_protocol  # the lead one first
    else:
        ranking = "sampled"
        by_protocol = {ranking: metrics_by_group(torch.as_tensor(out["ranks"]), groups, e.ks)}
    result = {"split": split, "method": cfg.method, "seed": cfg.seed, "items": N, "protocol": e.protocol,
              "sampled_negatives": e.sampled_negatives if e.protocol == "sampled" else None,
              "history_masked": ranking != "unfiltered", "ranking": ranking,
              "similarity": cfg.model.similarity, "data_split": cfg.data.split,
              "groups": rules | {"lists": f"PopShare@{k}: share of top-{k} slots holding a head item; "
                                          f"Coverage@{k}: distinct items in all top-{k} lists / {N} items"},
              "device": placement["device"], "gpus": placement["gpus"],
              "seconds": round(time.time() - t0, 2), "metrics": by_protocol[ranking], "by_protocol": by_protocol}
    result["protocol_name"] = protocol_label(result, ranking)
    lead = out["ranks_unfiltered" if ranking == "unfiltered" else "ranks"]
    per_user = pa.table({"user_idx": pa.array(users, pa.int32()), "target": pa.array(targets, pa.int32()),
                         "rank": pa.array(np.asarray(lead).astype(np.int64)),
                         **{name: pa.array(mask.numpy()) for name, mask in groups.items()}})
    return result, per_user


def evaluate(cfg: RunConfig, model_path: Path, prepare_dir: Path, out_dir: Path) -> dict:
    """Write ``metrics.json`` and ``ranks.parquet`` (test split) into out_dir; returns the manifest info."""
    if cfg.data.split == "all":
        raise ConfigError("data.split=all holds nothing out: there is no test part to evaluate (run the stages "
                          "up to train)")
    result, per_user = _evaluate_split(cfg, model_path, prepare_dir, "test")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(per_user, out_dir / "ranks.parquet")
    return {"rows": {"users": result["metrics"]["overall"]["users"]}}


def format_table(rows: list[tuple[str, dict]], ks=(10, 20)) -> str:
    """Plain-text tables under 100 columns for ks=(10, 20), one block per protocol (the lead one
    first), one row per (label, metrics.json content): HR, NDCG and MRR at every k over all test
    cases, HR and NDCG at the first k for the test cases whose target is a tail / head item (with
    the number of test cases of each group), then the top-k lists' PopShare and Coverage."""
    k0 = ks[0]
    blocks = [("overall", [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "MRR")])]
    blocks += [(g, [f"HR@{k0}", f"NDCG@{k0}"]) for g in ("tail", "head")]
    lists = [f"PopShare@{k0}", f"Coverage@{k0}"]
    first = rows[0][1]["metrics"] if rows else {}
    label_width = max([len(label) for label, _ in rows] + [3]) + 1
    widths = [[max(len(name), 6) + 1 for name in names] for _, names in blocks]
    titles, header = " " * label_width, f"{'run':<{label_width}}"
    for (group, names), w in zip(blocks, widths):
        title = f"{group} ({first.get(group, {}).get('users', 0)})"
        titles += "  " + f"{title:<{sum(w)}}"
        header += "  " + "".join(f"{n:>{c}}" for n, c in zip(names, w))
    list_header = f"{f'top-{k0} lists':<{label_width}}  " + "".join(f"{n:>{len(n) + 2}}" for n in lists)
    lines = []
    for protocol in (list(rows[0][1].get("by_protocol", {})) or [None]) if rows else []:
        lines += ["", f"protocol: {protocol_label(rows[0][1], protocol)}", titles.rstrip(), header, "-" * len(header)]
        table = [(label, res["by_protocol"][protocol] if protocol else res["metrics"]) for label, res in rows]
        for label, mets in table:
            lines.append(f"{label:<{label_width}}" + "".join(
                "  " + "".join(f"{mets.get(g, {}).get(n, float('nan')):>{c}.4f}" for n, c in zip(names, w))
                for (g, names), w in zip(blocks, widths)))
        if any(lists[0] in mets.get("overall", {}) for _, mets in table):
            lines += [list_header] + [f"{label:<{label_width}}  " + "".join(
                f"{mets['overall'].get(n, float('nan')):>{len(n) + 2}.4f}" for n in lists) for label, mets in table]
    lines.append(f"In brackets: test cases (one per evaluated user). tail / head: test cases whose target\n"
                 f"item is outside / among the head items, the most popular in training (data.head_rule).\n"
                 f"PopShare@{k0}: share of top-{k0} slots holding a head item; Coverage@{k0}: distinct items in all\n"
                 f"top-{k0} lists / catalogue.")
    return "\n".join(lines[1:])
