"""Periodic retraining on MovieLens-1M cut by time: warm start vs full retrain vs no retrain.

    bash benchmarks/ml1m/setup.sh
    .venv/bin/python benchmarks/retrain/simulate.py [--work benchmarks/.data/retrain-sim] [key=value ...]

The ratings are cut at their 70th, 80th and 90th time percentiles: an initial period (the first 70%)
and 3 more of ~10% each. Every period's input is a snapshot (all ratings before its end) in the
RecBole atomic layout of the source. Per period k >= 1, on the same prepared data and split
(valid = the previous period, test = period k, the newest):

- **warm**: ``alphafuse_dist.retrain.job.retrain(previous=<registry>, ...)``: stable ids, only new
  texts embedded (the shared cache), the previous basis reused, the previous model as the start,
  ``--warm-epochs`` at most; its "incumbent" is **no retrain** (the previous model applied to the
  new catalogue; items without training interactions, new ones included, take the ID part of their
  semantic neighbours: ``train.cold_items=neighbours``, set by the retrain job), scored on the
  same test period.
- **full**: the same period from scratch in another folder: a fresh embedding cache (every text
  encoded), a fresh basis, a fresh model, ``--full-epochs`` at most, the same ``train.cold_items``.

Printed and written to ``results/<date>.json``: wall time of each, items embedded, NDCG@10 /
HR@10 on the newest period overall and for targets never seen in training (items new this period),
plus ``retrain.png``. Runs on CPU (plain-torch backend, one process).
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CUTS = (0.7, 0.8, 0.9)  # time percentiles of the period ends (the last period ends after the newest rating)
FIRST_SPLIT = (0.6, 0.65)  # the initial period's valid / test start percentiles
CPU_OVERRIDES = ["train.backend=torch", "train.num_workers=1", "model.max_len=50", "train.batch_size=256",
                 "train.eval_every=1", "train.patience=3", "train.log_every=0", "ray.num_cpus=2"]


def cut_periods(source: Path, work: Path) -> tuple[list[Path], list[int], tuple[int, int]]:
    """Snapshot folders p0..p3 (ratings before each period end) and the period ends."""
    inter = pl.read_csv(source / "ml-1m.inter", separator="\t", quote_char=None)
    ts = inter["timestamp:float"].to_numpy()
    ends = [int(np.quantile(ts, q)) for q in CUTS] + [int(ts.max()) + 1]
    first = tuple(int(np.quantile(ts, q)) for q in FIRST_SPLIT)
    folders = []
    for k, end in enumerate(ends):
        folder = work / "data" / f"p{k}"
        if not (folder / "ml-1m.inter").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            inter.filter(pl.col("timestamp:float") < end).write_csv(folder / "ml-1m.inter.tmp", separator="\t",
                                                                     quote_style="never")
            (folder / "ml-1m.item").write_bytes((source / "ml-1m.item").read_bytes())
            os.replace(folder / "ml-1m.inter.tmp", folder / "ml-1m.inter")
        folders.append(folder)
    return folders, ends, first


def _embedded(run_dir: Path) -> dict:
    info = json.loads((run_dir / "embed" / "info.json").read_text())
    return {"encoded": info["encoded"], "cached": info["cached"], "items": info["items"]}


def _metrics(body: dict | None) -> dict:
    if not body:
        return {}
    out = {}
    for group in ("overall", "never_seen"):
        g = body.get(group, {})
        out[group] = {k: g.get(k) for k in ("NDCG@10", "HR@10", "users")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="benchmarks/.data/ml-1m")
    ap.add_argument("--work", default="benchmarks/.data/retrain-sim")
    ap.add_argument("--full-epochs", type=int, default=20)
    ap.add_argument("--warm-epochs", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from alphafuse_dist.pipeline import run_pipeline
    from alphafuse_dist.config import load_config
    from alphafuse_dist.retrain.job import retrain

    work = Path(args.work).resolve()
    folders, ends, first = cut_periods(Path(args.data), work)
    registry = work / "registry"
    common = CPU_OVERRIDES + list(args.overrides)
    rows = []

    t0 = time.time()
    out0 = retrain(None, str(folders[0]), pipeline=run_pipeline, run_root=registry, config="ml-1m",
                   split_times=list(first), period_end=ends[0], overrides=common + [f"data.path={folders[0]}", f"train.epochs={args.full_epochs}"])
    rows.append({"period": 0, "end": ends[0], "full_seconds": round(time.time() - t0, 1),
                 "embedded": _embedded(Path(out0["run_dir"])), "full": _metrics(out0["candidate"])})
    print(f"[sim] period 0: {rows[-1]}", flush=True)

    for k in range(1, len(folders)):
        t0 = time.time()
        out = retrain(registry, str(folders[k]), pipeline=run_pipeline, period_end=ends[k],
                      overrides=[f"train.epochs={args.warm_epochs}"] + list(args.overrides))
        warm_s = time.time() - t0
        run_dir = Path(out["run_dir"])
        cfg = json.loads(next(run_dir.glob("train-*/config.json")).read_text())
        # the same period from scratch: same data, ids and split; fresh cache, basis and model
        full_dir = work / "full" / f"p{k}"
        t0 = time.time()
        full_cfg = load_config("ml-1m", common + [
            f"data.path={folders[k]}", f"data.id_map={cfg['data']['id_map']}", "data.split=time",
            f"data.split_times=[{cfg['data']['split_times'][0]},{cfg['data']['split_times'][1]}]",
            f"run_dir={full_dir}", f"embed.cache_dir={full_dir / '.embed-cache'}", f"train.epochs={args.full_epochs}",
            f"train.cold_items={cfg['train']['cold_items']}"])  # as the retrain job set it
        full = run_pipeline(full_cfg)
        full_s = time.time() - t0
        rows.append({
            "period": k, "end": ends[k], "run_id": out["run_id"], "promoted": out["promoted"], "reason": out["reason"],
            "warm_seconds": round(warm_s, 1), "full_seconds": round(full_s, 1),
            "embedded_warm": _embedded(run_dir), "embedded_full": _embedded(full_dir),
            "drift": json.loads((run_dir / "decompose" / "drift.json").read_text()).get("drift", {}).get(
                "explained_ratio_old_mean"),
            "warm": _metrics(out["candidate"]), "none": _metrics(out["incumbent"]),
            "full": _metrics(full["metrics"]["metrics"]),
            "warm_best_epoch": json.loads((run_dir / f"train-alphafuse-s{cfg['seed']}" / "history.json").read_text())["best_epoch"],
        })
        print(f"[sim] period {k}: {json.dumps(rows[-1])}", flush=True)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    result = {"date": stamp, "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or ''}",
              "command": "python benchmarks/retrain/simulate.py " + " ".join(sys.argv[1:]),
              "full_epochs": args.full_epochs, "warm_epochs": args.warm_epochs, "overrides": common, "periods": rows}
    out_dir = ROOT / "benchmarks" / "retrain" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out_dir / "retrain.png")
    print(json.dumps(result, indent=2))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    later = [r for r in rows if r["period"] >= 1]
    ks = [r["period"] for r in later]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("warm", "warm start"), ("full", "full retrain"), ("none", "no retrain")):
        a.plot(ks, [r[name]["overall"]["NDCG@10"] for r in later], marker="o", label=label)
    a.set_xlabel("period (test = its new interactions)")
    a.set_ylabel("NDCG@10 on the newest period")
    a.set_xticks(ks)
    a.legend()
    w = 0.38
    b.bar(np.array(ks) - w / 2, [r["warm_seconds"] for r in later], w, label="warm start (incl. no-retrain eval)")
    b.bar(np.array(ks) + w / 2, [r["full_seconds"] for r in later], w, label="full retrain")
    b.set_xlabel("period")
    b.set_ylabel("wall time (s)")
    b.set_xticks(ks)
    b.legend()
    fig.suptitle("MovieLens-1M, periodic retraining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
