"""The comparison report of methods x seeds, as in the paper's tables: mean and std per method,
an improvement row of the proposed method over the best baseline, per-group metrics and plots.

Inputs are the evaluate stage's ``metrics.json`` contents (one per method and seed) and, for the
training curves, the train stage's ``history.json``. Outputs (written atomically into one folder):

- ``report.md``: per protocol (the lead one first: full ranking filtered or unfiltered, or
  sampled), one table per metric group (overall, then head/tail items, tail/head users,
  never-seen targets, whichever the runs have), each headed with its protocol, ``mean ± std``
  over seeds, the best baseline and the improvement row (accuracy metrics only; the top-k lists'
  ``PopShare`` and ``Coverage`` stand beside them).
- ``report.json``: the same numbers for machines, plus every seed's raw metrics.
- ``metrics_by_group.png``: NDCG@k per group and method, std over seeds as error bars (none for one seed).
- ``training_curves.png``: training loss and validation NDCG@10 per epoch, one line per run; a
  method has one colour (:data:`METHOD_COLOURS`) in every plot, its seeds one line style each.

Example::

    report = build_report([(metrics_json, history_json), ...], proposed="alphafuse")
    write_report(report, Path("runs/q/report"))
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..runtime.manifest import atomic_write_bytes, atomic_write_json

_log = logging.getLogger(__name__)

GROUP_ORDER = ("overall", "head", "tail", "head_users", "tail_users", "never_seen")
ACCURACY = ("HR", "NDCG", "MRR")  # higher is better; the list metrics (PopShare, Coverage) describe


def protocol_label(metrics: dict, ranking: str | None = None) -> str:
    """The protocol of a metrics.json content in words; ``ranking``: ``filtered``, ``unfiltered``
    or ``sampled`` (None: the file's lead one)."""
    ranking = ranking or metrics.get("ranking") or ("filtered" if metrics.get("history_masked") else "unfiltered")
    if ranking == "sampled" or metrics.get("protocol") == "sampled":
        return f"sampled: the target against {metrics.get('sampled_negatives')} items the user never interacted with"
    if ranking == "filtered":
        return "full ranking, filtered (the user's seen items removed)"
    return "full ranking, unfiltered (seen items ranked too)"


def _is_accuracy(metric: str) -> bool:
    return metric.split("@")[0] in ACCURACY


GROUP_DEFINITIONS = {
    "overall": "every test case (one per evaluated user)",
    "head": "test cases whose target is a head item: among the most popular items in training "
            "(data.head_rule, by default the 20% most interacted-with items; eval.tail_item_threshold if set)",
    "tail": "test cases whose target is not a head item",
    "head_users": "users with a long history (by default the 20% of users with the longest; "
                  "eval.tail_user_threshold if set)",
    "tail_users": "the other users (by default the 80% with the shortest histories)",
    "never_seen": "test cases whose target has no training interaction",
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def build_report(runs: list[tuple[dict, dict | None]], proposed: str = "alphafuse") -> dict:
    """Aggregate runs into per-method statistics.

    Args:
        runs: ``(metrics, history)`` per method x seed: ``metrics`` is a metrics.json content
            (``method``, ``seed``, ``metrics: {group: {metric: value, users}}``, protocol facts);
            ``history`` a history.json content or None.
        proposed: the method the improvement row is computed for; every other method is a baseline,
            but for the proposed method's ablation rows (``<proposed> [<row>]``).

    Returns:
        ``{"methods": [...], "groups": {group: {method: {metric: [mean, std]}}}, "users": {group: n},
        "improvement": {group: {metric: {"best_baseline": m, "relative": r}}}, "protocol": {...},
        "runs": [...]}``.
    """
    if not runs:
        raise ValueError("no runs to report")
    by_method: dict[str, list[dict]] = defaultdict(list)
    for metrics, _ in runs:
        by_method[metrics["method"]].append(metrics)
    methods = sorted(by_method, key=lambda m: (m == proposed, m))  # baselines first, proposed last
    first = runs[0][0]
    protocols = list(first.get("by_protocol") or {first.get("ranking"): None})
    tables = {p: _protocol_tables(by_method, methods, proposed, p) for p in protocols}
    protocol = {k: first.get(k) for k in ("data_split", "split", "protocol", "history_masked", "similarity", "items",
                                          "sampled_negatives") if k in first}
    return {"methods": methods, "proposed": proposed, "seeds": {m: sorted(r["seed"] for r in by_method[m])
                                                                 for m in methods},
            **tables[protocols[0]], "protocol": protocol, "protocols": protocols,
            "protocol_names": {p: protocol_label(first, p) for p in protocols},
            "by_protocol": tables, "runs": [{"metrics": m, "history": h} for m, h in runs]}


def _variant_of(label: str, proposed: str) -> bool:
    """True for the proposed method itself and its ablation rows (``alphafuse [threshold]``):
    neither is a baseline of the improvement row."""
    return label == proposed or label.startswith(f"{proposed} [")


def _protocol_tables(by_method: dict[str, list[dict]], methods: list[str], proposed: str, ranking: str | None) -> dict:
    """``{"groups", "users", "improvement"}`` of one protocol (``ranking``: a key of the runs'
    ``by_protocol``; None: their ``metrics``)."""
    def metrics_of(run: dict) -> dict:
        return run["by_protocol"][ranking] if ranking and "by_protocol" in run else run["metrics"]

    all_runs = [r for m in methods for r in by_method[m]]
    groups = [g for g in GROUP_ORDER if any(g in metrics_of(r) for r in all_runs)]
    stats: dict[str, dict[str, dict[str, list[float]]]] = {}
    users: dict[str, int] = {}
    for group in groups:
        stats[group] = {}
        for method in methods:
            rows = [metrics_of(r)[group] for r in by_method[method] if group in metrics_of(r)]
            if not rows:
                continue
            names = [k for k in rows[0] if k != "users"]
            stats[group][method] = {k: list(_mean_std([r[k] for r in rows])) for k in names}
            users[group] = int(rows[0].get("users", 0))
    improvement: dict[str, dict[str, dict]] = {}
    if proposed in by_method and len(methods) > 1:
        for group, per_method in stats.items():
            if proposed not in per_method:
                continue
            improvement[group] = {}
            for metric, (value, _) in per_method[proposed].items():
                baselines = {m: s[metric][0] for m, s in per_method.items()
                             if metric in s and not _variant_of(m, proposed)}
                if not baselines or not _is_accuracy(metric):
                    continue
                best = max(baselines, key=baselines.get)
                rel = (value - baselines[best]) / baselines[best] if baselines[best] > 0 else None
                improvement[group][metric] = {"best_baseline": best, "best_value": baselines[best], "relative": rel}
    return {"groups": stats, "users": users, "improvement": improvement}


def _metric_columns(tables: dict, group: str) -> list[str]:
    any_method = next(iter(tables["groups"][group].values()))
    order = ("HR", "NDCG", "MRR", "PopShare", "Coverage")  # a fixed order, whatever the runs' key order

    def key(name: str) -> tuple:
        kind, k = name.split("@")
        return int(k), order.index(kind) if kind in order else len(order), kind
    return sorted(any_method, key=key)


def to_markdown(report: dict, title: str = "Comparison", plots: list[str] = ()) -> str:
    """The report as Markdown tables (see the module docstring), with its groups defined and the
    ``plots`` (file names beside report.md) linked."""
    p = report["protocol"]
    lines = [f"# {title}", ""]
    names = report.get("protocol_names", {})
    facts = [f"data split `{p.get('data_split', '?')}` (evaluated: {p.get('split', '?')})", f"protocol `{p.get('protocol', 'full')}`"
             + (f" ({p['sampled_negatives']} sampled negatives)" if p.get("sampled_negatives") else ""),
             f"similarity `{p.get('similarity', '?')}`",
             f"{p.get('items', '?')} items"]
    lines += ["Protocol: " + ", ".join(facts) + ".",
              "Seeds: " + "; ".join(f"{m}: {', '.join(map(str, s))}" for m, s in report["seeds"].items())
              + ". Cells: mean ± sample std over seeds (the mean alone for a single seed).", "",
              "Metrics: each test case's target gets a 0-based rank r among the candidates; HR@k is the "
              "share with r < k, NDCG@k the mean of 1/log2(r + 2) and MRR@k the mean of 1/(r + 1), both counting "
              "0 where r >= k. PopShare@k: the share of top-k slots holding a head item; Coverage@k: distinct "
              "items in all top-k lists / catalogue items.",
              "", "Groups:", ""]
    lines += [f"- **{g}**: {GROUP_DEFINITIONS[g]}" for g in report["groups"] if g in GROUP_DEFINITIONS]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots] + ([""] if plots else [])
    if names:
        lines += ["Rankings reported (the first leads): " + "; ".join(names.values()) + ".", ""]
    for ranking, tables in (report.get("by_protocol") or {None: report}).items():
        lines += _protocol_markdown(report, tables, names.get(ranking, "protocol as above"))
    return "\n".join(lines)


def _protocol_markdown(report: dict, tables: dict, name: str) -> list[str]:
    """One protocol's tables, each headed with the protocol ``name``."""
    lines = []
    for group, per_method in tables["groups"].items():
        cols = _metric_columns(tables, group)
        users = tables["users"].get(group, 0)
        if not users:  # metrics of an empty group are 0 by convention, not results
            lines += [f"## {group} (0 test cases), {name}", "", "No test case falls in this group.", ""]
            continue
        lines += [f"## {group} ({users} test cases), {name}", "",
                  "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        best = {c: max(per_method[m][c][0] for m in per_method) for c in cols}
        for method, values in per_method.items():
            cells = []
            seeds = len(report["seeds"].get(method, []))
            for c in cols:
                mean, std = values[c]
                cell = f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"  # one seed: no spread
                bold = mean == best[c] and len(per_method) > 1 and _is_accuracy(c)
                cells.append(f"**{cell}**" if bold else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        imp = tables["improvement"].get(group)
        if imp:
            lines.append(f"| improv. of {report['proposed']} over the best baseline | "
                         + " | ".join(f"{imp[c]['relative'] * 100:+.1f}% (vs {imp[c]['best_baseline']})"
                                      if c in imp and imp[c]["relative"] is not None
                                      else ("n/a" if _is_accuracy(c) else "") for c in cols)
                         + " |")
        lines.append("")
    return lines


# one colour per method in every plot of every report (tab10): the proposed method red, the ID-only
# baseline blue; names outside this map (a method added later) take the remaining tab10 colours in order
METHOD_COLOURS = {"alphafuse": "tab:red", "sasrec_id": "tab:blue", "llminit": "tab:orange",
                  "morec": "tab:green", "whitenrec": "tab:purple", "unisrec": "tab:brown", "rlmrec": "tab:pink",
                  "llmesr": "tab:olive"}
_SPARE_COLOURS = ("tab:cyan", "tab:gray")
_SEED_STYLES = ("-", "--", ":", "-.")  # a method's seeds: its colour, one line style each


def method_colour(method: str, methods: list[str] = ()) -> str:
    """The fixed colour of ``method`` (:data:`METHOD_COLOURS`); an unlisted one takes a spare
    colour by its position among the unlisted names of ``methods``."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    unlisted = [m for m in methods if m not in METHOD_COLOURS]
    return _SPARE_COLOURS[unlisted.index(method) % len(_SPARE_COLOURS) if method in unlisted else 0]


def _plots(report: dict, folder: Path, k: int) -> list[str]:
    """metrics_by_group.png and training_curves.png; returns the file names written."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU image: the tables and JSON are still written
        _log.warning("[report] matplotlib is not installed: plots skipped")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    written = []
    methods = report["methods"]
    metric = f"NDCG@{k}"
    groups = [g for g in report["groups"] if report["users"].get(g, 0)
              and all(metric in v for v in report["groups"][g].values())]
    if groups:
        fig, ax = plt.subplots(figsize=(min(16, max(7, 0.3 * len(groups) * len(methods) + 3)), 4.5))
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            values = [report["groups"][g].get(method, {}).get(metric, [np.nan, 0]) for g in groups]
            several = len(report["seeds"].get(method, [])) > 1  # one seed: no error bar
            ax.bar(np.arange(len(groups)) + i * width, [v[0] for v in values], width,
                   yerr=[v[1] for v in values] if several else None, capsize=3, label=method,
                   color=method_colour(method, methods))
        ax.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2)
        ax.set_xticklabels([f"{g}\n({report['users'].get(g, 0)})" for g in groups])
        ax.set_ylabel(metric)
        lead = report.get("protocol_names", {}).get((report.get("protocols") or [None])[0], "")
        spread = "; error bars: std over seeds" if any(len(s) > 1 for s in report["seeds"].values()) else ""
        ax.set_title(f"{metric} by group\n(mean{spread}; test cases in brackets)\n{lead}", fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        written.append(_save(fig, folder / "metrics_by_group.png"))
        plt.close(fig)
    curves = [(r["metrics"]["method"], r["metrics"]["seed"], r["history"]) for r in report["runs"] if r["history"]]
    if curves:
        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
        seeds = sorted({seed for _, seed, _ in curves})
        for method, seed, hist in curves:
            style = dict(color=method_colour(method, methods), ls=_SEED_STYLES[seeds.index(seed) % len(_SEED_STYLES)])
            epochs = hist.get("epochs", [])
            ax_loss.plot([e["epoch"] for e in epochs], [e["loss"] for e in epochs], **style)
            val = [(e["epoch"], e["val_NDCG@10"]) for e in epochs if "val_NDCG@10" in e]
            if val:
                ax_val.plot(*zip(*val), marker=".", **style)
        shown = [m for m in methods if any(c[0] == m for c in curves)]
        handles = [Line2D([], [], color=method_colour(m, methods), label=m) for m in shown]
        if len(seeds) > 1:
            handles += [Line2D([], [], color="black", ls=_SEED_STYLES[i % len(_SEED_STYLES)], label=f"seed {s}")
                        for i, s in enumerate(seeds)]
        for ax, label in ((ax_loss, "training loss"), (ax_val, "validation NDCG@10")):
            ax.set_xlabel("epoch"), ax.set_ylabel(label), ax.set_title(label, fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                      ncol=min(len(handles), 4), frameon=False)
        written.append(_save(fig, folder / "training_curves.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # nothing clipped: titles, legends
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def write_report(report: dict, folder: Path, title: str = "Comparison", k: int = 10) -> list[Path]:
    """Write report.md, report.json and the PNG plots into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, folder, k)
    atomic_write_bytes(folder / "report.md", to_markdown(report, title, plots).encode())
    atomic_write_json(folder / "report.json", report)
    names = ["report.md", "report.json", *plots]
    return [folder / n for n in names]
