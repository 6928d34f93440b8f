"""The product path at a million items, in one command: synthetic catalogue -> every stage -> export -> recommend.

    python benchmarks/million/run.py                       # 1M items, 10M interactions, GPU if present
    python benchmarks/million/run.py --items 100000 --interactions 1000000 --users 50000   # the CPU size

Every stage runs the way a user runs it (`alphafuse run` in a child process, Ray Train + TorchRec
for training), then `alphafuse export` and `alphafuse recommend`. Per stage it reports the seconds
its manifest recorded and a rate (items/s, sequences/s, users/s); for the whole run the wall time,
the peak host RSS of the largest process (`getrusage` over finished children: the driver and every
Ray worker it reaped) and the peak GPU memory in use (nvidia-smi, sampled twice a second). A JSON
line is appended to ``--out`` (default: results.jsonl beside this file).
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

HERE = Path(__file__).resolve().parent


def _gpu_sampler(stop: threading.Event, peak: list[float]) -> None:
    """Peak GPU memory used (MiB, summed over cards) while the run lasts."""
    while not stop.wait(0.5):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            peak[0] = max(peak[0], sum(float(x) for x in out.split()))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return


def _cli(args: list[str], log: Path) -> float:
    """Run ``alphafuse <args>`` with its output going to ``log`` (and a progress line here); seconds."""
    t0 = time.time()
    print(f"$ alphafuse {' '.join(args)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ alphafuse {' '.join(args)}\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "alphafuse_dist.cli", *args], stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0
    print(f"  rc={rc} in {seconds:.1f}s (log: {log})", flush=True)
    if rc:
        sys.exit(f"alphafuse {args[0]} failed with exit code {rc}; see {log}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=500_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--workers", type=int, default=None, help="training workers (default: GPUs, or 2 on CPU)")
    p.add_argument("--work", type=Path, default=Path("runs/million"), help="data and run folder (rebuilt)")
    p.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    p.add_argument("--log", type=Path, default=None, help="the stages' output (default: WORK/run.log)")
    p.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = p.parse_args()

    import torch

    from alphafuse_dist.data.synthetic import write_synthetic

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    workers = args.workers or (torch.cuda.device_count() if cuda else 2)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    log = args.log or args.work / "run.log"
    stop, gpu_peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=_gpu_sampler, args=(stop, gpu_peak), daemon=True)
    if cuda:
        sampler.start()
    t_all = time.time()

    t0 = time.time()
    paths = write_synthetic(args.work / "data", n_interactions=args.interactions, n_items=args.items,
                            n_users=args.users, seed=0)
    synth_s = time.time() - t0
    print(f"synthetic data: {args.items:,} items, {args.interactions:,} interactions in {synth_s:.1f}s", flush=True)

    run_dir = args.work / "run"
    device = "cuda" if cuda else "cpu"
    overrides = [
        "name=million", f"run_dir={run_dir}", "method=alphafuse",
        "data.source=interactions", f"data.path={paths['interactions']}", f"data.items_path={paths['items']}",
        "data.text_template={title}. {categories}.", "data.min_user_interactions=3",
        f"embed.device={device}", f"train.device={device}", "train.backend=torchrec",
        f"train.num_workers={workers}", f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}",
        "train.batch_size=1024", "model.max_len=50", *args.overrides,
    ]
    run_s = _cli(["run", *overrides], log)
    export_s = _cli(["export", "--run", str(run_dir)], log)
    import pyarrow.parquet as pq

    # three catalogue items that survived prepare's filters (rare synthetic items may be dropped)
    items = pq.read_table(run_dir / "prepare" / "items.parquet", columns=["item_id", "retired"]).to_pylist()
    history = [row["item_id"] for row in items if not row["retired"]][:3]
    recommend_s = _cli(["recommend", "--run", str(run_dir), *[a for i in history for a in ("--item", i)], "--k", "10"],
                       log)
    total_s = time.time() - t_all
    stop.set()

    stages = {}
    for manifest in sorted(run_dir.glob("*/manifest.json"), key=lambda m: m.stat().st_mtime):
        m = json.loads(manifest.read_text())
        stages[manifest.parent.name] = {"seconds": m.get("seconds"), "rows": m.get("rows") or {}}
    train_rows = stages.get("prepare", {}).get("rows", {}).get("train", 0)
    for name, s in stages.items():  # the rate each stage is judged by
        kind = name.split("-")[0]
        count, unit = {"embed": (s["rows"].get("items"), "items/s"), "decompose": (s["rows"].get("items"), "items/s"),
                       "train": (train_rows * args.epochs, "train interactions/s"),
                       "evaluate": (s["rows"].get("users"), "users/s"),
                       "prepare": (s["rows"].get("interactions"), "interactions/s")}.get(kind, (None, ""))
        if count and s["seconds"]:
            s["rate"], s["unit"] = round(count / s["seconds"]), unit
    row = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()}",
        "items": args.items, "interactions": args.interactions, "users": args.users, "epochs": args.epochs,
        "workers": workers, "synthetic_s": round(synth_s, 1), "run_s": round(run_s, 1),
        "export_s": round(export_s, 1), "recommend_s": round(recommend_s, 1), "total_s": round(total_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "peak_gpu_mem_gb": round(gpu_peak[0] / 1024, 2) if cuda else None, "stages": stages,
    }
    print(f"\n{'stage':<28}{'seconds':>10}  rate")
    for name, s in stages.items():
        rate = f"{s['rate']:,} {s['unit']}" if "rate" in s else ""
        print(f"{name:<28}{s['seconds'] or 0:>10.1f}  {rate}")
    print(f"{'export':<28}{export_s:>10.1f}\n{'recommend':<28}{recommend_s:>10.1f}\n{'total (incl. data)':<28}"
          f"{total_s:>10.1f}\npeak RSS of one process {row['peak_rss_gb']} GB; peak GPU memory {row['peak_gpu_mem_gb']} GB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
