"""Top-k eigenpairs of the embedding covariance by a randomized range finder over the fragments.

For d_l in the thousands the exact path's d_l x d_l moments (and their eigh) dominate; only the
top d = model.dim directions are needed. This module never forms C: with X_f the rows of piece f
(a run of a fragment's row groups, covariance.fragment_pieces) and c the centre (the mean), every
pass over the data is one Ray task per piece returning

    Y_f = (X_f - 1 c^T)^T ((X_f - 1 c^T) Q)        float64 [d_l, l],  l = k + oversample

(the centre subtracted in the task, in float64, so no large-mean cancellation), summed by the
same tree reduce as the covariance; C Q = sum_f Y_f / (n - 1). Halko, Martinsson & Tropp (2011),
algorithm 4.4 (subspace iteration) on the symmetric C:

    Q_0 = orth(Gaussian [d_l, l]);  Q_{i+1} = orth(C Q_i), i < power_iters
    B = Q^T C Q  [l, l];  B = V T V^T;  eigenvalues T[:k], eigenvectors Q V[:, :k]

Passes over the data: 1 (mean, trace) + power_iters + 1. The error of eigenvalue j decays like
(S_{l+1} / S_j)^(2 power_iters + 2), so geometrically decaying spectra converge in a few passes.

Example::

    n, mean, values, vectors, total = randomized_covariance_eigh(files, k=128)
    values.shape, vectors.shape   # (128,), (d_l, 128), float64, values descending
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from ..errors import ConfigError, DataError
from .covariance import Piece, fragment_dim, fragment_pieces, iter_fragment, piece_path, tree_reduce


@dataclass
class ColumnSums:
    """First moments of a set of rows x (dimension d_l), float64.

    Attributes:
        count: n, number of rows.
        weight: W, sum of the row weights (== n without weights).
        total: sum x, [d_l] (unweighted).
        weighted_total: sum w x, [d_l].
        sumsq: sum x * x (element-wise), [d_l]: gives the trace of the covariance.
    """

    count: int
    weight: float
    total: np.ndarray
    weighted_total: np.ndarray
    sumsq: np.ndarray

    def __add__(self, other: "ColumnSums") -> "ColumnSums":
        return ColumnSums(self.count + other.count, self.weight + other.weight, self.total + other.total,
                          self.weighted_total + other.weighted_total, self.sumsq + other.sumsq)

    def mean(self, weighted: bool = False) -> np.ndarray:
        """The (popularity-weighted) mean, float64 [d_l]."""
        return self.weighted_total / self.weight if weighted else self.total / self.count

    def trace(self, center: np.ndarray) -> float:
        """trace of the unbiased covariance about ``center``: sum ||x - c||^2 / (n - 1)."""
        return float((self.sumsq - 2 * center * self.total + self.count * center * center).sum() / (self.count - 1))


@ray.remote(num_cpus=1)
def _sums_task(piece: Piece, weights: np.ndarray | None) -> ColumnSums:
    path = piece_path(piece)
    d_l = fragment_dim([path])
    sums = ColumnSums(0, 0.0, np.zeros(d_l), np.zeros(d_l), np.zeros(d_l))
    for idx, X in iter_fragment(piece):
        X = X.astype(np.float64)
        if weights is not None and (idx.min() < 0 or idx.max() >= len(weights)):
            raise DataError(f"item_idx outside 0..{len(weights) - 1}, the items with a weight", file=path,
                            column="item_idx")
        w = np.ones(len(X)) if weights is None else weights[idx]
        sums = sums + ColumnSums(len(X), float(w.sum()), X.sum(0), w @ X, (X * X).sum(0))
    return sums


@ray.remote(num_cpus=1)
def _product_task(piece: Piece, center: np.ndarray, Q: np.ndarray) -> np.ndarray:
    Y = np.zeros_like(Q)
    for _, X in iter_fragment(piece):
        Xc = X.astype(np.float64) - center
        Y += Xc.T @ (Xc @ Q)
    return Y


def column_sums(files: list[str], weights: np.ndarray | None = None, fan_in: int = 4) -> ColumnSums:
    """Row count, sums and sums of squares over all fragments, one Ray task per piece
    (:func:`~.covariance.fragment_pieces`).

    Args:
        files: the ``part-*.parquet`` fragments.
        weights: optional per-item weights, float [N] indexed by ``item_idx`` (for ``weighted_total``).
    """
    files = [str(Path(f)) for f in files]
    fragment_dim(files)
    weights = None if weights is None else ray.put(np.asarray(weights, dtype=np.float64))
    return tree_reduce([_sums_task.remote(p, weights) for p in fragment_pieces(files)], fan_in)


def covariance_times(files: list[str], center: np.ndarray, Q: np.ndarray, count: int,
                     fan_in: int = 4) -> np.ndarray:
    """C Q for the unbiased covariance C about ``center`` (float64 [d_l]), without forming C.

    Args:
        Q: float64 [d_l, l].
        count: n, the number of rows (divisor n - 1).

    Returns:
        float64 [d_l, l].
    """
    center_ref, Q_ref = ray.put(np.asarray(center, np.float64)), ray.put(np.ascontiguousarray(Q, np.float64))
    return tree_reduce([_product_task.remote(p, center_ref, Q_ref) for p in fragment_pieces(files)],
                       fan_in) / (count - 1)


def randomized_covariance_eigh(files: list[str], k: int, oversample: int = 16, power_iters: int = 4,
                               scale: float = 1.0, weights: np.ndarray | None = None, seed: int = 0,
                               fan_in: int = 4) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, float]:
    """Top-k eigenpairs of the covariance of ``scale * E`` about its (optionally weighted) mean.

    Args:
        files: the ``part-*.parquet`` fragments (``item_idx``, ``vector: fixed_size_list[d_l]``).
        k: eigenpairs wanted (model.dim).
        oversample: extra directions in the range finder (``decompose.oversample``).
        power_iters: subspace iterations, one pass over the data each (``decompose.power_iters``).
        scale: s in ``s * E``.
        weights: per-item weights [N] indexed by ``item_idx``; when given, the centre is the
            weighted mean (the covariance is still the unweighted scatter about it / (n - 1)).
        seed: seed of the Gaussian start matrix (the result is deterministic given it).

    Returns:
        ``(n, mean, eigenvalues, eigenvectors, total_variance)``: row count, float64 [d_l] (of
        ``s * E``), float64 [k] descending, float64 [d_l, k] orthonormal, and the trace of the full
        covariance (for explained-variance ratios).

    Raises:
        ConfigError: naming ``decompose.oversample`` / ``decompose.power_iters`` / ``model.dim``.
    """
    files = [str(Path(f)) for f in files]
    d_l = fragment_dim(files)
    if oversample < 0:
        raise ConfigError(f"decompose.oversample={oversample}: must be >= 0")
    if power_iters < 0:
        raise ConfigError(f"decompose.power_iters={power_iters}: must be >= 0")
    if not 0 < k <= d_l:
        raise ConfigError(f"model.dim={k}: must be in 1..{d_l}, the dimension d_l of the language embeddings")
    sums = column_sums(files, weights, fan_in)
    if sums.count < 2:
        raise DataError(f"the embeddings hold {sums.count} rows; a covariance needs at least 2",
                        file=Path(files[0]).parent)
    center = sums.mean(weighted=weights is not None)
    width = min(k + oversample, d_l)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_l, width)))
    for _ in range(power_iters):
        # re-orthonormalising each pass keeps the small directions from drowning in round-off
        Q, _ = np.linalg.qr(covariance_times(files, center, Q, sums.count, fan_in))
    B = Q.T @ covariance_times(files, center, Q, sums.count, fan_in)
    values, V = np.linalg.eigh((B + B.T) / 2)
    order = np.argsort(values)[::-1][:k]
    s2 = scale * scale
    return sums.count, scale * center, s2 * values[order], Q @ V[:, order], s2 * sums.trace(center)
