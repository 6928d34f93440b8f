"""Drift of the language-embedding distribution between periods, the refit rule, and ID vectors on a refit.

A retrain reuses the previous period's :class:`~.basis.NullSpaceBasis` (new items are transformed
with it too), so that semantic coordinates and ID vectors keep their meaning. Shapes: ``M`` new
items, ``d`` kept directions, ``d_n`` ID dims, ``d_s = d - d_n``; statistics are of ``scale * E``
with the OLD basis's scale. :func:`basis_drift` measures:

- explained fraction: the share of the new items' variance in the old d kept directions, over the
  share their own top-d directions hold (the best any d-dim subspace can do); about the OLD mean
  (what ``transform`` does, so a mean shift counts as unexplained) and about their own mean.
- spectrum change: the new items' top-d eigenvalues against the old ones (with whitening, a
  change means the new coordinates no longer have unit variance).
- principal angles between the old and the new top-d_s subspaces (cosines 1: unchanged).
- mean shift relative to the spread ``sqrt(trace C_old)``.

:func:`should_refit`: refit when ``explained_ratio_old_mean < threshold`` (default 0.9), judged
only with at least ``min_items`` new items (default 2 d): with fewer, sampling biases the ratio
down even for an unchanged distribution (about 0.96 at M = 2 d, 0.99 at 8 d for d = 128, d_l = 384).

On a refit (:func:`id_vectors_after_refit`) every item's semantic coordinates come from the new
basis. Rule ``carry`` reads an old ID vector ``x_old`` [d_n] as a displacement in ``scale * E``
space through the old basis (``P^+ = diag(S[:d])^1/2 U[:, :d]^T``, or ``U[:, :d]^T`` unwhitened)
and takes its null coordinates in the new one:

    x_new = x_old @ P_old^+[d_s:d, :] * (scale_new / scale_old) @ P_new[:, d_s':d']

(the identity when the basis is unchanged; the part outside the new null range is lost). Rule
``reset`` zeroes them. New items start from zero under both rules.

Example::

    report = basis_drift(NullSpaceBasis.load(prev / "decompose"), E_new)   # E_new: [M, d_l]
    refit, reason = should_refit(report, threshold=0.9)
    id_rows = id_vectors_after_refit(old_basis, new_basis, id_rows, rule="carry")
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from scipy.linalg import eigh

from ..errors import ConfigError, DataError
from .basis import NullSpaceBasis

DEFAULT_REFIT_THRESHOLD = 0.9
ID_REFIT_RULES = ("carry", "reset")
# rows per float64 block of the Gram accumulation: bounds the copy to ~64k x d_l doubles
_GRAM_BLOCK = 65536


@dataclass
class DriftReport:
    """How the new items' embeddings relate to the old basis (module docstring). Shares are of the
    new items' scatter about the old mean (``_old_mean``) or their own (``_new_mean``): ``old`` in
    the old d kept directions, ``best`` in their own top d, ``ratio`` = old / best (what
    :func:`should_refit` compares). Eigenvalues: the old basis's top d and the new items' covariance's
    (N-1 form), their ``new / old - 1``. Cosines: principal angles between the old and the new top-d_s
    subspaces. Mean shift: ``|mean(scale * E_new) - reference mean|``, and over ``sqrt(total_variance_old)``.
    """

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


def _check_embeddings(basis: NullSpaceBasis, E: np.ndarray) -> np.ndarray:
    E = np.asarray(E)
    if E.ndim != 2 or E.shape[1] != basis.d_l:
        raise DataError(f"new item embeddings have shape {E.shape}; the old basis needs [M, {basis.d_l}] "
                        "(same language model as the previous run)")
    if E.shape[0] < 2:
        raise DataError(f"{E.shape[0]} new item embeddings: drift needs at least 2 (a variance)")
    return E


def _scatter(Y: np.ndarray, scale: float, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum of (scale * y - shift), sum of its outer products)``, float64, in row blocks.

    Raises:
        DataError: naming the first row that is not finite.
    """
    d_l = Y.shape[1]
    total, gram = np.zeros(d_l), np.zeros((d_l, d_l))
    for s in range(0, Y.shape[0], _GRAM_BLOCK):
        block = scale * Y[s:s + _GRAM_BLOCK].astype(np.float64) - shift
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise DataError("new item embedding is not finite (NaN or inf)", row=s + int(np.argmax(bad)))
        total += block.sum(axis=0)
        gram += block.T @ block
    return total, gram


