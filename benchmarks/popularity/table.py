"""The markdown tables of RESULTS.md from run.sh's compare JSONs (benchmarks/popularity/results/).

    python benchmarks/popularity/table.py

One row per (row of run.sh, method, seed): overall and tail NDCG@10, PopShare@10 and Coverage@10,
unfiltered then filtered; then mean +- sample std over seeds of every setting run with several seeds
(``<row>.json`` holds seed 22, ``<row>_s23_24.json`` the others).
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CELLS = [("overall", "NDCG@10"), ("tail", "NDCG@10"), ("overall", "PopShare@10"), ("overall", "Coverage@10")]
HEADER = ("| row | method | seed | NDCG@10 | tail NDCG@10 | PopShare@10 | Coverage@10 "
          "| f NDCG@10 | f tail NDCG@10 | f PopShare@10 | f Coverage@10 |")


def values(run: dict) -> list[float]:
    return [run["by_protocol"][p][g][m] for p in ("unfiltered", "filtered") for g, m in CELLS]


def main() -> None:
    files = sorted(f for f in RESULTS.glob("*.json") if f.name != "balance.json")
    print("Unfiltered columns first, then filtered (f: the user's seen items removed).\n")
    print(HEADER + "\n|---|---|---|" + "---|" * 8)
    by_setting = defaultdict(list)
    for f in files:
        for run in json.loads(f.read_text()):
            v = values(run)
            print(f"| {f.stem} | {run['method']} | {run['seed']} | " + " | ".join(f"{x:.4f}" for x in v) + " |")
            by_setting[(f.stem.removesuffix("_s23_24"), run["method"])].append(v)
    multi = {k: v for k, v in by_setting.items() if len(v) > 1}
    if multi:
        print("\nMean +- sample std over seeds:\n")
        print(HEADER.replace("| seed |", "| seeds |") + "\n|---|---|---|" + "---|" * 8)
        for (row, method), vs in multi.items():
            cells = [f"{statistics.mean(c):.4f} +- {statistics.stdev(c):.4f}" for c in zip(*vs)]
            print(f"| {row} | {method} | {len(vs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
