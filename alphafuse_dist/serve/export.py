"""Export a trained model for serving: item vectors (Parquet), the user encoder (``torch.export``), a model card.

``export_run`` reads a train stage ``<run_dir>/train-<method>-s<seed>/`` (``model.safetensors``,
``config.json``, ``history.json``) and prepare's ``items.parquet``, and writes an export folder,
by default ``<run_dir>/export-<method>-s<seed>/``:

- ``items.parquet``: the servable (not retired) items, sorted by ``item_idx``:
  ``item_idx:int32``, ``item_id:string`` (the source's id), ``text:string`` (prepare's rendered
  item text, used as the title), ``vector:fixed_size_list<float32>[d]`` (the fused item table
  row, L2-normalised when ``model.similarity`` is ``cosine``). The serving score of a user and an
  item is ``dot(user_vector, vector)``, for either similarity. For text-only items (alphafuse)
  also ``semantic``, ``id_part`` and ``train_count`` (see ``text_items.py``).
- ``retired_items.parquet``: the retired items, same columns. They are never candidates, but a
  user's history may still hold them, so their vectors are kept as encoder inputs.
- ``user_encoder.pt2``: a ``torch.export`` program (``torch.export.load`` alone loads it, no
  alphafuse_dist import). ``forward(history_vectors, valid) -> user_vectors``: ``history_vectors``
  float32 [B, L, d], L = ``model.max_len``, holds the ``vector`` rows (from either Parquet file)
  of each user's last L items in time order, LEFT-padded (the most recent item at position L-1);
  ``valid`` bool [B, L] is True at real items (the last ``n`` positions of a row with ``n``
  items). Padded positions are zeroed inside. B is dynamic. Returns float32 [B, d] user vectors
  (L2-normalised when cosine).
- ``text_basis.safetensors`` (alphafuse): what places text-only items (``text_items.py``).
- ``model_card.json`` / ``model_card.md``: method, seed, config, data window, test metrics, basis
  facts, best epoch, code version, item counts, the serving contract above and the sha256 of
  every file (checked before anything is loaded).
- ``manifest.json``: as every stage (``alphafuse_dist/runtime/manifest.py``): the folder is written into a
  hidden temporary folder first and renamed into place only when complete, so a failed export
  leaves the previous one untouched; a rerun with the same inputs is skipped.

Why the ``vector`` rows are valid encoder inputs even though the encoder was trained on the raw
(unnormalised) fused rows: with cosine similarity every backbone rescales each input row to unit
RMS first (``normalize_inputs``, see ``model/backbones.py``), so a row's norm never reaches the
encoder and the normalised row gives the same user state. With dot similarity the rows are
exported unnormalised. Should an encoder ever take cosine-scored rows without rescaling them,
the raw rows are exported as an extra ``input_vector`` column and the model card names it
(``serving.history_input_column``).

Example::

    out = export_run("runs/quickstart", method="alphafuse")  # -> runs/quickstart/export-alphafuse-s22
    encoder = torch.export.load(str(out / "user_encoder.pt2")).module()
    users = encoder(history_vectors, valid)                # [B, d]; scores = users @ vectors.T
"""
from __future__ import annotations

import json
import logging
import platform
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import nn

from .. import __version__
from ..config import RunConfig, config_from_dict, section_hash
from ..errors import AlphaFuseError, ConfigError, DataError
from ..model.items import METHOD_INPUTS
from ..runtime.manifest import file_sha256, read_manifest, require_stage, run_dir_lock, run_stage, up_to_date
from ..runtime.parquet import open_file, read_table, write_table
from .text_items import BASIS_FILE, export_text_items, serving_rows

EXPORT_FORMAT = 2
ITEMS_FILE = "items.parquet"
RETIRED_FILE = "retired_items.parquet"
ENCODER_FILE = "user_encoder.pt2"
# the exported program's batch dimension accepts 1 .. MAX_BATCH users
MAX_BATCH = 65_536
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
# the export's own check: largest |score difference| allowed between the exported encoder +
# vectors and the library path (user_states_from_table + the similarity rule)
SELF_CHECK_TOLERANCE = 1e-5

_log = logging.getLogger(__name__)


def export_stage_name(method: str, seed: int) -> str:
    return f"export-{method}-s{seed}"


