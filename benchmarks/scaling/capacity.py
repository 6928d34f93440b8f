"""Capacity model of the product path beyond one host: prints, for each scenario and GPU count, the
memory per GPU, the time per epoch and the time per full retraining period (docs/scaling.md).

Every per-GPU rate is a measurement on one H100 (MEASURED, each with its benchmarks/*/RESULTS.md
page); every network figure and every scaling rule is an assumption (ASSUMED). Nothing here runs a
model: it is arithmetic on those inputs, plus the expected number of distinct ids of a step under the
synthetic data's power law (alphafuse_dist/data/synthetic.py: item exponent 0.9).

    python benchmarks/scaling/capacity.py [--gpus 8 16 32 64]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

F32 = 4  # bytes
MEASURED = {  # one H100 80GB unless said otherwise
    "train_seq_s_product": 32_900,  # Ray Train + TorchRec, epoch 3 (benchmarks/million)
    "train_seq_s_plain": 89_822,  # plain torch, 1M items (benchmarks/train, product mode)
    "train_peak_gb": 2.74,  # peak GPU memory at 1M items, plain torch (benchmarks/train)
    "embed_items_s": 44_639,  # while encoding, 4 actors per GPU (benchmarks/embed_gpu)
    "embed_startup_s": 17.0,  # Ray Data + model loads (benchmarks/embed_gpu)
    "decompose_items_s": 214_000,  # exact float64 gram, 16-core host (benchmarks/million)
    "eval_users_s": 12_938,  # all users x 897,560 items, encoder, both protocols and top-10 lists (benchmarks/million)
    "eval_items": 897_560,
    "windows_per_interaction": 542_733 / 10_000_000,  # training windows of 50 per interaction written (benchmarks/million log)
    "users_per_interaction": 500_000 / 10_000_000,  # the million run's shape: 20 interactions per user
}
ASSUMED = {
    "gpus_per_node": 8,
    "nvlink_gb_s": 450.0,  # per GPU per direction (H100 SXM: 900 GB/s both directions)
    "ib_gb_s_per_node": 50.0,  # 400 Gb/s InfiniBand per node, shared by its 8 GPUs
    "a2a_latency_s_intra": 30e-6,  # per all-to-all within a node
    "a2a_latency_s_inter": 100e-6,  # per all-to-all across nodes
    "collectives_per_step": 5,  # 2 lookups x (ids out + rows back) + 1 gradient all-to-all
    "usable_gb_per_gpu": 70.0,  # of an 80 GB H100
}
MODEL = {  # the default config (alphafuse_dist/config.py) and the model it builds
    "dim": 128, "id_dims": 64, "batch_per_gpu": 1024, "max_len": 50, "negatives": 256,
    "dense_params": 106_240,  # encoder parameters of build_encoder(ModelConfig()), counted
    "epochs": 3, "item_exponent": 0.9,
}
OPT_STATE_PER_ROW = {"sgd": 0, "adagrad": MODEL["id_dims"], "rowwise_adagrad": 1}  # float32 values per ID row
SCENARIOS = [("10M items, 1B interactions", 10_000_000, 1_000_000_000),
             ("100M items, 1B interactions", 100_000_000, 1_000_000_000)]


def bytes_per_row(id_optimizer: str = "adagrad", dim: int = MODEL["dim"], id_dims: int = MODEL["id_dims"]) -> int:
    """Training bytes of one item: frozen semantic row [d] + trainable ID row [d_n] + its optimiser
    state (fbgemm EXACT_ADAGRAD: d_n values; EXACT_ROWWISE_ADAGRAD: 1), all float32."""
    return F32 * (dim + id_dims + OPT_STATE_PER_ROW[id_optimizer])


def table_gb_per_gpu(items: int, gpus: int, id_optimizer: str = "adagrad") -> float:
    """Row-wise sharding spreads every table's rows evenly over the GPUs."""
    return items * bytes_per_row(id_optimizer) / gpus / 1e9


def eval_table_gb(items: int, dim: int = MODEL["dim"]) -> float:
    """Evaluation holds the whole fused float32 item table [N, d] on every GPU."""
    return items * dim * F32 / 1e9


def expected_unique(items: int, draws: int, exponent: float = MODEL["item_exponent"], chunk: int = 10_000_000) -> float:
    """E[#distinct] of ``draws`` draws with P(k) ~ 1/rank^exponent: sum_k 1 - exp(-draws p_k)."""
    ranks = np.arange(1, items + 1, dtype=np.float64)
    norm = sum(float(np.sum(ranks[i:i + chunk] ** -exponent)) for i in range(0, items, chunk))
    return sum(float(np.sum(-np.expm1(-draws * ranks[i:i + chunk] ** -exponent / norm)))
               for i in range(0, items, chunk))


def lookup_ids_per_step(items: int) -> float:
    """Distinct ids of one GPU's step: B windows of L+1 items (inputs and targets overlap) from the
    power law, plus K uniform shared negatives (nearly all distinct from them)."""
    return expected_unique(items, MODEL["batch_per_gpu"] * (MODEL["max_len"] + 1)) + MODEL["negatives"]


def a2a_bytes_per_id() -> int:
    """Per distinct id: int64 id to the owner of each of the 2 tables, the semantic [d] and ID [d_n]
    rows back, the ID row's gradient [d_n] out in backward (the frozen table has none)."""
    return 2 * 8 + F32 * (MODEL["dim"] + MODEL["id_dims"]) + F32 * MODEL["id_dims"]


