"""What the registry serves after each retraining period, scored on the period that follows it:
new items' share of the top-10 slots and their NDCG@10, before and after the deployable model.

    bash benchmarks/ml1m/setup.sh
    .venv/bin/python benchmarks/retrain/serving.py [--users N] [--device cpu|cuda] [key=value ...]

The ratings (RecBole layout, ``--data``) are cut at their ``--cuts`` time quantiles: period k holds
every rating before end_k (a snapshot), and is served during [end_k, end_k+1) (the last one until
the newest rating). Each period runs ``alphafuse_dist.retrain.job.retrain`` (the first a full
train, the others warm-started from the registry's ``LATEST``). Then two served models are scored
on the FOLLOWING window, which neither trained on:

- **after**: what ``LATEST`` serves now, the period's deployed model (the candidate refit on all
  the period's data when it won the gate, else the previous model on the new catalogue);
- **before**: what the registry served without a deployable model: the gated candidate when
  promoted (trained on the data before its valid part; this period's new items have only the
  cold-item rule), else the model served before (its catalogue ends earlier: this period's new
  items cannot be recommended, and a history drops them). Both lines come from this one chain, so
  a "before" candidate was warm-started from the previous period's deployed model.

"New items" of period k: items first rated in [end_k-1, end_k) (the newest part of its data,
which its gated candidate never trained on). Measured per served model, on the next window:

- **new share@10**: the share of the top-10 slots (full ranking, history not masked, as the
  evaluate stage) that new items take, over the users active in the window (history: their
  ratings before the window; one list per user);
- **new NDCG@10**: every rating of a new item in the window as a target (full ranking; history:
  the user's earlier ratings the model knows, the last ``model.max_len``);
- **NDCG@10**: each active user's first rating in the window (the time split's test rule).

``--users N`` keeps N users drawn with ``--seed`` (a smaller cut; default all). ``--device cuda``
sets ``train.device``, ``embed.device`` and ``eval.device``. Writes
``results/serving-<date>.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

USER, ITEM, TIME = "user_id:token", "item_id:token", "timestamp:float"
CPU_OVERRIDES = ["train.backend=torch", "train.num_workers=1", "model.max_len=50", "train.batch_size=256",
                 "train.eval_every=1", "train.patience=3", "train.log_every=0"]


def cut(source: Path, work: Path, cuts: list[float], users: int | None, seed: int) -> tuple[pl.DataFrame, list[Path], list[int]]:
    """(every kept rating, snapshot folders p0.., period ends + the end of the last window)."""
    inter = pl.read_csv(source / "ml-1m.inter", separator="\t", quote_char=None)
    if users is not None:
        everyone = inter[USER].unique().sort()
        keep = everyone.sample(min(users, len(everyone)), seed=seed)
        inter = inter.filter(pl.col(USER).is_in(keep.implode()))
    ts = inter[TIME].to_numpy()
    ends = [int(np.quantile(ts, q)) for q in cuts] + [int(ts.max()) + 1]
    folders = []
    for k, end in enumerate(ends[:-1]):
        folder = work / "data" / f"p{k}"
        if not (folder / "ml-1m.inter").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            inter.filter(pl.col(TIME) < end).write_csv(folder / "ml-1m.inter.tmp", separator="\t", quote_style="never")
            (folder / "ml-1m.item").write_bytes((source / "ml-1m.item").read_bytes())
            os.replace(folder / "ml-1m.inter.tmp", folder / "ml-1m.inter")
        folders.append(folder)
    return inter, folders, ends


def cases(inter: pl.DataFrame, start: int, end: int, new_ids: set, max_len: int, idx: dict, n: int):
    """Left-padded histories (pad n) of the window [start, end): (first rating per active user:
    histories, targets), (every new-item rating: histories, targets); unknown ids are -1."""
    first_h, first_t, new_h, new_t = [], [], [], []
    rows = inter.sort([USER, TIME]).select(USER, ITEM, TIME)
    for (_, g) in rows.group_by(USER, maintain_order=True):
        ids, ts = g[ITEM].to_list(), g[TIME].to_list()
        known = [idx.get(i, -1) for i in ids]
        first = True
        for j, (item, t) in enumerate(zip(ids, ts)):
            if not start <= t < end:
                continue
            hist = [x for x in known[:j] if x >= 0][-max_len:]
            if not hist:
                continue
            padded = [n] * (max_len - len(hist)) + hist
            if first:
                first_h.append(padded)
                first_t.append(known[j])
                first = False
            if item in new_ids:
                new_h.append(padded)
                new_t.append(known[j])
    as_array = lambda h: np.array(h, dtype=np.int64).reshape(-1, max_len)  # noqa: E731
    return (as_array(first_h), np.array(first_t, np.int64)), (as_array(new_h), np.array(new_t, np.int64))


def score(train_dir: Path, prepare: Path, inter: pl.DataFrame, window: tuple[int, int], new_ids: set,
          device: str) -> dict:
    """The three measures (module docstring) of one served model on ``window``."""
    from alphafuse_dist.config import config_from_dict
    from alphafuse_dist.evaluate.metrics import full_ranking_topk, metrics_from_ranks, target_ranks
    from alphafuse_dist.evaluate.stage import load_model
    from alphafuse_dist.model.sasrec import user_states_from_table

    cfg = config_from_dict(json.loads((train_dir / "config.json").read_text()))
    table, encoder = load_model(train_dir / "model.safetensors", cfg)
    table, encoder = table.to(device), encoder.to(device)
    items = pl.read_parquet(prepare / "items.parquet", columns=["item_idx", "item_id"])
    idx = dict(zip(items["item_id"].to_list(), items["item_idx"].to_list()))
    n = table.shape[0]
    new_rows = torch.tensor(sorted(idx[i] for i in new_ids if i in idx), dtype=torch.long)
    (fh, ft), (nh, nt) = cases(inter, *window, new_ids, cfg.model.max_len, idx, n)

    def ranks_and_top(hists, targets):
        ranks, tops = [], []
        with torch.no_grad():
            for s in range(0, len(hists), 1024):
                h = torch.as_tensor(hists[s:s + 1024], device=device)
                t = torch.as_tensor(targets[s:s + 1024], device=device)
                states = user_states_from_table(encoder, table, h)
                known = t >= 0  # a target the model does not know is a miss (rank n)
                r = torch.full_like(t, n)
                if known.any():
                    r[known] = target_ranks(states[known], table, t[known], similarity=cfg.model.similarity)
                ranks.append(r.cpu())
                tops.append(full_ranking_topk(states, table, 10, similarity=cfg.model.similarity)[1].cpu())
        return torch.cat(ranks) if ranks else torch.zeros(0), torch.cat(tops) if tops else torch.zeros(0, 10)

    first_ranks, top = ranks_and_top(fh, ft)
    new_ranks, _ = ranks_and_top(nh, nt)
    share = float(torch.isin(top, new_rows).float().mean()) if len(top) and len(new_rows) else 0.0
    return {"items": n, "new_items_known": int(len(new_rows)), "users": int(len(ft)),
            "NDCG@10": metrics_from_ranks(first_ranks, (10,))["NDCG@10"], "new_share@10": share,
            "new_cases": int(len(nt)), "new_NDCG@10": metrics_from_ranks(new_ranks, (10,))["NDCG@10"],
            "new_HR@10": metrics_from_ranks(new_ranks, (10,))["HR@10"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="benchmarks/.data/ml-1m", help="RecBole folder with ml-1m.inter / .item")
    ap.add_argument("--work", default="benchmarks/.data/retrain-serving")
    ap.add_argument("--cuts", default="0.6,0.7,0.8,0.9", help="time quantiles of the period ends (one period each)")
    ap.add_argument("--first-split", default="0.4,0.5", help="time quantiles of the first period's t1, t2")
    ap.add_argument("--users", type=int, default=None, help="keep this many users (seeded sample); default all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--epochs", type=int, default=20, help="the first period's train.epochs (early stopping)")
    ap.add_argument("--warm-epochs", type=int, default=5, help="train.epochs of the warm-started periods")
    ap.add_argument("--tolerance", type=float, default=0.0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from alphafuse_dist.cli import configure_logging
    from alphafuse_dist.pipeline import run_pipeline
    from alphafuse_dist.retrain import Registry
    from alphafuse_dist.retrain.job import retrain

    configure_logging()  # the stages' progress lines on stderr
    work = Path(args.work).resolve()
    cuts = [float(q) for q in args.cuts.split(",")]
    inter, folders, ends = cut(Path(args.data), work, cuts, args.users, args.seed)
    ts = inter[TIME].to_numpy()
    first_split = [int(np.quantile(ts, float(q))) for q in args.first_split.split(",")]
    first_seen = dict(inter.group_by(ITEM).agg(pl.col(TIME).min()).iter_rows())
    device = [f"train.device={args.device}", f"embed.device={args.device}", f"eval.device={args.device}"]
    common = CPU_OVERRIDES + device + list(args.overrides)
    registry = work / "registry"
    rows, before = [], None  # before: (train dir, prepare dir) the pre-deployment registry would serve
    for k in tqdm(range(len(folders)), desc="periods", unit="period"):
        t0 = time.time()
        if k == 0:
            out = retrain(None, str(folders[0]), pipeline=run_pipeline, run_root=registry, config="ml-1m",
                          split_times=first_split, period_end=ends[0], promote_tolerance=args.tolerance,
                          overrides=common + [f"data.path={folders[0]}", f"train.epochs={args.epochs}"])
        else:
            out = retrain(registry, str(folders[k]), pipeline=run_pipeline, period_end=ends[k],
                          promote_tolerance=args.tolerance,
                          overrides=[f"train.epochs={args.warm_epochs}"] + device + list(args.overrides))
        seconds = time.time() - t0
        run_dir = Path(out["run_dir"])
        stage = out["deployed"]["train_stage"]
        if out["promoted"] or before is None:
            before = (run_dir / stage, run_dir / "prepare")
        serving = Registry(registry).latest().serving_dir
        new_ids = ({i for i, t in first_seen.items() if ends[k - 1] <= t < ends[k]} if k else set())
        window = (ends[k], ends[k + 1])
        row = {"period": k, "run_id": out["run_id"], "end": ends[k], "seconds": round(seconds, 1),
               "promoted": out["promoted"], "reason": out["reason"], "deployed": out["deployed"],
               "evidence": out["evidence"], "new_items": len(new_ids),
               "drift": (json.loads((run_dir / "decompose" / "drift.json").read_text())
                         if (run_dir / "decompose" / "drift.json").is_file() else None),
               "before": score(*before, inter, window, new_ids, args.device),
               "after": score(serving / stage, serving / "prepare", inter, window, new_ids, args.device)}
        rows.append(row)
        tqdm.write(f"[serving] period {k}: {json.dumps({x: row[x] for x in ('seconds', 'promoted', 'before', 'after')})}")

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    result = {"date": stamp, "machine": f"{platform.machine()} {os.cpu_count()} cores, device {args.device}",
              "command": "python benchmarks/retrain/serving.py " + " ".join(sys.argv[1:]), "ends": ends,
              "users": args.users, "overrides": common, "periods": rows}
    out_dir = ROOT / "benchmarks" / "retrain" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"serving-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| period | new items | served after | promoted | NDCG@10 before / after | new share@10 before / after "
             "| new NDCG@10 before / after (cases) | wall time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['period']} | {r['new_items']} | {r['deployed']['dir']} | {'yes' if r['promoted'] else 'no'} "
                     f"| {b['NDCG@10']:.4f} / {a['NDCG@10']:.4f} | {b['new_share@10']:.4f} / {a['new_share@10']:.4f} "
                     f"| {b['new_NDCG@10']:.4f} / {a['new_NDCG@10']:.4f} ({a['new_cases']}) | {r['seconds']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
