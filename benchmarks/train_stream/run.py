"""Per-worker peak memory of the training data: streamed windows (``train.batches.EpochBatches``, what
the trainer runs) vs loading every window into every worker (``data.sequences.training_windows``,
shuffled at once by ``seeded_rng(seed, epoch)``), at two data sizes 10x apart and a fixed batch.

    .venv/bin/python benchmarks/train_stream/run.py                       # 200k and 2M interactions
    .venv/bin/python benchmarks/train_stream/run.py --interactions 20000 200000   # a quick look

Data: ``data.synthetic.write_synthetic`` (users and interactions grow together, 20 interactions
per user on average; 20,000 items), through the prepare stage (leave-one-out). Each loader runs
in a Ray Train ``TorchTrainer`` of 2 CPU workers (gloo) for one whole epoch: every step's windows
of this worker become torch tensors, as in ``TrainRecipe.train_step``; no model, so that the
numbers are the data's. Each worker reports its peak RSS (``getrusage`` ru_maxrss, the whole
process: Ray worker, torch, the data) and its RSS before the loader started; rank 0 gathers them
and reports them through ``ray.train.report`` (with an empty checkpoint, so that the run's result
keeps them). One JSON line per (size, loader) is printed and
appended to ``results.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

ITEMS, PER_USER = 20_000, 20


def prepared(folder: Path, interactions: int) -> tuple[Path, int]:
    """write_synthetic + prepare into ``folder``; returns (prepare folder, number of items)."""
    from alphafuse_dist.config import DataConfig
    from alphafuse_dist.data.prepare import prepare
    from alphafuse_dist.data.synthetic import write_synthetic

    paths = write_synthetic(folder / "data", n_interactions=interactions, n_items=ITEMS,
                            n_users=interactions // PER_USER, seed=0)
    out = folder / "prepare"
    info = prepare(DataConfig(source="interactions", path=str(paths["interactions"]),
                              items_path=str(paths["items"]), text_template="{title}"), out)
    return out, info["rows"]["items"]


def _rss_mb() -> float:
    """This process's resident memory now (MiB), from /proc."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_loop(config: dict) -> None:
    """One epoch of this worker's batches with ``config["loader"]``; rank 0 reports every worker's numbers."""
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    from alphafuse_dist.data.sequences import training_windows
    from alphafuse_dist.runtime.seeding import seeded_rng
    from alphafuse_dist.train.batches import EpochBatches

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    path, L, pad, B = Path(config["train_parquet"]), config["max_len"], config["items"], config["batch"]
    before = _rss_mb()
    t0 = time.time()
    if config["loader"] == "load_all":
        win_in, win_tgt = training_windows(path, L, pad)
        steps, order = len(win_in) // B, seeded_rng(0, 0).permutation(len(win_in))
        batches = ((win_in[rows], win_tgt[rows]) for rows in
                   (order[s * B + rank:(s + 1) * B:world] for s in range(steps)))
        windows_total = len(win_in)
    else:
        stream = EpochBatches(path, max_len=L, pad_id=pad, batch_size=B, chunk=config["shuffle_windows"], seed=0,
                              rank=rank, world=world)
        steps, batches, windows_total = stream.steps, stream.epoch(0), stream.num_windows
    seen = checksum = 0
    for inputs, targets in batches:
        seqs, tgts = torch.as_tensor(inputs), torch.as_tensor(targets)
        seen += len(seqs)
        checksum += int((seqs != pad).sum() + (tgts != pad).sum())
    row = {"rank": rank, "rss_before_mb": round(before, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "windows_seen": seen, "positions_seen": checksum, "seconds": round(time.time() - t0, 2)}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    metrics = {"steps": steps, "windows_total": windows_total}
    for r in rows:
        metrics |= {f"{k}_w{r['rank']}": v for k, v in r.items() if k != "rank"}
    if rank:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:  # the run's result keeps the metrics of its checkpoint
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_loader(loader: str, prep: Path, items: int, args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"loader": loader, "train_parquet": str(prep / "train.parquet"), "max_len": args.max_len,
                               "items": items, "batch": args.batch, "shuffle_windows": args.shuffle_windows},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name=f"stream-{loader}", storage_path=storage))
        result = trainer.fit()
    if result.error:
        raise result.error
    return result.metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interactions", type=int, nargs="+", default=[200_000, 2_000_000])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--shuffle-windows", type=int, default=4_096, help="train.shuffle_windows of the streamed loader")
    p.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
             "cpus": os.cpu_count(), "command": " ".join(["python", *sys.argv]), "ray": ray.__version__}
    with tempfile.TemporaryDirectory() as d:
        for n in args.interactions:
            t0 = time.time()
            prep, items = prepared(Path(d) / str(n), n)
            print(f"{n:,} interactions: prepared in {time.time() - t0:.1f} s", flush=True)
            for loader in ("load_all", "stream"):
                m = run_loader(loader, prep, items, args)
                row = {"interactions": n, "loader": loader, "batch": args.batch, "max_len": args.max_len,
                       "shuffle_windows": args.shuffle_windows if loader == "stream" else None, **m}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row | stamp) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
