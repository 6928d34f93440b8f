"""Full-ranking evaluation throughput: exact ranks of U users over N items on the GPU(s), against
the CPU path on a subset of the same users, extrapolated.

    # a CUDA machine (one H100: well under a minute at the defaults, 500,000 users x 1,000,000 items)
    python benchmarks/eval_gpu/bench.py --out /tmp/eval_gpu.json
    # the CPU path alone, e.g. its memory at 6,000 users x 1M items
    python benchmarks/eval_gpu/bench.py --device cpu --users 6000 --items 1000000 --out /tmp/eval_cpu.json

Data: item table [N, d] ~ N(0, 1) float32, targets uniform over the items, user states = the
target's vector + N(0, 3^2) noise (so the targets land anywhere from the top to the middle).
The timed work is the evaluate stage's ranking (``alphafuse_dist.evaluate.device.rank_users``,
``--user-batch`` users at a time, ``--item-chunk`` items per chunk, exact float64 scores) and
the metrics from the ranks (HR, NDCG and MRR at 10 and 20); the transfer of the table to the GPU
and its fixed-point rows are included.

With ``--device cuda`` the CPU path also ranks the first ``--cpu-users`` users (this process,
torch on all cores); its ranks must equal the GPU's for those users (``cpu_ranks_equal_gpu``),
and its users/s is extrapolated to all users. ``--ray`` ranks through Ray tasks (one per GPU),
as the stage does when the pipeline has started Ray; without it, one thread per local GPU.

``--stage`` ranks as the evaluate stage does by default: each user's history (``--history``
items on average, geometric lengths, items drawn by a power law) is excluded, the unfiltered ranks
and both top-10 lists come from the same pass (``eval.exclude_history``, ``eval.unfiltered``).
``--encoder`` adds the stage's encoder: user states from a SASRec encoder (random weights, width
``--dim``, ``--blocks`` blocks, one head) over each user's last 50 history items, batch by batch
on the ranking device;
the CPU check is then skipped (encoder kernels may differ in the last bits between devices, so
only ranks of the same states are comparable; ``--stage`` without it checks those).

Printed and written to ``--out`` (JSON): users/s on each side, the speed-up, peak GPU memory
(torch's allocator, the largest shard) and this process's peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {message}", flush=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synthetic(users: int, items: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item table float32 [N, d], user states float32 [U, d], targets int64 [U])."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((items, dim), dtype=np.float32)
    targets = rng.integers(0, items, size=users)
    states = table[targets]
    states += 3.0 * rng.standard_normal(states.shape, dtype=np.float32)
    return table, states, targets


def histories(users: int, items: int, mean: int, seed: int):
    """Per user, ``mean`` items on average (geometric lengths, 1..500), popular items more often
    (``ItemLists``: the evaluate stage's form of the exclusions)."""
    from alphafuse_dist.evaluate.metrics import ItemLists

    rng = np.random.default_rng(seed + 1)
    lengths = np.minimum(rng.geometric(1 / mean, users), 500)
    drawn = (rng.pareto(1.2, int(lengths.sum())) * items / 1000).astype(np.int64) % items
    return ItemLists(drawn, np.concatenate([[0], np.cumsum(lengths)]))


def timed_ranking(job, table, device: str, ks=(10, 20)) -> tuple[dict[str, np.ndarray], dict, dict, float]:
    """(the arrays of ``rank_users``: ranks, with ``--stage`` also unfiltered ranks and top lists;
    its info; metrics of the ranks; seconds)."""
    import torch

    from alphafuse_dist.evaluate.device import rank_users
    from alphafuse_dist.evaluate.metrics import metrics_from_ranks

    t0 = time.time()
    out, info = rank_users(job, table, device, log=log)
    metrics = metrics_from_ranks(torch.as_tensor(out["ranks"]), ks)
    return out, info, metrics, time.time() - t0


def main() -> None:
    from alphafuse_dist.config import EvalConfig, ModelConfig

    defaults = EvalConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--users", type=int, default=None, help="users (default: 500,000 on cuda, 2,000 on cpu)")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--similarity", choices=["dot", "cosine"], default="dot")
    p.add_argument("--user-batch", type=int, default=defaults.user_batch, help="eval.user_batch")
    p.add_argument("--item-chunk", type=int, default=defaults.item_chunk, help="eval.item_chunk")
    p.add_argument("--cpu-users", type=int, default=2000, help="cuda: users ranked on the CPU too (0: none)")
    p.add_argument("--ray", action="store_true", help="rank through Ray tasks, one per GPU")
    p.add_argument("--stage", action="store_true",
                   help="the evaluate stage's work: histories excluded, unfiltered ranks, both top-10 lists")
    p.add_argument("--history", type=int, default=20, help="--stage: mean history length")
    p.add_argument("--encoder", action="store_true",
                   help="--stage: user states from a SASRec encoder over the last 50 history items")
    p.add_argument("--blocks", type=int, default=ModelConfig().num_blocks,
                   help="--encoder: Transformer blocks (default: model.num_blocks's default, the million run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = p.parse_args()
    users = args.users or (500_000 if args.device == "cuda" else 2000)
    if args.encoder and not args.stage:
        p.error("--encoder: needs --stage (the encoder reads the histories)")

    import torch

    from alphafuse_dist.evaluate.device import RankJob

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device (use --device cpu)")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    log(f"{users:,} users x {args.items:,} items, d={args.dim}, {args.similarity}, {args.device} "
        f"({gpu or platform.processor() or platform.machine()}, {torch.cuda.device_count() if gpu else 0} GPU(s), "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads), user_batch {args.user_batch}, "
        f"item_chunk {args.item_chunk}" + (f", stage protocol (histories of {args.history} excluded, both "
                                           "rankings, top-10 lists)" if args.stage else "")
        + (f", user states from a {args.blocks}-block encoder" if args.encoder else ""))
    table_np, states, targets = synthetic(users, args.items, args.dim, args.seed)
    table = torch.from_numpy(table_np)
    stage = {"exclude": histories(users, args.items, args.history, args.seed), "unfiltered": True, "top_k": 10} \
        if args.stage else {}
    if args.encoder:  # the stage's inputs: windows of the histories and the encoder, no states
        from alphafuse_dist.data.sequences import last_items
        from alphafuse_dist.model.backbones import build_encoder

        torch.manual_seed(args.seed)
        model = ModelConfig(dim=args.dim, id_dims=args.dim // 2, max_len=50, similarity=args.similarity,
                            num_blocks=args.blocks, num_heads=1)
        ex = stage["exclude"]
        stage |= {"hist": last_items(ex.values, ex.offsets, model.max_len, args.items),
                  "encoder": build_encoder(model).eval()}
        states = None
    job = RankJob(targets=targets, similarity=args.similarity, user_batch=args.user_batch,
                  item_chunk=args.item_chunk, states=states, **stage)
    log(f"data ready ({table_np.nbytes / 2**30:.2f} GiB table), peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
    if args.ray:
        import ray

        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(include_dashboard=False, logging_level="WARNING")
        log(f"Ray: {ray.cluster_resources().get('GPU', 0):g} GPUs")

    report = {"benchmark": "eval_gpu", "device": args.device, "gpu": gpu, "users": users, "items": args.items,
              "dim": args.dim, "similarity": args.similarity, "user_batch": args.user_batch,
              "item_chunk": args.item_chunk, "via_ray": args.ray, "stage": args.stage,
              "history": args.history if args.stage else 0, "encoder": args.encoder,
              "encoder_blocks": args.blocks if args.encoder else 0, "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    log(f"ranking {users:,} users on {args.device} ...")
    out, info, metrics, seconds = timed_ranking(job, table, args.device)
    peak_gpu = max((s["peak_gpu_bytes"] or 0 for s in info["shards"]), default=0) or None
    report[args.device] = {"seconds": round(seconds, 2), "users_per_s": round(users / seconds, 1),
                           "gpus": info["gpus"], "shards": info["shards"], "peak_gpu_bytes": peak_gpu,
                           "metrics": metrics}
    log(f"{args.device}: {seconds:.1f}s, {users / seconds:,.0f} users/s"
        + (f", peak GPU memory {peak_gpu / 2**30:.2f} GiB" if peak_gpu else "")
        + f"; HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f} HR@20 {metrics['HR@20']:.4f} "
          f"NDCG@20 {metrics['NDCG@20']:.4f}")

    if args.device == "cuda" and args.cpu_users and not args.encoder:
        n = min(args.cpu_users, users)
        log(f"CPU path on the first {n:,} users ...")
        cpu_out, _, _, cpu_seconds = timed_ranking(job.shard(0, n), table, "cpu")
        equal = all(np.array_equal(cpu_out[k], out[k][:n]) for k in out)  # ranks, and top lists with --stage
        rate = n / cpu_seconds
        report["cpu_subset"] = {"users": n, "seconds": round(cpu_seconds, 2), "users_per_s": round(rate, 1),
                                "extrapolated_seconds_all_users": round(users / rate, 1),
                                "cpu_ranks_equal_gpu": equal}
        report["speedup_vs_cpu"] = round((users / seconds) / rate, 1)
        log(f"cpu: {rate:,.0f} users/s on {n:,} users ({users / rate:,.0f}s extrapolated to {users:,}); "
            f"GPU speed-up {report['speedup_vs_cpu']}x; CPU ranks equal the GPU's: {equal}")
        if not equal:
            log(f"MISMATCH: {int((cpu_out['ranks'] != out['ranks'][:n]).sum())} of {n} users' ranks differ")
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["total_s"] = round(time.time() - T0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB; total {report['total_s']}s -> {args.out}")


if __name__ == "__main__":
    main()
