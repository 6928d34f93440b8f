"""Mean and covariance of the item embeddings E, computed with one Ray task per Parquet fragment.

Each task reads ONE fragment (file) of the embed output in row batches and returns its moments
(count, weight, sum w x, sum w x x^T) in float64; the partial moments are combined by a tree of
Ray tasks (fan-in 2..8), so neither the driver nor any task ever holds more than one fragment or
more than ``fan_in`` partials of d_l x d_l. The driver then forms

    mu = sum w x / W,        C = (sum w x x^T - W mu mu^T) / (W - 1)        (W = sum w)

which is ``np.cov(E, rowvar=False)`` without weights (unbiased N-1 form, METHOD.md section 2).

Numerics: forming C from raw second moments cancels the W mu mu^T part of sum w x x^T. In float64
the absolute error of C_ij is about eps64 * W * (|mu_i mu_j| + |C_ij|) / (W - 1) with eps64 ~ 1e-16,
i.e. a relative error of ~1e-16 * (1 + |mu_i mu_j| / |C_ij|). For sentence embeddings (|mu_i| / std_i
of order 1..10) that is ~1e-14, far below anything the eigenbasis is sensitive to; the same sum in
float32 would lose ~1e-5, which is why the data are promoted to float64 before any product.
Only data whose mean exceeds its standard deviation by ~1e5 would need a shifted (pivot) variant.

Example::

    n, mu, cov = distributed_covariance(sorted(glob("runs/q/embed/part-*.parquet")))
    mu.shape, cov.shape   # (384,), (384, 384), float64
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from scipy.linalg.blas import dsyrk  # scipy comes with sentence-transformers

from ..errors import DataError

INDEX_COLUMN = "item_idx"
VECTOR_COLUMN = "vector"
BATCH_ROWS = 8192  # rows read at a time inside a fragment: bounds a task's memory, not its result


@dataclass
class Moments:
    """Weighted raw moments of a set of rows x (each of dimension d_l), all float64.

    Attributes:
        count: number of rows.
        weight: W, the sum of the row weights (== count without weights).
        total: sum w x, float64 [d_l].
        gram: sum w x x^T, float64 [d_l, d_l].
    """

    count: int
    weight: float
    total: np.ndarray
    gram: np.ndarray

    def merge(self, other: "Moments") -> "Moments":
        """The moments of the union of both row sets."""
        return Moments(self.count + other.count, self.weight + other.weight,
                       self.total + other.total, self.gram + other.gram)

    __add__ = merge  # lets tree_reduce sum Moments and plain arrays alike


def fragment_dim(files: list[str]) -> int:
    """d_l shared by all fragments, read from the Parquet footers only (no data is loaded).

    Raises:
        DataError: naming the file when one is missing, lacks ``item_idx`` / ``vector``, stores
            ``vector`` as anything but a fixed-size list of floats, or disagrees on d_l.
    """
    if not files:
        raise DataError("no embedding fragments (part-*.parquet) to decompose; run the embed stage")
    dims = {}
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read it as Parquet ({e})", file=path) from None
        for col in (INDEX_COLUMN, VECTOR_COLUMN):
            if col not in schema.names:
                raise DataError(f"missing column (has: {', '.join(schema.names)})", file=path, column=col)
        vtype = schema.field(VECTOR_COLUMN).type
        if not (pa.types.is_fixed_size_list(vtype) and pa.types.is_floating(vtype.value_type)):
            raise DataError(f"expected fixed_size_list<float32>[d_l], got {vtype}", file=path, column=VECTOR_COLUMN)
        dims[path] = vtype.list_size
    if len(set(dims.values())) > 1:
        first = files[0]
        other = next(p for p in files if dims[p] != dims[first])
        raise DataError(f"vectors have d_l={dims[other]} but {first} has d_l={dims[first]}; all fragments "
                        "must come from one embed run", file=other, column=VECTOR_COLUMN)
    return dims[files[0]]


def iter_fragment(path: str, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of one fragment, ``batch_rows`` at a time.

    Yields:
        ``(item_idx, X)``: int64 [b] and float [b, d_l] in the stored precision (float32 from embed).
    """
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=[INDEX_COLUMN, VECTOR_COLUMN]):
        vectors = batch.column(VECTOR_COLUMN)
        if vectors.null_count or batch.column(INDEX_COLUMN).null_count:
            raise DataError("null entries; every row needs an item_idx and a vector", file=path)
        # flatten() honours slice offsets, unlike .values
        X = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), vectors.type.list_size)
        yield batch.column(INDEX_COLUMN).to_numpy().astype(np.int64), X


