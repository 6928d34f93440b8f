"""Serving: export a trained model (``export.py``), recommend from the export (``recommend.py``),
place text-only items (``text_items.py``), serve it over HTTP with Ray Serve (``app.py``).

The command-line helpers below import nothing heavy, so the ``alphafuse`` command can register
them at start-up; torch is loaded only when a command runs.

Example::

    alphafuse export --run runs/quickstart --method alphafuse            # -> runs/quickstart/export-alphafuse-s22
    alphafuse recommend --run runs/quickstart --history 1,260,1196 --k 5  # table of rank, item id, score, title
    alphafuse recommend --run runs/quickstart --item 1 --item tt01 \
        --new-item tt01 --new-item-text "Heat 2 (2026). Genres: Action|Crime"
    alphafuse serve --export runs/quickstart --port 8000                 # POST {"history": [...], "k": 10}

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
    "add_serve_arguments",
    "export_command",
    "export_run",
    "recommend",
    "recommend_command",
    "serve_command",
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
    [--exclude-history] [--new-item ID --new-item-text TEXT ...] [--new-items FILE] [--json]``."""
    p.add_argument("--run", required=True, help="a run directory (its export is made if missing), an export "
                                                "folder, or a retraining registry (its LATEST run)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--item", action="append", metavar="ID",
                       help="one source item id (or title) of the history, oldest first; repeat it (any "
                            "characters, commas included); unknown ones without text are left out with a warning")
    given.add_argument("--history", help='the history as a JSON list (\'["1", "260"]\') or comma-separated ids; '
                                         "oldest first (the last model.max_len are used)")
    p.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    _common(p)
    p.add_argument("--exclude-history", action="store_true", help="never recommend an item of the history")
    p.add_argument("--new-item", action="append", default=[], metavar="ID",
                   help="a text-only item the model never saw (alphafuse): its id; repeat it, each with a "
                        "--new-item-text in the same order. It may appear in the history and is a candidate")
    p.add_argument("--new-item-text", action="append", default=[], metavar="TEXT",
                   help="the text of the --new-item at the same position (as the items' text template renders it)")
    p.add_argument("--new-items", metavar="FILE", help='text-only items as a JSON file [{"id": ..., "text": ...}]')
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--export DIR [--host H] [--port P] [--device cpu|cuda] [--replicas N] [--max-batch-size B]
    [--batch-wait-ms MS] [--method M] [--seed S]``."""
    p.add_argument("--export", required=True, help="an export folder, a run directory (its export is made if "
                                                   "missing) or a retraining registry (its LATEST run)")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where each replica scores (default cpu)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the deployment (default 1)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per batch at most (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests, in milliseconds (default 5)")
    return p


def export_command(args: argparse.Namespace) -> None:
    """Run ``alphafuse export`` (input errors raise AlphaFuseError for the caller to print)."""
    from ..config import is_uri
    from ..runtime.store import RunStore
    from .export import export_run

    store = RunStore(args.run, "--run") if is_uri(args.run) else None  # a run on an object store: its mirror
    out = export_run(store.pull() if store else args.run, args.method, args.seed, args.to, force=args.force,
                     serve_retired=args.serve_retired)
    if store is not None and args.to is None:
        store.push(out.name)  # the export is a stage folder of the run
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


def new_items_argument(ids: list[str], texts: list[str], path: str | None) -> list[dict]:
    """Text-only items from ``--new-item`` / ``--new-item-text`` pairs and a ``--new-items`` JSON file."""
    from .recommend import parse_new_items

    if len(ids) != len(texts):
        raise ConfigError(f"--new-item is given {len(ids)} time(s) and --new-item-text {len(texts)}: each new item "
                          "needs its text, in the same order")
    items = [{"id": i, "text": t} for i, t in zip(ids, texts)]
    if path is not None:
        try:
            given = json.loads(open(path, encoding="utf-8").read())
        except OSError as e:
            raise ConfigError(f"--new-items {path}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--new-items {path}: not JSON ({e.msg} at line {e.lineno})") from None
        items += parse_new_items(given, f"--new-items {path}")
    return parse_new_items(items, "--new-item")


def recommend_command(args: argparse.Namespace) -> None:
    """Run ``alphafuse recommend``: the table (or JSON) on stdout, export progress and warnings on stderr."""
    from ..runtime.store import local_run
    from .recommend import format_recommendations, recommend

    history = args.item if args.item is not None else parse_history(args.history)
    new_items = new_items_argument(args.new_item, args.new_item_text, args.new_items)
    rows = recommend(local_run(args.run), history, args.k, method=args.method, seed=args.seed,
                     exclude_history=args.exclude_history, new_items=new_items)
    print(json.dumps(rows, indent=2) if args.json else format_recommendations(rows))


def serve_command(args: argparse.Namespace) -> None:
    """Run ``alphafuse serve``: deploy the export and serve until interrupted (Ctrl-C)."""
    import time

    from ray import serve

    from ..runtime.store import local_run
    from .app import run_server
    from .recommend import resolve_export

    folder = resolve_export(local_run(args.export, "--export"), args.method, args.seed)
    run_server(folder, args.host, args.port, device=args.device, replicas=args.replicas,
               max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)
    print(f"serving {folder} at http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
