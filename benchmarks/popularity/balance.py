"""Where the popularity lean of a trained model's scores comes from: the semantic part or the ID part.

    python benchmarks/popularity/balance.py RUN_DIR [--out results/balance.json]

Reads the item tables that run.sh kept (``RUN_DIR/keep/<row>-<method>-s<seed>.safetensors``), the
decompose stage's frozen table and the prepare stage's splits, computes every test user's state with
the model's own encoder (``evaluate.stage.load_model``), and reports per table:

- ``gap``: the mean cosine score of head items minus that of tail items, over the test users (how
  much the scores favour popular items), and its split by the part of the item vector it comes
  from: the semantic coordinates ``[0, d_s)``, the semantic values in the null coordinates
  ``[d_s, d)``, and the trained ID part there (``alphafuse`` rows; cosine is linear in those parts
  once the item vector's norm is fixed, so the three add up to the total);
- ``id_norm / sem_norm``: mean norm of the ID part and of the frozen semantic row, head vs tail;
- ``popshare_sem`` / ``popshare_id``: PopShare@10 (unfiltered) of top-10 lists ranked by the
  semantic or the ID contribution alone;
- ``spearman``: the rank correlation of item popularity with the item's mean score;
- ``rare_share``: the share of top-10 slots (unfiltered) holding an item with at most 2 training
  interactions.

Numpy/torch arithmetic on one small table; the user states come from the project's encoder.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alphafuse_dist.config import config_from_dict, load_config
from alphafuse_dist.data.sequences import eval_inputs
from alphafuse_dist.evaluate.stage import load_model
from alphafuse_dist.model.sasrec import user_states_from_table
from alphafuse_dist.runtime.parquet import read_table


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def popshare(scores: torch.Tensor, head: torch.Tensor, k: int = 10) -> float:
    return head[scores.topk(k, dim=1).indices].float().mean().item()


def analyse(run_dir: Path, path: Path) -> dict:
    row, method, seed = re.fullmatch(r"(.+)-(alphafuse|sasrec_id)-s(\d+)", path.stem).groups()
    saved = path.with_suffix(".json")  # the run's config.json, kept beside its table by run.sh
    cfg = (config_from_dict(json.loads(saved.read_text())) if saved.exists()
           else load_config("quickstart", ["train.backend=torch", f"method={method}"]))
    table, encoder = load_model(path, cfg)
    n, d = table.shape
    d_s = 0 if cfg.model.id_space == "full_space" else d - cfg.model.id_dims
    items = read_table(run_dir / "prepare" / "items.parquet", columns=["popularity", "is_head"])
    pop = items.column("popularity").to_numpy().astype(np.float64)
    head = torch.as_tensor(items.column("is_head").to_numpy(zero_copy_only=False).astype(bool))
    _, hist, _ = eval_inputs(run_dir / "prepare" / "test.parquet", cfg.model.max_len, n)
    with torch.no_grad():
        h = F.normalize(user_states_from_table(encoder, table, torch.as_tensor(hist)), dim=1)
    norm = table.norm(dim=1, keepdim=True)
    scores = h @ (table / norm).T
    id_dims = {"full_space": d, "semantic_only": 0}.get(cfg.model.id_space, d - d_s) if method == "alphafuse" else d
    out = {"row": row, "method": method, "seed": int(seed), "id_dims": id_dims, "popshare": popshare(scores, head)}
    out["rare_share"] = torch.as_tensor(pop <= 2)[scores.topk(10, dim=1).indices].float().mean().item()
    mean_score = scores.mean(0)
    out["gap"] = (mean_score[head].mean() - mean_score[~head].mean()).item()
    out["spearman"] = float(np.corrcoef(_ranks(pop), _ranks(mean_score.numpy()))[0, 1])
    if method == "alphafuse":
        sem = load_file(str(run_dir / "decompose" / "semantic.safetensors"))["semantic"]
        ids = table[:, d_s:] - sem[:, d_s:]
        parts = {"sem_rows": torch.cat([sem[:, :d_s], torch.zeros_like(ids)], 1),
                 "sem_null": torch.cat([torch.zeros(n, d_s), sem[:, d_s:]], 1),
                 "id": torch.cat([torch.zeros(n, d_s), ids], 1)}
        contrib = {k: h @ (v / norm).T for k, v in parts.items()}
        for k, c in contrib.items():
            m = c.mean(0)
            out[f"gap_{k}"] = (m[head].mean() - m[~head].mean()).item()
        out["popshare_sem"] = popshare(contrib["sem_rows"] + contrib["sem_null"], head)
        if ids.abs().sum() > 0:  # semantic_only has no ID part to rank by
            out["popshare_id"] = popshare(contrib["id"], head)
        id_norm, sem_norm = ids.norm(dim=1), sem.norm(dim=1)
        for name, mask in (("head", head), ("tail", ~head)):
            out[f"id_norm_{name}"] = id_norm[mask].mean().item()
            out[f"sem_norm_{name}"] = sem_norm[mask].mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "balance.json")
    args = p.parse_args()
    rows = [analyse(args.run_dir, f) for f in sorted((args.run_dir / "keep").glob("*.safetensors"))]
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(args.out)
    keys = ["popshare", "gap", "gap_sem_rows", "gap_sem_null", "gap_id", "popshare_sem", "popshare_id",
            "rare_share", "spearman", "id_norm_head", "id_norm_tail"]
    print("| table | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        cells = [(str(r[k]) if isinstance(r[k], int) else f"{r[k]:.3f}") if k in r else "" for k in keys]
        print(f"| {r['row']} {r['method']} s{r['seed']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
