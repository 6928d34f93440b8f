"""Drift of the item embeddings between periods, the refit rule, and ID vectors on a refit.

A retrain reuses the previous period's basis, so semantic coordinates and ID vectors keep their
meaning. :func:`basis_drift` measures (on ``scale * E``, the old scale) the share of the new items'
variance in the old d directions over the share in their own top d, about the old mean (what
``transform`` does) and their own; the top-d eigenvalues against the old; the principal angles
between the old and new top-d_s subspaces; the mean shift over ``sqrt(trace C_old)``.
:func:`should_refit` refits when ``explained_ratio_old_mean < threshold`` with at least
``min_items`` new items (default 2 d: with fewer, sampling biases the ratio down, to about 0.96 at
2 d for d = 128, d_l = 384, even for an unchanged distribution).

On a refit, rule ``carry`` reads an old ID vector as a displacement in ``scale * E`` space
(``P^+ = diag(S[:d])^1/2 U[:, :d]^T``, or ``U[:, :d]^T`` unwhitened) and takes its new null
coordinates, ``x_new = x_old @ P_old^+[d_s:d, :] * (scale_new / scale_old) @ P_new[:, d_s':d']``
(the identity for an unchanged basis); ``reset`` zeroes them. New items start from zero.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from scipy.linalg import eigh

from ..errors import ConfigError, DataError
from .basis import NullSpaceBasis

DEFAULT_REFIT_THRESHOLD = 0.9
RELIABLE_ITEMS_PER_DIM = 2  # fewer than 2 d new items: the figures are mostly sampling noise
ID_REFIT_RULES = ("carry", "reset")
_GRAM_BLOCK = 65536  # rows per float64 block of the gram accumulation


@dataclass
class DriftReport:
    """What :func:`basis_drift` measured (module docstring): ``explained_{old,best,ratio}_{old,new}_mean``
    are the shares about the old / the new items' own mean in the old d directions, in their own top
    d, and old / best; eigenvalues of the covariance in N-1 form; ``mean_shift_norm`` from the reference mean."""

    num_items: int
    d_l: int
    dim: int
    semantic_dims: int
    explained_old_old_mean: float
    explained_best_old_mean: float
    explained_ratio_old_mean: float
    explained_old_new_mean: float
    explained_best_new_mean: float
    explained_ratio_new_mean: float
    old_eigenvalues: np.ndarray
    new_eigenvalues: np.ndarray
    eigenvalue_relative_change: np.ndarray
    max_abs_eigenvalue_change: float
    median_eigenvalue_change: float
    total_variance_old: float
    total_variance_new: float
    semantic_cosines: np.ndarray
    min_semantic_cosine: float
    mean_semantic_cosine: float
    mean_shift_norm: float
    mean_shift_relative: float

    def to_dict(self) -> dict:
        """JSON-ready: arrays become lists of floats."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


