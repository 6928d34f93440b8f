"""Drift of the language-embedding distribution between periods, the refit rule, and ID vectors on a refit.

A retrain reuses the previous period's :class:`~alphafuse_dist.decompose.basis.NullSpaceBasis` by
default (``NullSpaceBasis.project`` for new items), so that existing semantic coordinates and ID
vectors keep their meaning. :func:`basis_drift` measures how well that frozen basis still fits the
new items; :func:`should_refit` turns the measurement into a decision.

Shapes: ``M`` new items, ``d_l`` language dimension, ``d`` model width (kept directions), ``d_n``
null (ID) dims, ``d_s = d - d_n`` semantic dims. All statistics are taken on ``scale * E`` with the
OLD basis's scale, the space its eigenvalues live in.

What :func:`basis_drift` measures:

- explained fraction: the share of the new items' variance that lies in the old basis's d kept
  directions ``span(U_old[:, :d])`` (what AlphaFuse's fused vector can represent), divided by the
  share the new items' own top-d directions would hold (the best any d-dim subspace can do). Both
  about the OLD mean (what ``project`` actually does: it centres new items on the old mean, so a
  mean shift counts as unexplained variance) and about the new items' own mean.
- spectrum change: the top-d eigenvalues of the new items' covariance against the old ones (with
  whitening, a changed eigenvalue means new items' coordinates no longer have unit variance).
- principal angles between ``span(U_old[:, :d_s])`` and the new items' top-d_s subspace: cosines
  of 1 mean the semantic range is unchanged.
- mean shift: ``|mean(new) - mean(old)|`` relative to the spread ``sqrt(trace C_old)`` (the RMS
  distance of the old items from their mean).

The refit rule (:func:`should_refit`): refit when the old basis explains less than ``threshold``
(default 0.9) of what the new items' own top-d directions would, about the old mean
(``explained_ratio_old_mean < threshold``), judged only with at least ``min_items`` new items
(default 2 d). Below d + 1 items the best d-dim subspace holds all their variance whatever the
distribution, and sampling biases the ratio down even for an unchanged distribution: about 0.96
with M = 2 d and 0.99 with M = 8 d for a text-embedding-like spectrum (d = 128, d_l = 384).

What happens to the old ID vectors on a refit (:func:`id_vectors_after_refit`): the semantic
coordinates of every item, old and new, are recomputed with the new basis (``transform``). An ID
vector ``x_old`` [d_n] is a displacement in the OLD null-space coordinates (added to, or with
injection "cover" replacing, the last d_n columns of the d-wide fused vector). Rule ``carry``
expresses it as a displacement in the language space through the old basis and reads its new
null-space coordinates through the new basis: with ``P = U[:, :d] diag(S[:d])^-1/2`` (whitened) or
``U[:, :d]`` (not whitened), ``P^+ = diag(S[:d])^1/2 U[:, :d]^T`` (or ``U[:, :d]^T``) maps
coordinates back to ``scale * E`` space, so

    x_new = x_old @ P_old^+[d_s:d, :] * (scale_new / scale_old) @ P_new[:, d_s':d']

(the mean cancels: a displacement has none). It is the ID part that the same language-space point
``scale * E + delta`` gets under the new basis. The share of ``delta`` that falls outside the new
null range (into the new semantic range or the dropped tail) cannot be held by the ID table and is
lost; when the basis is unchanged the map is the identity. Rule ``reset`` sets every ID vector to
zero, as for new items (the cold-start state). New items start from zero under both rules.

Example::

    old_basis = NullSpaceBasis.load(previous_run / "decompose")
    report = basis_drift(old_basis, E_new)               # E_new: float32 [M, d_l], the new items
    refit, reason = should_refit(report, threshold=0.9)
    if refit:
        new_basis = ...                                  # the decompose stage on all items
        id_rows = id_vectors_after_refit(old_basis, new_basis, id_rows, rule="carry")
    spectrum_change_plot(report.old_eigenvalues, report.new_eigenvalues, out / "drift.png",
                         semantic_dims=report.semantic_dims)
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..decompose.basis import NullSpaceBasis
from ..errors import ConfigError, DataError
from ..stages import atomic_write_bytes

DEFAULT_REFIT_THRESHOLD = 0.9
ID_REFIT_RULES = ("carry", "reset")
# rows per float64 block of the Gram accumulation: bounds the copy to ~64k x d_l doubles
_GRAM_BLOCK = 65536


@dataclass
class DriftReport:
    """How the new items' embeddings relate to the old basis (see the module docstring).

    Attributes:
        num_items: M, new items measured.
        d_l, dim, semantic_dims: of the old basis (d_l, d, d_s).
        explained_old_old_mean: share of the new items' squared distance from the old mean inside
            the old d kept directions.
        explained_best_old_mean: the same share for the best d-dim subspace (top-d eigenvectors of
            the new items' scatter about the old mean).
        explained_ratio_old_mean: old / best, in [0, 1]; what :func:`should_refit` compares.
        explained_old_new_mean, explained_best_new_mean, explained_ratio_new_mean: the same about
            the new items' own mean (mean shift excluded).
        old_eigenvalues: float64 [d], the old basis's top-d eigenvalues.
        new_eigenvalues: float64 [d], top-d eigenvalues of the new items' covariance (N-1 form,
            like the decompose stage).
        eigenvalue_relative_change: float64 [d], ``new / old - 1`` per direction index.
        max_abs_eigenvalue_change: max over directions of ``|new / old - 1|``.
        median_eigenvalue_change: median of ``new / old - 1``.
        total_variance_old, total_variance_new: traces of the two covariances.
        semantic_cosines: float64 [d_s], cosines of the principal angles between the old and new
            top-d_s subspaces, descending.
        min_semantic_cosine, mean_semantic_cosine: their minimum and mean.
        mean_shift_norm: ``|mean(scale * E_new) - reference mean|``.
        mean_shift_relative: ``mean_shift_norm / sqrt(total_variance_old)``.
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
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:k]
    return np.clip(values[order], 0.0, None), vectors[:, order]


