"""Training throughput: sequences/s on this CPU (Ray Train + TorchRec, 1 and 2 workers) and on one
GPU (plain-torch backend, bf16 autocast) at catalogue sizes 10k, 100k and 1M items.

    # this machine: the product path (Ray Train, TorchRec row-wise sharding), 1 and 2 workers
    .venv/bin/python benchmarks/train/bench_train.py cpu --items 10000 --workers 1 2
    # one GPU, no Ray / TorchRec needed: the plain-torch backend in one process
    python benchmarks/train/bench_train.py gpu --items 10000 100000 1000000
    # one GPU, the product path (Ray Train + TorchRec, 1 worker) beside plain torch, same data
    python benchmarks/train/bench_train.py product --items 1000000

Data: a synthetic prepared run (``prepare/train.parquet``, ``valid.parquet``) with power-law item
popularity (``alphafuse_dist.data.synthetic._power_law_draw``, exponent 0.9), ``--users`` users of
``--seq-len`` interactions each, and a random frozen semantic table (N x d) standing in for the
decompose stage's output (its values do not change the cost of a step). Model: the preset's
AlphaFuse (d=128, d_n=64, SASRec 1 block 1 head, L=50, InfoNCE, shared negatives, loss at every
position). A "sequence" is one training window of up to L (history -> next item) pairs, the unit
of ``train.batch_size``. Throughput is read from the training loop's own epoch rows (validation
excluded); the first epoch is a warm-up and is not reported. ``product`` mode adds the GPU's
utilisation (nvidia-smi, sampled over each side's whole training call, start-up included) and
the model FLOPs utilisation: FLOPs of one training step counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention, forward and backward) x
steps/s, over the card's dense bf16 peak. One JSON line per configuration
goes to ``results.jsonl`` (or ``$OUT``).
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


def synthetic_run(folder: Path, num_items: int, users: int, seq_len: int, dim: int, seed: int = 0) -> Path:
    """Write prepare/{train,valid}.parquet and semantic.safetensors; returns the prepare folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from alphafuse_dist.data.synthetic import _power_law_draw

    rng = np.random.default_rng(seed)
    prep = folder / "prepare"
    prep.mkdir(parents=True, exist_ok=True)
    items = _power_law_draw(rng, num_items, users * (seq_len + 1), 0.9).reshape(users, seq_len + 1).astype(np.int32)
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(users, dtype=np.int32)),
                             "items": pa.array(list(items[:, :-1]), pa.list_(pa.int32()))}), prep / "train.parquet")
    valid_users = min(users, 512)
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(valid_users, dtype=np.int32)),
                             "history": pa.array(list(items[:valid_users, :-1]), pa.list_(pa.int32())),
                             "target": pa.array(items[:valid_users, -1])}), prep / "valid.parquet")
    gen = torch.Generator().manual_seed(seed)
    save_file({"semantic": torch.randn(num_items, dim, generator=gen)}, str(folder / "semantic.safetensors"))
    return prep


def _config(overrides: list[str]):
    from alphafuse_dist.config import load_config

    return load_config("quickstart", ["train.log_every=0", "train.patience=100"] + overrides)


def _rows(history: list[dict]) -> dict:
    steady = history[1:] or history  # epoch 1 pays allocator / kernel warm-up
    return {"epochs": len(history), "seq_per_s": round(float(np.median([r["seq_per_s"] for r in steady])), 1),
            "epoch_seconds": [r["seconds"] for r in history]}


