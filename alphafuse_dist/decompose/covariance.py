"""Mean and covariance of the item embeddings E: one Ray task per node, one thread per CPU.

The fragments (files) of the embed output are cut into pieces, runs of row groups of about equal
rows (:func:`fragment_pieces`; the embed stage writes row groups of 4,096 rows), so the
parallelism does not hang on the number of files. :func:`distributed_covariance` runs one Ray task
per node (:func:`task_layout`) holding as many CPUs as the node has; inside it (:func:`pieces_moments`)
one thread per CPU takes pieces (~4,096 rows, whatever the cluster) from a queue and streams each
in small batches: pyarrow decodes and BLAS multiplies with the GIL released. Each thread
accumulates its batches' products in a float32 buffer in place and, every 8,192 rows and at each
piece's end, adds them into one fixed-point (int64) gram shared by the task's threads
(:class:`FixedPointGram`: integer sums). The tasks' partials (:class:`GramPartial`: the integer
gram and each piece's sums) add up exactly in a tree of Ray tasks (fan-in 2..8), so the result
depends on the pieces alone, not on the threads' timing or the number of tasks and threads; no
process ever holds E: a task holds one gram, and one small batch and one float32 d_l x d_l
buffer per thread. (``float64`` keeps a float64 gram per thread, merged by the pairwise update
of Chan, Golub and LeVeque.) Then

    C = scatter / (W - 1)        (W = sum of weights)

which is ``np.cov(E, rowvar=False)`` without weights (unbiased N-1 form, docs/method.md section 2).

Why one task per node and not one per piece (until 2026-11-27): 16 worker processes each paid a
Ray worker's first task and sent a partial through the object store; one process with 16
threads took 0.36-0.39 of the reference's peak memory instead of 0.89 at 1M x 384 on 16 cores
(Ray's idle workers included), and its first call was faster (benchmarks/decompose/RESULTS.md).
Why one shared gram: a float64 gram per thread made 16 threads 6.1 GB at d_l = 3,072.

Numerics. Every batch is centred on a shift near the mean (the mean of the first 1,024 rows)
before any product, so the products never carry the mean (no ``sum x x^T - W mu mu^T``
cancellation, whatever |mu| / std is). The batch's scatter ``Z^T Z`` is then one BLAS ``syrk`` in
``precision``:

- ``float32`` (default): the centred rows stay float32 and the products are float32 (twice the
  speed of float64 and no float64 copy of the batch), accumulated in float32 over at most
  ``FLUSH_ROWS`` + one batch of rows, as one syrk over those rows would, then summed exactly (fixed
  point, ~1e-14 of the largest entry per add). The rounding of a sum of ``b`` products is
  ~eps32 * sqrt(b) ~ 1e-5 relative at worst and unbiased, and the exact sum over the
  ``N / b`` flushes averages it down: 1.7-2e-8 relative (Frobenius) to the float64 scatter at
  200k x 3,072 and 1M x 384 (tests assert < 1e-6 against ``np.cov``). An eigenvalue moves by at most
  ||dC||_2 (Weyl), so the k-th whitened direction is off by ~1e-7 * S_1 / S_k: nothing for the
  d = 128 of sentence embeddings (S_1 / S_128 ~ 1e2), ~2e-5 for a spectrum spanning 1e5 (use
  float64 there).
- ``float64``: a float64 copy of each batch and a float64 gram per thread (~1e-15 relative),
  for checks (:class:`ScatterAccumulator`).

Why not ``np.cov``: it needs E and a float64 copy of it in one process (the reference's peak
memory) and uses one machine (it computes the same syrk, in float64; see benchmarks/decompose).

Example::

    n, mu, cov = distributed_covariance(sorted(glob("runs/q/embed/part-*.parquet")))
    mu.shape, cov.shape   # (384,), (384, 384), float64
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
import operator
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..errors import DataError

INDEX_COLUMN = "item_idx"
VECTOR_COLUMN = "vector"
BATCH_ROWS = 8192  # default rows per batch of iter_fragment (callers pass their own)
BATCH_BYTES = 16 << 20  # float32 bytes per batch of the covariance pass: bounds a task's memory
READ_BUFFER = 1 << 20  # bytes; with pre_buffer off, a reader holds pages, not the whole row group
PRECISIONS = ("float32", "float64")
PIECES_PER_CPU = 1  # default pieces per cluster CPU (fragment_pieces); pieces have about equal rows
SHIFT_ROWS = 1024  # rows whose mean is the common shift of pieces_moments (near the mean is enough)
SCIPY_EIGH_MIN_DIM = 1024  # covariance_eigh: scipy's dsyevd from this d_l on, numpy's below
# mixed_precision_eigh stops refining when the top pairs' residuals |C v - t v| are below this
# share of S_1: a tenth of the float32 covariance's own error (~1e-7 of max |C|), ...
REFINE_RESIDUAL = 1e-8
REFINE_MAX_STEPS = 3  # ... or after this many subspace steps (each costs two d x d x b GEMMs)
SHARED_BATCH_BYTES = 4 << 20  # float32 bytes per read batch of the shared-gram path (pieces_moments)
FLUSH_ROWS = 8192  # rows a thread's float32 products accumulate before they go into the shared gram
HEADROOM_BITS = 16  # the fixed-point gram holds 2**HEADROOM_BITS x its estimated largest entry
STRIPE_ROWS = 64  # rows of the shared gram under one lock
PIECE_ROWS = 4096  # rows per piece of the covariance pass: one row group of the embed stage's files
FREE_CPUS_WAIT_S = 1.0  # free_cpus: how long to wait for CPUs a finished task still shows as taken

# A fragment file, or a run of its row groups: (path, (row group indices...)).
Piece = Union[str, Path, tuple[str, tuple[int, ...]]]


def piece_path(piece: Piece) -> str:
    """The file of a piece (a path or ``(path, row_groups)``)."""
    return str(piece) if isinstance(piece, (str, Path)) else str(piece[0])


def fragment_pieces(files: list[str], pieces: int | None = None, min_rows: int = 1,
                    rows_per_piece: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Split the fragments into ``(path, row_groups)`` pieces of about equal rows, for about
    ``pieces`` tasks (None: ``PIECES_PER_CPU`` per CPU of the Ray cluster) of at least ``min_rows``
    rows where a file has them, or (``rows_per_piece``) of about that many rows whatever the
    cluster; never fewer than one piece per file; a row group is never split.
    Reads the Parquet footers only.

    Raises:
        DataError: naming a file that cannot be read or has no rows.
    """
    if pieces is None and rows_per_piece is None:
        pieces = PIECES_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = {}
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read it as Parquet ({e})", file=path) from None
        groups[path] = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if not sum(groups[path]):
            raise DataError("has no rows", file=path)
    target = rows_per_piece or -(-sum(map(sum, groups.values())) // max(1, pieces))
    target = max(min_rows, target, 1)  # rows per piece
    out = []
    for path, rows in groups.items():
        # m runs of about equal rows: run j closes once the rows so far reach j/m of the file's
        total = sum(rows)
        m = min(len(rows), -(-total // target))
        run, held, made = [], 0, 0
        for i, n in enumerate(rows):
            run.append(i)
            held += n
            if held * m >= (made + 1) * total:
                out.append((path, tuple(run)))
                run, made = [], made + 1
        if run:  # row groups of 0 rows after the last cut
            out[-1] = (path, out[-1][1] + tuple(run))
    return out


@dataclass
class Moments:
    """Weighted moments of a set of rows x (each of dimension d_l), all float64.

    Attributes:
        count: number of rows.
        weight: W, the sum of the row weights (== count without weights).
        mean: sum w x / W, float64 [d_l] (zeros while W == 0).
        scatter: sum w (x - mean)(x - mean)^T, float64 [d_l, d_l].
    """

    count: int
    weight: float
    mean: np.ndarray
    scatter: np.ndarray

    def merge(self, other: "Moments") -> "Moments":
        """The moments of the union of both row sets (Chan et al.'s pairwise update)."""
        if other.weight == 0:
            return Moments(self.count + other.count, self.weight, self.mean, self.scatter)
        if self.weight == 0:
            return Moments(self.count + other.count, other.weight, other.mean, other.scatter)
        weight = self.weight + other.weight
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.weight / weight)
        # imported here, not at the top: the per-piece tasks never merge, and scipy.linalg costs
        # each fresh Ray worker ~0.1 s of a stage's first call (benchmarks/decompose/first_call.py)
        from scipy.linalg.blas import dger  # scipy comes with sentence-transformers

        scatter = self.scatter + other.scatter  # a new array: the inputs may be read-only (Ray objects)
        # the symmetric rank-1 term in place (BLAS ger on the Fortran view), no d_l x d_l temporary
        dger(self.weight * other.weight / weight, delta, delta, a=scatter.T, overwrite_a=1)
        return Moments(self.count + other.count, weight, mean, scatter)

    __add__ = merge  # lets tree_reduce sum Moments and plain arrays alike

    @property
    def total(self) -> np.ndarray:
        """sum w x, float64 [d_l]."""
        return self.mean * self.weight


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


def iter_fragment(piece: Piece, batch_rows: int = BATCH_ROWS, use_threads: bool = True,
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of one fragment, or of a piece ``(path, row_groups)`` of it, ``batch_rows`` at a time.

    The file is read page by page (``pre_buffer`` off): the default pre-buffering would hold a
    whole row group (614 MB for a 50,000-row group at d_l = 3072) on top of the batches.
    ``use_threads=False`` turns pyarrow's decoding pool off: :func:`pieces_moments` runs one
    thread per CPU already, and on 16 cores the pool on top made the covariance's first call 1.3x
    slower (benchmarks/decompose/RESULTS.md); the randomized solver's passes and the semantic
    table's transform run the same way.

    Yields:
        ``(item_idx, X)``: int64 [b] and float [b, d_l] in the stored precision (float32 from embed).
    """
    path, row_groups = (piece, None) if isinstance(piece, (str, Path)) else piece
    reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    for batch in reader.iter_batches(batch_size=batch_rows, row_groups=row_groups,
                                     columns=[INDEX_COLUMN, VECTOR_COLUMN], use_threads=use_threads):
        vectors = batch.column(VECTOR_COLUMN)
        if vectors.null_count or batch.column(INDEX_COLUMN).null_count:
            raise DataError("null entries; every row needs an item_idx and a vector", file=path)
        # the batch's own slice of the child values: .values ignores the batch's offset, and
        # flatten() (which honours it) imports pyarrow.compute on first use, 0.05-0.1 s under the
        # GIL that every thread of a fresh Ray worker's first pass waited for
        width = vectors.type.list_size
        values = vectors.values.slice(vectors.offset * width, len(vectors) * width)
        if values.null_count:
            raise DataError("null entries inside a vector", file=path, column=VECTOR_COLUMN)
        X = numpy_view(values).reshape(len(vectors), vectors.type.list_size)
        yield numpy_view(batch.column(INDEX_COLUMN)).astype(np.int64), X


def numpy_view(array: pa.Array) -> np.ndarray:
    """A read-only, zero-copy numpy view of a numeric Arrow array without nulls (other arrays:
    ``to_numpy``).

    Why not ``array.to_numpy()``: it imports pandas on first use (0.19-0.35 s), which every
    fresh Ray worker paid on its first batch, and the driver on its first read: part of the
    covariance's slower first call (benchmarks/decompose/RESULTS.md).
    """
    dtype = NUMPY_TYPES.get(array.type)  # not type.to_pandas_dtype(): pyarrow 25's imports pandas
    if dtype is None or array.null_count:
        return array.to_numpy(zero_copy_only=False)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


NUMPY_TYPES = {getattr(pa, name)(): np.dtype(name) for name in ("float16", "float32", "float64", "int8", "int16", "int32",
                                                                 "int64", "uint8", "uint16", "uint32", "uint64")}


def batch_rows_for(d_l: int) -> int:
    """Rows per read batch: ~``BATCH_BYTES`` of float32 vectors, but at least 4,096 and at most
    8,192 rows (8,192 at d_l=384, 4,096 = 50 MB at 3,072).

    The floor is the GEMM's: one thread's ``syrk`` of [b, 3072] rows took 115 us/row at b=1,365
    and 81 us/row at 4,096 (2026-11-27, 2-core Xeon, OpenBLAS); at 384 it is flat from ~8,192. The
    cap bounds the Parquet reader's buffers, which grow with the rows per batch
    (benchmarks/decompose/RESULTS.md)."""
    return min(8192, max(4096, BATCH_BYTES // (4 * d_l)))


class ScatterAccumulator:
    """Moments of rows added batch by batch, about a fixed shift (by default the first batch's mean).

    Each batch is centred on the shift (rounded to ``precision``) and its scatter ``Z^T Z`` is
    added into a float64 [d_l, d_l] gram in place. numpy computes ``Z.T @ Z`` of one buffer with
    BLAS ``syrk`` (half the flops of a GEMM; a hand-blocked upper triangle measured slower). The shift keeps
    the products centred (no cancellation against the mean); the scatter about the mean follows
    from the sum ``s = sum w (z - shift)`` (each batch's in ``precision``, added in float64):
    ``scatter = G - s s^T / W``; the mean is ``sum w x / W`` summed in float64 from the rows themselves.

    Accumulators given the same ``shift`` (the threads of :func:`pieces_moments`) add up exactly
    as their rows would: :meth:`absorb`. Subclasses send the products elsewhere
    (:meth:`_add_scatter`; :class:`SharedGramThread`).
    """

    def __init__(self, d_l: int, precision: str = "float32", shift: np.ndarray | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        self.dtype = np.dtype(precision)
        self.count, self.weight = 0, 0.0
        # float64 value of the rounded shift
        self.shift = None if shift is None else np.asarray(shift, np.float64).astype(self.dtype).astype(np.float64)
        self.sums = np.zeros(d_l)  # sum w (z - shift), of the rounded centred rows the gram sees
        self.totals = np.zeros(d_l)  # sum w x, exact in float64: the mean
        self.gram: np.ndarray | None = None  # float64 [d_l, d_l], from the first product on
        self._rows: np.ndarray | None = None  # the centred rows of a batch, in ``precision``
        self._product: np.ndarray | None = None  # a batch's Z^T Z, in ``precision``

    def add(self, X: np.ndarray, w: np.ndarray | None = None, path: str | None = None) -> None:
        """Add rows X [b, d_l] with optional weights w [b] (float64, >= 0); ``path``: their file,
        for errors."""
        if w is not None and not w.sum() > 0:
            self.count += len(X)
            return
        if self.shift is None:
            mean = (X.sum(axis=0, dtype=np.float64) / len(X) if w is None
                    else np.einsum("i,ij->j", w, X, dtype=np.float64) / w.sum())
            self.shift = mean.astype(self.dtype).astype(np.float64)
        if self._rows is None or len(self._rows) < len(X):  # reused batch after batch
            self._rows = np.empty(X.shape, dtype=self.dtype)
        Z = np.subtract(X, self.shift.astype(self.dtype), out=self._rows[:len(X)])
        if w is None:
            self.weight += float(len(X))
            # the column sums of Z as a BLAS gemv in ``precision`` (a quarter of the time of numpy's
            # float64 axis-0 sum); they only correct the scatter for the shift-to-mean offset
            self.sums += np.ones(len(Z), dtype=self.dtype) @ Z
            self.totals += X.sum(axis=0, dtype=np.float64)
        else:
            self.weight += float(w.sum())
            self.sums += np.einsum("i,ij->j", w, Z, dtype=np.float64)
            self.totals += np.einsum("i,ij->j", w, X, dtype=np.float64)
            Z *= np.sqrt(w).astype(self.dtype)[:, None]
        self.count += len(X)
        self._add_scatter(Z, path)

    def _add_scatter(self, Z: np.ndarray, path: str | None) -> None:
        """Add the centred (and weighted) batch's ``Z^T Z`` into the gram."""
        d = Z.shape[1]
        if self.gram is None:
            self.gram = np.zeros((d, d))
            self._product = np.empty((d, d), dtype=self.dtype)
        self.gram += np.matmul(Z.T, Z, out=self._product)

    def absorb(self, other: "ScatterAccumulator") -> None:
        """Add the rows of ``other``, accumulated about the same shift, into this accumulator."""
        if other.shift is None:  # nothing added, or only rows of weight 0
            self.count += other.count
            return
        if self.shift is None or not np.array_equal(self.shift, other.shift):
            raise ValueError("absorb() takes accumulators about the same shift")
        self.count += other.count
        self.weight += other.weight
        self.sums += other.sums
        self.totals += other.totals
        if other.gram is None:
            return
        if self.gram is None:
            self.gram = other.gram.copy()
        else:
            self.gram += other.gram

    def moments(self) -> Moments:
        """The accumulated rows' :class:`Moments`."""
        d = len(self.sums)
        gram = self.gram
        if self.weight == 0 or gram is None:
            return Moments(self.count, 0.0, np.zeros(d), np.zeros((d, d)))
        offset = self.sums / self.weight
        gram -= self.weight * np.outer(offset, offset)
        return Moments(self.count, self.weight, self.totals / self.weight, gram)


@functools.lru_cache(maxsize=None)
def openblas_syrk():
    """``cblas_ssyrk`` of an OpenBLAS this process has loaded (numpy's first), as a ctypes function
    ``syrk(Z, C, beta)``: ``C = Z^T Z + beta * C`` on the upper triangle of a C-ordered float32 C,
    in place; None where there is none (numpy on MKL or Accelerate).

    Why ctypes: the shared-gram path accumulates a thread's batch products in place (``beta=1``),
    which numpy's ``matmul`` cannot do (it also fills the lower triangle, a strided pass per batch),
    and scipy's ``ssyrk`` wrapper holds the GIL (two threads took twice one's time, 2026-11-27).
    ctypes releases the GIL during the call. The library is found with threadpoolctl, whose
    ``threadpool_limits`` then applies to these calls as to numpy's; the integer width (ILP64 or
    LP64) comes from the symbol's ``64_`` suffix or ``openblas_get_config``; a small product is
    checked against numpy before the function is handed out.
    """
    import ctypes

    from threadpoolctl import threadpool_info

    libs = [i["filepath"] for i in threadpool_info() if i.get("internal_api") == "openblas"]
    for filepath in sorted(libs, key=lambda f: "numpy" not in f):
        try:
            lib = ctypes.CDLL(filepath)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                fn = getattr(lib, f"{prefix}cblas_ssyrk{suffix}", None)
                if fn is None:
                    continue
                config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
                if suffix:
                    ilp64 = True
                elif config is not None:
                    config.restype = ctypes.c_char_p
                    ilp64 = b"USE64BITINT" in (config() or b"")
                else:
                    continue  # the integer width is unknown: a wrong guess would crash
                integer = ctypes.c_int64 if ilp64 else ctypes.c_int
                fn.restype = None
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, ctypes.c_float,
                               ctypes.c_void_p, integer, ctypes.c_float, ctypes.c_void_p, integer]

                def syrk(Z: np.ndarray, C: np.ndarray, beta: float, fn=fn) -> None:
                    # CblasRowMajor=101, CblasUpper=121, CblasTrans=112: C (n x n) = Z^T Z, Z (k x n)
                    assert Z.dtype == C.dtype == np.float32 and Z.flags.c_contiguous and C.flags.c_contiguous
                    n, k = C.shape[0], Z.shape[0]
                    fn(101, 121, 112, n, k, 1.0, Z.ctypes.data, n, beta, C.ctypes.data, n)

                Z = np.arange(15, dtype=np.float32).reshape(5, 3) - 7
                C = np.full((3, 3), 1.0, np.float32)
                syrk(Z, C, 1.0)
                if np.allclose(np.triu(C), np.triu(Z.T @ Z + 1.0)) and C[1, 0] == 1.0:
                    return syrk
    return None


class FixedPointGram:
    """A d_l x d_l gram that threads add into concurrently, held as int64 multiples of a power of
    two, ``quantum``: integer sums do not depend on the order the threads add in, so the result
    is the same bits on every run, unlike a shared float64 sum. Only the upper triangle is kept.

    Each add rounds ``A / quantum`` to the nearest integer, so an entry is off by at most
    ``quantum / 2`` per add. ``quantum`` is chosen (:meth:`for_rows`) so that the estimated largest
    entry is ``2**(62 - HEADROOM_BITS)`` quanta: ~1e-14 relative to it, where the float32 products
    themselves are ~1e-7. An add first counts its bound (twice the largest diagonal entry: a
    PSD matrix has no larger entry, and float32 rounding is far below a factor of 2); once the bounds
    sum past 2**62 an entry could overflow, the gram is marked ``overflowed`` and ignores further
    adds (the caller redoes the sum another way). The stripes of ``STRIPE_ROWS`` rows each have
    a lock; each thread starts at its own stripe.
    """

    LIMIT = 1 << 62

    def __init__(self, d_l: int, quantum: float):
        self.quantum = float(quantum)
        self.values = np.zeros((d_l, d_l), dtype=np.int64)
        self.stripes = [(r, min(d_l, r + STRIPE_ROWS)) for r in range(0, d_l, STRIPE_ROWS)]
        self._locks = [threading.Lock() for _ in self.stripes]
        self._lower = [np.tril_indices(r1 - r0, -1) for r0, r1 in self.stripes]
        self._bound, self._bound_lock = 0, threading.Lock()
        self.overflowed = False

    @staticmethod
    def quantum_for(weight: float, spread: float) -> float:
        """The quantum for rows of total weight at most ``weight`` whose centred squares average
        at most ``spread`` per coordinate (estimates; ``HEADROOM_BITS`` covers 65,536x more)."""
        largest = max(float(weight) * float(spread), np.finfo(np.float64).tiny)
        return float(2.0 ** np.ceil(np.log2(largest / 2.0 ** (62 - HEADROOM_BITS))))

    @classmethod
    def for_rows(cls, d_l: int, weight: float, spread: float) -> "FixedPointGram":
        """A gram with :meth:`quantum_for` ``(weight, spread)``."""
        return cls(d_l, cls.quantum_for(weight, spread))

    @property
    def bound(self) -> int:
        """The sum of the adds' bounds, in quanta: no entry is larger (above ``LIMIT``: overflowed)."""
        return self._bound

    def add(self, A: np.ndarray, start: int = 0) -> None:
        """Add the upper triangle of the PSD float matrix A (its lower one is not added: syrk
        leaves it as it was), from stripe ``start`` on."""
        bound = int(np.ceil(2.0 * float(A.diagonal().max()) / self.quantum)) + 1
        with self._bound_lock:
            self._bound += bound
            self.overflowed |= self._bound > self.LIMIT
            if self.overflowed:
                return
        n = len(self.stripes)
        for k in range(n):
            i = (start + k) % n
            r0, r1 = self.stripes[i]
            block = np.multiply(A[r0:r1, r0:], 1.0 / self.quantum, dtype=np.float64)  # exact: a power of 2
            block[:, :r1 - r0][self._lower[i]] = 0.0  # below the diagonal: not ours to add
            np.rint(block, out=block)
            block = block.astype(np.int64)
            with self._locks[i]:
                self.values[r0:r1, r0:] += block

    def to_float(self, alpha: float = 0.0, x: np.ndarray | None = None) -> np.ndarray:
        """The symmetric float64 gram, plus ``alpha x x^T`` when ``x`` is given: added to the upper
        triangle before it is mirrored (in place, BLAS ``syr``, from d_l = ``SCIPY_EIGH_MIN_DIM``
        on: 0.004 s against 0.04-0.13 s for numpy's outer product at 3,072), so the result is
        exactly symmetric."""
        G = self.values.astype(np.float64)
        G *= self.quantum
        if x is not None and len(x) >= SCIPY_EIGH_MIN_DIM:
            from scipy.linalg.blas import dsyr  # imported while the tasks ran (distributed_covariance)

            dsyr(alpha, x, a=G.T, lower=1, overwrite_a=1)  # G's upper triangle is its transpose's lower
        elif x is not None:  # small: scipy.linalg would cost more to import cold than this takes
            G += alpha * np.outer(x, x)
        for i, (r0, r1) in enumerate(self.stripes):  # mirror the upper triangle, stripe by stripe
            G[r0:r1, :r0] = G[:r0, r0:r1].T
            G[r0:r1, r0:r1][self._lower[i]] = G[r0:r1, r0:r1].T[self._lower[i]]
        return G


class SharedGramThread(ScatterAccumulator):
    """One thread's accumulator in :func:`shared_gram_pass`: its batch products add up in a
    float32 [d_l, d_l] buffer in place (``syrk`` with ``beta=1``: :func:`openblas_syrk`, or
    numpy's ``matmul`` and an add where there is none) for ``FLUSH_ROWS`` rows of a piece, as one
    8,192-row product would, and then (and at the piece's end: :meth:`end_piece`) go into the
    :class:`FixedPointGram` shared by all threads.
    So a thread holds one float32 d_l x d_l buffer and one small batch, not a float64 gram of its own.

    Raises (from :meth:`add`):
        DataError: naming the file when a vector holds NaN or inf (the diagonal of the products
            stops being finite).
    """

    def __init__(self, d_l: int, shift: np.ndarray, shared: FixedPointGram, order: int):
        super().__init__(d_l, "float32", shift)
        self.shared, self.order = shared, order
        self._pending = 0  # rows in the buffer since the last flush
        self._buffer = np.zeros((d_l, d_l), dtype=np.float32)  # the lower triangle stays 0 with syrk
        self._syrk = openblas_syrk()

    def _add_scatter(self, Z: np.ndarray, path: str | None) -> None:
        if self._syrk is not None:
            self._syrk(Z, self._buffer, 1.0 if self._pending else 0.0)
        elif self._pending:
            if self._product is None:
                self._product = np.empty_like(self._buffer)
            self._buffer += np.matmul(Z.T, Z, out=self._product)
        else:
            np.matmul(Z.T, Z, out=self._buffer)
        if not np.isfinite(self._buffer.diagonal()).all():
            raise DataError("a vector holds NaN or inf", file=path, column=VECTOR_COLUMN)
        self._pending += len(Z)
        if self._pending >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Add the buffered products into the shared gram."""
        if self._pending:
            self.shared.add(self._buffer, self.order)
            self._pending = 0

    def end_piece(self) -> tuple[int, float, np.ndarray, np.ndarray]:
        """Flush, and return the piece's ``(count, weight, sums, totals)``, starting the next
        piece from zero: a piece's products and sums then depend on the piece alone, not on what
        the thread read before it."""
        self.flush()
        out = (self.count, self.weight, self.sums.copy(), self.totals.copy())
        self.count, self.weight = 0, 0.0
        self.sums[:] = 0.0
        self.totals[:] = 0.0
        return out


def batch_moments(X: np.ndarray, w: np.ndarray | None = None, precision: str = "float32") -> Moments:
    """Moments of one batch of rows X [b, d_l] with optional weights w [b] (see the module notes)."""
    acc = ScatterAccumulator(X.shape[1], precision)
    acc.add(np.asarray(X), w)
    return acc.moments()


def _batch_weights(idx: np.ndarray, weights: np.ndarray | None, path: str) -> np.ndarray | None:
    """The weights of a batch's rows (None without weights).

    Raises:
        DataError: naming the file when an ``item_idx`` has no weight or a negative one.
    """
    if weights is None:
        return None
    outside = idx[(idx < 0) | (idx >= len(weights))]
    if len(outside):
        raise DataError(f"item_idx {outside[0]} has no weight (weights cover 0..{len(weights) - 1})",
                        file=path, column=INDEX_COLUMN)
    w = np.asarray(weights, dtype=np.float64)[idx]
    if (w < 0).any():
        raise DataError(f"item_idx {idx[np.argmax(w < 0)]} has a negative weight; weights are counts",
                        file=path, column=INDEX_COLUMN)
    return w


def _add_piece(acc: "ScatterAccumulator | None", piece: Piece, weights: np.ndarray | None, rows: int,
               precision: str, use_threads: bool = True) -> "ScatterAccumulator":
    """Stream one piece's rows into ``acc`` (a new accumulator when None) and return it
    (``use_threads``: pyarrow's decoding pool, see :func:`iter_fragment`).

    Raises:
        DataError: naming the file when the piece has no rows, an ``item_idx`` has no valid
            weight, or (``acc`` a :class:`SharedGramThread`) a vector holds NaN or inf.
    """
    path, before = piece_path(piece), (0 if acc is None else acc.count)
    for idx, X in iter_fragment(piece, rows, use_threads=use_threads):
        w = _batch_weights(idx, weights, path)
        if acc is None:
            acc = ScatterAccumulator(X.shape[1], precision)
        acc.add(X, w, path)
    if acc is None or acc.count == before:
        raise DataError("has no rows", file=path)
    return acc


def partial_moments(piece: Piece, weights: np.ndarray | None = None, batch_rows: int | None = None,
                    precision: str = "float32") -> Moments:
    """Moments of one fragment or piece, streamed in batches into one :class:`ScatterAccumulator`.

    Args:
        piece: one ``part-*.parquet`` file of the embed output, or ``(path, row_groups)`` of one.
        weights: optional per-item weights, float [N] indexed by ``item_idx`` (e.g. popularity);
            None gives every row weight 1.
        batch_rows: rows read at a time (None: :func:`batch_rows_for` d_l).
        precision: the GEMM precision of each batch's scatter ("float32" or "float64").
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    rows = batch_rows or batch_rows_for(fragment_dim([piece_path(piece)]))
    return _add_piece(None, piece, weights, rows, precision).moments()


def shared_batch_rows(d_l: int) -> int:
    """Rows per read batch of :func:`shared_gram_pass`: ``SHARED_BATCH_BYTES`` of float32
    vectors, between 1,024 and 8,192 rows (2,730 at d_l = 384, 1,024 = 12.6 MB at 3,072).
    The products accumulate across batches (:class:`SharedGramThread`), so small batches cost
    no precision; they keep 16 threads' batches small (benchmarks/decompose/RESULTS.md)."""
    return min(8192, max(1024, SHARED_BATCH_BYTES // (4 * d_l)))


@dataclass
class GramPartial:
    """What a :func:`shared_gram_pass` returns: the fixed-point gram of its pieces and each
    piece's count, weight, sums and totals. Partials add up (``+``: integer grams, pieces
    appended) and :meth:`moments` sums the pieces' vectors exactly (``math.fsum``), so the
    moments do not depend on which task or thread read which piece.

    Attributes:
        shift: float64 [d_l], the common shift; quantum: the gram's unit.
        values: int64 [d_l, d_l], the upper triangle of ``sum w z z^T`` in quanta.
        bound: the adds' bounds summed (:attr:`FixedPointGram.bound`).
        counts, weights: int64 / float64 [pieces]; sums, totals: float64 [pieces, d_l]
            (``sum w (z - shift)`` and ``sum w x`` of each piece).
    """

    shift: np.ndarray
    quantum: float
    values: np.ndarray
    bound: int
    counts: np.ndarray
    weights: np.ndarray
    sums: np.ndarray
    totals: np.ndarray

    @property
    def overflowed(self) -> bool:
        """True when an entry may have wrapped around int64: the sum must be redone another way."""
        return self.bound > FixedPointGram.LIMIT

    def __add__(self, other: "GramPartial") -> "GramPartial":
        if other.quantum != self.quantum or not np.array_equal(other.shift, self.shift):
            raise ValueError("GramPartial: only partials of one pass (same shift and quantum) add up")
        return GramPartial(self.shift, self.quantum, self.values + other.values, self.bound + other.bound,
                           *(np.concatenate([a, b]) for a, b in ((self.counts, other.counts),
                                                                 (self.weights, other.weights),
                                                                 (self.sums, other.sums),
                                                                 (self.totals, other.totals))))

    def moments(self) -> Moments:
        """The :class:`Moments` of all the pieces' rows."""
        if self.overflowed:
            raise ValueError("the fixed-point gram overflowed; redo the pass with thread_grams_pass")
        d = len(self.shift)
        gram = FixedPointGram(d, self.quantum)
        gram.values = np.asarray(self.values)
        count, weight = int(self.counts.sum()), math.fsum(self.weights)
        if weight == 0:
            return Moments(count, 0.0, np.zeros(d), np.zeros((d, d)))
        sums = np.array([math.fsum(col) for col in self.sums.T.tolist()])
        totals = np.array([math.fsum(col) for col in self.totals.T.tolist()])
        offset = sums / weight
        return Moments(count, weight, totals / weight, gram.to_float(-weight, offset))


def first_rows_mean(pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, X)``: the first ``SHIFT_ROWS`` rows X of the first piece and their float64 mean,
    a shift near the mean that every thread and task of a pass can share (read on the driver).

    Raises:
        DataError: naming the first piece's file when it has no rows or one of these rows holds
            NaN or inf (found here, a shift of NaN would make every piece's products NaN, and the
            thread that failed first would name its own file).
    """
    first = next(iter_fragment(pieces[0], SHIFT_ROWS, use_threads=False), None)
    if first is None:
        raise DataError("has no rows", file=piece_path(pieces[0]))
    X = first[1]
    mean = X.sum(axis=0, dtype=np.float64) / len(X)
    if not np.isfinite(mean).all():
        raise DataError("a vector holds NaN or inf", file=piece_path(pieces[0]), column=VECTOR_COLUMN)
    return mean, X


def gram_setup(pieces: list[Piece], weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """``(shift, quantum)`` of a fixed-point pass over ``pieces``: the mean of the first
    ``SHIFT_ROWS`` rows of the first piece, and the quantum for the rows' count (Parquet footers)
    or the weights' sum, and the largest mean square of those first rows about the shift.

    Raises:
        DataError: as :func:`first_rows_mean`.
    """
    shift, X = first_rows_mean(pieces)
    centred = X - shift.astype(X.dtype)
    spread = float(np.max(np.mean(np.square(centred, dtype=np.float64), axis=0)))
    spread = spread or float(np.max(np.square(shift))) or 1.0  # identical first rows
    weight = _pieces_rows(pieces) if weights is None else float(np.sum(weights))
    return shift, FixedPointGram.quantum_for(weight, spread)


def _run_threads(threads: int, work) -> list:
    """``work(t)`` for t in 0..threads-1, each in its own thread with BLAS held at one thread
    (threadpoolctl), results in thread order."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        if threads == 1:
            return [work(0)]
        with ThreadPoolExecutor(threads, thread_name_prefix="moments") as pool:
            return list(pool.map(work, range(threads)))


def pieces_in_threads(pieces: list[Piece], threads: int, start, handle, stop=None) -> None:
    """Run ``threads`` threads (BLAS at one thread each: :func:`_run_threads`) that take
    ``(i, piece)`` from one queue, in order, as they free up: ``state = start(t)`` once per
    thread, then ``handle(state, i, piece)`` per piece, until the queue is empty, ``stop()`` is
    true or a thread has raised (its error stops the others at their next piece, then surfaces)."""
    queue, lock, failed = iter(enumerate(pieces)), threading.Lock(), threading.Event()

    def work(t: int) -> None:
        state = start(t)
        while True:
            with lock:
                item = next(queue, None)
            if item is None or failed.is_set() or (stop is not None and stop()):
                return
            try:
                handle(state, *item)
            except BaseException:
                failed.set()
                raise

    _run_threads(max(1, min(threads, len(pieces))), work)


def shared_gram_pass(pieces: list[Piece], weights: np.ndarray | None, threads: int, shift: np.ndarray,
                     quantum: float, batch_rows: int | None = None) -> GramPartial:
    """The fixed-point pass of :func:`pieces_moments` and of each task of
    :func:`distributed_covariance`: ``threads`` threads take pieces from one queue as they free
    up; each streams a piece in batches (``shared_batch_rows``) into its
    :class:`SharedGramThread`, which adds the piece's products into one :class:`FixedPointGram`.
    A piece's products and sums depend on the piece alone and integer sums do not depend on
    their order, so any split of the pieces between threads and tasks gives the same bits;
    the queue keeps the threads busy to the end.

    Raises:
        DataError: naming the file of a piece without rows, an ``item_idx`` without a valid
            weight, or a vector holding NaN or inf.
    """
    d = len(shift)
    shared = FixedPointGram(d, quantum)
    rows = batch_rows or shared_batch_rows(d)
    openblas_syrk()  # found once here, not by every thread at once
    per_piece: list = [None] * len(pieces)
    threads = max(1, min(threads, len(pieces)))

    def add(acc: SharedGramThread, i: int, piece: Piece) -> None:
        _add_piece(acc, piece, weights, rows, "float32", use_threads=False)
        per_piece[i] = acc.end_piece()

    pieces_in_threads(pieces, threads, lambda t: SharedGramThread(d, shift, shared, t * len(shared.stripes) // threads),
                      add, stop=lambda: shared.overflowed)
    done = [p for p in per_piece if p is not None]  # all, unless it overflowed
    return GramPartial(np.asarray(shift, np.float64), quantum, shared.values, shared.bound,
                       np.array([p[0] for p in done], np.int64), np.array([p[1] for p in done]),
                       np.array([p[2] for p in done]).reshape(-1, d), np.array([p[3] for p in done]).reshape(-1, d))


def thread_grams_pass(pieces: list[Piece], weights: np.ndarray | None = None, threads: int = 1,
                      precision: str = "float32", batch_rows: int | None = None) -> Moments:
    """The float64 way of :func:`pieces_moments`: thread t streams pieces t, t + threads, ...
    into its own :class:`ScatterAccumulator` (a float64 gram), all about one shift, and the
    accumulators are added in thread order: the same bits for the same pieces and thread count.

    Raises:
        DataError: as :func:`partial_moments`, for the first failing piece.
    """
    d = fragment_dim([piece_path(pieces[0])])
    first = next(iter_fragment(pieces[0], SHIFT_ROWS, use_threads=False), None)
    if first is None:
        raise DataError("has no rows", file=piece_path(pieces[0]))
    shift = first[1].sum(axis=0, dtype=np.float64) / len(first[1])
    rows = batch_rows or batch_rows_for(d)
    threads = max(1, min(threads, len(pieces)))

    def work(t: int) -> ScatterAccumulator:
        acc = ScatterAccumulator(d, precision, shift=shift)
        for piece in pieces[t::threads]:
            _add_piece(acc, piece, weights, rows, precision, use_threads=False)
        return acc

    accs = _run_threads(threads, work)
    total = accs[0]
    for acc in accs[1:]:
        total.absorb(acc)
    return total.moments()


def pieces_moments(pieces: list[Piece], weights: np.ndarray | None = None, threads: int = 1,
                   precision: str = "float32", batch_rows: int | None = None) -> Moments:
    """Moments of several pieces in this process, in ``threads`` threads.

    - ``float32`` (default): :func:`gram_setup` and :func:`shared_gram_pass`: one fixed-point
      gram shared by the threads; the result does not depend on the thread count or timing.
      Should the data outgrow the gram's range (its first rows' spread times 2**16; the gram
      reports an overflow), the pass is redone by :func:`thread_grams_pass`, with a warning.
    - ``float64``: :func:`thread_grams_pass` (a float64 gram per thread, added in thread order).

    Threads, not one process per piece: the work is pyarrow's decoding and BLAS, which release the
    GIL, and one process per node pays one Ray worker's first task and returns one partial
    (benchmarks/decompose/RESULTS.md). BLAS runs one thread per calling thread meanwhile
    (threadpoolctl), so the threads do not oversubscribe the cores. The shared gram is what
    keeps 16 threads small and fast at d_l = 3,072: a float64 gram per thread took 6.1 GB and
    4.5 s for the first pass over 200k rows on 16 cores, the shared one 2.1 GB and 2.4 s
    (benchmarks/decompose/RESULTS.md).

    Raises:
        DataError: as :func:`partial_moments`, for the first failing piece; naming the file
            whose vector holds NaN or inf (float32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if not pieces:
        raise ValueError("pieces_moments needs at least one piece")
    if precision == "float32":
        shift, quantum = gram_setup(pieces, weights)
        partial = shared_gram_pass(pieces, weights, threads, shift, quantum, batch_rows)
        if not partial.overflowed:
            return partial.moments()
        _warn_overflow()
    return thread_grams_pass(pieces, weights, threads, precision, batch_rows)


def _warn_overflow() -> None:
    logging.getLogger(__name__).warning(
        "the products outgrew the fixed-point gram (their first %d rows' spread, 2**%d times over); "
        "summing again with a float64 gram per thread", SHIFT_ROWS, HEADROOM_BITS)


def _pieces_rows(pieces: list[Piece]) -> int:
    """Rows of the pieces, from the Parquet footers (each file's read once)."""
    footers: dict[str, pq.FileMetaData] = {}
    rows = 0
    for piece in pieces:
        path = piece_path(piece)
        if path not in footers:
            footers[path] = pq.ParquetFile(path).metadata
        meta = footers[path]
        groups = range(meta.num_row_groups) if isinstance(piece, (str, Path)) else piece[1]
        rows += sum(meta.row_group(g).num_rows for g in groups)
    return rows


def _shared_gram_task(pieces: list[Piece], weights, shift: np.ndarray, quantum: float) -> GramPartial:
    """A Ray task of :func:`distributed_covariance` (float32): as many threads as CPUs Ray gave it."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return shared_gram_pass(pieces, weights, max(1, int(cpus)), shift, quantum)


def _thread_grams_task(pieces: list[Piece], weights, precision: str) -> Moments:
    """A Ray task of :func:`distributed_covariance` (float64, or float32 after an overflow)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return thread_grams_pass(pieces, weights, max(1, int(cpus)), precision)


_shared_gram_remote = ray.remote(_shared_gram_task)
_thread_grams_remote = ray.remote(_thread_grams_task)


def task_layout(task_cpus: int | None = None) -> tuple[int, int]:
    """``(tasks, cpus_per_task)`` for :func:`distributed_covariance`.

    By default each task takes as many CPUs as the largest alive node has (one task per node of
    an even cluster), but no more than the cluster has free (:func:`free_cpus`): a task asking
    for a whole node would wait forever while an actor holds one of its CPUs. ``task_cpus``
    (``decompose.task_cpus``) sets the CPUs per task instead, e.g. for a multi-node cluster
    where resident actors hold a CPU on every node. Tasks: the cluster's CPUs over
    ``cpus_per_task``, at least one (more tasks than fit at once run as CPUs free up). The
    float32 covariance does not depend on the layout, only its speed does.

    Raises:
        ValueError: when ``task_cpus`` < 1.
    """
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    if task_cpus is None:
        largest = int(max(nodes, default=1))
        task_cpus = min(largest, free_cpus(largest)) or 1
    if task_cpus < 1:
        raise ValueError(f"task_cpus={task_cpus}: must be >= 1")
    return max(1, int(sum(nodes)) // task_cpus), task_cpus


def free_cpus(want: int, wait: float = FREE_CPUS_WAIT_S) -> int:
    """The cluster's free CPUs, waiting up to ``wait`` seconds for ``want`` of them.

    Ray's count of free resources lags: right after a task ends, its CPUs still show as taken
    for a moment (a covariance run straight after another saw 1 free CPU of 16 and ran 16
    one-CPU tasks: 3.1 s instead of 0.8 s, 2026-11-27, 16 cores). CPUs held by an actor stay
    taken, so then this waits the whole ``wait``.
    """
    deadline = time.monotonic() + wait
    while True:
        free = int(ray.available_resources().get("CPU", 0))
        if free >= want or time.monotonic() >= deadline:
            return free
        time.sleep(0.02)


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


def covariance_eigh(cov: np.ndarray, precision: str = "float64",
                    top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs of a symmetric covariance, eigenvalues ascending (as ``np.linalg.eigh``).

    ``float64`` (default): LAPACK's divide and conquer ``dsyevd``, as numpy's; from d_l =
    ``SCIPY_EIGH_MIN_DIM`` on scipy's, which ships a faster OpenBLAS build: 0.88 s against numpy's
    1.14-1.19 s for the covariance of the 200k x 3,072 benchmark on 16 cores (2026-11-27, H100
    machine's CPU). Below, numpy's takes milliseconds and importing scipy.linalg cold would cost
    more (0.13-0.39 s). Not MRRR (``dsyevr``): on that covariance, whose 1,308 smallest eigenvalues
    lie below 1e-12 of the largest, it took 2.2 s; a top-128 subset (``dsyevx``) was no faster,
    since the reduction to tridiagonal form, which every driver does first, is most of the time.

    ``float32`` with ``top`` (the decompose stage under ``decompose.precision`` float32, ``top`` =
    ``model.dim``): :func:`mixed_precision_eigh`, when d_l >= ``SCIPY_EIGH_MIN_DIM`` and its
    refinement block (:func:`refine_block`) is at most half of d_l; otherwise as ``float64``.

    Raises:
        ValueError: for another ``precision`` or ``top`` outside 1..d_l.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    cov = np.asarray(cov, dtype=np.float64)
    d = len(cov)
    if top is not None and not 1 <= top <= d:
        raise ValueError(f"top={top}: expected 1..{d} (the covariance is {d} x {d})")
    if precision == "float32" and top is not None and d >= SCIPY_EIGH_MIN_DIM and 2 * refine_block(top, d) <= d:
        return mixed_precision_eigh(cov, top)
    if d < SCIPY_EIGH_MIN_DIM:
        return np.linalg.eigh(cov)
    from scipy.linalg import eigh  # as for dger: imported where it is used

    return eigh(cov, driver="evd", check_finite=False)


def refine_block(top: int, d: int) -> int:
    """Columns :func:`mixed_precision_eigh` refines to get the top ``top`` pairs: ``top`` plus as
    many again (at least 16), at most d. Extra columns speed up the subspace step: the error of
    pair k shrinks by S_{block+1} / S_k."""
    return min(d, top + max(16, top))


def mixed_precision_eigh(cov: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs from float32 ``ssyevd``, the top ``refine_block(top)`` of them refined in float64.

    1. ``ssyevd`` on the covariance rounded to float32: about half ``dsyevd``'s time (200k x 3,072
       benchmark covariance, 2-core Xeon: 1.4-1.6 s against 2.5-3.0 s). Its pairs carry float32's
       backward error, ~1e-7 of the largest eigenvalue: the error class of the float32 products
       the covariance is summed from under ``decompose.precision`` float32.
    2. Subspace iteration with Rayleigh-Ritz in float64 on the top ``b = refine_block(top, d)``
       vectors V: ``Q = qr(C V)``, ``eigh(Q^T C Q) = W T W^T``, ``V = Q W``, until the top
       ``top`` pairs' residuals ``|C v - t v|`` are at most ``REFINE_RESIDUAL`` of the largest
       eigenvalue, or ``REFINE_MAX_STEPS`` steps (each step cuts pair k's error by about
       S_{b+1} / S_k). All b pairs then replace those of step 1, so the seam between refined and
       float32 pairs lies at least 16 pairs below the top ``top`` (a cluster of near-equal
       eigenvalues across the top ``top``'s edge is refined as a whole). On the benchmark
       covariance (top 128, b = 256), one step put the refined eigenvalues within 2e-13 relative of
       ``dsyevd``'s (float32 alone: 3e-6) and the smallest principal cosine of the two top-128
       subspaces at 1 - 2e-13 (float32 alone: 1 - 8e-7), for 0.2 s on 2 cores.
    3. The d - b float32 vectors below are projected off the refined ones and normalised: no
       column then repeats a refined direction (unprojected, they are orthogonal only to the
       float32 versions of the refined vectors: 6e-4 off on a power-law spectrum, ~1 with a
       cluster of eigenvalues at the seam). Among themselves they stay orthogonal to about the
       square of what was projected off: a float32 eigenvector of eigenvalue S_k is accurate to
       ~1e-7 S_1 / gap only, so for the benchmark covariance 8e-5 (``ssyevd`` alone: 2e-6).

    The covariance is scaled by its largest diagonal entry before the float32 cast, so no scale
    of the embeddings under- or overflows float32.

    Written here because LAPACK has no mixed-precision symmetric eigensolver (its mixed-precision
    routines, ``dsgesv`` / ``dsposv``, solve linear systems). The pairs below the top b stay
    float32-accurate: the stage's basis uses the top ``model.dim`` (the whitenrec baseline uses
    all above 1e-5 of the largest; set ``decompose.precision=float64`` to fit those in float64
    too).

    Returns:
        ``(eigenvalues float64 [d] ascending, eigenvectors float64 [d, d])``, as :func:`covariance_eigh`.
    """
    from scipy.linalg import eigh

    cov = np.asarray(cov, dtype=np.float64)
    unit = float(np.max(np.abs(np.diagonal(cov)))) or 1.0
    values, vectors = eigh((cov / unit).astype(np.float32), driver="evd", check_finite=False)
    values, vectors = values.astype(np.float64) * unit, vectors.astype(np.float64)
    b = refine_block(top, len(cov))
    refined, C_refined = vectors[:, -b:], cov @ vectors[:, -b:]
    for _ in range(REFINE_MAX_STEPS):
        Q, _ = np.linalg.qr(C_refined)
        CQ = cov @ Q
        ritz, W = np.linalg.eigh(Q.T @ CQ)
        refined, C_refined = Q @ W, CQ @ W
        residual = np.linalg.norm(C_refined[:, -top:] - refined[:, -top:] * ritz[-top:], axis=0).max()
        if residual <= REFINE_RESIDUAL * max(ritz[-1], 0.0):
            break
    rest = vectors[:, :-b]
    rest -= refined @ (refined.T @ rest)
    rest /= np.linalg.norm(rest, axis=0)
    values[-b:], vectors[:, -b:] = ritz, refined
    # at the seam a refined and a float32 pair closer than float32 rounding may come out of
    # order; sort them back
    if np.all(np.diff(values) >= 0):
        return values, vectors
    order = np.argsort(values, kind="stable")
    return values[order], vectors[:, order]


def covariance_pieces(files: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """The pieces of :func:`distributed_covariance`: runs of row groups of about ``PIECE_ROWS``
    rows (:func:`fragment_pieces`), one row group of the embed stage's files, whatever the
    cluster: the float32 covariance depends on the pieces, so they must not depend on the CPUs.
    Small pieces also even out the threads' loads (they take pieces from a queue).

    Raises:
        DataError: as :func:`fragment_dim` and :func:`fragment_pieces`.
    """
    fragment_dim(files)
    return fragment_pieces(files, rows_per_piece=PIECE_ROWS)


def distributed_covariance(files: list[str], scale: float = 1.0, weights: np.ndarray | None = None,
                           fan_in: int = 4, precision: str = "float32",
                           task_cpus: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``scale * E`` over all fragments: one Ray task per node
    (:func:`task_layout`), each running one thread per CPU over its share of the pieces
    (:func:`covariance_pieces`); the tasks' partials are tree-reduced.

    - ``float32``: the driver fixes the shift and quantum (:func:`gram_setup`), each task runs
      :func:`shared_gram_pass`, and the partials' integer grams add up exactly: the result is
      the same bits whatever the number of tasks and threads (on nodes of one CPU type: OpenBLAS
      picks its float32 kernels by CPU). An overflow of the fixed-point gram
      (data far wider than its first rows) redoes the pass as ``float64`` does, with a warning.
    - ``float64``: each task runs :func:`thread_grams_pass`; the partials are merged with Chan's
      update (:class:`Moments`).

    Args:
        files: the ``part-*.parquet`` fragments (``item_idx``, ``vector: fixed_size_list[d_l]``).
        scale: s in ``s * E`` (``decompose.scale``); mu scales by s and C by s^2.
        weights: optional per-item frequency weights, float [N] indexed by ``item_idx``: a weight
            of k counts the row k times, the divisor is ``sum(w) - 1`` (``np.cov(fweights=w)``).
        fan_in: partials combined per reduce task (2..8).
        precision: GEMM precision of the per-batch scatter (``decompose.precision``; module notes).
        task_cpus: CPUs (and threads) per task; None: the largest node's CPUs (:func:`task_layout`).

    Returns:
        ``(n, mean, cov)``: the row count, float64 [d_l] and float64 [d_l, d_l].
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    files = [str(Path(f)) for f in files]
    pieces = covariance_pieces(files)  # checks every file's columns and d_l
    if fragment_dim(files[:1]) >= SCIPY_EIGH_MIN_DIM and "scipy.linalg" not in sys.modules:
        # covariance_eigh will want scipy.linalg next: import it while the tasks run (0.39 s cold
        # at d_l = 3,072 on 16 cores); the import lock makes a later import wait for this one
        threading.Thread(target=importlib.import_module, args=("scipy.linalg",), daemon=True).start()
    tasks, cpus = task_layout(task_cpus)
    tasks = min(tasks, len(pieces))
    weights_ref = None if weights is None else ray.put(np.asarray(weights, dtype=np.float64))
    total = None
    if precision == "float32":
        shift, quantum = gram_setup(pieces, weights)
        # pieces dealt round-robin: they have about equal rows (fragment_pieces)
        partial = tree_reduce([_shared_gram_remote.options(num_cpus=cpus).remote(
            pieces[t::tasks], weights_ref, shift, quantum) for t in range(tasks)], fan_in)
        if partial.overflowed:
            _warn_overflow()
        else:
            total = partial.moments()  # its scatter: exactly symmetric (one triangle mirrored), ours
    symmetric = total is not None
    if total is None:
        total = tree_reduce([_thread_grams_remote.options(num_cpus=cpus).remote(pieces[t::tasks], weights_ref, precision)
                             for t in range(tasks)], fan_in)
    if total.weight <= 1:
        raise DataError(f"the embeddings hold total weight {total.weight:g} over {total.count} rows; a "
                        "covariance needs more than 1", file=Path(files[0]).parent)
    if symmetric:  # in place: two 75 MB passes fewer at d_l = 3,072
        cov = total.scatter
        cov /= total.weight - 1
    else:
        cov = total.scatter / (total.weight - 1)
        cov = (cov + cov.T) / 2  # exact symmetry for eigh (the GEMM's two triangles differ in the last bit)
    if scale != 1.0:
        cov *= scale * scale
    return total.count, scale * total.mean, cov