def principal_cosines(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between ``span(A)`` and ``span(B)``, descending.

    Args:
        A, B: float [n, p] and [n, q], orthonormal columns.

    Returns:
        float64 [min(p, q)], in [0, 1].
    """
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
    """The refit rule: refit iff ``report.explained_ratio_old_mean < threshold`` and the report
    covers at least ``min_items`` new items.

    Args:
        report: from :func:`basis_drift`.
        threshold: in (0, 1]: the share of the best possible explained variance the old basis must
            keep; 1 refits on any loss.
        min_items: fewest new items to judge by (default 2 d): with fewer, the sampling bias of the
            ratio (module docstring) would trigger refits on an unchanged distribution.

    Returns:
        ``(refit, reason)``, the reason one line with the numbers compared.

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


def _check_pair(old_basis: NullSpaceBasis, new_basis: NullSpaceBasis) -> None:
    if old_basis.d_l != new_basis.d_l:
        raise ConfigError(f"the old basis has d_l={old_basis.d_l}, the new one d_l={new_basis.d_l}: the language "
                          "model changed, so ID vectors cannot be carried over; use the rule 'reset'")


def id_carry_matrix(old_basis: NullSpaceBasis, new_basis: NullSpaceBasis) -> np.ndarray:
    """The linear map of the ``carry`` rule: old null coordinates -> new null coordinates.

    Returns:
        float64 [d_n_old, d_n_new]; row j is the new null-space coordinates of the language-space
        displacement that unit old null coordinate j stands for (module docstring).
    """
    _check_pair(old_basis, new_basis)
    d_s, d = old_basis.semantic_dims, old_basis.dim
    to_language = old_basis.eigenvectors[:, d_s:d].T  # [d_n_old, d_l], in scale_old * E space
    if old_basis.whiten:
        to_language = np.sqrt(old_basis.eigenvalues[d_s:d])[:, None] * to_language
    to_new = new_basis.projection[:, new_basis.semantic_dims:]  # [d_l, d_n_new], from scale_new * E space
    return (new_basis.scale / old_basis.scale) * (to_language @ to_new)


def carry_id_vectors(old_basis: NullSpaceBasis, new_basis: NullSpaceBasis, id_rows: np.ndarray) -> np.ndarray:
    """ID vectors expressed in the new basis's null space (the ``carry`` rule).

    Args:
        old_basis, new_basis: the bases before and after the refit (same d_l).
        id_rows: float [M, d_n_old], ID vectors trained under ``old_basis``.

    Returns:
        float32 [M, d_n_new], computed in float64.

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
    """The ID rows to warm-start from after a refit: ``carry`` (re-project) or ``reset`` (zeros).

    Returns:
        float32 [M, d_n_new].

    Raises:
        ConfigError: an unknown rule, or ``carry`` across language models (different d_l).
    """
    if rule not in ID_REFIT_RULES:
        raise ConfigError(f"ID vector rule on a refit {rule!r}: expected one of {', '.join(ID_REFIT_RULES)}")
    if rule == "reset":
        return np.zeros((np.asarray(id_rows).shape[0], new_basis.null_dims), dtype=np.float32)
    return carry_id_vectors(old_basis, new_basis, id_rows)


def spectrum_change_plot(old_eigenvalues: np.ndarray, new_eigenvalues: np.ndarray, path: Path, *,
                         semantic_dims: int | None = None) -> None:
    """Write a PNG: old and new top eigenvalues (log axis) and their relative change.

    Args:
        old_eigenvalues, new_eigenvalues: float [d] each (``DriftReport.old_eigenvalues`` /
            ``new_eigenvalues``).
        path: the PNG to write (atomically).
        semantic_dims: d_s, drawn as the boundary of the semantic and null ranges.
    """
    import matplotlib

    matplotlib.use("Agg")  # retraining runs on headless cluster nodes
    import matplotlib.pyplot as plt

    old, new = np.asarray(old_eigenvalues, np.float64), np.asarray(new_eigenvalues, np.float64)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"spectrum_change_plot: eigenvalue arrays of shapes {old.shape} and {new.shape}")
    k = np.arange(len(old))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    for values, label, color in ((old, "old basis", "black"), (new, "new items", "tab:red")):
        positive = values > 0  # a log axis cannot show zeros
        top.semilogy(k[positive], values[positive], color=color, lw=1.2, label=label)
    top.set_ylabel("eigenvalue (covariance of scale * E)")
    bottom.plot(k, new / old - 1.0, color="tab:blue", lw=1.0)
    bottom.axhline(0.0, color="gray", lw=0.8)
    bottom.set_ylabel("new / old - 1")
    bottom.set_xlabel("direction k (eigenvalues descending)")
    if semantic_dims is not None:
        for ax in (top, bottom):
            ax.axvline(semantic_dims - 0.5, color="tab:orange", ls="--", lw=1.0)
    top.legend(fontsize=8)
    top.set_title(f"spectrum change over the d={len(old)} kept directions"
                  + ("" if semantic_dims is None else f" (semantic | null at {semantic_dims})"), fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