def bench_gpu(items: int, users: int, seq_len: int, batch: int, epochs: int, negatives: int) -> dict:
    import torch

    from alphafuse_dist.train.inputs import TrainInputs
    from alphafuse_dist.train.recipe import train_model

    with tempfile.TemporaryDirectory() as d:
        prep = synthetic_run(Path(d), items, users, seq_len, 128)
        cfg = _config(["train.backend=torch", "train.device=cuda", "train.num_workers=1",
                       f"train.batch_size={batch}", f"train.epochs={epochs}", f"train.eval_every={epochs}",
                       f"train.num_negatives={negatives}", f"model.max_len={seq_len}"])
        torch.cuda.reset_peak_memory_stats()
        result = train_model(cfg, TrainInputs(prepare_dir=str(prep), semantic_path=str(Path(d) / "semantic.safetensors"),
                                              num_items=items), log=lambda s: None)
    row = _rows(result.history)
    steps = users // batch
    return {"mode": "gpu", "device": torch.cuda.get_device_name(0), "items": items, "users": users,
            "seq_len": seq_len, "batch": batch, "negatives": negatives, "autocast": "bf16",
            "ms_per_step": round(1000 * batch / row["seq_per_s"], 3), "steps_per_epoch": steps, **row,
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


# dense bf16 tensor-core peak (FLOP/s) from NVIDIA's data sheets, for MFU
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def step_flops(cfg, inputs) -> float:
    """FLOPs of one training step (forward + backward) of ``cfg``'s model, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from alphafuse_dist.train.recipe import TrainRecipe

    recipe = TrainRecipe(cfg, inputs, log=lambda s: None)
    recipe.setup()
    inputs, targets = next(iter(recipe.batches.epoch(0)))
    recipe.train_step(0, 0, inputs, targets)  # warm-up: lazy initialisation outside the count
    with FlopCounterMode(display=False) as counter:
        recipe.train_step(0, 1, inputs, targets)
    return float(counter.get_total_flops())


def bench_product(items: int, users: int, seq_len: int, batch: int, epochs: int, negatives: int) -> list[dict]:
    """The product path (Ray Train + TorchRec, one CUDA worker) and plain torch on the same data."""
    import ray
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gpu_util import GpuSampler

    from alphafuse_dist.train.inputs import TrainInputs
    from alphafuse_dist.train.launch import train_with_ray
    from alphafuse_dist.train.recipe import train_model

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    sampler = GpuSampler().start()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        prep = synthetic_run(Path(d), items, users, seq_len, 128)
        inputs = TrainInputs(prepare_dir=str(prep), semantic_path=str(Path(d) / "semantic.safetensors"), num_items=items)
        common = ["train.device=cuda", "train.num_workers=1", f"train.batch_size={batch}", f"train.epochs={epochs}",
                  f"train.eval_every={epochs}", f"train.num_negatives={negatives}", f"model.max_len={seq_len}",
                  f"run_dir={d}/run"]
        flops = step_flops(_config(["train.backend=torch", *common]), inputs)
        for side in ("plain torch", "ray train + torchrec"):
            t0 = time.time()
            if side == "plain torch":
                history = train_model(_config(["train.backend=torch", *common]), inputs, log=lambda s: None).history
            else:
                ray.init(include_dashboard=False, logging_level="ERROR", ignore_reinit_error=True)
                out = Path(d) / "out"
                out.mkdir()
                train_with_ray(_config(["train.backend=torchrec", *common]), inputs, out, identity="bench")
                history = json.loads((out / "history.json").read_text())["epochs"]
            row = {"mode": "product", "side": side, "device": name, "items": items, "users": users, "seq_len": seq_len,
                   "batch": batch, "negatives": negatives, **_rows(history), **sampler.window(t0, time.time()),
                   "gflops_per_step": round(flops / 1e9, 1)}
            steps_per_s = row["seq_per_s"] / batch
            row["model_tflops_per_s"] = round(flops * steps_per_s / 1e12, 2)
            row["mfu"] = round(flops * steps_per_s / peak, 4) if peak else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    sampler.stop()
    base = rows[0]["seq_per_s"]
    for r in rows:
        r["vs_plain_torch"] = round(r["seq_per_s"] / base, 3)
    return rows


def bench_cpu(items: int, users: int, seq_len: int, batch: int, epochs: int, negatives: int, workers: int) -> dict:
    import ray

    from alphafuse_dist.train.launch import train_with_ray
    from alphafuse_dist.train.inputs import TrainInputs

    with tempfile.TemporaryDirectory() as d:
        prep = synthetic_run(Path(d), items, users, seq_len, 128)
        cfg = _config(["train.backend=torchrec", "train.device=cpu", f"train.num_workers={workers}",
                       f"train.batch_size={batch}", f"train.epochs={epochs}", f"train.eval_every={epochs}",
                       f"train.num_negatives={negatives}", f"model.max_len={seq_len}", f"run_dir={d}/run"])
        out = Path(d) / "out"
        out.mkdir()
        train_with_ray(cfg, TrainInputs(prepare_dir=str(prep), semantic_path=str(Path(d) / "semantic.safetensors"),
                                        num_items=items), out, identity="bench")
        history = json.loads((out / "history.json").read_text())["epochs"]
    return {"mode": "cpu", "workers": workers, "backend": "torchrec row_wise", "items": items, "users": users,
            "seq_len": seq_len, "batch": batch, "negatives": negatives, **_rows(history),
            "threads_per_worker": max(1, (os.cpu_count() or 1) // workers), "ray": ray.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cpu", "gpu", "product"])
    p.add_argument("--items", type=int, nargs="+", default=[10_000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cpu mode")
    p.add_argument("--users", type=int, default=None, help="default: 2048 (cpu), 65536 (gpu)")
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--batch", type=int, default=None, help="default: 128 (cpu), 1024 (gpu)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--negatives", type=int, default=256)
    a = p.parse_args()
    results = []
    if a.mode == "cpu":
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        for n in a.items:
            for w in a.workers:
                results.append(bench_cpu(n, a.users or 2048, a.seq_len, a.batch or 128, a.epochs, a.negatives, w))
                print(json.dumps(results[-1]), flush=True)
        ray.shutdown()
    elif a.mode == "product":
        for n in a.items:
            results += bench_product(n, a.users or 65_536, a.seq_len, a.batch or 1024, a.epochs, a.negatives)
    else:
        for n in a.items:
            results.append(bench_gpu(n, a.users or 65_536, a.seq_len, a.batch or 1024, a.epochs, a.negatives))
            print(json.dumps(results[-1]), flush=True)
        base = results[0]["ms_per_step"]
        for r in results:
            r["step_cost_vs_smallest"] = round(r["ms_per_step"] / base, 3)
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
             "cpus": os.cpu_count(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out = Path(os.environ.get("OUT", Path(__file__).parent)) / "results.jsonl"
    with open(out, "a") as f:
        for r in results:
            f.write(json.dumps(r | stamp) + "\n")
    print(json.dumps([r | stamp for r in results], indent=2))


if __name__ == "__main__":
    main()