def _scatter(Y: np.ndarray, scale: float, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum of (scale * y - shift), sum of its outer products)``, float64, in row blocks."""
    total, gram = np.zeros(Y.shape[1]), np.zeros((Y.shape[1], Y.shape[1]))
    for s in range(0, Y.shape[0], _GRAM_BLOCK):
        block = scale * Y[s:s + _GRAM_BLOCK].astype(np.float64) - shift
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise DataError("new item embedding is not finite (NaN or inf)", row=s + int(np.argmax(bad)))
        total += block.sum(axis=0)
        gram += block.T @ block
    return total, gram


def basis_drift(old_basis: NullSpaceBasis, new_embeddings: np.ndarray, *,
                old_embeddings_stats: Mapping | None = None) -> DriftReport:
    """How well the old basis fits the new items' raw embeddings float [M >= 2, d_l] (DataErrors name
    a bad shape, a non-finite row, no variance). ``old_embeddings_stats``: ``{"mean": [d_l]}``, the
    plain mean of ``scale * E_old`` to measure the mean shift from when the basis is centred
    elsewhere (``decompose.weighted_mean``)."""
    E = np.asarray(new_embeddings)
    if E.ndim != 2 or E.shape[1] != old_basis.d_l or E.shape[0] < 2:
        raise DataError(f"new item embeddings have shape {E.shape}; drift needs at least 2 of the old basis's "
                        f"[M, {old_basis.d_l}] (same language model as the previous run)")
    M, d, d_s = E.shape[0], old_basis.dim, old_basis.semantic_dims
    stats = dict(old_embeddings_stats or {})
    reference_mean = np.asarray(stats.get("mean", old_basis.mean), np.float64)
    if set(stats) - {"mean"} or reference_mean.shape != (old_basis.d_l,):
        raise DataError(f"old_embeddings_stats: expected {{'mean': float [{old_basis.d_l}]}}, got unknown keys "
                        f"{sorted(set(stats) - {'mean'})} or a mean of shape {reference_mean.shape}")
    # one pass about the old mean; the scatter about the new mean follows from it exactly
    total, gram_old_mean = _scatter(E, old_basis.scale, old_basis.mean)
    delta = total / M  # mean(scale * E_new) - old_basis.mean
    gram_new_mean = gram_old_mean - M * np.outer(delta, delta)
    U_kept = old_basis.eigenvectors[:, :d]

    def explained(gram: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        trace = float(np.trace(gram))
        if not trace > 0:
            raise DataError(f"the {M} new item embeddings have no variance (all rows equal)")
        values, vectors = eigh(gram, subset_by_index=(len(gram) - d, len(gram) - 1))  # the top d, ascending
        values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
        old = float(np.sum((gram @ U_kept) * U_kept)) / trace  # trace(U^T G U)
        return old, float(values.sum()) / trace, values, vectors

    old_om, best_om, _, _ = explained(gram_old_mean)
    old_nm, best_nm, values, vectors = explained(gram_new_mean)
    new_eigenvalues, old_eigenvalues = values / (M - 1), old_basis.eigenvalues[:d].copy()
    with np.errstate(divide="ignore", invalid="ignore"):  # only without whitening can an old S_k be 0
        change = np.where(old_eigenvalues > 0, new_eigenvalues / old_eigenvalues - 1.0, np.inf)
    total_old = float(old_basis.total_variance or np.clip(old_basis.eigenvalues, 0.0, None).sum())
    # cosines of the principal angles between the old and the new top-d_s subspaces
    cosines = np.clip(np.linalg.svd(old_basis.eigenvectors[:, :d_s].T @ vectors[:, :d_s], compute_uv=False), 0, 1)
    shift = float(np.linalg.norm(old_basis.mean + delta - reference_mean))
    return DriftReport(
        num_items=M, d_l=old_basis.d_l, dim=d, semantic_dims=d_s,
        explained_old_old_mean=old_om, explained_best_old_mean=best_om,
        explained_ratio_old_mean=min(old_om / best_om, 1.0), explained_old_new_mean=old_nm,
        explained_best_new_mean=best_nm, explained_ratio_new_mean=min(old_nm / best_nm, 1.0),
        old_eigenvalues=old_eigenvalues, new_eigenvalues=new_eigenvalues, eigenvalue_relative_change=change,
        max_abs_eigenvalue_change=float(np.abs(change).max()), median_eigenvalue_change=float(np.median(change)),
        total_variance_old=total_old, total_variance_new=float(np.trace(gram_new_mean)) / (M - 1),
        semantic_cosines=cosines, min_semantic_cosine=float(cosines.min()), mean_semantic_cosine=float(cosines.mean()),
        mean_shift_norm=shift, mean_shift_relative=float(shift / np.sqrt(total_old)) if total_old > 0 else float("inf"),
    )


def reliability(num_items: int, dim: int) -> tuple[bool, str]:
    """``(reliable, note)``: drift figures of ``num_items`` new items mean little below
    ``RELIABLE_ITEMS_PER_DIM * dim`` of them (module docstring); the note states the threshold."""
    least = RELIABLE_ITEMS_PER_DIM * dim
    if num_items >= least:
        return True, f"{num_items} new items >= {least} (2 d): the figures are meaningful"
    return False, (f"only {num_items} new items < {least} (2 d, d={dim}): too few for reliable figures; with so "
                   "few, even an unchanged distribution shows a lower explained share (sampling), so read them "
                   "as noise and never refit on them")


def should_refit(report: DriftReport, threshold: float = DEFAULT_REFIT_THRESHOLD, *,
                 min_items: int | None = None) -> tuple[bool, str]:
    """``(refit, reason)``: refit iff ``report.explained_ratio_old_mean < threshold`` (in (0, 1])
    with at least ``min_items`` new items (default 2 d; module docstring); the reason gives the numbers."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"refit threshold {threshold!r}: must be in (0, 1] (share of the best explained variance)")
    min_items = RELIABLE_ITEMS_PER_DIM * report.dim if min_items is None else min_items
    if min_items < 0:
        raise ConfigError(f"min_items={min_items}: must be >= 0")
    ratio = report.explained_ratio_old_mean
    facts = (f"the old basis's d={report.dim} directions explain {report.explained_old_old_mean:.1%} of the "
             f"{report.num_items} new items' variance about the old mean, the best d directions "
             f"{report.explained_best_old_mean:.1%}: ratio {ratio:.3f}")
    if report.num_items < min_items:
        return False, f"keep the basis: only {report.num_items} new items (< {min_items}) to judge drift by; {facts}"
    if ratio < threshold:
        return True, f"refit: {facts} < threshold {threshold:g}"
    return False, f"keep the basis: {facts} >= threshold {threshold:g}"


