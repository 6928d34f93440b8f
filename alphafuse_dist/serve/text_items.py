"""Text-only items: items the model never saw, placed from their text alone by AlphaFuse's frozen basis.

A text-only item gets the fused row an AlphaFuse item of that text would have:

    semantic = (scale * E - mean) @ P                      the frozen coordinates [d]
    id       = sum_{j in kNN} count_j * id_j / sum count_j  the cold-item rule (train/cold_items.py)
    fused    = [semantic[:d_s], semantic[d_s:] + id]        (model.injection "add")
             = [semantic[:d_s], id]                         (model.injection "cover")

``E`` is the text encoder's embedding (``embed.model`` with the run's ``embed.normalize`` and
``embed.max_seq_length``), ``mean`` / ``P`` / ``scale`` the decompose stage's basis
(``NullSpaceBasis.transform``), kNN the ``train.cold_neighbours`` trained items nearest by cosine of
the first d_s semantic coordinates, ``count`` their training interactions. Its serving vector is the
fused row, L2-normalised when ``model.similarity`` is cosine.

The export ships what this needs (:func:`export_text_items`): ``text_basis.safetensors`` (``mean``
[d_l], ``projection`` [d_l, d], float64), the columns ``semantic``, ``id_part`` and ``train_count`` of
both item files, and the model card's ``text_items`` section (encoder, scale, widths, rule).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from ..config import RunConfig
from ..data.sequences import item_counts
from ..decompose.basis import TENSORS_FILE, NullSpaceBasis
from ..errors import AlphaFuseError, DataError
from ..runtime.manifest import read_manifest
from ..train.cold_items import neighbour_id_parts

BASIS_FILE = "text_basis.safetensors"
# the export re-embeds a few catalogue texts with the shipped recipe: the largest relative distance
# allowed between their coordinates and the decompose stage's (another encoder gives ~1)
TEXT_CHECK_TOLERANCE = 0.05
TEXT_CHECK_ITEMS = 8


def semantic_coordinates(embeddings: np.ndarray, mean: np.ndarray, projection: np.ndarray,
                         scale: float) -> np.ndarray:
    """``(scale * E - mean) @ P`` in float64 -> float32 [n, d] (as ``NullSpaceBasis.transform``)."""
    return ((scale * np.asarray(embeddings, np.float64) - mean) @ projection).astype(np.float32)


def embed_texts(encoder, texts: list[str], normalize: bool) -> np.ndarray:
    """The text encoder's embeddings float32 [n, d_l] (as the embed stage computes them)."""
    return encoder.encode(list(texts), batch_size=max(1, len(texts)), convert_to_numpy=True,
                          normalize_embeddings=normalize, show_progress_bar=False)


def _unsupported(reason: str) -> tuple[dict, None, None]:
    return {"supported": False, "reason": reason}, None, None


def export_text_items(run_dir: Path, prep: Path, cfg: RunConfig, method: str,
                      table: torch.Tensor) -> tuple[dict, dict | None, dict | None]:
    """(the model card's ``text_items`` section, per-item columns ``semantic`` [N, d] /
    ``id_part`` [N, d_n] / ``train_count`` [N] in item_idx order, the basis tensors) of the trained
    fused ``table`` [N, d]; (section saying why not, None, None) when the model cannot place
    text-only items (another method, no decompose basis, no trained item).

    Raises:
        DataError when the decompose stage does not hold the train stage's frozen coordinates;
        AlphaFuseError when the shipped text recipe does not reproduce them (another encoder).
    """
    from ..decompose.stage import SEMANTIC_FILE, SEMANTIC_TENSOR  # imports ray: the export side only

    if method != "alphafuse":
        return _unsupported(f"method {method}: only alphafuse places items by their text through a frozen basis")
    folder = Path(run_dir) / "decompose"
    if read_manifest(folder) is None or not (folder / TENSORS_FILE).is_file():
        return _unsupported(f"no finished decompose stage with {TENSORS_FILE} in {folder}")
    m = cfg.model
    basis = NullSpaceBasis.load(folder).with_id_dims(m.id_dims, where=str(folder))
    semantic = load_file(str(folder / SEMANTIC_FILE))[SEMANTIC_TENSOR]
    N, d = table.shape
    d_s = d - m.id_dims
    if semantic.shape != (N, d) or basis.dim != d or not np.allclose(table[:, :d_s].numpy(), semantic[:, :d_s],
                                                                      atol=1e-5):
        raise DataError("the semantic table does not hold the train stage's frozen coordinates (another "
                        "decompose run); rerun the train stage", file=folder / SEMANTIC_FILE)
    counts = item_counts(Path(prep) / "train.parquet", N)
    if not counts.any():
        return _unsupported("no item has a training interaction: the cold-item rule has no neighbours")
    ids = table[:, d_s:].numpy() - (semantic[:, d_s:] if m.injection == "add" else 0.0)
    tensors = {"mean": basis.mean, "projection": np.ascontiguousarray(basis.projection)}
    section = {"supported": True, "basis_file": BASIS_FILE,
               "encoder": {"model": cfg.embed.model, "normalize": cfg.embed.normalize,
                           "max_seq_length": cfg.embed.max_seq_length, "d_l": basis.d_l},
               "scale": basis.scale, "semantic_dims": d_s, "id_dims": m.id_dims, "injection": m.injection,
               "neighbours": cfg.train.cold_neighbours,
               "rule": "semantic = (scale * encoder(text) - mean) @ projection; id_part = train_count-weighted mean "
                       "id_part of the `neighbours` items with train_count > 0 nearest by cosine of semantic[:"
                       "semantic_dims]; fused = [semantic[:semantic_dims], semantic[semantic_dims:] + id_part] "
                       "(injection add) or [semantic[:semantic_dims], id_part] (cover); vector = fused, "
                       "L2-normalised when similarity is cosine"}
    section["self_check_max_relative_error"] = _check_text_recipe(section, tensors, semantic, prep)
    columns = {"semantic": semantic, "id_part": np.ascontiguousarray(ids, np.float32), "train_count": counts}
    return section, columns, tensors


