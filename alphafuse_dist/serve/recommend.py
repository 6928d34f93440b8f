"""Top-k recommendations from an export (``export.py``): item ids or titles in, ranked items with titles out.

Serving follows the export's contract only (the Parquet vectors and the ``torch.export`` encoder,
each checked against the model card's sha256 before it is read), so what this module returns is
what a serving system built on the export would return. The ranking is the evaluation's: every
servable item is scored, ``dot(user_vector, vector)`` in float64, ties by the smaller
``item_idx``; retired items are never candidates; the history is not masked unless
``exclude_history`` (as ``eval.exclude_history``, off by default).

Text-only items (alphafuse exports): a request may bring items the model never saw as
``{"id", "text"}``; they are placed by their text (``text_items.py``), may appear in the history
and are candidates of that request. History entries that are neither known ids, item titles nor
such items are left out with a warning; a history with no known entry is an error.

Example::

    recommend("runs/quickstart", ["1", "260", "1196"], k=5)
    # [{"rank": 1, "item_id": "1210", "title": "Star Wars: Episode VI ...", "score": 0.71, "item_idx": 1234,
    #   "new": False}, ...]
    rec = Recommender("runs/quickstart/export-alphafuse-s22")   # load once, serve many
    rec.recommend(["1", "tt01"], k=10, new_items=[{"id": "tt01", "text": "Heat 2 (2026). Genres: Crime"}])
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..errors import AlphaFuseError, ConfigError, DataError
from ..runtime.manifest import file_sha256, read_manifest
from ..runtime.parquet import read_table
from .export import CARD_JSON, ENCODER_FILE, EXPORT_FORMAT, ITEMS_FILE, RETIRED_FILE, export_run
from .text_items import TextItems, serving_rows

_log = logging.getLogger(__name__)


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
    read (loading a program runs what it holds)."""
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


@dataclass
class Query:
    """One request, resolved against an export (:meth:`Recommender.query`).

    Attributes:
        inputs: encoder input rows [n, d] of the history (its last ``max_len`` known items, oldest first).
        exclude: candidate columns never recommended (the history's, with ``exclude_history``).
        new_vectors: candidate vectors [m, d] of the request's text-only items.
        new_ids / new_titles: their ids and texts; new_excluded: [m] bool, excluded ones.
        k: how many items; dropped: history entries left out (unknown, no text given).
    """

    inputs: torch.Tensor
    exclude: list[int]
    new_vectors: torch.Tensor
    new_ids: list[str]
    new_titles: list[str]
    new_excluded: list[bool]
    k: int
    dropped: list[str] = field(default_factory=list)


