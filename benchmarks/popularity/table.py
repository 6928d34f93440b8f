"""The markdown tables of RESULTS.md from run.sh's compare JSONs (benchmarks/popularity/results/).

    python benchmarks/popularity/table.py            # one table per factor
    python benchmarks/popularity/table.py --runs     # every run, one line each

Every setting has a seed-22 line; a setting run with several seeds (``<row>.json`` holds seed 22,
``<row>_s23_24.json`` seeds 23 and 24) also a line of mean ± sample std over them. Unfiltered
columns first, then filtered (seen items removed).
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CELLS = [("overall", "NDCG@10"), ("tail", "NDCG@10"), ("overall", "PopShare@10"), ("overall", "Coverage@10")]
HEADER = ("| method | setting | seeds | NDCG@10 | tail NDCG@10 | PopShare@10 | Coverage@10 "
          "| filtered NDCG@10 | filtered tail NDCG@10 | filtered PopShare@10 | filtered Coverage@10 |")
FACTORS = {
    "Protocol and model selection": ["default", "exclude_history", "patience_10"],
    "Text and balance: the frozen semantic part alone": ["default", "semantic_only"],
    "ID initialisation": ["default", "id_init_normal"],
    "Temperature": ["temperature_0.03", "default", "temperature_0.2"],
    "Negatives and loss": ["default", "popularity_negatives", "popularity_logq", "full_ce_10ep"],
}
SETTING = {"default": "preset",
           "exclude_history": "eval.exclude_history=true", "patience_10": "train.patience=10",
           "semantic_only": "model.id_space=semantic_only",
           "id_init_normal": "model.id_init=normal (std 1)", "temperature_0.03": "model.temperature=0.03",
           "temperature_0.2": "model.temperature=0.2",
           "popularity_negatives": "train.negative_sampler=popularity",
           "popularity_logq": "negative_sampler=popularity train.logq=true",
           "full_ce_10ep": "train.loss=full_ce train.epochs=10"}


def values(run: dict) -> list[float]:
    return [run["by_protocol"][p][g][m] for p in ("unfiltered", "filtered") for g, m in CELLS]


def load() -> dict[tuple[str, str], list[tuple[int, list[float]]]]:
    runs = defaultdict(list)
    for f in sorted(RESULTS.glob("*.json")):
        if f.name == "balance.json":
            continue
        for run in json.loads(f.read_text()):
            runs[(f.stem.removesuffix("_s23_24"), run["method"])].append((run["seed"], values(run)))
    return runs


def cell(xs: list[float]) -> str:
    return f"{xs[0]:.4f}" if len(xs) == 1 else f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def main() -> None:
    runs = load()
    if "--runs" in sys.argv:
        print("| row | method | seed | NDCG@10 | tail NDCG@10 | PopShare@10 | Coverage@10 | f NDCG@10 "
              "| f tail NDCG@10 | f PopShare@10 | f Coverage@10 |\n|---|---|---|" + "---|" * 8)
        for (row, method), rs in runs.items():
            for seed, v in sorted(rs):
                print(f"| {row} | {method} | {seed} | " + " | ".join(f"{x:.4f}" for x in v) + " |")
        return
    for title, rows in FACTORS.items():
        print(f"\n### {title}\n\n{HEADER}\n|---|---|---|" + "---|" * 8)
        for method in ("alphafuse", "sasrec_id"):
            for row in rows:
                rs = sorted(runs.get((row, method), []))
                # seed 22 (every row has it), then the mean over seeds where there are several
                for part in ([r for r in rs if r[0] == 22], rs if len(rs) > 1 else []):
                    if part:
                        seeds = ",".join(str(s) for s, _ in part)
                        cols = [cell(list(c)) for c in zip(*(v for _, v in part))]
                        print(f"| {method} | {SETTING[row]} | {seeds} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
