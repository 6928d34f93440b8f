"""Mean and covariance of the item embeddings E, streamed from the embed stage's Parquet fragments.

The files are cut into pieces (runs of whole row groups of about ``PIECE_ROWS`` rows). One Ray
task per piece streams float64 batches about a common shift s (the mean of the first rows) and
returns n, the popularity weight W, ``t = sum (x - s)``, ``t_w = sum w (x - s)``, the column sums
of squares and ``G = sum (x - s)(x - s)^T`` (the randomized method: ``G Q``). The driver adds the
partials in piece order: the result depends only on the file layout. About the centre c (the mean,
or the popularity-weighted mean), delta = c - s,

    (n - 1) C = G - t delta^T - delta t^T + n delta delta^T      (np.cov(E, rowvar=False) for c = mean)

The popularity-weighted covariance (``decompose.weighted_covariance``) takes ``G = sum w (x - s)(x - s)^T``
instead and ``W C = G - t_w delta^T - delta t_w^T + W delta delta^T`` about the weighted mean.

``randomized_eigh`` never forms C: Halko, Martinsson & Tropp's range finder, ``Q <- orth(C Q)``
for ``power_iters`` more passes, then the eigenpairs of ``Q^T C Q``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from ..errors import ConfigError, DataError
from ..runtime.parquet import iter_batches, open_file

INDEX_COLUMN = "item_idx"
VECTOR_COLUMN = "vector"
PIECE_ROWS = 65_536  # rows per Ray task, about: whole row groups of one file
BATCH_BYTES = 32 << 20  # float64 bytes per batch a task holds
SHIFT_ROWS = 1024  # rows whose mean is the shift s (near the mean is enough)


def pieces(files: list[str], rows: int = PIECE_ROWS) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, row_groups)`` runs of about ``rows`` rows per file, from the Parquet footers. A
    DataError names a file that is not Parquet, has no rows, or lacks ``item_idx`` / a
    ``vector: fixed_size_list<float>[d_l]`` of the other files' d_l."""
    out, dims = [], set()
    for path in map(str, files):
        meta = open_file(path).metadata
        schema = meta.schema.to_arrow_schema()
        vtype = schema.field(VECTOR_COLUMN).type if VECTOR_COLUMN in schema.names else None
        if INDEX_COLUMN not in schema.names or vtype is None or not (pa.types.is_fixed_size_list(vtype) and (
                pa.types.is_floating(vtype.value_type))) or dims - {vtype.list_size} or not meta.num_rows:
            got = ", ".join(f"{f.name}: {f.type}" for f in schema)
            raise DataError(f"expected rows of item_idx and vector: fixed_size_list<float32>[d_l] (d_l of the "
                            f"other files: {sorted(dims)}), got {meta.num_rows} rows of {got}", file=path)
        dims.add(vtype.list_size)
        run, held = [], 0
        for g in range(meta.num_row_groups):
            run, held = run + [g], held + meta.row_group(g).num_rows
            if held >= rows or g == meta.num_row_groups - 1:
                out.append((path, tuple(run)))
                run, held = [], 0
    return out


def iter_rows(piece, batch_rows: int):
    """``(item_idx int64 [b], X float [b, d_l])`` batches of a piece (a path or ``(path, row_groups)``)."""
    path, groups = (str(piece), None) if isinstance(piece, (str, Path)) else piece
    for batch in iter_batches(path, batch_size=batch_rows, row_groups=groups, columns=[INDEX_COLUMN, VECTOR_COLUMN],
                              use_threads=False):
        idx, vectors = batch.column(INDEX_COLUMN), batch.column(VECTOR_COLUMN)
        values = vectors.flatten()
        if idx.null_count or vectors.null_count or values.null_count:
            raise DataError("null entries; every row needs an item_idx and a vector", file=path)
        X = values.to_numpy().reshape(len(vectors), vectors.type.list_size)
        yield idx.to_numpy().astype(np.int64), X


