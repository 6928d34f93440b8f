"""The decompose stage: embed/part-*.parquet -> basis, frozen semantic table, spectrum.

Data flow (docs/method.md section 2)::

    embed/part-*.parquet (item_idx, vector[d_l])
      -> "exact": covariance (one Ray task per piece, float64 grams added in piece order)
                  -> scipy.linalg.eigh: all d_l eigenpairs
         "randomized": randomized_eigh -> the top model.dim eigenpairs and the trace of C
      -> null_rule "count": d = model.dim, d_n = model.id_dims (not recorded by this stage)
                   "threshold": d = d_l, d_n = #S_k <= null_threshold, recorded in basis.json
      -> decompose/basis.safetensors + basis.json
      -> semantic table (one Ray task per piece)        -> decompose/semantic.safetensors float32 [N, d]
      -> decompose/spectrum.json + spectrum.png

With ``weighted_mean`` the centre is the popularity-weighted mean mu_w and C the unweighted
scatter about it over N - 1.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray
from safetensors.numpy import save_file

from ..config import DecomposeConfig
from ..errors import ConfigError, DataError
from ..stages import atomic_write_json, read_manifest
from .basis import NullSpaceBasis, threshold_null_dims
from .covariance import INDEX_COLUMN, covariance, iter_rows, pieces, randomized_eigh
from .drift import basis_drift, should_refit
from .spectrum import SPECTRUM_PLOT, plot_spectrum

PART_GLOB = "part-*.parquet"
SEMANTIC_FILE = "semantic.safetensors"
SEMANTIC_TENSOR = "semantic"
SPECTRUM_FILE = "spectrum.json"
DRIFT_FILE = "drift.json"
PREVIOUS_BASIS_DIR = "previous_basis"


@ray.remote(num_cpus=1)
def _transform_piece(piece, basis: NullSpaceBasis) -> tuple[np.ndarray, np.ndarray]:
    parts = [(idx, basis.transform(X)) for idx, X in iter_rows(piece, 16_384)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def semantic_table(files: list[str], basis: NullSpaceBasis, num_items: int) -> np.ndarray:
    """Every row transformed and placed at its item_idx: float32 [N, d].

    Raises:
        DataError: naming the file when an item_idx is outside 0..N-1 or appears twice, or naming
            the embed folder when items are missing.
    """
    table = np.zeros((num_items, basis.dim), dtype=np.float32)
    seen = np.zeros(num_items, dtype=bool)
    basis_ref = ray.put(basis)
    work = pieces(files)
    refs = [_transform_piece.remote(p, basis_ref) for p in work]
    for (path, _), ref in zip(work, refs):
        idx, coords = ray.get(ref)
        outside = idx[(idx < 0) | (idx >= num_items)]
        if len(outside):
            raise DataError(f"item_idx {outside[0]} is outside 0..{num_items - 1} (prepare has {num_items} items)",
                            file=path, column=INDEX_COLUMN)
        ordered = np.sort(idx)
        twice = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(twice) or seen[idx].any():
            item = twice[0] if len(twice) else idx[seen[idx]][0]
            raise DataError(f"item_idx {item} occurs more than once in the embeddings; each item needs exactly "
                            "one row", file=path, column=INDEX_COLUMN)
        seen[idx] = True
        table[idx] = coords
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise DataError(f"{len(missing)} items have no embedding (first item_idx {missing[0]}); rerun the embed "
                        "stage", file=Path(files[0]).parent)
    return table


def _write(out_dir: Path, basis: NullSpaceBasis, files: list[str], num_items: int, extra: dict) -> dict:
    """Basis, semantic table, spectrum.json and .png; returns the manifest facts."""
    basis.save(out_dir)
    save_file({SEMANTIC_TENSOR: semantic_table(files, basis, num_items)}, str(out_dir / SEMANTIC_FILE))
    explained = basis.explained_variance()
    info = {"d_l": basis.d_l, "d": basis.dim, "d_null": basis.null_dims,
            "explained_variance_semantic": float(explained[basis.dim - 1])}
    if basis.null_dims is not None:
        info["explained_variance_row_space"] = float(explained[basis.semantic_dims - 1])
    atomic_write_json(out_dir / SPECTRUM_FILE, {
        **extra, "whiten": basis.whiten, "scale": basis.scale, "items": num_items,
        "total_variance": basis.total_variance, "eigenvalues": basis.eigenvalues.tolist(),
        "cumulative_explained_variance": explained.tolist(), **info})
    plot_spectrum(basis, out_dir / SPECTRUM_PLOT)
    return info


def decompose(embed_dir: Path, cfg: DecomposeConfig, dim: int, num_items: int, out_dir: Path,
              weights: np.ndarray | None = None) -> dict:
    """Fit the basis on all item embeddings and write the frozen semantic table.

    Args:
        embed_dir: the embed stage folder (``part-*.parquet`` with ``item_idx``, ``vector[d_l]``).
        cfg: the ``decompose`` config section.
        dim: d, the model width (``model.dim``).
        num_items: N, from prepare's manifest; every item_idx 0..N-1 must be embedded once.
        out_dir: receives ``basis.*``, ``semantic.safetensors``, ``spectrum.json``, ``spectrum.png``.
        weights: item popularity, float [N] by item_idx; used with ``decompose.weighted_mean``.

    Returns:
        ``{"rows": {"items": N}, "d_l", "d", "d_null" (None under the count rule),
        "explained_variance_semantic", ...}`` for the stage manifest.

    Raises:
        ConfigError: naming the key of an inconsistent setting (``model.dim`` under the threshold rule).
    """
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    if cfg.null_rule == "threshold":
        if cfg.null_threshold is None:
            raise ConfigError("decompose.null_rule=threshold needs decompose.null_threshold (DreamRec: 0.25 "
                              "with decompose.scale=40)")
        if cfg.method != "exact":
            raise ConfigError(f"decompose.null_rule=threshold counts small eigenvalues, which "
                              f"decompose.method={cfg.method} does not compute; use decompose.method=exact")
    if cfg.weighted_mean and (weights is None or not np.sum(weights) > 0):
        raise ConfigError("decompose.weighted_mean=true needs item popularities (prepare's items.parquet) with a "
                          "positive sum; every item has popularity 0 here")
    files = sorted(str(p) for p in embed_dir.glob(PART_GLOB))
    if not files:
        raise DataError(f"no {PART_GLOB} embedding fragments; run the embed stage first", file=embed_dir)
    t0 = time.time()
    refit_facts = None
    if cfg.reuse_basis:
        refit_facts = _reuse_basis(files, cfg, dim, num_items, out_dir)
        if refit_facts is None:
            drift = json.loads((out_dir / DRIFT_FILE).read_text())
            return {"rows": {"items": num_items}, "reused_basis": drift["previous"], "refit": False,
                    "new_items": drift["new_items"]}
    w = weights if cfg.weighted_mean else None
    if cfg.method == "randomized":
        n, mean, values, vectors, total_variance = randomized_eigh(
            files, dim, cfg.oversample, cfg.power_iters, cfg.scale, w)
    else:
        from scipy.linalg import eigh

        n, mean, C = covariance(files, cfg.scale, w)
        (values, vectors), total_variance = eigh(C, check_finite=False), None
    if n != num_items:
        raise DataError(f"the embeddings have {n} rows but prepare has {num_items} items; rerun the embed stage",
                        file=embed_dir)
    null_dims = None
    if cfg.null_rule == "threshold":
        null_dims = threshold_null_dims(values, cfg.null_threshold)
        if dim != len(values):  # the model's width is fixed before this stage: the rule may not change it
            raise ConfigError(f"decompose.null_rule=threshold keeps all d_l={len(values)} directions: set "
                              f"model.dim={len(values)} (now {dim}); the rule gives d_n={null_dims} "
                              f"(set model.id_dims={null_dims})")
    t_spectrum = time.time() - t0
    basis = NullSpaceBasis.from_spectrum(mean, values, vectors, dim=dim, null_dims=null_dims, whiten=cfg.whiten,
                                         scale=cfg.scale, total_variance=total_variance)
    info = _write(out_dir, basis, files, num_items, {"method": cfg.method, "null_rule": cfg.null_rule,
                                                     "null_threshold": cfg.null_threshold,
                                                     "weighted_mean": cfg.weighted_mean})
    print(f"[decompose] {num_items} items x d_l={basis.d_l} from {len(files)} fragments: {cfg.method} spectrum "
          f"{t_spectrum:.1f}s, total {time.time() - t0:.1f}s; the d={dim} kept directions explain "
          f"{info['explained_variance_semantic']:.1%} of the variance" + (
              f"; the items span only {basis.spanned_dims} of them, the other whitened coordinates are 0"
              if basis.whiten and basis.spanned_dims < dim else ""), flush=True)
    if refit_facts is not None:
        info |= {"reused_basis": None, "refit": True}
    return {"rows": {"items": num_items}, **info}


def _reuse_basis(files: list[str], cfg: DecomposeConfig, dim: int, num_items: int, out_dir: Path) -> dict | None:
    """``decompose.reuse_basis``: transform every item with the previous run's basis, measure drift
    on the items added since, and refit when ``decompose.refit_threshold`` says so.

    Writes ``drift.json`` either way. Without a refit it also writes the old basis, the semantic
    table and the spectrum, and returns None; with a refit it keeps the old basis under
    ``previous_basis/`` (the train stage's warm start carries ID vectors from it) and returns the
    drift facts, and the caller fits a new basis.
    """
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
    facts: dict = {"previous": str(prev), "previous_items": old_items, "items": num_items,
                   "new_items": int(len(added)), "refit_threshold": cfg.refit_threshold}
    refit, reason = False, f"{len(added)} new items: too few to measure drift"
    if len(added) >= 2:
        report = basis_drift(old, added)
        facts["drift"] = report.to_dict()
        refit, reason = (should_refit(report, cfg.refit_threshold) if cfg.refit_threshold is not None else
                         (False, "decompose.refit_threshold is not set: the basis is always reused"))
    facts |= {"refit": bool(refit), "reason": reason}
    atomic_write_json(out_dir / DRIFT_FILE, facts)
    print(f"[decompose] reuse basis of {prev}: {facts['new_items']} new items, "
          + (f"old basis explains {facts['drift']['explained_ratio_old_mean']:.1%} of their best d-dim share; "
             if "drift" in facts else "") + ("REFIT: " if refit else "kept: ") + reason, flush=True)
    if refit:
        old.save(out_dir / PREVIOUS_BASIS_DIR)
        return facts
    _write(out_dir, old, files, num_items, {"reused_from": str(prev)})
    return None
