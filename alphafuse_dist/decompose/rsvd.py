"""Top-k eigenpairs of the embedding covariance by a randomized range finder over the fragments.

For d_l in the thousands the exact path's d_l x d_l moments (and their eigh) dominate; only the
top d = model.dim directions are needed. This module never forms C. With y = x - s the rows
about a shift s near the mean (the mean of the first 1,024 rows, fixed by the driver), every
pass over the data computes

    Y = sum_rows y (y^T Q)        float64 [d_l, l],  l = k + oversample

and the first pass also the column sums of y (count, sum y, sum w y, sum y^2). The centre c
(the mean, or the weighted mean) then gives C Q without a second look at the rows, with
delta = c - s and t = sum y:

    (n - 1) C Q = Y - t (delta^T Q) - delta (t^T Q) + n delta (delta^T Q)

Halko, Martinsson & Tropp (2011), algorithm 4.4 (subspace iteration) on the symmetric C:

    Q_0 = orth(Gaussian [d_l, l]);  Q_{i+1} = orth(C Q_i), i < power_iters
    B = Q^T C Q  [l, l];  B = V T V^T;  eigenvalues T[:k], eigenvectors Q V[:, :k]

Passes over the data: 1 + power_iters (the column sums ride on the first). The error of
eigenvalue j decays like (S_{l+1} / S_j)^(2 power_iters + 2), so geometrically decaying spectra
converge in a few passes.

How a pass runs: as the exact covariance (covariance.py): one Ray task per node
(:func:`~.covariance.task_layout`), one thread per CPU in it taking pieces of ~4,096 rows
(:func:`~.covariance.covariance_pieces`) from a queue; pyarrow decodes and BLAS multiplies with
the GIL released. Each piece's sums and products are added in piece order (:class:`_OrderedSum`),
so a task's result does not depend on its threads' timing, and the tasks' results are added by
the tree reduce: the same bits for the same files and number of tasks. Until 2026-11-27 every
pass ran one Ray task per piece with float64 products: 16.3 s for the top 128 of 200k x 3,072 on
16 cores, against 3.7 s for the exact path (benchmarks/decompose/RESULTS.md).

``precision`` is the precision of the products: ``float32`` (default: the rows stay float32,
~1e-7 relative per batch, far below the method's own error) or ``float64`` (a float64 copy of
each batch, for checks). The column sums are exact float64 sums either way (a float64 copy of
each batch in the first pass only).

Example::

    n, mean, values, vectors, total = randomized_covariance_eigh(files, k=128)
    values.shape, vectors.shape   # (128,), (d_l, 128), float64, values descending
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from ..errors import ConfigError, DataError
from .covariance import (PRECISIONS, VECTOR_COLUMN, Piece, _batch_weights, covariance_pieces, first_rows_mean,
                         fragment_dim, iter_fragment, piece_path, pieces_in_threads, shared_batch_rows, task_layout,
                         tree_reduce)


@dataclass
class ColumnSums:
    """First moments of a set of rows x (dimension d_l) about a shift s, float64.

    Attributes:
        count: n, number of rows.
        weight: W, sum of the row weights (== n without weights).
        total: sum (x - s), [d_l] (unweighted).
        weighted_total: sum w (x - s), [d_l].
        sumsq: sum (x - s) * (x - s) (element-wise), [d_l]: gives the trace of the covariance.
        shift: s, [d_l]; None: the origin.
    """

    count: int
    weight: float
    total: np.ndarray
    weighted_total: np.ndarray
    sumsq: np.ndarray
    shift: np.ndarray | None = None

    def __add__(self, other: "ColumnSums") -> "ColumnSums":
        if not _same_shift(self.shift, other.shift):
            raise ValueError("ColumnSums: only sums about the same shift add up")
        return ColumnSums(self.count + other.count, self.weight + other.weight, self.total + other.total,
                          self.weighted_total + other.weighted_total, self.sumsq + other.sumsq, self.shift)

    def _shift(self) -> np.ndarray:
        return np.zeros(len(self.total)) if self.shift is None else self.shift

    def mean(self, weighted: bool = False) -> np.ndarray:
        """The (popularity-weighted) mean, float64 [d_l]."""
        return self._shift() + (self.weighted_total / self.weight if weighted else self.total / self.count)

    def trace(self, center: np.ndarray) -> float:
        """trace of the unbiased covariance about ``center``: sum ||x - c||^2 / (n - 1)."""
        delta = np.asarray(center, np.float64) - self._shift()
        return float((self.sumsq.sum() - 2 * delta @ self.total + self.count * delta @ delta) / (self.count - 1))


def _same_shift(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


@dataclass
class RangePartial:
    """What a pass over some rows returns: their :class:`ColumnSums` (all zeros but ``count``
    when the pass was not asked for them) and ``product`` = sum y (y^T Q), float64 [d_l, l]
    (None without a Q), y = x - ``sums.shift``."""

    sums: ColumnSums
    product: np.ndarray | None

    def __add__(self, other: "RangePartial") -> "RangePartial":
        product = None if self.product is None else self.product + other.product
        return RangePartial(self.sums + other.sums, product)


class _OrderedSum:
    """Adds the pieces' :class:`RangePartial` s in piece order, whichever thread finishes first:
    a piece waits only for those before it (threads take pieces in order, so few wait)."""

    def __init__(self):
        self.total: RangePartial | None = None
        self._next, self._waiting, self._lock = 0, {}, threading.Lock()

    def put(self, i: int, part: RangePartial) -> None:
        with self._lock:
            self._waiting[i] = part
            while self._next in self._waiting:
                part = self._waiting.pop(self._next)
                self.total = part if self.total is None else self.total + part
                self._next += 1


def _piece_pass(piece: Piece, weights: np.ndarray | None, shift: np.ndarray, Q: np.ndarray | None,
                sums: bool, rows: int, buffers: dict) -> RangePartial:
    """One piece's :class:`RangePartial` (``shift`` and ``Q`` already in the products' precision)."""
    path, d = piece_path(piece), len(shift)
    dtype, shift64 = shift.dtype, shift.astype(np.float64)
    count, weight = 0, 0.0
    total, weighted, sumsq = np.zeros(d), np.zeros(d), np.zeros(d)
    product = None if Q is None else np.zeros((d, Q.shape[1]))
    for idx, X in iter_fragment(piece, rows, use_threads=False):
        w = _batch_weights(idx, weights, path)
        b = len(X)
        if buffers.get("Z") is None or len(buffers["Z"]) < b:
            buffers["Z"] = np.empty((b, d), dtype)
            buffers["P"] = None if Q is None else np.empty((b, Q.shape[1]), dtype)
        Z = np.subtract(X, shift, out=buffers["Z"][:b])
        count += b
        if sums:  # exact in float64 (the rows about the rounded shift), whatever the products' precision
            if buffers.get("Z64") is None or len(buffers["Z64"]) < b:
                buffers["Z64"] = np.empty((b, d))
            Z64 = np.subtract(X, shift64, out=buffers["Z64"][:b], dtype=np.float64)
            column = np.add.reduce(Z64, axis=0)
            total += column
            weight += b if w is None else float(w.sum())
            weighted += column if w is None else w @ Z64
            squares = np.einsum("ij,ij->j", Z64, Z64)
            if not np.isfinite(squares).all():
                raise DataError("a vector holds NaN or inf", file=path, column=VECTOR_COLUMN)
            sumsq += squares
        if Q is not None:
            P = np.matmul(Z, Q, out=buffers["P"][:b])
            product += Z.T @ P
    if not count:
        raise DataError("has no rows", file=path)
    if product is not None and not np.isfinite(product).all():
        raise DataError("a vector holds NaN or inf", file=path, column=VECTOR_COLUMN)
    return RangePartial(ColumnSums(count, weight, total, weighted, sumsq, shift64), product)


def range_pass(pieces: list[Piece], weights: np.ndarray | None, threads: int, shift: np.ndarray,
               Q: np.ndarray | None = None, sums: bool = True, precision: str = "float32",
               batch_rows: int | None = None) -> RangePartial:
    """One pass over ``pieces`` in this process: ``threads`` threads take pieces from a queue
    (BLAS at one thread each, as the exact path's :func:`~.covariance.shared_gram_pass`), and
    the pieces' results are added in piece order.

    Args:
        shift: s, float64 [d_l]; it is rounded to ``precision`` and the sums are about the
            rounded value (``sums.shift``).
        Q: float [d_l, l] or None (sums only).
        sums: compute the column sums (else only ``count``).
        precision: of the centred rows and the products ("float32" or "float64").

    Raises:
        DataError: naming the file of a piece without rows, an ``item_idx`` without a valid
            weight, or a vector holding NaN or inf.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    dtype = np.dtype(precision)
    shift = np.asarray(shift, np.float64).astype(dtype)
    Q = None if Q is None else np.ascontiguousarray(Q, dtype=dtype)
    rows = batch_rows or shared_batch_rows(len(shift))
    out = _OrderedSum()

    def add(buffers: dict, i: int, piece: Piece) -> None:
        out.put(i, _piece_pass(piece, weights, shift, Q, sums, rows, buffers))

    pieces_in_threads(pieces, threads, lambda t: {}, add)
    return out.total


def _range_task(pieces: list[Piece], weights, shift: np.ndarray, Q: np.ndarray | None, sums: bool,
                precision: str) -> RangePartial:
    """A Ray task of a pass: as many threads as CPUs Ray gave it."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return range_pass(pieces, weights, max(1, int(cpus)), shift, Q, sums, precision)


_range_remote = ray.remote(_range_task)


class _Passes:
    """The passes of one solve: the pieces, the task layout and the shift are fixed once."""

    def __init__(self, pieces: list[Piece], weights: np.ndarray | None, precision: str, fan_in: int,
                 task_cpus: int | None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        self.pieces = pieces
        tasks, self.cpus = task_layout(task_cpus)
        self.tasks = min(tasks, len(self.pieces))
        self.shift, _ = first_rows_mean(self.pieces)
        self.weights = None if weights is None else ray.put(np.asarray(weights, dtype=np.float64))
        self.precision, self.fan_in = precision, fan_in

    def run(self, Q: np.ndarray | None, sums: bool) -> RangePartial:
        Q_ref = None if Q is None else ray.put(np.ascontiguousarray(Q))
        return tree_reduce([_range_remote.options(num_cpus=self.cpus).remote(
            self.pieces[t::self.tasks], self.weights, self.shift, Q_ref, sums, self.precision)
            for t in range(self.tasks)], self.fan_in)


def _pieces(files: list[str]) -> list[Piece]:
    """The pieces of every pass (:func:`~.covariance.covariance_pieces`: it checks every file's
    columns and d_l)."""
    return covariance_pieces([str(Path(f)) for f in files])


def _centred_times(part: RangePartial, sums: ColumnSums, center: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """C Q for the unbiased covariance about ``center`` from a pass's ``sum y (y^T Q)`` and the
    first pass's sums (same shift, same rows)."""
    delta = np.asarray(center, np.float64) - sums._shift()
    t, n = sums.total, sums.count
    dQ = delta @ Q
    CQ = part.product - np.outer(t, dQ) - np.outer(delta, t @ Q) + n * np.outer(delta, dQ)
    return CQ / (n - 1)


def column_sums(files: list[str], weights: np.ndarray | None = None, fan_in: int = 4,
                task_cpus: int | None = None) -> ColumnSums:
    """Row count, sums and sums of squares over all fragments about a shift near the mean
    (float64; one pass as :func:`randomized_covariance_eigh`'s).

    Args:
        files: the ``part-*.parquet`` fragments.
        weights: optional per-item weights, float [N] indexed by ``item_idx`` (for ``weighted_total``).
    """
    return _Passes(_pieces(files), weights, "float64", fan_in, task_cpus).run(None, sums=True).sums


def covariance_times(files: list[str], center: np.ndarray, Q: np.ndarray, count: int | None = None,
                     fan_in: int = 4, precision: str = "float64") -> np.ndarray:
    """C Q for the unbiased covariance C about ``center`` (float64 [d_l]), without forming C
    (one pass, with its column sums).

    Args:
        Q: float64 [d_l, l].
        count: n, the number of rows, if known (checked against the pass's).

    Returns:
        float64 [d_l, l].
    """
    part = _Passes(_pieces(files), None, precision, fan_in, None).run(Q, sums=True)
    if count is not None and count != part.sums.count:
        raise ValueError(f"count={count}, but the fragments hold {part.sums.count} rows")
    return _centred_times(part, part.sums, center, np.asarray(Q, np.float64))


def randomized_covariance_eigh(files: list[str], k: int, oversample: int = 16, power_iters: int = 4,
                               scale: float = 1.0, weights: np.ndarray | None = None, seed: int = 0,
                               fan_in: int = 4, precision: str = "float32",
                               task_cpus: int | None = None) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, float]:
    """Top-k eigenpairs of the covariance of ``scale * E`` about its (optionally weighted) mean.

    Args:
        files: the ``part-*.parquet`` fragments (``item_idx``, ``vector: fixed_size_list[d_l]``).
        k: eigenpairs wanted (model.dim).
        oversample: extra directions in the range finder (``decompose.oversample``).
        power_iters: subspace iterations, one pass over the data each (``decompose.power_iters``).
        scale: s in ``s * E``.
        weights: per-item weights [N] indexed by ``item_idx``; when given, the centre is the
            weighted mean (the covariance is still the unweighted scatter about it / (n - 1)).
        seed: seed of the Gaussian start matrix (the result is deterministic given it, the files
            and the number of tasks).
        precision: of the products (``decompose.precision``; module notes).
        task_cpus: CPUs (and threads) per task (``decompose.task_cpus``; None: a node's).

    Returns:
        ``(n, mean, eigenvalues, eigenvectors, total_variance)``: row count, float64 [d_l] (of
        ``s * E``), float64 [k] descending, float64 [d_l, k] orthonormal, and the trace of the full
        covariance (for explained-variance ratios).

    Raises:
        ConfigError: naming ``decompose.oversample`` / ``decompose.power_iters`` / ``model.dim``.
        DataError: as :func:`range_pass`, or when the fragments hold fewer than 2 rows.
    """
    files = [str(Path(f)) for f in files]
    pieces = _pieces(files)
    d_l = fragment_dim(files[:1])  # _pieces checked that every file has the same
    if oversample < 0:
        raise ConfigError(f"decompose.oversample={oversample}: must be >= 0")
    if power_iters < 0:
        raise ConfigError(f"decompose.power_iters={power_iters}: must be >= 0")
    if not 0 < k <= d_l:
        raise ConfigError(f"model.dim={k}: must be in 1..{d_l}, the dimension d_l of the language embeddings")
    passes = _Passes(pieces, weights, precision, fan_in, task_cpus)
    width = min(k + oversample, d_l)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_l, width)))
    first = passes.run(Q, sums=True)  # the column sums ride on the first product
    sums = first.sums
    if sums.count < 2:
        raise DataError(f"the embeddings hold {sums.count} rows; a covariance needs at least 2",
                        file=Path(files[0]).parent)
    center = sums.mean(weighted=weights is not None)
    CQ = _centred_times(first, sums, center, Q)
    for _ in range(power_iters):
        # re-orthonormalising each pass keeps the small directions from drowning in round-off
        Q, _ = np.linalg.qr(CQ)
        CQ = _centred_times(passes.run(Q, sums=False), sums, center, Q)
    B = Q.T @ CQ
    values, V = np.linalg.eigh((B + B.T) / 2)
    order = np.argsort(values)[::-1][:k]
    s2 = scale * scale
    return sums.count, scale * center, s2 * values[order], Q @ V[:, order], s2 * sums.trace(center)