def id_carry_matrix(old_basis: NullSpaceBasis, new_basis: NullSpaceBasis) -> np.ndarray:
    """The ``carry`` rule's map, float64 [d_n_old, d_n_new]: row j is the new null coordinates of
    the displacement that unit old null coordinate j stands for (module docstring)."""
    if old_basis.d_l != new_basis.d_l:
        raise ConfigError(f"the old basis has d_l={old_basis.d_l}, the new one d_l={new_basis.d_l}: the language "
                          "model changed, so ID vectors cannot be carried over; use the rule 'reset'")
    d_s, d = old_basis.semantic_dims, old_basis.dim
    to_language = old_basis.eigenvectors[:, d_s:d].T  # [d_n_old, d_l], in scale_old * E space
    if old_basis.whiten:
        to_language = np.sqrt(old_basis.eigenvalues[d_s:d])[:, None] * to_language
    to_new = new_basis.projection[:, new_basis.semantic_dims:]  # [d_l, d_n_new], from scale_new * E space
    return (new_basis.scale / old_basis.scale) * (to_language @ to_new)


def carry_id_vectors(old_basis: NullSpaceBasis, new_basis: NullSpaceBasis, id_rows: np.ndarray) -> np.ndarray:
    """ID rows float [M, d_n_old] trained under ``old_basis`` in the new basis's null space (the
    ``carry`` rule): float32 [M, d_n_new]. ConfigError for bases of different d_l."""
    id_rows = np.asarray(id_rows)
    if id_rows.ndim != 2 or id_rows.shape[1] != old_basis.null_dims:
        raise ValueError(f"carry_id_vectors: expected ID rows [M, {old_basis.null_dims}], got {id_rows.shape}")
    return (id_rows.astype(np.float64) @ id_carry_matrix(old_basis, new_basis)).astype(np.float32)


def id_vectors_after_refit(old_basis: NullSpaceBasis, new_basis: NullSpaceBasis, id_rows: np.ndarray,
                           rule: str = "carry") -> np.ndarray:
    """The ID rows float32 [M, d_n_new] to warm-start from after a refit: ``carry`` or ``reset`` (zeros)."""
    if rule not in ID_REFIT_RULES:
        raise ConfigError(f"ID vector rule on a refit {rule!r}: expected one of {', '.join(ID_REFIT_RULES)}")
    if rule == "reset":
        return np.zeros((np.asarray(id_rows).shape[0], new_basis.null_dims), dtype=np.float32)
    return carry_id_vectors(old_basis, new_basis, id_rows)
