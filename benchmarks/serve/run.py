"""Load test of `alphafuse serve`: latency percentiles and requests/s of the Ray Serve endpoint.

    .venv/bin/python benchmarks/serve/run.py --export runs/quickstart --out /tmp/serve.json
    .venv/bin/python benchmarks/serve/run.py --export runs/quickstart --device cuda   # on a GPU machine

The export (an export folder, a run directory or a registry, as `alphafuse serve --export`) is
deployed with `alphafuse_dist.serve.app.run_server` on 127.0.0.1 (Ray started in this process).
Each load level is a closed loop: ``--concurrency`` client threads, each with its own keep-alive
HTTP connection, post requests back to back until ``--requests`` have been answered or
``--seconds`` have passed (the bound), after ``--warmup`` untimed requests. A request is
``{"history": <ids>, "k": --k}``: histories of 5 .. max_len catalogue items drawn uniformly
(seeded), and with ``--text-share`` > 0 that share of requests also brings one text-only item
(a catalogue text with a new id, so the text encoder runs). Latency is measured by the client,
from sending the request to reading the whole answer; every answer must be 200 with k items.

Printed and written to ``--out`` (JSON): per level p50 / p90 / p99 / mean latency (ms) and
requests/s, with the machine, the export's shape and the serving options.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _requests(rec, n: int, k: int, text_share: float, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    ids = rec.item_ids
    bodies = []
    for i in range(n):
        length = int(rng.integers(5, max(6, rec.max_len + 1)))
        history = [ids[j] for j in rng.integers(0, len(ids), length)]
        body = {"history": history, "k": k}
        if rng.random() < text_share:
            j = int(rng.integers(0, len(ids)))
            body["new_items"] = [{"id": f"bench-new-{i}", "text": rec.titles[j]}]
            body["history"] = history[1:] + [f"bench-new-{i}"]
        bodies.append(json.dumps(body).encode())
    return bodies


def _level(port: int, bodies: list[bytes], concurrency: int, requests: int, seconds: float, k: int) -> dict:
    """One closed-loop level: latencies of ``requests`` answers (or what ``seconds`` allowed)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, counter = threading.Lock(), iter(range(requests))
    deadline = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            conn.request("POST", "/", bodies[i % len(bodies)], {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)
                if response.status != 200 or len(json.loads(data)["items"]) != k:
                    errors.append(f"{response.status}: {data[:200]!r}")
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    if errors:
        raise SystemExit(f"{len(errors)} bad answers, first: {errors[0]}")
    return {"concurrency": concurrency, "requests": len(ms), "seconds": round(wall, 2),
            "requests_per_s": round(len(ms) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True, help="export folder, run directory or registry")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the replica's device)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client threads per level")
    p.add_argument("--requests", type=int, default=1000, help="timed requests per level at most")
    p.add_argument("--seconds", type=float, default=60.0, help="time per level at most")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--text-share", type=float, default=0.0, help="share of requests with one text-only item")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--port", type=int, default=18400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = p.parse_args()

    import ray
    import torch
    from ray import serve

    from alphafuse_dist.cli import _served_run
    from alphafuse_dist.serve.app import run_server
    from alphafuse_dist.serve.recommend import Recommender, resolve_export

    folder = resolve_export(_served_run(args.export, "--export"))
    rec = Recommender(folder)
    ray.init(include_dashboard=False, logging_level="WARNING")
    run_server(folder, "127.0.0.1", args.port, device=args.device, max_batch_size=args.max_batch_size,
               batch_wait_ms=args.batch_wait_ms)
    bodies = _requests(rec, args.requests + args.warmup, args.k, args.text_share, args.seed)
    levels = []
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            _level(args.port, bodies[args.requests:], c, args.warmup, 60, args.k)  # untimed warm-up
            levels.append(_level(args.port, bodies, c, args.requests, args.seconds, args.k))
            print(json.dumps(levels[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "load_avg_1m_at_end": os.getloadavg()[0], "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "export": {"folder": str(folder), "items": rec.num_candidates, "dim": int(rec.vectors.shape[1]),
                   "max_len": rec.max_len, "backbone": rec.card["model"]["backbone"]},
        "options": {k: getattr(args, k) for k in ("k", "text_share", "max_batch_size", "batch_wait_ms",
                                                  "requests", "seconds", "warmup")},
        "levels": levels,
    }
    print("| concurrency | requests | req/s | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|---|---|")
    for lv in levels:
        print(f"| {lv['concurrency']} | {lv['requests']} | {lv['requests_per_s']} | {lv['p50_ms']} | "
              f"{lv['p90_ms']} | {lv['p99_ms']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