def partial_moments(path: str, weights: np.ndarray | None = None, batch_rows: int = BATCH_ROWS) -> Moments:
    """Moments of one fragment, accumulated in float64.

    Args:
        path: one ``part-*.parquet`` file of the embed output.
        weights: optional per-item weights, float [N] indexed by ``item_idx`` (e.g. popularity);
            None gives every row weight 1.
        batch_rows: rows read at a time.
    """
    count, weight, total, gram = 0, 0.0, None, None
    for idx, X in iter_fragment(path, batch_rows):
        X = X.astype(np.float64)
        if weights is None:
            w_sum, wX, rootwX = float(len(X)), X, X
        else:
            outside = idx[(idx < 0) | (idx >= len(weights))]
            if len(outside):
                raise DataError(f"item_idx {outside[0]} has no weight (weights cover 0..{len(weights) - 1})",
                                file=path, column=INDEX_COLUMN)
            w = np.asarray(weights, dtype=np.float64)[idx]
            if (w < 0).any():
                raise DataError(f"item_idx {idx[np.argmax(w < 0)]} has a negative weight; weights are counts",
                                file=path, column=INDEX_COLUMN)
            w_sum, wX, rootwX = float(w.sum()), X * w[:, None], X * np.sqrt(w)[:, None]
        if total is None:
            # Fortran order: dsyrk accumulates into it in place
            total, gram = np.zeros(X.shape[1]), np.zeros((X.shape[1], X.shape[1]), order="F")
        count += len(X)
        weight += w_sum
        total += wX.sum(axis=0)
        # sum w x x^T = (sqrt(w) X)^T (sqrt(w) X): the symmetric rank-k update computes only the
        # upper triangle, half the flops of X^T X (the dominant cost for d_l in the thousands).
        # rootwX.T is the Fortran-ordered [d_l, b] view, so no copy is made.
        gram = dsyrk(1.0, rootwX.T, beta=1.0, c=gram, trans=0, overwrite_c=1)
    if total is None:
        raise DataError("has no rows", file=path)
    upper = np.triu(gram)
    return Moments(count, weight, total, upper + np.triu(upper, 1).T)


_partial_moments_task = ray.remote(num_cpus=1)(partial_moments)


@ray.remote(num_cpus=1)
def _merge_task(*parts):
    return functools.reduce(operator.add, parts)


def tree_reduce(refs: list, fan_in: int = 4):
    """Sum partial results (ObjectRefs of ``Moments``, arrays, or anything with ``+``) level by
    level, ``fan_in`` at a time, in Ray tasks.

    Each merge task starts as soon as its inputs exist; only the final result reaches the driver.
    """
    if not 2 <= fan_in <= 8:
        raise ValueError(f"fan_in={fan_in}: must be in 2..8")
    while len(refs) > 1:
        groups = [refs[i:i + fan_in] for i in range(0, len(refs), fan_in)]
        refs = [_merge_task.remote(*group) if len(group) > 1 else group[0] for group in groups]
    return ray.get(refs[0])


def distributed_covariance(files: list[str], scale: float = 1.0, weights: np.ndarray | None = None,
                           fan_in: int = 4) -> tuple[int, np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``scale * E`` over all fragments, one Ray task per file.

    Args:
        files: the ``part-*.parquet`` fragments (``item_idx``, ``vector: fixed_size_list[d_l]``).
        scale: s in ``s * E`` (``decompose.scale``); mu scales by s and C by s^2.
        weights: optional per-item frequency weights, float [N] indexed by ``item_idx``: a weight
            of k counts the row k times, the divisor is ``sum(w) - 1`` (``np.cov(fweights=w)``).
        fan_in: partials combined per reduce task (2..8).

    Returns:
        ``(n, mean, cov)``: the row count, float64 [d_l] and float64 [d_l, d_l].
    """
    files = [str(Path(f)) for f in files]
    fragment_dim(files)
    weights_ref = None if weights is None else ray.put(np.asarray(weights, dtype=np.float64))
    total = tree_reduce([_partial_moments_task.remote(f, weights_ref) for f in files], fan_in)
    if total.weight <= 1:
        raise DataError(f"the embeddings hold total weight {total.weight:g} over {total.count} rows; a "
                        "covariance needs more than 1", file=Path(files[0]).parent)
    mean = total.total / total.weight
    # the cancellation discussed in the module docstring happens here, in float64
    cov = (total.gram - total.weight * np.outer(mean, mean)) / (total.weight - 1)
    cov = (cov + cov.T) / 2  # exact symmetry for eigh (the products above differ in the last bit)
    return total.count, scale * mean, scale * scale * cov
