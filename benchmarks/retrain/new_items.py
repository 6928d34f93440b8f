"""How the periodic-retraining models rank NEW items: every interaction of the newest period with an
item that has no training interaction, as a target (full ranking over the period's catalogue).

    .venv/bin/python benchmarks/retrain/new_items.py [--work benchmarks/.data/retrain-sim] [--out FILE]

Runs after ``simulate.py`` over the run folders it left (no training). The evaluate stage's test
split holds one target per user (the first interaction in the test window), so only a handful of
those are new items; here every test-window interaction with a never-trained item counts, with the
user's earlier interactions (last ``model.max_len``) as the history. Scores come from the library's
kernels (``load_model``, ``user_states_from_table``, ``target_ranks``), as in the evaluate stage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def new_item_cases(snapshot: Path, prepare: Path, t2: int, max_len: int) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    """(histories [M, L] left-padded with N, targets [M], every item of the case's user [M],
    user numbers [M]) of the test window's new-item interactions."""
    items = pl.read_parquet(prepare / "items.parquet")
    n = items.height
    idx = dict(zip(items["item_id"].to_list(), items["item_idx"].to_list()))
    fresh = set(items.filter(pl.col("popularity") == 0)["item_idx"].to_list())
    inter = pl.read_csv(snapshot / "ml-1m.inter", separator="\t", quote_char=None).with_row_index("row")
    inter = inter.sort(["user_id:token", "timestamp:float", "row"])
    hists, targets, seen, users = [], [], [], []
    for u, (_, g) in enumerate(inter.group_by("user_id:token", maintain_order=True)):
        ids = [idx.get(i) for i in g["item_id:token"].to_list()]
        ts = g["timestamp:float"].to_list()
        for j, (i, t) in enumerate(zip(ids, ts)):
            if t >= t2 and i in fresh:
                h = [x for x in ids[:j] if x is not None][-max_len:]
                if h:
                    hists.append([n] * (max_len - len(h)) + h)
                    targets.append(i)
                    seen.append(np.array([x for x in ids if x is not None], dtype=np.int64))
                    users.append(u)
    return (np.array(hists, dtype=np.int64).reshape(-1, max_len), np.array(targets, dtype=np.int64), seen,
            np.array(users, dtype=np.int64))


def score(train_dir: Path, hists: np.ndarray, targets: np.ndarray, fresh: np.ndarray, negatives: np.ndarray) -> dict:
    """Metrics of the new-item targets over the whole catalogue (full ranking), among 100 sampled
    items the user never interacted with (the paper's long-tail protocol, Table 3), and their
    median rank among the never-trained items ``fresh`` only (does the semantic part order the new
    items usefully?)."""
    from alphafuse_dist.config import config_from_dict
    from alphafuse_dist.evaluate.metrics import metrics_from_ranks, sampled_ranks, target_ranks
    from alphafuse_dist.evaluate.stage import load_model
    from alphafuse_dist.model.sasrec import user_states_from_table

    cfg = config_from_dict(json.loads((train_dir / "config.json").read_text()))
    table, encoder = load_model(train_dir / "model.safetensors", cfg)
    with torch.no_grad():
        states = user_states_from_table(encoder, table, torch.as_tensor(hists))
        ranks = target_ranks(states, table, torch.as_tensor(targets), similarity=cfg.model.similarity)
        position = {int(i): j for j, i in enumerate(fresh)}
        among = target_ranks(states, table[torch.as_tensor(fresh)], torch.tensor([position[int(x)] for x in targets]),
                             similarity=cfg.model.similarity)
        sampled = sampled_ranks(states, table, torch.as_tensor(targets), torch.as_tensor(negatives),
                                similarity=cfg.model.similarity)
    m = metrics_from_ranks(ranks, (10, 50))
    ms = metrics_from_ranks(sampled, (10,))
    return {k: m[k] for k in ("NDCG@10", "HR@10", "HR@50", "users")} | {
        "hits@10": int((ranks < 10).sum()), "median_rank": int(ranks.median()) + 1,
        "median_rank_among_new": int(among.median()) + 1,
        "sampled100_NDCG@10": ms["NDCG@10"], "sampled100_HR@10": ms["HR@10"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="benchmarks/.data/retrain-sim")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    runs = sorted((work / "registry" / "runs").iterdir())
    for k, run in enumerate(runs):
        if k == 0:
            continue
        cfg = json.loads(next(run.glob("train-*/config.json")).read_text())
        t2 = int(cfg["data"]["split_times"][1])
        hists, targets, seen, users = new_item_cases(work / "data" / f"p{k}", run / "prepare", t2, cfg["model"]["max_len"])
        row = {"period": k, "run": run.name, "cases": int(len(targets)), "distinct_items": int(len(set(targets.tolist()))),
               "items": int(pl.read_parquet(run / "prepare" / "items.parquet").height)}
        fresh = pl.read_parquet(run / "prepare" / "items.parquet").filter(pl.col("popularity") == 0)["item_idx"].to_numpy().copy()
        row["never_trained_items"] = int(len(fresh))
        if len(targets):
            from alphafuse_dist.evaluate.metrics import sample_negatives

            seed = cfg["seed"]
            # the same negatives for every model: they depend on (eval.negative_seed, user) only
            negatives = sample_negatives(row["items"], seen, users, 100, cfg["eval"]["negative_seed"])
            row["warm"] = score(run / f"train-alphafuse-s{seed}", hists, targets, fresh, negatives)
            row["none"] = score(run / "incumbent" / f"train-alphafuse-s{seed}", hists, targets, fresh, negatives)
            full = work / "full" / f"p{k}" / f"train-alphafuse-s{seed}"
            if full.is_dir():
                row["full"] = score(full, hists, targets, fresh, negatives)
        row["random_HR@10"] = 10 / row["items"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
