"""Embedding throughput: the Ray Data embed job vs a plain ``SentenceTransformer.encode`` loop.

    # this machine (CPU): same texts through both paths, one run, ratio printed
    .venv/bin/python benchmarks/embed/bench_embed.py cpu --n 5000
    # a GPU machine with torch + sentence-transformers only (no Ray): the plain encode path, fp16
    python benchmarks/embed/bench_embed.py gpu --n 1000000 --model <folder of all-MiniLM-L6-v2>

Texts are synthetic catalogue titles (``alphafuse_dist.data.synthetic``), so every run sees the
same strings. Results are appended to ``benchmarks/embed/results.jsonl`` (or ``$OUT``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_titles(n: int, seed: int = 0) -> list[str]:
    from alphafuse_dist.data.synthetic import _categories, _titles

    rng = np.random.default_rng(seed)
    titles, cats = _titles(rng, n).to_pylist(), _categories(rng, n).to_pylist()
    return [f"{t}. Category: {c}." for t, c in zip(titles, cats)]


def bench_cpu(n: int, batch: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from alphafuse_dist.config import EmbedConfig
    from alphafuse_dist.embed.encoder import load_encoder
    from alphafuse_dist.embed.job import embed_items

    texts = synthetic_titles(n)
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_encoder("all-MiniLM-L6-v2", "cpu")
    model.encode(texts[:256], batch_size=batch)  # warm-up: model load and first-call costs out
    t0 = time.perf_counter()
    plain = model.encode(texts, batch_size=batch, convert_to_numpy=True)
    plain_s = time.perf_counter() - t0
    del model

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as d:
        items = Path(d) / "items.parquet"
        pq.write_table(pa.table({"item_idx": pa.array(np.arange(n), pa.int32()), "text": texts}), items)
        out = Path(d) / "out"
        out.mkdir()
        t0 = time.perf_counter()
        embed_items(items, EmbedConfig(batch_size=batch), out, cache_dir=Path(d) / "cache")
        ray_s = time.perf_counter() - t0
        got = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))).sort_by("item_idx").column("vector").combine_chunks().flatten()
        got = got.to_numpy().reshape(n, -1)
    ray.shutdown()
    return {"mode": "cpu", "n": n, "batch": batch, "plain_items_per_s": n / plain_s,
            "ray_data_items_per_s": n / ray_s, "ratio_ray_over_plain": plain_s / ray_s,
            "max_abs_diff": float(np.abs(got - plain).max()),
            "note": "Ray Data time includes Ray Data start-up, actor start and model load; plain excludes the load"}


def bench_gpu(n: int, batch: int, model_path: str) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    texts = synthetic_titles(n)
    model = SentenceTransformer(model_path, device="cuda", local_files_only=True).half().eval()
    model.encode(texts[:batch * 4], batch_size=batch)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    vecs = model.encode(texts, batch_size=batch, convert_to_numpy=True)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    assert vecs.shape[0] == n and np.isfinite(vecs).all()
    return {"mode": "gpu", "n": n, "batch": batch, "items_per_s": n / s, "seconds": s,
            "device": torch.cuda.get_device_name(0), "dtype": "fp16",
            "reference": "sbert.net: all-MiniLM-L6-v2 14,200 sentences/s on a V100",
            "ratio_vs_sbert_v100": n / s / 14_200}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["cpu", "gpu"])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default=None, help="gpu mode: model folder")
    a = p.parse_args()
    res = bench_cpu(a.n, a.batch) if a.mode == "cpu" else bench_gpu(a.n, a.batch, a.model)
    res |= {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    print(json.dumps(res, indent=2))
    out = Path(os.environ.get("OUT", Path(__file__).parent)) / "results.jsonl"
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