def parse_new_items(value, where: str = "new_items") -> list[dict]:
    """Text-only items as given: a list of ``{"id": str, "text": str}`` with distinct ids; a
    ConfigError naming ``where`` and the entry otherwise."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of {{\"id\": ..., \"text\": ...}} objects")
    seen = set()
    for i, item in enumerate(value):
        if not (isinstance(item, dict) and isinstance(item.get("id"), (str, int)) and isinstance(item.get("text"), str)
                and item["text"].strip()):
            raise ConfigError(f"{where}[{i}]: expected {{\"id\": <item id>, \"text\": <non-empty text>}}")
        if str(item["id"]) in seen:
            raise ConfigError(f"{where}[{i}]: item id {str(item['id'])!r} given twice")
        seen.add(str(item["id"]))
    return [{"id": str(item["id"]), "text": item["text"]} for item in value]


class Recommender:
    """An export loaded for serving: candidate vectors, history lookup, the ``torch.export`` encoder,
    and (alphafuse) the text-only item rule.

    Args:
        export_dir: a finished export folder (``export_run``'s output).
        device: where the encoder, the scoring and the text encoder run ("cpu", "cuda", "cuda:1").
    """

    def __init__(self, export_dir: str | Path, device: str = "cpu"):
        self.dir, self.device = Path(export_dir), torch.device(device)
        if read_manifest(self.dir) is None or not (self.dir / CARD_JSON).is_file():
            raise AlphaFuseError(f"export {self.dir}: not a finished export (no manifest.json / {CARD_JSON}); "
                                 "run alphafuse export first")
        self.card = _read_card(self.dir / CARD_JSON)
        if self.card.get("format_version") != EXPORT_FORMAT:
            raise DataError(f"format_version {self.card.get('format_version')!r}, this code serves {EXPORT_FORMAT}; "
                            "export again", file=self.dir / CARD_JSON)
        serving = self.card["serving"]
        self.max_len = int(self.card["model"]["max_len"])
        self.cosine = self.card["model"]["similarity"] == "cosine"
        input_column = serving.get("history_input_column", "vector")
        self.raw_inputs = input_column != "vector"
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
        # candidates [M, d], row order = item_idx order
        self.vectors = _vectors(items, "vector", items_path).to(self.device)
        # history lookup: servable rows first (0..M-1), then retired ones
        self.inputs = torch.cat([_vectors(items, input_column, items_path),
                                 _vectors(retired, input_column, retired_path)]).to(self.device)
        lookup_ids = self.item_ids + retired.column("item_id").to_pylist()
        self.row_of = {item_id: row for row, item_id in enumerate(lookup_ids)}
        by_title: dict[str, list[int]] = {}
        for row, title in enumerate(self.titles + retired.column("text").to_pylist()):
            by_title.setdefault(title, []).append(row)
        self.row_of_title = {title: rows[0] for title, rows in by_title.items() if len(rows) == 1}
        self.num_candidates = len(self.item_ids)
        self.text_items = self._text_items(parts)
        encoder_path = _verified_file(self.dir, self.card, serving.get("encoder_file", ENCODER_FILE))
        program = torch.export.load(str(encoder_path))
        if self.device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self.device)
        self.encoder = program.module()

    def _text_items(self, parts: list[tuple[Path, pa.Table]]) -> TextItems | None:
        section = self.card.get("text_items") or {}
        if not section.get("supported"):
            return None
        from safetensors.numpy import load_file

        tensors = load_file(str(_verified_file(self.dir, self.card, section["basis_file"])))
        cols = {c: torch.cat([_vectors(t, c, p) for p, t in parts]) for c in ("semantic", "id_part")}
        for path, table in parts:
            if "train_count" not in table.column_names:
                raise DataError("missing column", file=path, column="train_count")
        counts = torch.from_numpy(np.concatenate([t.column("train_count").to_numpy() for _, t in parts]))
        return TextItems(section, tensors, cols["semantic"], cols["id_part"], counts, device=str(self.device))

    def query(self, history: Sequence[str], k: int = 10, *, new_items: Sequence[dict] = (),
              exclude_history: bool = False) -> Query:
        """Resolve one request: ``history`` entries are item ids, else unique item texts (titles),
        else ids of ``new_items`` (text-only items, also candidates); other entries are dropped
        with a warning.

        Raises:
            ConfigError for an empty history, a bad ``k`` or text-only items the export cannot
            place; DataError when no entry of the history is known.
        """
        if isinstance(history, str):
            raise ConfigError("history: expected a list of item ids, got one string")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k={k!r}: must be an integer of at least 1")
        if not len(history):
            raise ConfigError("history: empty; the model needs at least one item the user interacted with")
        new_items = parse_new_items(new_items)
        taken = [n["id"] for n in new_items if n["id"] in self.row_of]
        if taken:
            raise ConfigError(f"new_items: id(s) {', '.join(map(repr, taken[:5]))} are already in the catalogue")
        if new_items and self.text_items is None:
            raise ConfigError(f"new_items: this export cannot place text-only items "
                              f"({(self.card.get('text_items') or {}).get('reason', 'an older export')})")
        new_col = {n["id"]: j for j, n in enumerate(new_items)}
        fused = self.text_items.fused_rows([n["text"] for n in new_items]).to(self.device) if new_items else \
            self.vectors.new_zeros(0, self.vectors.shape[1])
        new_vectors, new_inputs = serving_rows(fused, self.cosine, self.raw_inputs)
        rows, exclude, dropped = [], set(), []
        for h in map(str, history):
            row = self.row_of.get(h, self.row_of_title.get(h))
            if row is not None:
                rows.append(self.inputs[row])
                if exclude_history and row < self.num_candidates:
                    exclude.add(row)
            elif h in new_col:
                rows.append(new_inputs[new_col[h]])
            else:
                dropped.append(h)
        if dropped:
            shown = ", ".join(repr(u) for u in list(dict.fromkeys(dropped))[:20])
            if not rows:
                raise DataError(f"no known item in the history: {shown} (not in this model's catalogue, and no "
                                "text given for them as new items)", file=self.dir / ITEMS_FILE, column="item_id")
            _log.warning(f"history: left out {len(dropped)} unknown item(s) {shown} (not in this model's "
                         "catalogue; give their text as new items to use them)")
        in_history = {str(h) for h in history}
        return Query(torch.stack(rows[-self.max_len:]), sorted(exclude), new_vectors, [n["id"] for n in new_items],
                     [n["text"] for n in new_items], [exclude_history and n["id"] in in_history for n in new_items],
                     k, dropped)

    def user_vectors(self, queries: Sequence[Query]) -> torch.Tensor:
        """User vectors [B, d]: each history left-padded to ``max_len``, one encoder call."""
        x = self.inputs.new_zeros(len(queries), self.max_len, self.inputs.shape[1])
        valid = torch.zeros(len(queries), self.max_len, dtype=torch.bool, device=self.device)
        for i, q in enumerate(queries):
            x[i, self.max_len - len(q.inputs):] = q.inputs
            valid[i, self.max_len - len(q.inputs):] = True
        with torch.no_grad():
            return self.encoder(x, valid)

    def answer(self, queries: Sequence[Query]) -> list[list[dict]]:
        """The top items of each query, batched: dicts of rank (1-based), item_id, title (the item
        text), score, item_idx (None for a text-only item), new (a text-only item). Order: higher
        score, then catalogue items by item_idx, then text-only items in the order given."""
        from ..evaluate.metrics import full_ranking_topk

        if not queries:
            return []
        users = self.user_vectors(queries)
        k = min(max(q.k for q in queries), self.num_candidates)
        exclude = [torch.tensor(q.exclude, dtype=torch.long) for q in queries]
        scores, cols = full_ranking_topk(users, self.vectors, k, similarity="dot", exclude=exclude)
        out = []
        for i, q in enumerate(queries):
            ranked = [(s, 0, c) for s, c in zip(scores[i].tolist(), cols[i].tolist()) if s != float("-inf")]
            if len(q.new_ids):
                new_scores = (users[i:i + 1].double() @ q.new_vectors.double().T)[0].tolist()
                ranked += [(s, 1, j) for j, s in enumerate(new_scores) if not q.new_excluded[j]]
            ranked.sort(key=lambda r: (-r[0], r[1], r[2]))
            out.append([self._row(rank, s, new, c, q) for rank, (s, new, c) in enumerate(ranked[:q.k], 1)])
        return out

    def _row(self, rank: int, score: float, new: int, col: int, q: Query) -> dict:
        if new:
            return {"rank": rank, "item_id": q.new_ids[col], "title": q.new_titles[col], "score": float(score),
                    "item_idx": None, "new": True}
        return {"rank": rank, "item_id": self.item_ids[col], "title": self.titles[col], "score": float(score),
                "item_idx": int(self.item_idx[col]), "new": False}

    def recommend(self, history: Sequence[str], k: int = 10, *, exclude_history: bool = False,
                  new_items: Sequence[dict] = ()) -> list[dict]:
        """The top ``k`` items for one history (see :meth:`query` and :meth:`answer`). Fewer than
        ``k`` only when fewer items are left."""
        return self.answer([self.query(history, k, new_items=new_items, exclude_history=exclude_history)])[0]


def resolve_export(path: str | Path, method: str = "alphafuse", seed: int | None = None) -> Path:
    """An export folder from an export folder or a run directory; in a run directory the export
    ``export-<method>-s<seed>`` is written (or brought up to date) first."""
    path = Path(path)
    if (path / CARD_JSON).is_file():
        return path
    return export_run(path, method, seed)


def recommend(run_dir_or_export_dir: str | Path, history: Sequence[str], k: int = 10, *,
              method: str = "alphafuse", seed: int | None = None, exclude_history: bool = False,
              new_items: Sequence[dict] = ()) -> list[dict]:
    """Top-``k`` items for one user's history (time order, most recent last).

    Args:
        run_dir_or_export_dir: an export folder, or a run directory (its export of ``method`` /
            ``seed`` is created or refreshed first; ``seed=None``: the method's only model).
        history: source item ids (prepare's ``item_id``), item titles (the ``title`` returned) or
            ids of ``new_items``; longer than ``model.max_len``: the last ``max_len`` are used.
            Retired items may appear in it; they are never recommended. Unknown entries are left
            out with a warning.
        k: how many items.
        exclude_history: never recommend an item of the history (default False, as evaluation).
        new_items: text-only items ``[{"id", "text"}, ...]`` (alphafuse exports), candidates too.

    Returns:
        ``[{"rank", "item_id", "title", "score", "item_idx", "new"}, ...]``, best first.

    Raises:
        DataError when no history entry is known; ConfigError for an empty history, ``k < 1`` or
        malformed new items.
    """
    return Recommender(resolve_export(run_dir_or_export_dir, method, seed)).recommend(
        history, k, exclude_history=exclude_history, new_items=new_items)


def format_recommendations(rows: list[dict], title_width: int = 70) -> str:
    """A plain-text table: rank, item id, score, title."""
    id_width = max([len("item_id")] + [len(r["item_id"]) for r in rows])
    lines = [f"{'rank':>4}  {'item_id':<{id_width}}  {'score':>8}  title", "-" * (24 + id_width + title_width // 2)]
    for r in rows:
        title = r["title"] if len(r["title"]) <= title_width else r["title"][:title_width - 3] + "..."
        lines.append(f"{r['rank']:>4}  {r['item_id']:<{id_width}}  {r['score']:>8.4f}  {title}")
    return "\n".join(lines)
