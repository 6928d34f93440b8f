"""Where a training step's time goes: plain torch and TorchRec (DMP) in one process, same data.

    python benchmarks/train/step_profile.py --items 1000000        # one GPU (needs fbgemm-gpu, torchrec)
    python benchmarks/train/step_profile.py --device cpu --items 20000 --batch 64 --users 512

The synthetic data and model of ``bench_train.py``; batches are built before timing (the loader
is not measured). Each side: 5 warm-up steps, ``--steps`` timed steps (device synchronised), then
``torch.profiler`` over 6 steps. Sides: plain torch; plain torch inside a one-rank process group;
TorchRec row-wise and table-wise, with the frozen semantic table replicated and sharded
(``--frozen``, ``train.frozen_tables``); TorchRec row-wise with each lookup's ids as ONE KJT sample
and as one sample per id (``--layouts``: the product cuts them into ``LOOKUP_SAMPLES`` samples).
Prints one JSON line per side; ``$OUT`` (default /tmp/step_profile) gets each side's operator
table (``prof-SIDE.txt``) and Chrome trace.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_train import _config, synthetic_run  # noqa: E402

import alphafuse_dist.model.item_table as item_table  # noqa: E402
import alphafuse_dist.model.methods as methods  # noqa: E402
from alphafuse_dist.runtime.seeding import deterministic_torch  # noqa: E402
from alphafuse_dist.train.inputs import TrainInputs  # noqa: E402
from alphafuse_dist.train.recipe import TrainRecipe  # noqa: E402

PRODUCT_LOOKUP = item_table.torchrec_lookup


def use_layout(kind: str) -> None:
    """Lookups as the product makes them ("product"), all ids in one sample ("one"), or one sample per id ("ones")."""
    from torchrec import KeyedJaggedTensor

    def lookup(ec, feature, ids):
        n = ids.numel()
        lengths = (torch.tensor([n], dtype=torch.int32, device=ids.device) if kind == "one"
                   else torch.ones(n, dtype=torch.int32, device=ids.device))
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[feature], values=ids, lengths=lengths)
        return ec(kjt)[feature].values()
    item_table.torchrec_lookup = methods.torchrec_lookup = PRODUCT_LOOKUP if kind == "product" else lookup


def profile_side(name: str, overrides: list[str], a, inputs, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    cfg = _config([f"train.device={a.device}", "train.num_workers=1", f"train.batch_size={a.batch}", "train.epochs=1",
                   "train.num_negatives=256", "model.max_len=50", *overrides])
    deterministic_torch()
    recipe = TrainRecipe(cfg, inputs, log=lambda s: None)
    recipe.setup()
    batches = list(recipe.batches.epoch(0))
    for s in range(5):
        recipe.train_step(0, s, *batches[s % len(batches)])
    sync()
    t0 = time.perf_counter()
    for s in range(a.steps):
        recipe.train_step(0, s, *batches[s % len(batches)])
    sync()
    ms = 1000 * (time.perf_counter() - t0) / a.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for s in range(6):
            recipe.train_step(0, s, *batches[s % len(batches)])
        sync()
    key = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
    (out / f"prof-{name}.txt").write_text(f"{name}: {ms:.2f} ms/step\n"
                                          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35)
                                          + "\nby device time\n" + prof.key_averages().table(sort_by=key, row_limit=20))
    prof.export_chrome_trace(str(out / f"trace-{name}.json"))
    row = {"side": name, "ms_per_step": round(ms, 2), "seq_per_s": round(a.batch * 1000 / ms)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--users", type=int, default=32_768)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--shardings", default="row_wise,table_wise", help="TorchRec plans (train.sharding)")
    p.add_argument("--frozen", default="replicated,sharded", help="train.frozen_tables of the TorchRec sides")
    p.add_argument("--layouts", default="one,ones", help="extra TorchRec row-wise sides: one, ones")
    a = p.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/step_profile"))
    out.mkdir(parents=True, exist_ok=True)
    d = tempfile.mkdtemp()
    prep = synthetic_run(Path(d), a.items, a.users, 50, 128)
    inputs = TrainInputs(prepare_dir=str(prep), semantic_path=f"{d}/semantic.safetensors", num_items=a.items)
    rows = [profile_side("plain", ["train.backend=torch"], a, inputs, out)]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=0, world_size=1)
    rows.append(profile_side("plain-in-process-group", ["train.backend=torch"], a, inputs, out))
    for sharding in filter(None, a.shardings.split(",")):
        for frozen in filter(None, a.frozen.split(",")):
            rows.append(profile_side(f"torchrec-{sharding}-frozen-{frozen}", [
                "train.backend=torchrec", f"train.sharding={sharding}", f"train.frozen_tables={frozen}"], a, inputs, out))
    for kind in filter(None, a.layouts.split(",")):
        use_layout(kind)
        rows.append(profile_side(f"torchrec-row_wise-{kind}", ["train.backend=torchrec", "train.sharding=row_wise"],
                                 a, inputs, out))
    use_layout("product")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