@ray.remote(num_cpus=1)
def _piece_sums(piece, shift: np.ndarray, weights: np.ndarray | None, Q: np.ndarray | None,
                weigh_scatter: bool = False) -> tuple:
    """One piece's ``(n, W, t, t_w, sumsq, G or G Q)`` about ``shift``, float64 (module notes);
    ``weigh_scatter``: G sums ``w (x - s)(x - s)^T``."""
    d = len(shift)
    n, W, t, tw, sq = 0, 0.0, np.zeros(d), np.zeros(d), np.zeros(d)
    G = np.zeros((d, d) if Q is None else (d, Q.shape[1]))
    for idx, X in iter_rows(piece, max(256, BATCH_BYTES // (8 * d))):
        Z = X.astype(np.float64)
        Z -= shift
        n += len(Z)
        t += Z.sum(0)
        sq += np.einsum("ij,ij->j", Z, Z)
        if weights is not None:
            if idx.min() < 0 or idx.max() >= len(weights):
                raise DataError(f"item_idx outside 0..{len(weights) - 1}", file=piece[0], column=INDEX_COLUMN)
            w = weights[idx]
            W += float(w.sum())
            tw += w @ Z
        Zt = (Z * w[:, None]).T if weigh_scatter else Z.T
        G += Zt @ Z if Q is None else Zt @ (Z @ Q)
    if not (np.isfinite(G).all() and np.isfinite(sq).all()):
        raise DataError("a vector holds NaN or inf", file=piece[0], column=VECTOR_COLUMN)
    return n, W, t, tw, sq, G


class _Passes:
    """The pieces, the shift and the weights of one solve; :meth:`run` is one pass over the data."""

    def __init__(self, files: list[str], weights: np.ndarray | None, weigh_scatter: bool = False):
        self.pieces = pieces(files)
        X = next(iter_rows(self.pieces[0], SHIFT_ROWS))[1]
        self.d_l = X.shape[1]
        self.shift = X.astype(np.float64).mean(0)
        self.weights = None if weights is None else ray.put(np.asarray(weights, np.float64))
        self.weighted = weights is not None
        self.weigh_scatter = weigh_scatter and self.weighted

    def run(self, Q: np.ndarray | None = None) -> tuple:
        """The summed partials, added in piece order."""
        Q_ref = None if Q is None else ray.put(np.ascontiguousarray(Q, np.float64))
        refs = [_piece_sums.remote(p, self.shift, self.weights, Q_ref, self.weigh_scatter) for p in self.pieces]
        total = functools.reduce(lambda a, b: tuple(x + y for x, y in zip(a, b)), map(ray.get, refs))
        if total[0] < 2 or self.weighted and not total[1] > 0:
            raise DataError(f"the embeddings hold {total[0]} rows of popularity {total[1]:g}; a covariance needs at "
                            "least 2 (and a positive popularity with weights)", file=Path(self.pieces[0][0]).parent)
        return total

    def centre(self, total: tuple) -> np.ndarray:
        """delta = c - s: the (popularity-weighted) mean about the shift."""
        return total[3] / total[1] if self.weighted else total[2] / total[0]


def _about(GQ: np.ndarray, t: np.ndarray, n: int, delta: np.ndarray, Q: np.ndarray | None = None) -> np.ndarray:
    """C (Q None) or C Q about the centre s + delta, from ``G`` / ``G Q`` about s."""
    tQ, dQ = (t, delta) if Q is None else (t @ Q, delta @ Q)
    return (GQ - np.outer(t, dQ) - np.outer(delta, tQ) + n * np.outer(delta, dQ)) / (n - 1)


def covariance(files: list[str], scale: float = 1.0, weights: np.ndarray | None = None,
               weigh_scatter: bool = False) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean, C)`` of ``scale * E``: float64 [d_l] and [d_l, d_l], C the unbiased scatter
    about the mean, or (``weights``: item popularity [N] by item_idx) about the weighted mean;
    ``weigh_scatter``: C the popularity-weighted covariance ``sum_i w_i (x_i - c)(x_i - c)^T / sum_i w_i``."""
    passes = _Passes(files, weights, weigh_scatter)
    n, W, t, tw, _, G = total = passes.run()
    delta = passes.centre(total)
    C = (G - np.outer(tw, delta) - np.outer(delta, tw) + W * np.outer(delta, delta)) / W if passes.weigh_scatter \
        else _about(G, t, n, delta)
    return n, scale * (passes.shift + delta), (C + C.T) * (scale * scale / 2)


def randomized_eigh(files: list[str], k: int, oversample: int = 16, power_iters: int = 4, scale: float = 1.0,
                    weights: np.ndarray | None = None, seed: int = 0) -> tuple:
    """``(n, mean, eigenvalues [k] descending, eigenvectors [d_l, k], trace of C)`` for C of
    :func:`covariance`; a ConfigError names ``model.dim`` above d_l."""
    passes = _Passes(files, weights)
    if not 0 < k <= passes.d_l:
        raise ConfigError(f"model.dim={k}: must be in 1..{passes.d_l}, the dimension d_l of the language embeddings")
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((passes.d_l, min(k + oversample, passes.d_l))))
    n, _, t, _, sq, GQ = total = passes.run(Q)
    delta = passes.centre(total)
    CQ = _about(GQ, t, n, delta, Q)
    for _ in range(power_iters):
        Q, _ = np.linalg.qr(CQ)
        CQ = _about(passes.run(Q)[5], t, n, delta, Q)
    B = Q.T @ CQ
    values, V = np.linalg.eigh((B + B.T) / 2)
    values, V = values[::-1][:k], V[:, ::-1][:, :k]
    trace = float(sq.sum() - 2 * delta @ t + n * delta @ delta) / (n - 1)
    return n, scale * (passes.shift + delta), scale ** 2 * values, Q @ V, scale ** 2 * trace
