"""Serving hand-off: export a trained model (``export.py``) and recommend from the export (``recommend.py``).

The command-line helpers below import nothing heavy, so the ``alphafuse`` command can register
them at start-up; torch is loaded only when a command runs.

Example::

    alphafuse export --run runs/quickstart --method alphafuse            # -> runs/quickstart/export-alphafuse-s22
    alphafuse recommend --run runs/quickstart --history 1,260,1196 --k 5  # table of rank, item id, score, title

    from alphafuse_dist.serve import export_run, recommend
    recommend(export_run("runs/quickstart"), ["1", "260"], k=5)
"""
from __future__ import annotations

import argparse
import json

from ..errors import ConfigError

__all__ = [
    "Recommender",
    "add_export_arguments",
    "add_recommend_arguments",
    "export_command",
    "export_run",
    "recommend",
    "recommend_command",
]


def __getattr__(name: str):  # the library entry points, imported on first use
    if name == "export_run":
        from .export import export_run

        return export_run
    if name in ("recommend", "Recommender"):
        from . import recommend as module

        return getattr(module, name)
    raise AttributeError(name)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="alphafuse", help="the trained method (default alphafuse)")
    p.add_argument("--seed", type=int, default=None, help="the trained seed (default: the method's only model)")


def add_export_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--run DIR [--method M] [--seed S] [--to DIR] [--force]``."""
    p.add_argument("--run", required=True, help="the run directory holding prepare/ and train-<method>-s<seed>/, "
                                                "or a retraining registry (its LATEST run)")
    _common(p)
    p.add_argument("--to", default=None, help="export folder (default <run>/export-<method>-s<seed>)")
    p.add_argument("--force", action="store_true", help="export again even if the export is up to date")
    p.add_argument("--serve-retired", action="store_true",
                   help="also serve items that left the catalogue (default: history inputs only)")
    return p


def add_recommend_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--run DIR (--item ID ... | --history JSON|id1,id2) [--k 10] [--method M] [--seed S]
    [--exclude-history] [--json]``."""
    p.add_argument("--run", required=True, help="a run directory (its export is made if missing), an export "
                                                "folder, or a retraining registry (its LATEST run)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--item", action="append", metavar="ID",
                       help="one source item id of the history, oldest first; repeat it (any characters, "
                            "commas included)")
    given.add_argument("--history", help='the history as a JSON list (\'["1", "260"]\') or comma-separated ids; '
                                         "oldest first (the last model.max_len are used)")
    p.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    _common(p)
    p.add_argument("--exclude-history", action="store_true", help="never recommend an item of the history")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def export_command(args: argparse.Namespace) -> None:
    """Run ``alphafuse export`` (input errors raise AlphaFuseError for the caller to print)."""
    from .export import export_run

    out = export_run(args.run, args.method, args.seed, args.to, force=args.force,
                     serve_retired=args.serve_retired)
    print(out)


def parse_history(text: str) -> list[str]:
    """``--history``: a JSON list of ids (ids may hold commas) or comma-separated ids."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--history: not a JSON list of item ids ({e.msg} at character {e.pos})") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, int)) for i in items):
            raise ConfigError("--history: expected a JSON list of item ids (strings or integers)")
        return [str(i) for i in items]
    return [h.strip() for h in text.split(",") if h.strip()]


def recommend_command(args: argparse.Namespace) -> None:
    """Run ``alphafuse recommend``: the table (or JSON) on stdout, export progress on stderr."""
    from .recommend import format_recommendations, recommend

    history = args.item if args.item is not None else parse_history(args.history)
    rows = recommend(args.run, history, args.k, method=args.method, seed=args.seed,
                     exclude_history=args.exclude_history)
    print(json.dumps(rows, indent=2) if args.json else format_recommendations(rows))