def _top_eigh(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of a symmetric matrix, descending (round-off negatives clipped to 0)."""
    values, vectors = eigh(gram, subset_by_index=(len(gram) - k, len(gram) - 1))
    return np.clip(values[::-1], 0.0, None), vectors[:, ::-1]


def principal_cosines(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between ``span(A)`` and ``span(B)`` (orthonormal columns),
    float64 [min(p, q)] in [0, 1], descending."""
    return np.clip(np.linalg.svd(np.asarray(A, np.float64).T @ np.asarray(B, np.float64), compute_uv=False),
                   0.0, 1.0)


def basis_drift(old_basis: NullSpaceBasis, new_embeddings: np.ndarray, *,
                old_embeddings_stats: Mapping | None = None) -> DriftReport:
    """Measure how well the old basis fits new items (see the module docstring for each number).

    Args:
        old_basis: the previous run's basis (``decompose/basis.*``).
        new_embeddings: raw language embeddings of the new (or new and changed) items, float [M, d_l],
            M >= 2; unscaled, like the embed stage's vectors.
        old_embeddings_stats: optional statistics of the items the old basis was fit on, for what
            the basis does not hold: ``{"mean": float [d_l]}``, the plain mean of ``scale * E_old``,
            when the basis is centred elsewhere (``decompose.weighted_mean``); the mean shift is
            then measured from it instead of ``old_basis.mean``.

    Returns:
        The :class:`DriftReport`.

    Raises:
        DataError: new embeddings of the wrong width, fewer than 2, with a non-finite row (named),
            or without any variance; a bad ``old_embeddings_stats``.
    """
    E = _check_embeddings(old_basis, new_embeddings)
    M, d, d_s = E.shape[0], old_basis.dim, old_basis.semantic_dims
    reference_mean = old_basis.mean
    if old_embeddings_stats is not None:
        unknown = set(old_embeddings_stats) - {"mean"}
        if unknown:
            raise DataError(f"old_embeddings_stats: unknown keys {sorted(unknown)}; expected 'mean'")
        if "mean" in old_embeddings_stats:
            reference_mean = np.asarray(old_embeddings_stats["mean"], np.float64)
            if reference_mean.shape != (old_basis.d_l,):
                raise DataError(f"old_embeddings_stats['mean'] has shape {reference_mean.shape}, "
                                f"expected ({old_basis.d_l},)")

    # one pass about the old mean; the scatter about the new mean follows from it exactly
    total, gram_old_mean = _scatter(E, old_basis.scale, old_basis.mean)
    delta = total / M  # mean(scale * E_new) - old_basis.mean
    gram_new_mean = gram_old_mean - M * np.outer(delta, delta)
    U_kept = old_basis.eigenvectors[:, :d]

    def explained(gram: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        trace = float(np.trace(gram))
        if not trace > 0:
            raise DataError(f"the {M} new item embeddings have no variance (all rows equal)")
        values, vectors = _top_eigh(gram, d)
        old = float(np.sum((gram @ U_kept) * U_kept)) / trace  # trace(U^T G U)
        return old, float(values.sum()) / trace, values, vectors

    old_om, best_om, _, _ = explained(gram_old_mean)
    old_nm, best_nm, values, vectors = explained(gram_new_mean)
    new_eigenvalues = values / (M - 1)
    old_eigenvalues = old_basis.eigenvalues[:d].copy()
    with np.errstate(divide="ignore", invalid="ignore"):  # only without whitening can an old S_k be 0
        change = np.where(old_eigenvalues > 0, new_eigenvalues / old_eigenvalues - 1.0, np.inf)
    total_old = float(old_basis.total_variance if old_basis.total_variance is not None
                      else np.clip(old_basis.eigenvalues, 0.0, None).sum())
    cosines = principal_cosines(old_basis.eigenvectors[:, :d_s], vectors[:, :d_s])
    shift = float(np.linalg.norm(old_basis.mean + delta - reference_mean))
    return DriftReport(
        num_items=M, d_l=old_basis.d_l, dim=d, semantic_dims=d_s,
        explained_old_old_mean=old_om, explained_best_old_mean=best_om,
        explained_ratio_old_mean=min(old_om / best_om, 1.0),
        explained_old_new_mean=old_nm, explained_best_new_mean=best_nm,
        explained_ratio_new_mean=min(old_nm / best_nm, 1.0),
        old_eigenvalues=old_eigenvalues, new_eigenvalues=new_eigenvalues, eigenvalue_relative_change=change,
        max_abs_eigenvalue_change=float(np.abs(change).max()), median_eigenvalue_change=float(np.median(change)),
        total_variance_old=total_old, total_variance_new=float(np.trace(gram_new_mean)) / (M - 1),
        semantic_cosines=cosines, min_semantic_cosine=float(cosines.min()),
        mean_semantic_cosine=float(cosines.mean()),
        mean_shift_norm=shift, mean_shift_relative=float(shift / np.sqrt(total_old)) if total_old > 0 else float("inf"),
    )


def should_refit(report: DriftReport, threshold: float = DEFAULT_REFIT_THRESHOLD, *,
                 min_items: int | None = None) -> tuple[bool, str]:
    """``(refit, reason)``: refit iff ``report.explained_ratio_old_mean < threshold`` (in (0, 1])
    with at least ``min_items`` new items (default 2 d; module docstring). The reason is one line
    with the numbers compared.

    Raises:
        ConfigError: a threshold outside (0, 1] or a negative ``min_items``.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"refit threshold {threshold!r}: must be in (0, 1] (share of the best explained variance)")
    if min_items is None:
        min_items = 2 * report.dim
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
    """ID vectors float [M, d_n_old] trained under ``old_basis`` in the new basis's null space
    (the ``carry`` rule): float32 [M, d_n_new], computed in float64.

    Raises:
        ConfigError: the bases have different d_l.
        ValueError: ``id_rows`` is not [M, d_n_old].
    """
    id_rows = np.asarray(id_rows)
    if id_rows.ndim != 2 or id_rows.shape[1] != old_basis.null_dims:
        raise ValueError(f"carry_id_vectors: expected ID rows [M, {old_basis.null_dims}], got {id_rows.shape}")
    return (id_rows.astype(np.float64) @ id_carry_matrix(old_basis, new_basis)).astype(np.float32)


def id_vectors_after_refit(old_basis: NullSpaceBasis, new_basis: NullSpaceBasis, id_rows: np.ndarray,
                           rule: str = "carry") -> np.ndarray:
    """The ID rows float32 [M, d_n_new] to warm-start from after a refit: ``carry`` or ``reset`` (zeros).

    Raises:
        ConfigError: an unknown rule, or ``carry`` across language models (different d_l).
    """
    if rule not in ID_REFIT_RULES:
        raise ConfigError(f"ID vector rule on a refit {rule!r}: expected one of {', '.join(ID_REFIT_RULES)}")
    if rule == "reset":
        return np.zeros((np.asarray(id_rows).shape[0], new_basis.null_dims), dtype=np.float32)
    return carry_id_vectors(old_basis, new_basis, id_rows)
