"""The decompose stage: embed/part-*.parquet -> basis, frozen semantic table, spectrum.

Data flow (METHOD.md section 2, steps 1-6)::

    embed/part-*.parquet (item_idx, vector[d_l])
      -> distributed_covariance: one Ray task per fragment + tree reduce -> mu [d_l], C [d_l, d_l]
      -> NullSpaceBasis.fit (exact eigh)         -> decompose/basis.safetensors + basis.json
      -> one Ray task per fragment: transform     -> decompose/semantic.safetensors  float32 [N, d]
      -> decompose/spectrum.json

Example::

    info = decompose(Path("runs/q/embed"), DecomposeConfig(), dim=128, num_items=9742,
                     out_dir=Path("runs/q/decompose"))
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
from safetensors.numpy import save_file

from ..config import DecomposeConfig
from ..errors import DataError
from ..stages import atomic_write_json
from .basis import NullSpaceBasis
from .covariance import INDEX_COLUMN, distributed_covariance, iter_fragment

PART_GLOB = "part-*.parquet"
SEMANTIC_FILE = "semantic.safetensors"
SEMANTIC_TENSOR = "semantic"
SPECTRUM_FILE = "spectrum.json"


@ray.remote(num_cpus=1)
def _transform_fragment(path: str, basis: NullSpaceBasis) -> tuple[np.ndarray, np.ndarray]:
    """Semantic coordinates of one fragment: (item_idx int64 [n], float32 [n, d])."""
    parts = [(idx, basis.transform(X)) for idx, X in iter_fragment(path)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def semantic_table(files: list[str], basis: NullSpaceBasis, num_items: int) -> np.ndarray:
    """Transform every fragment in a Ray task and place row i at item_idx i.

    Results are consumed as they finish, so the driver holds the float32 [N, d] table plus at most
    the fragments already done but not yet copied.

    Raises:
        DataError: naming the file when an item_idx is outside 0..N-1 or appears twice, or naming
            the embed folder when items are missing.
    """
    table = np.zeros((num_items, basis.dim), dtype=np.float32)
    seen = np.zeros(num_items, dtype=bool)
    basis_ref = ray.put(basis)
    pending = {_transform_fragment.remote(f, basis_ref): f for f in files}
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        path = pending.pop(ref)
        idx, coords = ray.get(ref)
        outside = idx[(idx < 0) | (idx >= num_items)]
        if len(outside):
            raise DataError(f"item_idx {outside[0]} is outside 0..{num_items - 1} (prepare has {num_items} items)",
                            file=path, column=INDEX_COLUMN)
        counts = np.bincount(idx, minlength=num_items)
        twice = np.flatnonzero((counts > 1) | (seen & (counts > 0)))
        if len(twice):
            raise DataError(f"item_idx {twice[0]} occurs more than once in the embeddings; each item needs "
                            "exactly one row", file=path, column=INDEX_COLUMN)
        seen |= counts > 0
        table[idx] = coords
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise DataError(f"{len(missing)} items have no embedding (first item_idx {missing[0]}); rerun the embed "
                        "stage", file=Path(files[0]).parent)
    return table


def decompose(embed_dir: Path, cfg: DecomposeConfig, dim: int, num_items: int, out_dir: Path) -> dict:
    """Fit the null-space basis on all item embeddings and write the frozen semantic table.

    Args:
        embed_dir: the embed stage folder (``part-*.parquet`` with ``item_idx``, ``vector[d_l]``).
        cfg: the ``decompose`` config section (null_dims d_n, whiten, scale).
        dim: d, the model width (``model.dim``).
        num_items: N, from prepare's manifest; every item_idx 0..N-1 must be embedded once.
        out_dir: receives ``basis.safetensors``, ``basis.json``, ``semantic.safetensors``
            (``semantic: float32 [N, d]``) and ``spectrum.json``.

    Returns:
        ``{"rows": {"items": N}, "d_l": d_l, "explained_variance_semantic": share of the total
        variance in the d kept directions}`` for the stage manifest.
    """
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    files = sorted(str(p) for p in embed_dir.glob(PART_GLOB))
    if not files:
        raise DataError(f"no {PART_GLOB} embedding fragments; run the embed stage first", file=embed_dir)
    t0 = time.time()
    n, mean, cov = distributed_covariance(files, scale=cfg.scale)
    if n != num_items:
        raise DataError(f"the embeddings have {n} rows but prepare has {num_items} items; rerun the embed stage",
                        file=embed_dir)
    t_cov = time.time() - t0
    basis = NullSpaceBasis.fit(mean, cov, dim=dim, null_dims=cfg.null_dims, whiten=cfg.whiten, scale=cfg.scale)
    basis.save(out_dir)
    table = semantic_table(files, basis, num_items)
    save_file({SEMANTIC_TENSOR: table}, str(out_dir / SEMANTIC_FILE))

    explained = basis.explained_variance()
    info = {
        "explained_variance_semantic": float(explained[dim - 1]),
        "explained_variance_row_space": float(explained[basis.semantic_dims - 1]),
    }
    atomic_write_json(out_dir / SPECTRUM_FILE, {
        "d_l": basis.d_l, "d": dim, "d_null": cfg.null_dims, "d_semantic": basis.semantic_dims,
        "whiten": cfg.whiten, "scale": cfg.scale, "items": num_items,
        "eigenvalues": basis.eigenvalues.tolist(), "cumulative_explained_variance": explained.tolist(), **info,
    })
    print(f"[decompose] {num_items} items x d_l={basis.d_l} from {len(files)} fragments: covariance "
          f"{t_cov:.1f}s, total {time.time() - t0:.1f}s; the d={dim} kept directions explain "
          f"{info['explained_variance_semantic']:.1%} of the variance ({info['explained_variance_row_space']:.1%} "
          f"in the first d_s={basis.semantic_dims})", flush=True)
    return {"rows": {"items": num_items}, "d_l": basis.d_l, **info}
