#!/usr/bin/env python3
"""Run the AlphaFuse reference code (Hugo-Chinn/AlphaFuse, ``train.py``, SASRec backbone) on the data
of one of OUR run directories, time every epoch and print one final JSON line.

The reference is never copied into this repository: ``--reference`` points to a checkout of it
(e.g. ``.device/reference``, git-ignored). It is copied to ``--workdir`` and run there UNMODIFIED:
- its hard-coded data path ``../ours_DiT/data/<data>`` is satisfied by the folder layout
  ``WORKDIR/code`` (the copy, the working directory) + ``WORKDIR/ours_DiT/data/<data>`` (inputs);
- its checkpoint path ``./saved/<data>...pth`` by creating ``WORKDIR/code/saved/``;
- the README's ``-loss_type`` typo is avoided by passing ``--loss_type``;
- ``--cuda`` (which sets CUDA_VISIBLE_DEVICES inside train.py, default 7) is passed as 0 for
  ``--device cuda`` after this wrapper has already created the CUDA context on the device the
  machine exposes (so the reference's override cannot move it to another card), and as -1 for
  ``--device cpu`` (hides all GPUs).
Instrumentation, added at run time without touching its source (train.py runs through runpy):
- ``torch.utils.data.DataLoader`` is replaced by a subclass that tags the three loaders train.py
  builds (train, val, test, in that order), counts the training rows each epoch, and, only when
  ``--max-steps-per-epoch`` is given (smoke tests), stops a training epoch after that many batches;
- ``utils.evaluate`` is wrapped: it synchronises the GPU, times the call, captures the metric
  table the reference prints (HR/NDCG/MRR at 1,5,10,20,50) and re-prints it.
Epoch time = from the start of the training loader's iteration to the entry of the validation
``evaluate`` that follows (GPU synchronised): data loading/collation + forward/backward/step,
no evaluation. Throughput unit: training transitions per second, one transition = one row of
train_data.df = one (history of <= L items -> next item) example with one InfoNCE loss term.

Usage (see benchmarks/reference/README.md):
  python3 benchmarks/reference/run_reference.py --reference .device/reference \
      --run-dir .device/runs/ml-1m --device cuda --epochs 20 --output $OUT/reference.json
Extra arguments after ``--`` go to train.py verbatim (they override the defaults below).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVENTS: list[dict] = []
STATE = {"in_eval": False, "epoch": 0, "train_t0": None, "train_rows": 0, "train_steps": 0, "t_start": time.time()}


def log(msg: str) -> None:
    print(f"[ref-bench] {msg}", flush=True)


def parse_table(text: str) -> dict:
    """Metrics from the table utils.evaluate prints (see the reference's utils.py)."""
    lines = [ln.split() for ln in text.strip().splitlines() if ln.strip()]
    out = {}
    for i, row in enumerate(lines[:-1]):
        if row and all(re.fullmatch(r"(HR|NDCG|MRR)@\d+", c) for c in row):
            for name, val in zip(row, lines[i + 1]):
                out[name] = float(val)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def instrument(code_dir: Path, device: str, max_steps: int | None) -> None:
    import torch.utils.data as tud

    roles = iter(["train", "val", "test"])
    Base = tud.DataLoader

    class TaggedLoader(Base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.role = next(roles, "other")

        def __iter__(self):
            it = super().__iter__()
            if self.role != "train" or STATE["in_eval"]:
                yield from it
                return
            STATE["epoch"] += 1
            STATE["train_rows"], STATE["train_steps"] = 0, 0
            sync(device)
            STATE["train_t0"] = time.time()
            for step, batch in enumerate(it):
                if max_steps is not None and step >= max_steps:
                    break
                STATE["train_rows"] += len(batch["next"])
                STATE["train_steps"] += 1
                yield batch

    tud.DataLoader = TaggedLoader
    sys.path.insert(0, str(code_dir))
    for mod in ("utils", "models"):
        if mod in sys.modules:
            raise SystemExit(f"a module named {mod!r} is already imported; cannot load the reference's")
    import utils  # the reference's utils.py (code_dir is first on sys.path)

    orig = utils.evaluate

    def evaluate(model, loader, dev, *a, **k):
        role = getattr(loader, "role", "other")
        sync(device)
        t_enter = time.time()
        ev = {"kind": "eval", "split": role, "epoch": STATE["epoch"]}
        if role == "val" and STATE["train_t0"] is not None:
            secs = t_enter - STATE["train_t0"]
            ev["train"] = {"seconds": round(secs, 3), "rows": STATE["train_rows"], "steps": STATE["train_steps"],
                           "transitions_per_s": round(STATE["train_rows"] / secs, 1)}
            STATE["train_t0"] = None
        if role == "val" and STATE["epoch"] == 0:
            ev["setup_seconds"] = round(t_enter - STATE["t_start"], 2)
        buf = io.StringIO()
        STATE["in_eval"] = True
        try:
            with contextlib.redirect_stdout(buf):
                ret = orig(model, loader, dev, *a, **k)
        finally:
            STATE["in_eval"] = False
        sync(device)
        print(buf.getvalue(), end="", flush=True)
        ev["eval_seconds"] = round(time.time() - t_enter, 3)
        ev["metrics"] = parse_table(buf.getvalue())
        EVENTS.append(ev)
        m = ev["metrics"]
        tr = ev.get("train")
        log(f"epoch {ev['epoch']} {role}: " + (f"train {tr['seconds']:.2f} s, {tr['rows']:,} rows, "
            f"{tr['transitions_per_s']:,.0f} transitions/s; " if tr else "")
            + f"NDCG@10 {m.get('NDCG@10', float('nan')):.4f} HR@10 {m.get('HR@10', float('nan')):.4f} "
            f"NDCG@20 {m.get('NDCG@20', float('nan')):.4f}; eval {ev['eval_seconds']:.2f} s")
        return ret

    utils.evaluate = evaluate


def summary(args, ref_args: list[str], inputs_info: dict, error: str | None) -> dict:
    vals = [e for e in EVENTS if e["split"] == "val"]
    epochs = [e for e in vals if "train" in e]
    tests = [e for e in EVENTS if e["split"] == "test"]
    secs = [e["train"]["seconds"] for e in epochs]
    rows = [e["train"]["rows"] for e in epochs]
    # the reference keeps the model of the first epoch with the highest validation NDCG@20 (strict >)
    best, best_v = None, 0.0
    for e in epochs:  # the evaluation before training (epoch 0) is not a candidate in train.py
        if e["metrics"].get("NDCG@20", 0.0) > best_v:
            best, best_v = e, e["metrics"]["NDCG@20"]
    keep = ("NDCG@10", "HR@10", "NDCG@20", "HR@20", "MRR@10")
    gpu = None
    if args.device == "cuda":
        import torch
        gpu = torch.cuda.get_device_name(0)
    out = {
        "system": "alphafuse-reference (Hugo-Chinn/AlphaFuse train.py, unmodified)",
        "device": args.device, "gpu": gpu, "threads": args.threads if args.device == "cpu" else None,
        "train_py_args": ref_args,
        "inputs": inputs_info,
        "throughput_unit": "training transitions/s: one transition = one train_data.df row = one "
                           "(history of <= L items -> next item) example with one InfoNCE loss term",
        "epochs_run": len(epochs),
        "rows_per_epoch": rows[0] if rows else None,
        "steps_per_epoch": epochs[0]["train"]["steps"] if epochs else None,
        "epoch_seconds": secs,
        "epoch_seconds_median": round(statistics.median(secs), 3) if secs else None,
        "transitions_per_s_median_epoch": round(statistics.median(r / s for r, s in zip(rows, secs)), 1) if secs else None,
        "transitions_per_s_excl_first_epoch": (round(sum(rows[1:]) / sum(secs[1:]), 1) if len(secs) > 1 else None),
        "transitions_per_s_all_epochs": round(sum(rows) / sum(secs), 1) if secs else None,
        "val_eval_seconds_median": round(statistics.median(e["eval_seconds"] for e in vals), 3) if vals else None,
        "setup_seconds": vals[0].get("setup_seconds") if vals else None,
        "best_valid_epoch": best["epoch"] if best else None,
        "best_valid": {k: best["metrics"].get(k) for k in keep} if best else None,
        "best_valid_NDCG@10_any_epoch": max((e["metrics"].get("NDCG@10", 0.0) for e in epochs), default=None),
        "test_at_best_valid": {k: tests[-1]["metrics"].get(k) for k in keep} if tests else None,
        "wall_seconds": round(time.time() - STATE["t_start"], 1),
        "error": error,
    }
    if args.max_steps_per_epoch is not None:
        out["note"] = f"smoke test: at most {args.max_steps_per_epoch} steps per epoch"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="checkout of Hugo-Chinn/AlphaFuse")
    ap.add_argument("--run-dir", type=Path, help="our run dir (prepare/, embed/); converted with make_reference_inputs.py")
    ap.add_argument("--inputs", type=Path, help="already converted inputs (instead of --run-dir)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alphafuse-reference"))
    ap.add_argument("--data-name", default="ML1M", help="the reference's --data (folder name only)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (cpu device)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--model-type", default="AlphaFuse", help="AlphaFuse, SASRec (ID only), MoRec, WhitenRec, ...")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--neg-ratio", type=int, default=64)
    ap.add_argument("--id-init", default="zeros", help="--ID_embs_init_type (README: zeros for Movies)")
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--order", choices=["shuffled", "user"], default="shuffled", help="train row order (converter)")
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="smoke tests only")
    ap.add_argument("--output", type=Path, help="also write the final JSON here")
    ap.add_argument("extra", nargs="*", help="after --: more train.py arguments")
    args = ap.parse_args()
    if (args.run_dir is None) == (args.inputs is None):
        ap.error("give exactly one of --run-dir / --inputs")

    if args.output is not None:
        args.output = args.output.resolve()  # train.py runs in WORKDIR/code
    work = args.workdir.resolve()
    code = work / "code"
    data = work / "ours_DiT" / "data" / args.data_name
    shutil.rmtree(code, ignore_errors=True)
    shutil.copytree(args.reference, code, ignore=shutil.ignore_patterns(".git", "saved", "log"))
    (code / "saved").mkdir()
    if args.inputs is not None:
        data.parent.mkdir(parents=True, exist_ok=True)
        if data.is_symlink() or data.exists():
            data.unlink() if data.is_symlink() else shutil.rmtree(data)
        data.symlink_to(args.inputs.resolve(), target_is_directory=True)
    else:
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.time()
        subprocess.run([sys.executable, str(HERE / "make_reference_inputs.py"), "--run-dir", str(args.run_dir),
                        "--out", str(data), "--max-len", str(args.max_len), "--lm-name", "minilm",
                        "--order", args.order, "--seed", str(args.seed)], check=True)
        log(f"converted inputs in {time.time() - t0:.1f} s -> {data}")
    info = json.loads((data / "reference_inputs.json").read_text())
    if info["seq_size"] != args.max_len:
        raise SystemExit(f"inputs have seq_size {info['seq_size']}, asked --max-len {args.max_len}")
    for split, n in (("train", info["train_transitions"]), ("val", info["valid_users"]), ("test", info["test_users"])):
        if n % args.batch_size == 1:
            log(f"WARNING: {split} has {n} rows = 1 mod batch {args.batch_size}; the reference's "
                "forward squeezes a batch of one to 1-D and will fail on it")

    import torch
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no GPU visible")
        torch.zeros(1, device="cuda")  # create the context now: train.py's CUDA_VISIBLE_DEVICES change is then moot
        cuda_flag = "0"
    else:
        torch.set_num_threads(args.threads)
        cuda_flag = "-1"
    ref_args = ["--data", args.data_name, "--random_seed", str(args.seed), "--model_type", args.model_type,
                "--cuda", cuda_flag, "--language_model_type", "minilm", "--ID_embs_init_type", args.id_init,
                "--hidden_dim", "128", "--null_dim", "64", "--lr", str(args.lr), "--loss_type", "infoNCE",
                "--neg_ratio", str(args.neg_ratio), "--batch_size", str(args.batch_size),
                "--epoch", str(args.epochs)] + list(args.extra)
    log("train.py " + " ".join(ref_args))
    instrument(code, args.device, args.max_steps_per_epoch)
    os.chdir(code)
    sys.argv = ["train.py"] + ref_args
    STATE["t_start"] = time.time()
    error = None
    try:
        runpy.run_path(str(code / "train.py"), run_name="__main__")
    except BaseException as e:  # noqa: BLE001 - report what was measured, then fail
        error = f"{type(e).__name__}: {e}"
        log(f"train.py failed: {error}")
    res = summary(args, ref_args, info, error)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res), flush=True)
    sys.exit(1 if error else 0)


if __name__ == "__main__":
    main()
