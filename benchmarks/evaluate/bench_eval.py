"""Full-ranking evaluation at catalogue scale: peak memory on this CPU, users/s on one GPU.

    # this machine: 6,000 users against a 1M-item table (exact float64 scoring, the evaluate stage's path)
    .venv/bin/python benchmarks/evaluate/bench_eval.py cpu --users 6000 --items 1000000
    # one GPU (plain torch, no Ray/TorchRec needed): bf16 top-10 serving path, users/s at 1M items
    python benchmarks/evaluate/bench_eval.py gpu --users 65536 --items 1000000

Both modes build a SASRec encoder (d=128, L=50) and a random item table, encode random histories
into user states (the evaluate stage's ``user_states_from_table``) and rank every item for every
user, one item chunk at a time (``alphafuse_dist.evaluate.metrics``). CPU mode times
``target_ranks`` (exact, float64 products, the metric path) and reports the process's peak RSS
(``ru_maxrss``, the whole process: table, states, chunk buffers). GPU mode times
``full_ranking_topk(k=10, score_dtype=bfloat16)`` and prints the GEMM-bound estimate beside it
(2 U N d flops at the card's dense bf16 peak). One JSON line per run goes to ``results.jsonl``
(or ``$OUT``).
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alphafuse_dist.evaluate.metrics import full_ranking_topk, metrics_from_ranks, target_ranks  # noqa: E402
from alphafuse_dist.model.sasrec import SASRecEncoder, user_states_from_table  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0}


def _inputs(users: int, items: int, dim: int, max_len: int, device: str):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(items, dim, generator=gen).to(device)
    hist = torch.randint(0, items, (users, max_len), generator=gen)
    hist[: users // 2, : max_len // 2] = items  # half the users have short, left-padded histories
    targets = torch.randint(0, items, (users,), generator=gen)
    encoder = SASRecEncoder(dim, max_len).to(device).eval()
    return table, hist.to(device), targets.to(device), encoder


def bench_cpu(users: int, items: int, dim: int, user_batch: int, item_chunk: int) -> dict:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table, hist, targets, encoder = _inputs(users, items, dim, 50, "cpu")
    t0 = time.perf_counter()
    ranks = []
    with torch.no_grad():
        for s in range(0, users, user_batch):
            states = user_states_from_table(encoder, table, hist[s:s + user_batch])
            ranks.append(target_ranks(states, table, targets[s:s + user_batch], similarity="cosine",
                                      item_chunk=item_chunk))
    seconds = time.perf_counter() - t0
    ranks = torch.cat(ranks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": "cpu", "users": users, "items": items, "dim": dim, "user_batch": user_batch,
            "item_chunk": item_chunk, "seconds": round(seconds, 2), "users_per_s": round(users / seconds, 1),
            "peak_rss_mb": round(peak), "rss_before_inputs_mb": round(base),
            "table_mb": round(table.numel() * 4 / 2**20), "target_under_4gb": peak < 4096,
            "NDCG@10_random_model": metrics_from_ranks(ranks, (10,))["NDCG@10"],
            "threads": torch.get_num_threads()}


def bench_gpu(users: int, items: int, dim: int, user_batch: int, item_chunk: int) -> dict:
    table, hist, targets, encoder = _inputs(users, items, dim, 50, "cuda")
    table_bf16 = table.to(torch.bfloat16)

    def run() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for s in range(0, users, user_batch):
                states = user_states_from_table(encoder, table_bf16, hist[s:s + user_batch])
                full_ranking_topk(states, table_bf16, 10, similarity="dot", item_chunk=item_chunk,
                                  score_dtype=torch.bfloat16)

    run()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    gemm_bound = peak * 1e12 / (2 * items * dim) if peak else None
    return {"mode": "gpu", "device": name, "users": users, "items": items, "dim": dim, "user_batch": user_batch,
            "item_chunk": item_chunk, "k": 10, "score_dtype": "bfloat16", "seconds": round(seconds, 3),
            "users_per_s": round(users / seconds), "gemm_bound_users_per_s": round(gemm_bound) if gemm_bound else None,
            "fraction_of_gemm_bound": round(users / seconds / gemm_bound, 3) if gemm_bound else None,
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cpu", "gpu"])
    p.add_argument("--users", type=int, default=6000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--user-batch", type=int, default=None, help="default: 1024 (cpu), 4096 (gpu)")
    p.add_argument("--item-chunk", type=int, default=None, help="default: 65536 (cpu), 262144 (gpu)")
    a = p.parse_args()
    if a.mode == "cpu":
        res = bench_cpu(a.users, a.items, a.dim, a.user_batch or 1024, a.item_chunk or 65_536)
    else:
        res = bench_gpu(a.users, a.items, a.dim, a.user_batch or 4096, a.item_chunk or 262_144)
    res |= {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cpus": os.cpu_count(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(res, indent=2))
    out = Path(os.environ.get("OUT", Path(__file__).parent)) / "results.jsonl"
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
