"""Top-k recommendations from an export (``export.py``): source item ids in, ranked items with titles out.

Serving follows the export's contract only (the Parquet vectors and the TorchScript encoder), so
what this module returns is what a serving system built on the export would return. The ranking
is the evaluation's: every servable item is scored, ``dot(user_vector, vector)`` in float64, ties
by the smaller ``item_idx``; retired items are never candidates; the history is not masked unless
``exclude_history`` (as ``eval.exclude_history``, off by default).

Example::

    recommend("runs/quickstart", ["1", "260", "1196"], k=5)
    # [{"rank": 1, "item_id": "1210", "title": "Star Wars: Episode VI ...", "score": 0.71, "item_idx": 1234}, ...]
    rec = Recommender("runs/quickstart/export-alphafuse-s22")   # load once, serve many
    rec.recommend(["1", "260"], k=10, exclude_history=True)
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..errors import AlphaFuseError, ConfigError, DataError
from ..runtime.manifest import file_sha256, read_manifest
from ..runtime.parquet import read_table
from .export import CARD_JSON, ENCODER_FILE, ITEMS_FILE, RETIRED_FILE, export_run


def _vectors(table: pa.Table, column: str, path: Path) -> torch.Tensor:
    if column not in table.column_names:
        raise DataError("missing column", file=path, column=column)
    col = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise DataError(f"expected fixed_size_list<float32>, got {col.type}", file=path, column=column)
    d = col.type.list_size
    flat = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return torch.from_numpy(flat.reshape(len(col), d).copy())


def _read_card(path: Path) -> dict:
    """The model card, checked for what serving reads: sections ``model`` (``max_len`` >= 1),
    ``serving`` and ``files`` (name -> {"sha256", ...}); a DataError naming the card otherwise."""
    damaged = "the export was altered or damaged; export again"
    try:
        card = json.loads(path.read_bytes())
    except ValueError as e:  # UnicodeDecodeError included
        raise DataError(f"not valid JSON ({e}): {damaged}", file=path) from None
    sections = ("model", "serving", "files")
    if not isinstance(card, dict) or not all(isinstance(card.get(k), dict) for k in sections):
        raise DataError(f"expected a JSON object with the sections {', '.join(sections)}: {damaged}", file=path)
    max_len = card["model"].get("max_len")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise DataError(f"model.max_len={max_len!r}: expected an integer >= 1: {damaged}", file=path)
    if not all(isinstance(entry, dict) for entry in card["files"].values()):
        raise DataError(f"files: expected name -> {{\"sha256\": ...}}: {damaged}", file=path)
    return card


def _verified_file(folder: Path, card: dict, name: str) -> Path:
    """``folder / name`` after checking that ``name`` is a plain file name listed in the model card
    and that the file's sha256 is the card's: nothing outside the export and nothing altered is
    read (``torch.jit.load`` runs code)."""
    card_path = folder / CARD_JSON
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise DataError(f"file name {name!r} is not a plain file name inside the export", file=card_path)
    path = folder / name
    expected = (card.get("files") or {}).get(name, {}).get("sha256")
    if expected is None:
        raise DataError(f"{name} is not listed under 'files' with its sha256", file=card_path)
    if not path.is_file() or path.is_symlink():
        raise DataError("missing: the export is incomplete", file=path)
    if file_sha256(path) != expected:
        raise DataError(f"sha256 differs from the model card's: the export was altered or damaged; export again",
                        file=path)
    return path


class Recommender:
    """An export loaded for serving: candidate vectors, history lookup, the TorchScript encoder.

    Args:
        export_dir: a finished export folder (``export_run``'s output).
    """

    def __init__(self, export_dir: str | Path):
        self.dir = Path(export_dir)
        if read_manifest(self.dir) is None or not (self.dir / CARD_JSON).is_file():
            raise AlphaFuseError(f"export {self.dir}: not a finished export (no manifest.json / {CARD_JSON}); "
                                 "run alphafuse export first")
        self.card = _read_card(self.dir / CARD_JSON)
        serving = self.card["serving"]
        self.max_len = self.card["model"]["max_len"]
        input_column = serving.get("history_input_column", "vector")
        parts = []
        for name in (serving.get("items_file", ITEMS_FILE), serving.get("retired_items_file", RETIRED_FILE)):
            path = _verified_file(self.dir, self.card, name)
            parts.append((path, read_table(path)))
        (items_path, items), (retired_path, retired) = parts
        for path, table in parts:
            for col in ("item_idx", "item_id", "text"):
                if col not in table.column_names:
                    raise DataError("missing column", file=path, column=col)
        idx = items.column("item_idx").to_numpy()
        if len(idx) and not np.all(np.diff(idx) > 0):
            raise DataError("rows must be sorted by item_idx (the tie rule relies on it)", file=items_path,
                            column="item_idx")
        self.item_idx = idx.astype(np.int64)
        self.item_ids: list[str] = items.column("item_id").to_pylist()
        self.titles: list[str] = items.column("text").to_pylist()
        self.vectors = _vectors(items, "vector", items_path)  # candidates [M, d], row order = item_idx order
        # history lookup: servable rows first (0..M-1), then retired ones
        self.inputs = torch.cat([_vectors(items, input_column, items_path),
                                 _vectors(retired, input_column, retired_path)])
        lookup_ids = self.item_ids + retired.column("item_id").to_pylist()
        self.row_of = {item_id: row for row, item_id in enumerate(lookup_ids)}
        self.num_candidates = len(self.item_ids)
        encoder_path = _verified_file(self.dir, self.card, serving.get("encoder_file", ENCODER_FILE))
        self.encoder = torch.jit.load(str(encoder_path)).eval()

    def rows(self, history: Sequence[str]) -> list[int]:
        """Lookup rows of a history's item ids; an error naming every unknown id."""
        unknown = [h for h in dict.fromkeys(history) if h not in self.row_of]
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20
                                                                 else "")
            raise DataError(f"unknown item id(s) in the history: {shown} (not in this model's catalogue)",
                            file=self.dir / ITEMS_FILE, column="item_id")
        return [self.row_of[h] for h in history]

    def user_vectors(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """User vectors [B, d] of source-id histories (time order, most recent last); each history is
        cut to its last ``max_len`` items and left-padded, as in evaluation."""
        if not histories:
            raise ConfigError("history: no users given")
        x = torch.zeros(len(histories), self.max_len, self.inputs.shape[1])
        valid = torch.zeros(len(histories), self.max_len, dtype=torch.bool)
        for i, history in enumerate(histories):
            if not len(history):
                raise ConfigError("history: empty; the model needs at least one item the user interacted with")
            rows = self.rows(list(history))[-self.max_len:]
            x[i, self.max_len - len(rows):] = self.inputs[rows]
            valid[i, self.max_len - len(rows):] = True
        with torch.no_grad():
            return self.encoder(x, valid)

    def recommend(self, history: Sequence[str], k: int = 10, *, exclude_history: bool = False) -> list[dict]:
        """The top ``k`` servable items for one history: dicts of rank (1-based), item_id, title
        (prepare's rendered item text), score, item_idx. Fewer than ``k`` only when fewer items are left."""
        from ..evaluate.metrics import full_ranking_topk

        if isinstance(history, str):
            raise ConfigError("history: expected a list of item ids, got one string")
        if k < 1:
            raise ConfigError(f"k={k}: must be at least 1")
        user = self.user_vectors([history])
        exclude = None
        if exclude_history:
            seen = sorted({r for r in self.rows(list(history)) if r < self.num_candidates})
            exclude = [torch.tensor(seen, dtype=torch.long)]
        scores, cols = full_ranking_topk(user, self.vectors, min(k, self.num_candidates), similarity="dot",
                                         exclude=exclude)
        out = []
        for score, col in zip(scores[0].tolist(), cols[0].tolist()):
            if score == float("-inf"):  # an excluded history item filling the tail
                break
            out.append({"rank": len(out) + 1, "item_id": self.item_ids[col], "title": self.titles[col],
                        "score": float(score), "item_idx": int(self.item_idx[col])})
        return out


def resolve_export(path: str | Path, method: str = "alphafuse", seed: int | None = None) -> Path:
    """An export folder from an export folder or a run directory; in a run directory the export
    ``export-<method>-s<seed>`` is written (or brought up to date) first."""
    path = Path(path)
    if (path / CARD_JSON).is_file():
        return path
    return export_run(path, method, seed)


def recommend(run_dir_or_export_dir: str | Path, history: Sequence[str], k: int = 10, *,
              method: str = "alphafuse", seed: int | None = None, exclude_history: bool = False) -> list[dict]:
    """Top-``k`` items for one user's history of source item ids (time order, most recent last).

    Args:
        run_dir_or_export_dir: an export folder, or a run directory (its export of ``method`` /
            ``seed`` is created or refreshed first; ``seed=None``: the method's only model).
        history: source item ids (prepare's ``item_id``); longer than ``model.max_len``: the last
            ``max_len`` are used. Retired items may appear in it; they are never recommended.
        k: how many items.
        exclude_history: never recommend an item of the history (default False, as evaluation).

    Returns:
        ``[{"rank", "item_id", "title", "score", "item_idx"}, ...]``, best first.

    Raises:
        DataError naming the unknown ids; ConfigError for an empty history or ``k < 1``.
    """
    return Recommender(resolve_export(run_dir_or_export_dir, method, seed)).recommend(
        history, k, exclude_history=exclude_history)


def format_recommendations(rows: list[dict], title_width: int = 70) -> str:
    """A plain-text table: rank, item id, score, title."""
    id_width = max([len("item_id")] + [len(r["item_id"]) for r in rows])
    lines = [f"{'rank':>4}  {'item_id':<{id_width}}  {'score':>8}  title", "-" * (24 + id_width + title_width // 2)]
    for r in rows:
        title = r["title"] if len(r["title"]) <= title_width else r["title"][:title_width - 3] + "..."
        lines.append(f"{r['rank']:>4}  {r['item_id']:<{id_width}}  {r['score']:>8.4f}  {title}")
    return "\n".join(lines)
