"""Embedding throughput: the Ray Data embed job vs a plain ``SentenceTransformer.encode`` loop.

    # this machine (CPU): same texts through both paths, one run, ratio printed
    .venv/bin/python benchmarks/embed/bench_embed.py cpu --n 20000 --repeats 2
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
import subprocess
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


def _plain_job(items: Path, out: Path, batch: int) -> dict:
    """What a user writes without Ray: load the model, read the texts, ``encode``, write Parquet.
    Runs in a fresh process (mode ``plain``, started by :func:`_plain_job_process`)."""
    t_import = time.perf_counter()
    import pyarrow.parquet as pq
    import torch

    from alphafuse_dist.embed.encoder import load_encoder
    from alphafuse_dist.embed.job import PARQUET_OPTIONS, vector_table

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = load_encoder("all-MiniLM-L6-v2", "cpu")
    table = pq.read_table(items)
    t1 = time.perf_counter()
    vectors = model.encode(table.column("text").to_pylist(), batch_size=batch, convert_to_numpy=True)
    t2 = time.perf_counter()
    pq.write_table(vector_table(table.column("item_idx").to_numpy(), vectors), out, **PARQUET_OPTIONS)
    t3 = time.perf_counter()
    return {"import_s": t0 - t_import, "load_s": t1 - t0, "encode_s": t2 - t1, "write_s": t3 - t2,
            "in_process_s": t3 - t0}


def _plain_job_process(items: Path, out: Path, batch: int) -> tuple[dict, np.ndarray]:
    """The plain job as a user runs it: a fresh Python process (its imports and start-up timed, as
    the Ray Data job's actor pays its own); returns its timings and the vectors it wrote."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "plain", "--items", str(items), "--out", str(out),
                           "--batch", str(batch)], capture_output=True, text=True, check=True)
    total = time.perf_counter() - t0
    timings = json.loads(done.stdout.strip().splitlines()[-1]) | {"total_s": total}
    table = pq.read_table(out)
    order = np.argsort(table.column("item_idx").to_numpy())
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(order), -1)[order]
    return timings, vectors


def bench_cpu(n: int, batch: int, repeats: int) -> dict:
    """``repeats`` pairs (plain job, Ray Data job), alternating, on the same texts; ratios of
    end-to-end times (texts in Parquet -> vectors in Parquet, model load included on both sides)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from alphafuse_dist.config import EmbedConfig
    from alphafuse_dist.embed.job import embed_items

    texts = synthetic_titles(n)
    # a running cluster is the job's premise (the pipeline starts it once per run): not timed
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    pairs = []
    with tempfile.TemporaryDirectory() as d:
        items = Path(d) / "items.parquet"
        pq.write_table(pa.table({"item_idx": pa.array(np.arange(n), pa.int32()), "text": texts}), items)
        for r in range(repeats):
            plain, plain_vectors = _plain_job_process(items, Path(d) / "plain.parquet", batch)
            out = Path(d) / f"out{r}"
            out.mkdir()
            t0 = time.perf_counter()
            embed_items(items, EmbedConfig(batch_size=batch), out, cache_dir=None)
            ray_s = time.perf_counter() - t0
            got = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("part-*.parquet")))
            got = got.sort_by("item_idx").column("vector").combine_chunks().flatten().to_numpy().reshape(n, -1)
            pairs.append({"plain": plain, "ray_data_s": ray_s,
                          "ratio_end_to_end": plain["total_s"] / ray_s,
                          "ratio_vs_plain_in_process": plain["in_process_s"] / ray_s,
                          "ratio_vs_plain_encode_only": plain["encode_s"] / ray_s,
                          "max_abs_diff": float(np.abs(got - plain_vectors).max()),
                          "load_average": os.getloadavg()[0]})
            print(json.dumps({"pair": r + 1} | pairs[-1]), flush=True)
    ray.shutdown()
    return {"mode": "cpu", "n": n, "batch": batch, "pairs": pairs,
            "median_ratio_end_to_end": float(np.median([p["ratio_end_to_end"] for p in pairs])),
            "median_ratio_vs_plain_in_process": float(np.median([p["ratio_vs_plain_in_process"] for p in pairs])),
            "median_ratio_vs_plain_encode_only": float(np.median([p["ratio_vs_plain_encode_only"] for p in pairs])),
            "median_plain_items_per_s": float(np.median([n / p["plain"]["total_s"] for p in pairs])),
            "median_ray_data_items_per_s": float(np.median([n / p["ray_data_s"] for p in pairs])),
            "note": "end to end: items Parquet -> vectors Parquet; the plain job in a fresh process (its "
                    "interpreter, imports and model load timed), the Ray Data job with its executor and "
                    "actor start (the actor's imports and model load); ray.init is not timed. "
                    "in_process: the plain job's model load + read + encode + write only (before "
                    "2026-11-27 the plain job ran in the benchmark's process and this was the ratio)"}


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
    p.add_argument("mode", choices=["cpu", "gpu", "plain"])
    p.add_argument("--items", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default=None, help="gpu mode: model folder")
    p.add_argument("--repeats", type=int, default=2, help="cpu mode: alternating (plain, Ray Data) pairs")
    a = p.parse_args()
    if a.mode == "plain":  # the child process of _plain_job_process
        print(json.dumps(_plain_job(Path(a.items), Path(a.out), a.batch)))
        return
    res = bench_cpu(a.n, a.batch, a.repeats) if a.mode == "cpu" else bench_gpu(a.n, a.batch, a.model)
    res |= {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    print(json.dumps(res, indent=2))
    out = Path(os.environ.get("OUT", Path(__file__).parent)) / "results.jsonl"
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
