"""What a training run reads: the stage folders it starts from and the tensors loaded from them.

Each method's item module reads some of ``semantic`` (decompose/semantic.safetensors, whitened PCA
coordinates [N, d]), ``language`` (the embed stage's vectors [N, d_l]) and ``basis`` (the decompose
stage's NullSpaceBasis): ``model.items.METHOD_INPUTS`` names them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.items import METHOD_INPUTS
from ..runtime.parquet import read_table


@dataclass
class TrainInputs:
    """Where a training run reads from (prepare, embed and decompose stage folders)."""

    prepare_dir: str
    semantic_path: str | None  # decompose/semantic.safetensors (methods needing "semantic")
    num_items: int
    language_path: str | None = None  # the embed stage folder, part-*.parquet (methods needing "language")
    basis_path: str | None = None  # the decompose stage folder, basis.safetensors/.json (whitenrec)


@dataclass
class ItemInputs:
    """The tensors an item module is built from; each is None unless the method reads it."""

    semantic: torch.Tensor | None = None  # float32 [N, d]
    language: torch.Tensor | None = None  # float32 [N, d_l], row i = item_idx i
    basis: object | None = None  # decompose.basis.NullSpaceBasis


def load_item_inputs(method: str, inputs: TrainInputs) -> ItemInputs:
    """Load what ``method`` reads (``METHOD_INPUTS[method]``) from the stage folders."""
    needs = METHOD_INPUTS[method]
    out = ItemInputs()
    if "semantic" in needs:
        from safetensors.torch import load_file

        out.semantic = load_file(inputs.semantic_path)["semantic"]
    if "language" in needs:
        out.language = torch.from_numpy(read_embeddings(Path(inputs.language_path), inputs.num_items))
    if "basis" in needs:
        from ..decompose.basis import NullSpaceBasis

        out.basis = NullSpaceBasis.load(Path(inputs.basis_path))
    return out


def read_embeddings(embed_dir: Path, num_items: int) -> np.ndarray:
    """The embed stage's language embeddings as float32 [N, d_l], row i = ``item_idx`` i.

    Reads every ``part-*.parquet`` fragment (``item_idx``, fixed-size list ``vector``), whatever
    the order of fragments and rows.

    Raises:
        DataError: naming the file when an item_idx is outside 0..N-1 or occurs twice, or naming
            the folder when fragments or items are missing.
    """
    from ..errors import DataError

    embed_dir = Path(embed_dir)
    files = sorted(embed_dir.glob("part-*.parquet"))
    if not files:
        raise DataError("no part-*.parquet embedding fragments; run the embed stage", file=embed_dir)
    table, seen = None, np.zeros(num_items, dtype=bool)
    for path in files:
        frag = read_table(path, columns=["item_idx", "vector"])
        vectors = frag.column("vector").combine_chunks()
        idx = frag.column("item_idx").to_numpy().astype(np.int64)
        X = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), vectors.type.list_size)
        if table is None:
            table = np.zeros((num_items, X.shape[1]), dtype=np.float32)
        if X.shape[1] != table.shape[1]:
            raise DataError(f"vectors have d_l={X.shape[1]}, {files[0].name} has {table.shape[1]}", file=path)
        bad = idx[(idx < 0) | (idx >= num_items)]
        if len(bad):
            raise DataError(f"item_idx {bad[0]} is outside 0..{num_items - 1}", file=path, column="item_idx")
        counts = np.bincount(idx, minlength=num_items)
        twice = np.flatnonzero((counts > 1) | (seen & (counts > 0)))
        if len(twice):
            raise DataError(f"item_idx {twice[0]} occurs more than once", file=path, column="item_idx")
        seen |= counts > 0
        table[idx] = X
    if not seen.all():
        raise DataError(f"{int((~seen).sum())} items have no embedding (first item_idx {np.flatnonzero(~seen)[0]}); "
                        "rerun the embed stage", file=embed_dir)
    return table