def find_train_stage(run_dir: str | Path, method: str = "alphafuse", seed: int | None = None) -> tuple[Path, int]:
    """(folder, seed) of the finished train stage ``train-<method>-s<seed>`` in ``run_dir``.

    With ``seed=None`` the method must have exactly one finished train stage; otherwise the error
    lists the seeds to choose from.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AlphaFuseError(f"run {run_dir}: no such directory")
    pattern = re.compile(rf"train-{re.escape(method)}-s(-?\d+)")
    found = {int(m.group(1)): p for p in run_dir.iterdir()
             if (m := pattern.fullmatch(p.name)) and read_manifest(p) is not None}
    if seed is not None:
        if seed in found:
            return found[seed], seed
    elif len(found) == 1:
        return next(iter(found.items()))[::-1]
    elif len(found) > 1:
        raise ConfigError(f"run {run_dir}: method {method} has models for seeds "
                          f"{', '.join(map(str, sorted(found)))}; pick one with --seed")
    trained = sorted(p.name for p in run_dir.glob("train-*-s*") if read_manifest(p) is not None)
    wanted = f"train-{method}-s{seed}" if seed is not None else f"train-{method}-s<seed>"
    raise AlphaFuseError(f"run {run_dir}: no finished train stage {wanted} (finished: "
                         f"{', '.join(trained) or 'none'}); train it first (alphafuse run ... method={method})")


class ServingEncoder(nn.Module):
    """The exported user encoder: a trained sequence encoder's ``user_state`` rule behind a fixed
    serving contract (see the module docstring), exported with ``torch.export``."""

    def __init__(self, encoder: nn.Module, normalize_output: bool):
        super().__init__()
        self.encoder, self.normalize_output = encoder, normalize_output

    def forward(self, history_vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = history_vectors * valid.unsqueeze(-1).to(history_vectors.dtype)  # pads carry zero vectors
        user = self.encoder.user_state(x, valid)
        return F.normalize(user, dim=-1) if self.normalize_output else user


def export_program(module: nn.Module, max_len: int, dim: int, path: Path) -> None:
    """``torch.export`` ``module`` (inputs [B, max_len, dim] float32 and [B, max_len] bool, B dynamic)
    and save it to ``path``."""
    import warnings

    example = (torch.zeros(2, max_len, dim), torch.ones(2, max_len, dtype=torch.bool))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():  # nn.GRU re-assigns its flat weights while traced: harmless
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        program = torch.export.export(module, example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(path))


def export_run(run_dir: str | Path, method: str = "alphafuse", seed: int | None = None,
               out_dir: str | Path | None = None, *, force: bool = False, serve_retired: bool = False) -> Path:
    """Export the model ``train-<method>-s<seed>`` of ``run_dir`` for serving; returns the folder.

    Args:
        run_dir: the run directory (holds ``prepare/`` and the train stage).
        method: the trained method.
        seed: the trained seed; None: the method's only finished train stage.
        out_dir: where to write (default ``<run_dir>/export-<method>-s<seed>``); it is replaced
            only once the new export is complete.
        force: export again even when the existing export's manifest matches its inputs.
        serve_retired: also serve the items that left the catalogue (prepare's ``retired``);
            by default they are kept as history inputs only (``retired_items.parquet``).

    Raises:
        AlphaFuseError / ConfigError / DataError naming the stage, file or column at fault.
    """
    run_dir = Path(run_dir)
    train_dir, seed = find_train_stage(run_dir, method, seed)
    require_stage(run_dir, train_dir.name)  # its files as trained
    prep = require_stage(run_dir, "prepare")
    out = Path(out_dir) if out_dir is not None else run_dir / export_stage_name(method, seed)
    inputs = {"train": read_manifest(train_dir)["digest"], "prepare": read_manifest(prep)["digest"]}
    for name in ("decompose", f"evaluate-{method}-s{seed}"):  # the model card's and text items' inputs
        manifest = read_manifest(run_dir / name)
        if manifest is not None:
            inputs[name] = manifest.get("digest")
    config_hash = section_hash("export", EXPORT_FORMAT, method, seed, *(["serve_retired"] if serve_retired else []))
    if not force and up_to_date(out, config_hash=config_hash, inputs=inputs, kind="export"):
        # nothing to write: no lock, so a current export is served while a pipeline runs or from a
        # read-only run directory
        _log.info(f"[{out.name}] up to date (manifest {out / 'manifest.json'}), skipped")
        return out
    with run_dir_lock(run_dir):  # no pipeline may rewrite the train stage while it is exported
        return run_stage(out.parent, out.name, config_hash=config_hash, inputs=inputs,
                         build=lambda tmp: _build(run_dir, train_dir, prep, tmp, method, seed, serve_retired),
                         force=force, kind="export")


def load_train_config(train_dir: Path) -> RunConfig:
    """The RunConfig a train stage was trained with (its ``config.json``)."""
    path = Path(train_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("missing: the train stage is incomplete or from an older version", file=path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e})", file=path) from None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _load_model(model_path: Path, cfg: RunConfig) -> tuple[torch.Tensor, nn.Module]:
    from ..evaluate.stage import load_model

    if not model_path.is_file():
        raise DataError("missing: the train stage is incomplete", file=model_path)
    try:
        table, encoder = load_model(model_path, cfg)
    except KeyError as e:
        raise DataError(f"no tensor {e} (expected item_table and encoder.*)", file=model_path) from None
    except RuntimeError as e:  # state dict keys / shapes against config.json's model section
        raise DataError(f"the encoder weights do not fit model.backbone={cfg.model.backbone}, "
                        f"model.dim={cfg.model.dim} of config.json: {str(e).splitlines()[0]}",
                        file=model_path) from None
    table = table.to(torch.float32)
    if table.dim() != 2 or table.shape[1] != cfg.model.dim:
        raise DataError(f"item_table has shape {list(table.shape)}, expected [N, {cfg.model.dim}] (model.dim)",
                        file=model_path, column="item_table")
    bad = (~torch.isfinite(table).all(1)).nonzero().squeeze(1)
    if len(bad):
        raise DataError(f"rows {bad[:5].tolist()} contain NaN or infinite values", file=model_path,
                        column="item_table")
    return table, encoder


def read_items(prepare_dir: Path, num_items: int) -> pa.Table:
    """prepare's items (item_idx, item_id, text, retired) checked against a table of ``num_items`` rows.
    Runs prepared before retirement existed have no ``retired`` column: nothing is retired there."""
    path = Path(prepare_dir) / "items.parquet"
    names = open_file(path).schema_arrow.names
    for col in ("item_idx", "item_id", "text"):
        if col not in names:
            raise DataError("missing column", file=path, column=col)
    items = read_table(path, columns=[c for c in ("item_idx", "item_id", "text", "retired") if c in names])
    if "retired" not in names:
        items = items.append_column("retired", pa.array(np.zeros(items.num_rows, dtype=bool)))
    idx = items.column("item_idx").to_numpy()
    if items.num_rows != num_items or not np.array_equal(idx, np.arange(num_items)):
        raise DataError(f"{items.num_rows} items (item_idx must be 0..N-1 in order), but the model's "
                        f"item_table has N={num_items} rows: the train stage is from another prepare",
                        file=path, column="item_idx")
    return items


def _vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1)),
                                             vectors.shape[1])


def _write_items(path: Path, items: pa.Table, rows: np.ndarray, vectors: np.ndarray,
                 inputs: np.ndarray | None, text_columns: dict | None) -> None:
    cols = {"item_idx": items.column("item_idx").take(rows).cast(pa.int32()),
            "item_id": items.column("item_id").take(rows).cast(pa.string()),
            "text": items.column("text").take(rows).cast(pa.string()),
            "vector": _vector_column(vectors[rows])}
    if inputs is not None:
        cols["input_vector"] = _vector_column(inputs[rows])
    if text_columns is not None:
        cols["semantic"] = _vector_column(text_columns["semantic"][rows])
        cols["id_part"] = _vector_column(text_columns["id_part"][rows])
        cols["train_count"] = pa.array(text_columns["train_count"][rows], pa.int64())
    write_table(pa.table(cols), path, compression="zstd")


def _self_check(program: nn.Module, encoder: nn.Module, table: torch.Tensor, inputs: torch.Tensor,
                vectors: torch.Tensor, cfg: RunConfig) -> float:
    """Largest |score difference| over all items between the exported path (the loaded program on
    exported input rows, dot with exported vectors) and the library path, on fixed histories of
    length 1 .. max_len + 2 (longer ones cut to their last max_len items, as the contract says)."""
    from ..model.sasrec import user_states_from_table
    from ..runtime.seeding import seeded_generator

    N, L = table.shape[0], cfg.model.max_len
    g = seeded_generator(0)
    lengths = sorted({1, 2, max(1, L // 2), L, L + 2})
    hists = [torch.randint(0, N, (n,), generator=g)[-L:] for n in lengths]
    seqs = torch.full((len(hists), L), N, dtype=torch.long)
    x = torch.zeros(len(hists), L, table.shape[1])
    valid = torch.zeros(len(hists), L, dtype=torch.bool)
    for i, h in enumerate(hists):
        seqs[i, L - len(h):] = h
        x[i, L - len(h):] = inputs[h]
        valid[i, L - len(h):] = True
    with torch.no_grad():
        states, rows = user_states_from_table(encoder, table, seqs).double(), table.double()
        if cfg.model.similarity == "cosine":
            states, rows = F.normalize(states, dim=1), F.normalize(rows, dim=1)
        library = states @ rows.T
        batched = program(x, valid).double() @ vectors.double().T
        single = program(x[:1], valid[:1]).double() @ vectors.double().T  # a batch of one
    return float(max((library - batched).abs().max(), (library[:1] - single).abs().max()))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _data_window(prep: Path) -> dict:
    manifest = read_manifest(prep) or {}
    stats = _read_json(prep / "stats.json") or {}
    split = stats.get("split") or {}
    window = {"source": stats.get("source", manifest.get("source")), "files": stats.get("files"),
              "rows": manifest.get("rows"), "split": split or None, "id_map": stats.get("id_map"),
              "prepared_at": manifest.get("finished_at")}
    if split.get("kind") == "time" and "t1" in split and "t2" in split:
        t1, t2 = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(split[k])) for k in ("t1", "t2"))
        window["time_range"] = {"train": f"before {t1}", "valid": f"{t1} .. {t2}", "test": f"from {t2}"}
    else:
        window["time_range"] = None  # prepare records times only for the time split
    return window


def _basis_facts(run_dir: Path, method: str, cfg: RunConfig) -> dict | None:
    if not METHOD_INPUTS.get(method, frozenset()) & {"semantic", "basis"}:
        return None  # the method does not use the decomposition
    folder = run_dir / "decompose"
    if read_manifest(folder) is None:
        return None
    basis = _read_json(folder / "basis.json") or {}
    spectrum = _read_json(folder / "spectrum.json") or {}
    facts = {k: basis.get(k, spectrum.get(k)) for k in ("d", "d_l", "whiten", "scale", "items")}
    facts["d_null"] = basis.get("d_null") or (cfg.model.id_dims if method == "alphafuse" else None)
    d, d_null = facts["d"], facts["d_null"]
    facts["d_semantic"] = d - d_null if d is not None and d_null is not None else None
    explained = spectrum.get("cumulative_explained_variance") or []
    if d is not None and len(explained) >= d:
        facts["explained_variance_kept"] = explained[d - 1]  # all d kept directions
        if facts["d_semantic"]:
            facts["explained_variance_semantic"] = explained[facts["d_semantic"] - 1]  # the frozen part's
    return facts


def _metrics(run_dir: Path, method: str, seed: int) -> dict | None:
    folder = run_dir / f"evaluate-{method}-s{seed}"
    if read_manifest(folder) is None:
        return None
    m = _read_json(folder / "metrics.json")
    if m is None:
        return None
    return {k: m.get(k) for k in ("split", "protocol", "sampled_negatives", "history_masked", "data_split",
                                  "similarity", "items", "groups", "metrics")}


def _build(run_dir: Path, train_dir: Path, prep: Path, tmp: Path, method: str, seed: int,
           serve_retired: bool = False) -> dict:
    t0 = time.time()
    cfg = load_train_config(train_dir)
    table, encoder = _load_model(train_dir / "model.safetensors", cfg)
    N, d = table.shape
    items = read_items(prep, N)
    cosine = cfg.model.similarity == "cosine"
    # the encoder's inputs: the exported vectors, unless the encoder sees cosine rows' norms
    raw_inputs = cosine and not getattr(encoder, "normalize_inputs", True)
    vectors, inputs = serving_rows(table, cosine, raw_inputs)
    retired = items.column("retired").to_numpy(zero_copy_only=False).astype(bool)
    if serve_retired:
        retired = np.zeros_like(retired)
    servable_rows, retired_rows = np.flatnonzero(~retired), np.flatnonzero(retired)
    if not len(servable_rows):
        raise DataError("every item is retired: nothing to serve", file=prep / "items.parquet", column="retired")
    text_items, text_columns, basis_tensors = export_text_items(run_dir, prep, cfg, method, table)
    if basis_tensors is not None:
        save_file(basis_tensors, str(tmp / BASIS_FILE))
    np_vectors, np_inputs = vectors.numpy(), (table.numpy() if raw_inputs else None)
    _write_items(tmp / ITEMS_FILE, items, servable_rows, np_vectors, np_inputs, text_columns)
    _write_items(tmp / RETIRED_FILE, items, retired_rows, np_vectors, np_inputs, text_columns)

    export_program(ServingEncoder(encoder, normalize_output=cosine).eval(), cfg.model.max_len, d, tmp / ENCODER_FILE)
    error = _self_check(torch.export.load(str(tmp / ENCODER_FILE)).module(), encoder, table, inputs, vectors, cfg)
    if not error <= SELF_CHECK_TOLERANCE:
        raise AlphaFuseError(f"export of {train_dir.name}: the exported encoder's scores differ from the "
                             f"library's by {error:.2e} (> {SELF_CHECK_TOLERANCE:g}); not exported")

    history = _read_json(train_dir / "history.json") or {}
    card = {
        "format_version": EXPORT_FORMAT,
        "method": method, "seed": seed,
        "model": {"backbone": cfg.model.backbone, "dim": d, "max_len": cfg.model.max_len,
                  "similarity": cfg.model.similarity, "items": int(N)},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "source": {"run_dir": str(run_dir.resolve()), "train_stage": train_dir.name,
                   "train_digest": read_manifest(train_dir)["digest"],
                   "prepare_digest": read_manifest(prep)["digest"]},
        "data_window": _data_window(prep),
        "training": {"best_epoch": history.get("best_epoch"), "best_val_ndcg10": history.get("best_val_ndcg10"),
                     "epochs_run": len(history.get("epochs", [])) or None},
        "test_metrics": _metrics(run_dir, method, seed),
        "basis": _basis_facts(run_dir, method, cfg),
        "items": {"exported": len(servable_rows), "retired": len(retired_rows), "total": int(N)},
        "serving": {
            "items_file": ITEMS_FILE, "retired_items_file": RETIRED_FILE, "encoder_file": ENCODER_FILE,
            "history_input_column": "input_vector" if raw_inputs else "vector",
            "encoder_format": "torch.export ExportedProgram (torch.export.load(path).module()), batch "
                              f"dimension dynamic (1..{MAX_BATCH})",
            "encoder_inputs": "history_vectors float32 [B, L, d], L = max_len: the history_input_column rows "
                              "(items_file or retired_items_file) of the user's last L items in time order, "
                              "left-padded (most recent at L-1); valid bool [B, L]: True at real items.",
            "encoder_output": "user vectors float32 [B, d]" + (" (L2-normalised)" if cosine else ""),
            "score": "dot(user_vector, vector)" + (": cosine similarity, vectors are L2-normalised" if cosine
                                                   else ": dot product of the raw fused rows"),
            "ties": "equal scores: the smaller item_idx first",
            "history_masked": False,
            "self_check_max_abs_score_error": error,
        },
        "text_items": text_items,
        "config": cfg.to_dict(),
    }
    card["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_model_card(tmp, card)
    _log.info(f"[export] {method} seed {seed}: {len(servable_rows)} items ({len(retired_rows)} retired left out), "
        f"encoder self-check {error:.1e}, text-only items "
              f"{'supported' if text_items['supported'] else 'not supported: ' + text_items['reason']}, "
              f"{time.time() - t0:.1f}s")
    return {"rows": {"items": len(servable_rows), "retired": len(retired_rows)},
            "method": method, "seed": seed}


def _write_model_card(folder: Path, card: dict) -> None:
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    (folder / CARD_MD).write_text(render_model_card(card))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def render_model_card(card: dict) -> str:
    """The model card as Markdown."""
    m, s, items = card["model"], card["serving"], card["items"]
    w, t = card["data_window"], card["training"]
    src = card["source"]
    lines = [f"# Model card: {card['method']} (seed {card['seed']})", "",
             (f"Exported {card['created_at']} by alphafuse-dist {card['code_version']} (torch "
              f"{card['torch_version']}) from `{src['run_dir']}/{src['train_stage']}`."), "",
             "## Model", "",
             (f"- backbone `{m['backbone']}`, d = {m['dim']}, history length L = {m['max_len']}, "
              f"similarity `{m['similarity']}`"),
             (f"- best epoch {_fmt(t['best_epoch'])} of {_fmt(t['epochs_run'])} (validation NDCG@10 "
              f"{_fmt(t['best_val_ndcg10'])})"),
             f"- items: {items['exported']} exported, {items['retired']} retired (not served), {items['total']} in all",
             "", "## Data window", "",
             f"- source: {_fmt(w['source'])}",
             f"- rows: {_fmt(w['rows'])}",
             f"- split: {_fmt(w['split'])}",
             f"- time range: {_fmt(w['time_range'])}" + ("" if w["time_range"] else " (not recorded by prepare)"),
             f"- prepared at: {_fmt(w['prepared_at'])}", ""]
    basis = card.get("basis")
    lines += ["## Basis", ""]
    if basis:
        lines += [(f"- d = {_fmt(basis.get('d'))}, d_semantic = {_fmt(basis.get('d_semantic'))}, "
                   f"d_null = {_fmt(basis.get('d_null'))}, d_l = {_fmt(basis.get('d_l'))}, "
                   f"whiten = {_fmt(basis.get('whiten'))}, scale = {_fmt(basis.get('scale'))}"),
                  (f"- explained variance: the d kept directions {_fmt(basis.get('explained_variance_kept'))}, "
                   f"the first d_semantic (the frozen semantic part) "
                   f"{_fmt(basis.get('explained_variance_semantic'))}")]
    else:
        lines += ["- none (the method does not use the decomposition, or no decompose stage)"]
    lines += ["", "## Test metrics", ""]
    metrics = card.get("test_metrics")
    if metrics and metrics.get("metrics"):
        lines += [(f"Protocol {_fmt(metrics.get('protocol'))}, split {_fmt(metrics.get('data_split'))}, "
                   f"history masked: {_fmt(metrics.get('history_masked'))}."), ""]
        overall = metrics["metrics"].get("overall", {})
        keys = [k for k in overall if k != "users"]
        lines += ["| group | " + " | ".join(keys) + " | users |", "|---" * (len(keys) + 2) + "|"]
        for group, vals in metrics["metrics"].items():
            lines.append(f"| {group} | " + " | ".join(_fmt(vals.get(k)) for k in keys) + f" | {vals.get('users')} |")
    else:
        lines += ["- none: no evaluate stage for this method and seed"]
    lines += ["", "## Serving", "",
              (f"- `{s['items_file']}`: item_idx, item_id, text, vector (servable items); "
               f"`{s['retired_items_file']}`: the retired items (history inputs only, never recommended)"),
              (f"- `{s['encoder_file']}` ({s['encoder_format']}): {s['encoder_inputs']} "
               f"History rows come from the `{s['history_input_column']}` column. Output: {s['encoder_output']}."),
              f"- score = {s['score']}; {s['ties']}",
              f"- self-check against the library: max |score error| {s['self_check_max_abs_score_error']:.2e}", ""]
    text = card["text_items"]
    lines += ["## Text-only items", ""]
    if text["supported"]:
        enc = text["encoder"]
        lines += [(f"- encoder `{enc['model']}` (normalize {enc['normalize']}, max_seq_length "
                   f"{_fmt(enc['max_seq_length'])}), basis `{text['basis_file']}`, d_semantic "
                   f"{text['semantic_dims']}, id_dims {text['id_dims']}, {text['neighbours']} neighbours"),
                  f"- rule: {text['rule']}",
                  (f"- self-check: catalogue texts re-embedded land within {text['self_check_max_relative_error']:.1e} "
                   "(relative) of their frozen coordinates"), ""]
    else:
        lines += [f"- not supported: {text['reason']}", ""]
    return "\n".join(lines)
