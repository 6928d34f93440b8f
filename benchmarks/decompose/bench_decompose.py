"""Decompose benchmark: our fragment-wise covariance + eigh (and the randomized solver) against the
reference's in-memory ``np.cov`` + ``np.linalg.svd``.

Per size ``N x d_l`` (float32 rows with a decaying spectrum and a non-zero mean):

1. The rows are written once as Parquet fragments of ``--rows-per-file`` rows in the embed stage's
   layout (``--format embed``: required fields, uncompressed, 4,096-row groups; ``nullable``: the
   older nullable, snappy layout, one row group per file) and as one ``.npy`` file (the reference's input; it holds E in memory, as its
   code does).
2. reference: a fresh subprocess loads E (timed apart: ``load_seconds``), then times the
   reference's decomposition as its code runs it: ``mu = np.mean(E, 0)``,
   ``C = np.cov(E - mu, rowvar=False)``, ``np.linalg.svd(C)`` (centring, cov and svd also timed
   apart); peak memory = that process's ``ru_maxrss`` (E included).
3. ours: a fresh subprocess starts local Ray (``--num-cpus``, default all cores) and times
   ``distributed_covariance`` + ``covariance_eigh`` (the stage's path; reading and decoding the fragments included)
   twice: the first call (Ray workers start and import our code: ``seconds``) and a warm one
   (``warm_seconds``). Peak memory comes from another fresh subprocess that runs the first call
   under a sampler: the peak of the summed RSS (and PSS: shared pages split among the processes) of
   the driver and all its descendants (raylet, GCS, workers), every 20 ms; Ray's idle RSS / PSS
   before the work is reported too. (Until 2026-11-27 the timed run was the sampled one; the
   sampler's ~20 ms of CPU per sample inflated our times on 2 cores.)
4. randomized: the timing subprocess of the last pair times ``randomized_covariance_eigh(k=128)``
   and reports the largest relative error of the top-128 eigenvalues against the exact ones, and
   the smallest cosine of the principal angles between the two top-128 subspaces.

The eigendecomposition timed as ours (``--eigh``) is by default the stage's for model.dim =
``--k`` under the default ``decompose.precision``: from d_l = 1,024 on, float32 ``ssyevd`` with
the top 2k pairs refined in float64 (``covariance_eigh``; until 2026-11-27, seventh session, float64
``dsyevd`` for all pairs, which ``--eigh float64`` still times). The timing subprocess reports the
float64 ``dsyevd`` time of the same covariance (``eigh_float64_seconds``) and the timed path's
largest relative error of the top-k eigenvalues and smallest top-k subspace cosine against it.

``speedup`` = reference time (centring + cov + svd) / ours (first call); ``speedup_cov_svd``
counts only the reference's ``np.cov`` + ``svd``; ``speedup_with_load`` adds its ``np.load``
(ours always includes reading its input); ``speedup_warm`` uses our warm call;
``speedup_after_task`` our first call in another fresh Ray that has run the pipeline's worker
check first (a pipeline job's case: ``ensure_ray`` runs ``check_workers``, one small task, before
any stage; a fresh job's first Ray task costs ~0.3-0.5 s, whatever it does).

Usage::

    python benchmarks/decompose/bench_decompose.py --sizes 1000000x384 200000x3072 --work /tmp/bench

Each size runs ``--repeats`` reference/ours pairs alternately (the 2 cores here are shared, so a
single pair can be skewed by someone else's job) and appends a JSON line to ``--results``
(default ``results.jsonl`` here).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CHUNK = 50_000  # default rows per Parquet fragment (embed.rows_per_file's default)


def generate(n: int, d_l: int, folder: Path, chunk: int = CHUNK, fmt: str = "embed") -> None:
    """Write ``folder/part-*.parquet`` (``chunk`` rows each) and ``folder/E.npy`` (float32 [n, d_l]).

    ``fmt="embed"``: the embed stage's layout (required fields, uncompressed: ``embed.job.vector_table``);
    ``"nullable"``: nullable fields, snappy pages (pyarrow's defaults, the embed stage's files
    before 2026-11-27).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alphafuse_dist.embed.job import PARQUET_OPTIONS, vector_table

    if fmt == "nullable":
        def vector_table(idx, X):  # noqa: F811 - the older layout
            return pa.table({"item_idx": pa.array(idx, pa.int32()),
                             "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])})

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # decaying spectrum: column j of the mixing matrix scaled by 0.98^j
    mix = rng.normal(size=(d_l, d_l)) * (0.98 ** np.arange(d_l))[:, None] / np.sqrt(d_l)
    mean = rng.uniform(-1, 1, size=d_l)
    E = np.lib.format.open_memmap(folder / "E.npy", mode="w+", dtype=np.float32, shape=(n, d_l))
    for k, start in enumerate(range(0, n, chunk)):
        rows = min(chunk, n - start)
        X = (rng.standard_normal((rows, d_l), dtype=np.float32) @ mix.astype(np.float32) + mean).astype(np.float32)
        E[start:start + rows] = X
        pq.write_table(vector_table(np.arange(start, start + rows), X), folder / f"part-{k:05d}.parquet",
                       **(PARQUET_OPTIONS if fmt == "embed" else {}))
    E.flush()


def run_reference(folder: Path) -> dict:
    """The reference's decomposition as its code runs it (``semantic_space_decomposion`` in the
    AlphaFuse repository's models/embedding.py, uniform item distribution): ``mu = np.mean(E, 0)``,
    ``C = np.cov(E - mu, rowvar=False)``, ``U, S, _ = np.linalg.svd(C, full_matrices=False)``.
    E comes from ``np.load`` (timed apart; the reference unpickles a list of vectors and stacks it)."""
    t0 = time.perf_counter()
    E = np.load(folder / "E.npy")
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean = np.mean(E, axis=0)
    centred = E - mean
    t1 = time.perf_counter()
    C = np.cov(centred, rowvar=False)
    t2 = time.perf_counter()
    U, S, _ = np.linalg.svd(C, full_matrices=False)
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "centre_seconds": t1 - t0, "cov_seconds": t2 - t1, "svd_seconds": t3 - t2,
            "load_seconds": load, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _tree_memory_mb(root: int) -> tuple[float, float]:
    """Summed ``Rss`` and ``Pss`` (shared pages divided among the processes mapping them) of
    ``root`` and all its descendants, in one pass over /proc/<pid>/smaps_rollup."""
    children: dict[int, list[int]] = {}
    kb: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            fields = {}
            with open(f"/proc/{entry}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Rss:", "Pss:")):
                        fields[line[:3]] = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        kb[int(entry)] = (fields.get("Rss", 0), fields.get("Pss", 0))
    rss = pss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        r, p = kb.get(pid, (0, 0))
        rss, pss = rss + r, pss + p
        stack.extend(children.get(pid, []))
    return rss / 1024, pss / 1024


class PeakSampler:
    """Peak of the summed RSS and PSS of this process tree, sampled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.peak_pss, self._stop = interval, 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = _tree_memory_mb(os.getpid())
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _eigh(cov: np.ndarray, eigh: str, k: int):
    """The eigendecomposition timed as ours: ``stage``, the decompose stage's for model.dim = k
    under the default ``decompose.precision`` (auto: float32 with the count rule), i.e. float32
    ``ssyevd`` with the top 2k pairs refined in float64 from d_l = 1,024 on; ``float64``: ``dsyevd``."""
    from alphafuse_dist.decompose.covariance import covariance_eigh

    return covariance_eigh(cov, "float32", top=k) if eigh == "stage" else covariance_eigh(cov)


def run_ours(folder: Path, k: int, randomized: bool, num_cpus: int, eigh: str = "stage") -> dict:
    """Time ours in a fresh local Ray: the first call (workers start and import our code, as in
    a new job) and a second, warm one; no memory sampler runs meanwhile (it costs ~20 ms of CPU per
    sample, half a core at 20 ms intervals, which inflated our times by 25-80% on 2 cores). Then,
    untimed in the comparison, the float64 ``dsyevd`` of the same covariance: its time and the
    timed path's top-k eigenvalue error and subspace cosine against it."""
    import ray

    from alphafuse_dist.decompose.covariance import (covariance_eigh, covariance_pieces, distributed_covariance,
                                                     task_layout)
    from alphafuse_dist.decompose.rsvd import randomized_covariance_eigh

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    files = sorted(str(p) for p in folder.glob("part-*.parquet"))
    time.sleep(2)  # let Ray's start-up settle, as in the memory run
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        _, _, cov = distributed_covariance(files)
        t1 = time.perf_counter()
        timed_values, timed_vectors = _eigh(cov, eigh, k)
        times.append((time.perf_counter() - t0, time.perf_counter() - t1))
    t0 = time.perf_counter()
    values, vectors = covariance_eigh(cov)
    float64_seconds = time.perf_counter() - t0
    values, vectors = values[::-1], vectors[:, ::-1]  # descending, as the reference's svd
    cosines = np.linalg.svd(vectors[:, :k].T @ timed_vectors[:, ::-1][:, :k], compute_uv=False)
    pieces = len(covariance_pieces(files))
    result = {"seconds": times[0][0], "eigh_seconds": times[0][1], "warm_seconds": times[1][0], "eigh": eigh,
              "eigh_float64_seconds": float64_seconds,
              "eigh_top_k_max_rel_error": float(np.abs(timed_values[::-1][:k] / values[:k] - 1).max()),
              "eigh_top_k_min_subspace_cosine": float(cosines.min()),
              "num_cpus": num_cpus, "fragments": len(files), "pieces": pieces, "tasks": task_layout()[0]}
    if not randomized:
        ray.shutdown()
        return result
    t0 = time.perf_counter()
    _, _, r_values, r_vectors, _ = randomized_covariance_eigh(files, k=k)
    r_seconds = time.perf_counter() - t0
    ray.shutdown()
    cosines = np.linalg.svd(vectors[:, :k].T @ r_vectors, compute_uv=False)
    return result | {"randomized_seconds": r_seconds,
            "randomized_max_rel_eigenvalue_error": float(np.abs(r_values / values[:k] - 1).max()),
            "randomized_min_subspace_cosine": float(cosines.min())}


def run_ours_after_task(folder: Path, num_cpus: int, k: int, eigh: str = "stage") -> dict:
    """Time our first call in a fresh local Ray that has run the pipeline's worker check first
    (``pipeline.check_workers``: one small task; ``ensure_ray`` runs it before any stage, so this
    is a pipeline job's decompose stage, with or without an embed stage before it). A fresh job's
    first Ray task costs ~0.3-0.5 s whatever it does (``ray_first_task_seconds``; until the
    seventh session this was a no-op task); the ``seconds`` of :func:`run_ours` include it."""
    import ray

    from alphafuse_dist.decompose.covariance import distributed_covariance
    from alphafuse_dist.pipeline import check_workers

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    files = sorted(str(p) for p in folder.glob("part-*.parquet"))
    time.sleep(2)  # as in run_ours
    first_task = check_workers(60.0)
    t0 = time.perf_counter()
    _, _, cov = distributed_covariance(files)
    _eigh(cov, eigh, k)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"seconds": seconds, "ray_first_task_seconds": first_task}


