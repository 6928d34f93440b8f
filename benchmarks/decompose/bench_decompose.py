"""Decompose benchmark: the stage's covariance + eigh against in-memory ``np.cov`` + ``np.linalg.eigh`` / ``svd``.

Per size ``N x d_l``: float32 rows with a decaying spectrum and a non-zero mean, written once as
Parquet files of ``--rows-per-file`` rows in the embed stage's layout (``embed.job.vector_table``).

- numpy: E read from the same files into memory (timed apart), then ``np.cov(E, rowvar=False)``
  followed by ``np.linalg.eigh`` and, separately, ``np.linalg.svd`` of the covariance.
- ours: ``decompose.covariance.covariance`` (one Ray task per piece, Parquet read included) then
  ``scipy.linalg.eigh``, in a local Ray of ``--num-cpus`` CPUs started before the clock.

Each side runs twice in one process: the first call (Ray's workers start and import our code;
numpy's BLAS warms up) and a warm one. It prints one line per call and the largest relative
differences of the covariance and the eigenvalues between the two.

Usage::

    python benchmarks/decompose/bench_decompose.py --sizes 200000x384 1000000x384 --work /tmp/afbench
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def generate(n: int, d_l: int, folder: Path, rows_per_file: int) -> list[str]:
    from alphafuse_dist.embed.job import PARQUET_OPTIONS, vector_table

    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in folder.glob("part-*.parquet"))
    if files:
        return files
    rng = np.random.default_rng(0)
    mix = (rng.normal(size=(d_l, d_l)) * (0.98 ** np.arange(d_l))[:, None] / np.sqrt(d_l)).astype(np.float32)
    mean = rng.uniform(-1, 1, size=d_l).astype(np.float32)
    for k, start in enumerate(range(0, n, rows_per_file)):
        rows = min(rows_per_file, n - start)
        X = rng.standard_normal((rows, d_l), dtype=np.float32) @ mix + mean
        pq.write_table(vector_table(np.arange(start, start + rows), X), folder / f"part-{k:05d}.parquet",
                       **PARQUET_OPTIONS)
    return sorted(str(p) for p in folder.glob("part-*.parquet"))


def numpy_side(files: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    E = np.concatenate([pq.read_table(f, columns=["vector"]).column(0).combine_chunks().flatten().to_numpy()
                        .reshape(-1, pq.read_schema(f).field("vector").type.list_size) for f in files])
    out = {"read": time.perf_counter() - t0}
    t0 = time.perf_counter()
    C = np.cov(E, rowvar=False)
    out["cov"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    values = np.linalg.eigh(C)[0]
    out["eigh"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.linalg.svd(C)
    out["svd"] = time.perf_counter() - t0
    return out, C, values


def ours(files: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
    from scipy.linalg import eigh

    from alphafuse_dist.decompose.covariance import covariance

    t0 = time.perf_counter()
    _, _, C = covariance(files)
    out = {"cov": time.perf_counter() - t0}
    t0 = time.perf_counter()
    values = eigh(C, check_finite=False)[0]
    out["eigh"] = time.perf_counter() - t0
    return out, C, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["200000x384", "1000000x384"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/afbench-decompose"))
    parser.add_argument("--rows-per-file", type=int, default=50_000)
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args()
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False)
    print(f"ray.init {time.perf_counter() - t0:.2f}s (not counted), {ray.cluster_resources()['CPU']:.0f} CPUs")
    for size in args.sizes:
        n, d_l = map(int, size.split("x"))
        files = generate(n, d_l, args.work / size, args.rows_per_file)
        for call in ("first", "warm"):
            ref, C_ref, S_ref = numpy_side(files)
            got, C, S = ours(files)
            numpy_s, ours_s = ref["cov"] + ref["eigh"], got["cov"] + got["eigh"]
            print(f"{size} {call}: numpy cov {ref['cov']:.2f}s + eigh {ref['eigh']:.2f}s = {numpy_s:.2f}s "
                  f"(svd {ref['svd']:.2f}s, read into memory {ref['read']:.2f}s) | ours cov {got['cov']:.2f}s "
                  f"(Parquet read included) + eigh {got['eigh']:.2f}s = {ours_s:.2f}s | numpy / ours "
                  f"{numpy_s / ours_s:.2f}x, with numpy's read {(numpy_s + ref['read']) / ours_s:.2f}x | "
                  f"max rel diff cov {np.abs(C - C_ref).max() / np.abs(C_ref).max():.1e}, "
                  f"eigenvalues {np.abs(S - S_ref).max() / S_ref.max():.1e}", flush=True)
            del C_ref
    ray.shutdown()


if __name__ == "__main__":
    main()
