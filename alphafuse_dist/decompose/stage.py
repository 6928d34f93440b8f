"""The decompose stage (docs/method.md section 2): embed/part-*.parquet (item_idx, vector[d_l]) ->
the covariance and all d_l eigenpairs (scipy.linalg.eigh; ``randomized``: the top model.dim and the
trace) -> null_rule ``count`` (d = model.dim, d_n = model.id_dims, not recorded here) or
``threshold`` (d = d_l, d_n = #S_k <= null_threshold, recorded in basis.json) -> basis.safetensors +
basis.json, semantic.safetensors (float32 [N, d], one Ray task per piece), spectrum.json + .png.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray
from safetensors.numpy import save_file
from scipy.linalg import eigh

from ..config import DecomposeConfig
from ..errors import ConfigError, DataError
from ..runtime.manifest import atomic_write_bytes, atomic_write_json, read_manifest
from ..runtime.plots import spectrum_png
from .basis import NullSpaceBasis
from .covariance import INDEX_COLUMN, covariance, iter_rows, pieces, randomized_eigh
from .drift import basis_drift, reliability, should_refit

_log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
SEMANTIC_FILE = "semantic.safetensors"
SEMANTIC_TENSOR = "semantic"
SPECTRUM_FILE = "spectrum.json"
SPECTRUM_PLOT = "spectrum.png"
DRIFT_FILE = "drift.json"
PREVIOUS_BASIS_DIR = "previous_basis"


@ray.remote(num_cpus=1)
def _transform_piece(piece, basis: NullSpaceBasis) -> tuple[np.ndarray, np.ndarray]:
    parts = [(idx, basis.transform(X)) for idx, X in iter_rows(piece, 16_384)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def semantic_table(files: list[str], basis: NullSpaceBasis, num_items: int) -> np.ndarray:
    """Every row transformed and placed at its item_idx: float32 [N, d]. A DataError names the file
    of an item_idx outside 0..N-1 or seen twice, or the embed folder when items are missing."""
    table, count = np.zeros((num_items, basis.dim), dtype=np.float32), np.zeros(num_items, dtype=np.int64)
    work = pieces(files)
    refs = [_transform_piece.remote(p, basis_ref) for basis_ref in [ray.put(basis)] for p in work]
    for (path, _), ref in zip(work, refs):
        idx, coords = ray.get(ref)
        outside = idx[(idx < 0) | (idx >= num_items)]
        if len(outside):
            raise DataError(f"item_idx {outside[0]} is outside 0..{num_items - 1} (prepare has {num_items} items)",
                            file=path, column=INDEX_COLUMN)
        np.add.at(count, idx, 1)
        if (count[idx] > 1).any():
            raise DataError(f"item_idx {idx[count[idx] > 1][0]} occurs more than once in the embeddings; each item "
                            "needs exactly one row", file=path, column=INDEX_COLUMN)
        table[idx] = coords
    if not count.all():
        raise DataError(f"{np.sum(count == 0)} items have no embedding (first item_idx {np.argmin(count)}); rerun "
                        "the embed stage", file=Path(files[0]).parent)
    return table


def _write(out_dir: Path, basis: NullSpaceBasis, files: list[str], num_items: int, extra: dict) -> dict:
    """Basis, semantic table, spectrum.json and .png; returns the manifest facts."""
    basis.save(out_dir)
    save_file({SEMANTIC_TENSOR: semantic_table(files, basis, num_items)}, str(out_dir / SEMANTIC_FILE))
    explained = basis.explained_variance()
    info = {"d_l": basis.d_l, "d": basis.dim, "d_null": basis.null_dims,
            "explained_variance_kept": float(explained[basis.dim - 1])}
    if basis.null_dims is not None:  # the threshold rule: the semantic part's width is known here
        info["explained_variance_semantic"] = float(explained[basis.semantic_dims - 1])
    atomic_write_json(out_dir / SPECTRUM_FILE, {
        **extra, "whiten": basis.whiten, "scale": basis.scale, "items": num_items,
        "total_variance": basis.total_variance, "eigenvalues": basis.eigenvalues.tolist(),
        "cumulative_explained_variance": explained.tolist(), **info})
    atomic_write_bytes(out_dir / SPECTRUM_PLOT, spectrum_png(
        basis.eigenvalues, basis.explained_variance(), semantic_dims=basis.semantic_dims, dim=basis.dim,
        null_dims=basis.null_dims, title=f"d_l={basis.d_l}, d={basis.dim}, d_n={basis.null_dims or 'model.id_dims'} "
                                         f"({'whitened' if basis.whiten else 'not whitened'})"))
    return info


def decompose(embed_dir: Path, cfg: DecomposeConfig, dim: int, num_items: int, out_dir: Path,
              weights: np.ndarray | None = None) -> dict:
    """Fit the basis on the embed folder's fragments and write ``basis.*``, ``semantic.safetensors``
    and the spectrum to ``out_dir``; ``dim`` = ``model.dim``, ``num_items`` = N (every item_idx
    0..N-1 embedded once), ``weights`` = popularity [N] (``decompose.weighted_mean`` /
    ``weighted_covariance``). Returns the
    manifest facts (``d_null`` is None under the count rule); ConfigErrors name the key to change."""
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    weighted = cfg.weighted_mean or cfg.weighted_covariance
    if weighted and (weights is None or not np.sum(weights) > 0):
        key = "weighted_mean" if cfg.weighted_mean else "weighted_covariance"
        raise ConfigError(f"decompose.{key}=true needs item popularities (prepare's items.parquet) with a "
                          "positive sum; every item has popularity 0 here")
    files = sorted(str(p) for p in embed_dir.glob(PART_GLOB))
    if not files:
        raise DataError(f"no {PART_GLOB} embedding fragments; run the embed stage first", file=embed_dir)
    t0 = time.time()
    reused = _reuse_basis(files, cfg, dim, num_items, out_dir) if cfg.reuse_basis else None
    if reused is not None and not reused["refit"]:
        return {"rows": {"items": num_items}, "reused_basis": reused["previous"], "refit": False,
                "new_items": reused["new_items"]}
    w = weights if weighted else None
    if cfg.method == "randomized":
        n, mean, values, vectors, total_variance = randomized_eigh(files, dim, cfg.oversample, cfg.power_iters,
                                                                   cfg.scale, w)
    else:
        n, mean, C = covariance(files, cfg.scale, w, weigh_scatter=cfg.weighted_covariance)
        (values, vectors), total_variance = eigh(C, check_finite=False), None
    if n != num_items:
        raise DataError(f"the embeddings have {n} rows but prepare has {num_items} items; rerun the embed stage",
                        file=embed_dir)
    null_dims = int(np.count_nonzero(values <= cfg.null_threshold)) if cfg.null_rule == "threshold" else None
    if null_dims is not None and dim != len(values):  # the model's width is fixed before this stage
        raise ConfigError(f"decompose.null_rule=threshold keeps all d_l={len(values)} directions: set model.dim="
                          f"{len(values)} (now {dim}); the rule gives d_n={null_dims} (set model.id_dims={null_dims})")
    basis = NullSpaceBasis.from_spectrum(mean, values, vectors, dim=dim, null_dims=null_dims, whiten=cfg.whiten,
                                         scale=cfg.scale, total_variance=total_variance)
    info = _write(out_dir, basis, files, num_items, {k: getattr(cfg, k) for k in (
        "method", "null_rule", "null_threshold", "weighted_mean", "weighted_covariance")})
    _log.info(f"[decompose] {num_items} items x d_l={basis.d_l} from {len(files)} fragments: {cfg.method}, "
              f"{time.time() - t0:.1f}s; the d={dim} kept directions explain "
              f"{info['explained_variance_kept']:.1%} of the variance" + (
                  f"; the items span only {basis.spanned_dims} of them, the other whitened coordinates are 0"
                  if basis.whiten and basis.spanned_dims < dim else ""))
    if reused is not None:
        info |= {"reused_basis": None, "refit": True}
    return {"rows": {"items": num_items}, **info}


def _reuse_basis(files: list[str], cfg: DecomposeConfig, dim: int, num_items: int, out_dir: Path) -> dict:
    """``decompose.reuse_basis``: measure drift on the items added since the previous run, write
    ``drift.json`` and return its facts. Without a refit (``decompose.refit_threshold``) also write the
    old basis's outputs; with one keep the old basis in ``previous_basis/`` (the warm start carries ID
    vectors from it): the caller fits a new basis."""
    prev = Path(cfg.reuse_basis).expanduser()
    old = NullSpaceBasis.load(prev)
    if old.dim != dim:
        raise ConfigError(f"decompose.reuse_basis={prev}: that basis has d={old.dim}; this run has model.dim={dim}")
    try:
        old_items = int(read_manifest(prev)["rows"]["items"])
    except (KeyError, TypeError, ValueError, OSError):
        raise DataError("decompose.reuse_basis: not a finished decompose stage (no manifest with rows.items)",
                        file=prev / "manifest.json") from None
    if old_items > num_items:
        raise DataError(f"decompose.reuse_basis: the previous run has {old_items} items, this one {num_items}; ids "
                        "must be stable (data.id_map = the previous run's prepare folder)", file=prev)
    # the items added since the previous run (stable ids append them after the old ones)
    new_rows = [X[idx >= old_items] for f in files for idx, X in iter_rows(f, 16_384)]
    added = np.concatenate(new_rows) if new_rows else np.zeros((0, old.d_l), np.float32)
    reliable, note = reliability(len(added), dim)
    facts: dict = {"previous": str(prev), "previous_items": old_items, "items": num_items,
                   "new_items": int(len(added)), "reliable": reliable, "reliability": note,
                   "refit_threshold": cfg.refit_threshold}
    refit, reason = False, f"{len(added)} new items: too few to measure drift"
    if len(added) >= 2:
        report = basis_drift(old, added)
        facts["drift"] = report.to_dict()
        refit, reason = (should_refit(report, cfg.refit_threshold) if cfg.refit_threshold is not None else
                         (False, "decompose.refit_threshold is not set: the basis is always reused"))
    facts |= {"refit": bool(refit), "reason": reason}
    atomic_write_json(out_dir / DRIFT_FILE, facts)
    if not reliable:
        _log.warning(f"[decompose] warning: drift.json: {note}")
    _log.info(f"[decompose] reuse basis of {prev}: {facts['new_items']} new items, "
              + (f"old basis explains {facts['drift']['explained_ratio_old_mean']:.1%} of their best d-dim share; "
                 if "drift" in facts else "") + ("REFIT: " if refit else "kept: ") + reason)
    if refit:
        old.save(out_dir / PREVIOUS_BASIS_DIR)
    else:
        _write(out_dir, old, files, num_items, {"reused_from": str(prev)})
    return facts