def _check_text_recipe(section: dict, tensors: dict, semantic: np.ndarray, prep: Path) -> float:
    """Largest relative distance between a few catalogue items' coordinates re-derived from their
    text by the shipped recipe and the decompose stage's."""
    from ..embed.encoder import load_encoder
    from ..runtime.parquet import read_table

    texts = read_table(Path(prep) / "items.parquet", columns=["text"]).column("text").to_pylist()
    rows = np.unique(np.linspace(0, len(texts) - 1, min(TEXT_CHECK_ITEMS, len(texts))).astype(int))
    enc = section["encoder"]
    encoder = load_encoder(enc["model"], "cpu", enc["max_seq_length"])
    got = semantic_coordinates(embed_texts(encoder, [texts[i] for i in rows], enc["normalize"]), tensors["mean"],
                               tensors["projection"], section["scale"])
    want = semantic[rows]
    error = float(np.max(np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-12)))
    if not error <= TEXT_CHECK_TOLERANCE:
        raise AlphaFuseError(f"embed.model={enc['model']!r} re-embeds the catalogue's texts {error:.2g} away "
                             f"(relative) from the decompose stage's coordinates (> {TEXT_CHECK_TOLERANCE:g}): "
                             "not the encoder the run embedded with; not exported")
    return error


class TextItems:
    """The serving side: fused rows of text-only items.

    Args:
        section: the model card's ``text_items`` section.
        tensors: ``mean`` and ``projection`` of the verified basis file.
        semantic / id_part / train_count: every exported item's columns (servable and retired).
        device: where the text encoder runs.
    """

    def __init__(self, section: dict, tensors: dict, semantic: torch.Tensor, id_part: torch.Tensor,
                 train_count: torch.Tensor, device: str = "cpu"):
        self.section, self.device = section, device
        self.mean, self.projection = tensors["mean"], tensors["projection"]
        self.d_s, self.add = int(section["semantic_dims"]), section["injection"] == "add"
        warm = train_count > 0
        self.keys, self.ids, self.counts = semantic[warm, :self.d_s], id_part[warm], train_count[warm]
        self._encoder = None

    @property
    def encoder(self):
        """The text encoder, loaded on first use (offline: ``embed.encoder.load_encoder``)."""
        if self._encoder is None:
            from ..embed.encoder import load_encoder

            enc = self.section["encoder"]
            self._encoder = load_encoder(enc["model"], self.device, enc["max_seq_length"])
        return self._encoder

    def fused_rows(self, texts: list[str]) -> torch.Tensor:
        """Fused rows float32 [n, d] of ``texts`` (module docstring)."""
        E = embed_texts(self.encoder, texts, self.section["encoder"]["normalize"])
        sem = torch.from_numpy(semantic_coordinates(E, self.mean, self.projection, float(self.section["scale"])))
        ids = neighbour_id_parts(sem[:, :self.d_s], self.keys, self.ids, self.counts, int(self.section["neighbours"]))
        return torch.cat([sem[:, :self.d_s], sem[:, self.d_s:] + ids if self.add else ids], dim=1)


def serving_rows(fused: torch.Tensor, cosine: bool, raw_inputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate vectors, encoder input rows) of fused rows, as the export writes ``vector`` and the
    history input column."""
    vectors = F.normalize(fused.double(), dim=1).float() if cosine else fused
    return vectors, (fused if raw_inputs else vectors)