def comm_seconds_per_step(ids: float, gpus: int) -> float:
    """All-to-all of the lookups (share (g-1)/W over NVLink, (W-g)/W over InfiniBand) plus the ring
    all-reduce of the dense gradients, not overlapped with compute (conservative)."""
    g = min(gpus, ASSUMED["gpus_per_node"])
    ib_per_gpu = ASSUMED["ib_gb_s_per_node"] * 1e9 / g
    nbytes = ids * a2a_bytes_per_id()
    t = nbytes * (g - 1) / gpus / (ASSUMED["nvlink_gb_s"] * 1e9) + nbytes * (gpus - g) / gpus / ib_per_gpu
    dense = 2 * (gpus - 1) / gpus * MODEL["dense_params"] * F32
    t += dense / (ib_per_gpu if gpus > g else ASSUMED["nvlink_gb_s"] * 1e9)
    lat = ASSUMED["a2a_latency_s_inter"] if gpus > g else ASSUMED["a2a_latency_s_intra"]
    return t + (ASSUMED["collectives_per_step"] + 1) * lat


@dataclass
class Row:
    gpus: int
    train_gb: float  # tables + optimiser state + workspace, per GPU
    eval_gb: float
    step_ms: float
    comm_share: float
    comm_share_plain: float
    epoch_s: float
    epoch_plain_s: float
    embed_s: float
    decompose_s: float
    eval_s: float
    period_s: float


def plan(items: int, interactions: int, gpus: int, ids_per_step: float, id_optimizer: str = "adagrad") -> Row:
    """One scenario on ``gpus`` GPUs: weak scaling (batch_per_gpu per GPU), per-GPU rates as measured."""
    m = MEASURED
    windows = interactions * m["windows_per_interaction"]
    users = interactions * m["users_per_interaction"]
    comm = comm_seconds_per_step(ids_per_step, gpus)
    step = MODEL["batch_per_gpu"] / m["train_seq_s_product"] + comm
    step_plain = MODEL["batch_per_gpu"] / m["train_seq_s_plain"] + comm
    steps = windows / (MODEL["batch_per_gpu"] * gpus)
    nodes = -(-gpus // ASSUMED["gpus_per_node"])
    embed = m["embed_startup_s"] + items / (m["embed_items_s"] * gpus)
    decompose = items / (m["decompose_items_s"] * nodes)  # ASSUMED: one Ray task per piece, spread over nodes
    # full ranking costs users x items; one GPU did eval_users_s users at eval_items items
    evaluate = users * items / (m["eval_users_s"] * m["eval_items"] * gpus)
    epoch = steps * step
    return Row(gpus, table_gb_per_gpu(items, gpus, id_optimizer) + m["train_peak_gb"],
               eval_table_gb(items),
               step * 1e3, comm / step, comm / step_plain, epoch, steps * step_plain, embed, decompose, evaluate,
               embed + decompose + MODEL["epochs"] * epoch + evaluate)


def max_items(gpus: int, id_optimizer: str = "adagrad") -> tuple[int, int]:
    """Largest catalogue whose training shards (beside the measured workspace) and whose replicated
    evaluation table fit ``usable_gb_per_gpu``."""
    free = ASSUMED["usable_gb_per_gpu"] * 1e9
    return (int(gpus * (free - MEASURED["train_peak_gb"] * 1e9) / bytes_per_row(id_optimizer)),
            int(free / (MODEL["dim"] * F32)))


def fmt_s(s: float) -> str:
    return f"{s:,.0f} s" if s < 3600 else f"{s / 3600:,.1f} h"


def table(name: str, items: int, interactions: int, gpus: list[int]) -> str:
    ids = lookup_ids_per_step(items)
    lines = [f"### {name}", "",
             f"Distinct ids per GPU step: {ids:,.0f}; all-to-all {ids * a2a_bytes_per_id() / 1e6:.1f} MB per GPU step; "
             f"{interactions * MEASURED['windows_per_interaction'] / 1e6:.1f}M windows, "
             f"{interactions * MEASURED['users_per_interaction'] / 1e6:.0f}M users.", "",
             "| GPUs | train GB/GPU | eval table GB/GPU | ms/step (comm share) | epoch | epoch at plain-torch speed "
             "(comm share) | embed | decompose | evaluate | retraining period (3 epochs) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in gpus:
        r = plan(items, interactions, w, ids)
        lines.append(f"| {w} | {r.train_gb:.1f} | {r.eval_gb:.1f} | {r.step_ms:.1f} ({r.comm_share:.0%}) | "
                     f"{fmt_s(r.epoch_s)} | {fmt_s(r.epoch_plain_s)} ({r.comm_share_plain:.0%}) | {fmt_s(r.embed_s)} | {fmt_s(r.decompose_s)} | "
                     f"{fmt_s(r.eval_s)} | {fmt_s(r.period_s)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    args = ap.parse_args()
    print(f"Bytes per item row in training: {bytes_per_row('adagrad')} (adagrad), "
          f"{bytes_per_row('rowwise_adagrad')} (rowwise_adagrad); evaluation {MODEL['dim'] * F32} per row.\n")
    for w in args.gpus:
        train_max, eval_max = max_items(w)
        print(f"- {w} GPUs: training tables fit up to {train_max / 1e6:,.0f}M items, the evaluation table up to "
              f"{eval_max / 1e6:,.0f}M ({ASSUMED['usable_gb_per_gpu']:.0f} GB usable per GPU).")
    print()
    for name, items, interactions in SCENARIOS:
        print(table(name, items, interactions, args.gpus) + "\n")


if __name__ == "__main__":
    main()
