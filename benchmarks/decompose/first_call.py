"""Where the first call of ``distributed_covariance`` in a fresh Ray spends its extra time.

Usage (from the repository root; writes 1M x 384 fragments to /tmp/first-call once)::

    python benchmarks/decompose/first_call.py none 2     # three calls, 2 s after ray.init
    python benchmarks/decompose/first_call.py noop 2     # first a round of no-op tasks
    python benchmarks/decompose/first_call.py import 2   # then also a round importing our module

``noop`` runs one no-op task per CPU first (every Ray worker has run a task); ``import`` then
also runs one task per CPU importing ``alphafuse_dist.decompose.covariance``. Results and the
device command in RESULTS.md.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decompose import generate  # noqa: E402


def main(mode: str, sleep: float) -> None:
    import ray

    folder = Path("/tmp/first-call/1000000x384")
    if not folder.exists():
        generate(1_000_000, 384, folder)
    files = sorted(str(p) for p in folder.glob("part-*.parquet"))
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    print(mode, "ray.init", round(time.perf_counter() - t0, 2), flush=True)
    from alphafuse_dist.decompose.covariance import distributed_covariance

    time.sleep(sleep)
    n = os.cpu_count()
    if mode in ("noop", "import"):
        @ray.remote(num_cpus=1)
        def noop(s):
            time.sleep(s)
            return os.getpid()

        t0 = time.perf_counter()
        pids = ray.get([noop.remote(0.2) for _ in range(n)])
        print(mode, "no-op round (0.2 s tasks)", round(time.perf_counter() - t0, 2), "workers", len(set(pids)), flush=True)
    if mode == "import":
        @ray.remote(num_cpus=1)
        def imp():
            t = time.perf_counter()
            import alphafuse_dist.decompose.covariance  # noqa: F401

            return time.perf_counter() - t

        t0 = time.perf_counter()
        seconds = ray.get([imp.remote() for _ in range(n)])
        print(mode, "import round", round(time.perf_counter() - t0, 2), "slowest import", round(max(seconds), 2), flush=True)
    for i in range(3):
        t0 = time.perf_counter()
        distributed_covariance(files)
        print(mode, "call", i, round(time.perf_counter() - t0, 2), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