def run_ours_memory(folder: Path, num_cpus: int, k: int, eigh: str = "stage") -> dict:
    """Peak memory of ours (first call in a fresh local Ray, as timed by :func:`run_ours`): the
    summed RSS and PSS of the driver and all its descendants, sampled every 20 ms."""
    import ray

    from alphafuse_dist.decompose.covariance import distributed_covariance

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    files = sorted(str(p) for p in folder.glob("part-*.parquet"))
    time.sleep(2)  # let Ray's start-up settle before the idle reading
    idle, idle_pss = _tree_memory_mb(os.getpid())
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        _, _, cov = distributed_covariance(files)
        _eigh(cov, eigh, k)
        seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"peak_rss_mb": sampler.peak, "idle_rss_mb": idle, "peak_pss_mb": sampler.peak_pss,
            "idle_pss_mb": idle_pss, "sampled_seconds": seconds}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def child(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter (clean ru_maxrss / process tree)."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1000000x384", "200000x3072"])
    parser.add_argument("--work", default="/tmp/alphafuse-bench-decompose")
    parser.add_argument("--k", type=int, default=128,
                        help="model.dim: the top pairs the stage's eigh refines, and the randomized solver's k")
    parser.add_argument("--eigh", choices=["stage", "float64"], default="stage",
                        help="the eigh timed as ours: the stage's (float32 ssyevd, top 2k refined in float64, "
                             "from d_l = 1,024 on) or float64 dsyevd for all pairs")
    parser.add_argument("--repeats", type=int, default=3,
                        help="reference/ours pairs run alternately; the median ratio is reported")
    parser.add_argument("--no-randomized", action="store_true", help="skip the randomized solver")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray's CPUs (default: all cores)")
    parser.add_argument("--rows-per-file", type=int, default=CHUNK, help="rows per Parquet fragment")
    parser.add_argument("--format", choices=["embed", "nullable"], default="embed",
                        help="fragment layout: the embed stage's (default) or the older nullable/snappy one")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results.jsonl")),
                        help="JSON-lines file the results are appended to")
    parser.add_argument("--role", choices=["reference", "ours", "ours-after-task", "ours-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "reference":
        print(json.dumps(run_reference(Path(args.folder))))
        return
    if args.role == "ours":
        print(json.dumps(run_ours(Path(args.folder), args.k, not args.no_randomized, args.num_cpus, args.eigh)))
        return
    if args.role == "ours-after-task":
        print(json.dumps(run_ours_after_task(Path(args.folder), args.num_cpus, args.k, args.eigh)))
        return
    if args.role == "ours-memory":
        print(json.dumps(run_ours_memory(Path(args.folder), args.num_cpus, args.k, args.eigh)))
        return
    for size in args.sizes:
        n, d_l = map(int, size.split("x"))
        folder = Path(args.work) / size
        t0 = time.perf_counter()
        generate(n, d_l, folder, args.rows_per_file, args.format)
        gen = time.perf_counter() - t0
        pairs = []
        for r in range(args.repeats):
            ref = child(["--role", "reference", "--folder", str(folder)])
            last = r == args.repeats - 1 and not args.no_randomized
            common = ["--folder", str(folder), "--k", str(args.k), "--num-cpus", str(args.num_cpus), "--eigh", args.eigh]
            ours = child(["--role", "ours", *common] + ([] if last else ["--no-randomized"]))
            after = child(["--role", "ours-after-task", *common])
            memory = child(["--role", "ours-memory", *common])
            pairs.append({"reference": ref, "ours": ours, "ours_after_task": after, "ours_memory": memory,
                          "speedup": ref["seconds"] / ours["seconds"],
                          "speedup_after_task": ref["seconds"] / after["seconds"],
                          "speedup_cov_svd": (ref["cov_seconds"] + ref["svd_seconds"]) / ours["seconds"],
                          "speedup_with_load": (ref["seconds"] + ref["load_seconds"]) / ours["seconds"],
                          "speedup_warm": ref["seconds"] / ours["warm_seconds"],
                          "memory_ratio": memory["peak_rss_mb"] / ref["peak_rss_mb"],
                          "memory_ratio_pss": memory["peak_pss_mb"] / ref["peak_rss_mb"],
                          "load_average": os.getloadavg()[0]})
            print(json.dumps({"size": size, "pair": r + 1} | pairs[-1]), flush=True)
        result = {"size": size, "format": args.format, "rows_per_file": args.rows_per_file,
                  "generate_s": round(gen, 1), "pairs": pairs,
                  "median_speedup": float(np.median([p["speedup"] for p in pairs])),
                  "median_speedup_cov_svd": float(np.median([p["speedup_cov_svd"] for p in pairs])),
                  "median_speedup_after_task": float(np.median([p["speedup_after_task"] for p in pairs])),
                  "median_speedup_warm": float(np.median([p["speedup_warm"] for p in pairs])),
                  "median_speedup_with_load": float(np.median([p["speedup_with_load"] for p in pairs])),
                  "median_memory_ratio": float(np.median([p["memory_ratio"] for p in pairs])),
                  "median_memory_ratio_pss": float(np.median([p["memory_ratio_pss"] for p in pairs])),
                  "machine": f"{os.cpu_count()} cores, {_cpu_model()}",
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}
        print(json.dumps(result), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
