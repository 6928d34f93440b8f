"""The eigenbasis of the language-embedding covariance and AlphaFuse's frozen projection.

Shapes: ``d_l`` language-model dimension, ``d`` model width (``model.dim``), ``d_n`` null dims
(``decompose.null_dims``), ``d_s = d - d_n`` semantic (row-space) dims. With C = U S U^T
(S descending), docs/method.md section 2 defines

    P = U[:, :d] diag(S[:d])^-1/2   (whiten)      or      P = U[:, :d]   (no whitening)
    E_lang = (s E - mu) P           float32 [N, d]

whose last ``d_n`` columns are the null-space coordinates that the trainable ID part is added to.
Only the top ``k >= d`` eigenpairs need to be stored (the randomized path computes no more).

Choosing d_n (``decompose.null_rule``):

- ``count``: d_n = ``decompose.null_dims``, d = ``model.dim`` (reference default 128 / 64: the
  "null space" is principal components d_s+1..d, whitened to unit variance).
- ``threshold``: the reference's DreamRec path. All d_l directions are kept (d = d_l) and
  d_n = #{k : S_k <= ``decompose.null_threshold``}, S the eigenvalues of the covariance of
  ``scale * E`` (DreamRec: scale 40, threshold 0.25). See :func:`threshold_null_dims`.

Example::

    basis = NullSpaceBasis.fit(mu, cov, dim=128, null_dims=64)
    # or, from the top-k spectrum of the randomized path:
    basis = NullSpaceBasis.from_spectrum(mu, values, vectors, dim=128, null_dims=64, total_variance=t)
    E_lang = basis.transform(E)               # float32 [N, 128], identity covariance on E
    basis.save(folder); NullSpaceBasis.load(folder)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from ..errors import ConfigError, DataError
from ..stages import atomic_write_bytes, atomic_write_json

TENSORS_FILE = "basis.safetensors"
META_FILE = "basis.json"
FORMAT_VERSION = 1
# whitening divides by sqrt(S_k); eigenvalues below this fraction of the largest are rank
# deficiency or round-off, and their whitened directions would be noise blown up to unit variance
MIN_RELATIVE_EIGENVALUE = 1e-12


@dataclass
class NullSpaceBasis:
    """Mean, sorted eigendecomposition of the covariance, and the sizes of the projection.

    Attributes:
        mean: mu, float64 [d_l], the (optionally popularity-weighted) mean of ``scale * E``.
        eigenvalues: S, float64 [k], descending, d <= k <= d_l (k = d_l for the exact path).
        eigenvectors: U, float64 [d_l, k]; column j belongs to ``eigenvalues[j]``, its entry of
            largest magnitude is positive (a deterministic sign).
        dim: d, the model width (columns of the projection).
        null_dims: d_n, the trailing columns of the projection that form the null space.
        whiten: divide each kept direction by its standard deviation.
        scale: s, the factor the raw embeddings are multiplied by before centring.
        total_variance: trace of the covariance, for explained-variance ratios when only the top
            k < d_l eigenvalues are stored; None: the sum of the stored eigenvalues (all d_l).
    """

    mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    dim: int
    null_dims: int
    whiten: bool = True
    scale: float = 1.0
    total_variance: float | None = None

    def __post_init__(self) -> None:
        d_l, k = self.mean.shape[0], self.eigenvalues.shape[0]
        if self.mean.shape != (d_l,) or self.eigenvalues.shape != (k,) or self.eigenvectors.shape != (d_l, k) \
                or k > d_l:
            raise ValueError(f"NullSpaceBasis: inconsistent shapes mean {self.mean.shape}, eigenvalues "
                             f"{self.eigenvalues.shape}, eigenvectors {self.eigenvectors.shape}")
        if k < d_l and self.total_variance is None:
            raise ValueError(f"NullSpaceBasis: only {k} of {d_l} eigenvalues given; total_variance is needed")
        if not 0 < self.dim <= d_l:
            raise ConfigError(f"model.dim={self.dim}: must be in 1..{d_l}, the dimension d_l of the "
                              "language embeddings")
        if self.dim > k:
            raise ValueError(f"NullSpaceBasis: model.dim={self.dim} directions needed, only {k} eigenpairs given")
        if not 0 < self.null_dims < self.dim:
            raise ConfigError(f"decompose.null_dims={self.null_dims}: must be in (0, model.dim={self.dim})")
        if self.whiten:
            kept = self.eigenvalues[:self.dim]
            floor = MIN_RELATIVE_EIGENVALUE * max(float(self.eigenvalues[0]), 0.0)
            if kept[-1] <= floor:
                k = int(np.argmax(kept <= floor))
                raise ConfigError(
                    f"model.dim={self.dim}: eigenvalue {k + 1} of the embedding covariance is {kept[k]:.3g} "
                    f"(<= {MIN_RELATIVE_EIGENVALUE:g} x the largest), so the embeddings span only {k} "
                    f"directions and whitening would divide by ~0. Use model.dim <= {k} (with "
                    "decompose.null_dims below it), more items, or decompose.whiten=false")

    @classmethod
    def fit(cls, mean: np.ndarray, cov: np.ndarray, dim: int, null_dims: int, whiten: bool = True,
            scale: float = 1.0) -> "NullSpaceBasis":
        """Exact eigendecomposition (:func:`~.covariance.covariance_eigh`) of a symmetric covariance.

        Args:
            mean: float [d_l], the mean of ``scale * E``.
            cov: float [d_l, d_l], the covariance of ``scale * E``.
            dim, null_dims, whiten, scale: as the attributes.
        """
        from .covariance import covariance_eigh

        values, vectors = covariance_eigh(cov)
        return cls.from_spectrum(mean, values, vectors, dim, null_dims, whiten, scale)

    @classmethod
    def from_spectrum(cls, mean: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray, dim: int,
                      null_dims: int, whiten: bool = True, scale: float = 1.0,
                      total_variance: float | None = None) -> "NullSpaceBasis":
        """A basis from (part of) an eigendecomposition, in any order and with any signs.

        Args:
            mean: float [d_l], the mean of ``scale * E``.
            eigenvalues: float [k], d <= k <= d_l.
            eigenvectors: float [d_l, k], orthonormal columns.
            total_variance: the covariance's trace; needed when k < d_l.
            dim, null_dims, whiten, scale: as the attributes.
        """
        order = np.argsort(eigenvalues)[::-1]
        values, vectors = np.asarray(eigenvalues, np.float64)[order], np.asarray(eigenvectors, np.float64)[:, order]
        # eigenvectors are defined up to sign; fixing it makes the basis (and the semantic table
        # built from it) reproducible across LAPACK builds, machines and the two decompositions
        pivots = np.argmax(np.abs(vectors), axis=0)
        vectors = vectors * np.sign(vectors[pivots, np.arange(vectors.shape[1])])
        return cls(np.asarray(mean, dtype=np.float64).copy(), np.ascontiguousarray(values),
                   np.ascontiguousarray(vectors), int(dim), int(null_dims), bool(whiten), float(scale),
                   None if total_variance is None else float(total_variance))

    @property
    def d_l(self) -> int:
        return self.mean.shape[0]

    @property
    def semantic_dims(self) -> int:
        """d_s = d - d_n, the leading (row-space) columns of the projection."""
        return self.dim - self.null_dims

    @property
    def projection(self) -> np.ndarray:
        """P, float64 [d_l, d]: ``U[:, :d] * S[:d]^-1/2`` with whitening, else ``U[:, :d]``."""
        P = self.eigenvectors[:, :self.dim]
        return P / np.sqrt(self.eigenvalues[:self.dim]) if self.whiten else P.copy()

    def transform(self, E: np.ndarray, precision: str = "float64") -> np.ndarray:
        """Frozen semantic coordinates ``(scale * E - mean) @ P``.

        Args:
            E: raw language embeddings, float [n, d_l].
            precision: of the centring and the GEMM. ``float64`` (default); ``float32`` is the
                decompose stage's for ``decompose.precision`` float32 (and auto with the count
                rule): 2.7x less time per 8,192 x 384 batch (14 against 37 ms, one thread of the
                2-core Xeon), and a coordinate is off by at most ~6e-8 * sqrt(trace / S_k)
                relative (whitened: the k-th direction's rounding grows as its eigenvalue
                shrinks), the error class of the float32 covariance the stage fits with.

        Returns:
            float32 [n, d]; columns ``d - d_n ..`` are the null-space coordinates.
        """
        E = np.asarray(E)
        if E.ndim != 2 or E.shape[1] != self.d_l:
            raise ValueError(f"NullSpaceBasis.transform: expected embeddings [n, {self.d_l}], got {E.shape}")
        if precision == "float32":
            Z = np.multiply(E, np.float32(self.scale), dtype=np.float32) if self.scale != 1.0 else E.astype(np.float32)
            Z -= self.mean.astype(np.float32)
            return Z @ self.projection.astype(np.float32)
        if precision != "float64":
            raise ValueError(f"precision={precision!r}: expected 'float32' or 'float64'")
        return ((self.scale * E.astype(np.float64) - self.mean) @ self.projection).astype(np.float32)

    def project(self, E_new: np.ndarray) -> np.ndarray:
        """Semantic coordinates of items that were not part of the fit (e.g. new items added before
        retraining): the same frozen map as :meth:`transform`, float [n, d_l] -> float32 [n, d].

        The basis is NOT refitted, so existing rows of the semantic table stay valid and a new
        item's coordinates are comparable with the old ones.
        """
        return self.transform(E_new)

    def explained_variance(self) -> np.ndarray:
        """Cumulative explained-variance ratio, float64 [k]: entry j is the share of the total
        variance in the first j+1 directions (round-off negative eigenvalues count as 0)."""
        values = np.clip(self.eigenvalues, 0.0, None)
        total = self.total_variance if self.total_variance is not None else values.sum()
        return np.cumsum(values) / total

    def save(self, folder: Path) -> None:
        """Write ``basis.safetensors`` (mean, eigenvalues, eigenvectors, float64) and ``basis.json``
        (format_version, d_l, d, d_null, whiten, scale, total_variance, stored eigenpairs k)."""
        folder = Path(folder)
        atomic_write_bytes(folder / TENSORS_FILE, save_tensors({
            "mean": np.ascontiguousarray(self.mean), "eigenvalues": np.ascontiguousarray(self.eigenvalues),
            "eigenvectors": np.ascontiguousarray(self.eigenvectors)}))
        atomic_write_json(folder / META_FILE, {
            "format_version": FORMAT_VERSION, "d_l": self.d_l, "d": self.dim, "d_null": self.null_dims,
            "whiten": self.whiten, "scale": self.scale, "total_variance": self.total_variance,
            "eigenpairs": int(self.eigenvalues.shape[0])})

    @classmethod
    def load(cls, folder: Path) -> "NullSpaceBasis":
        """Inverse of :meth:`save` (bit-exact)."""
        folder = Path(folder)
        meta_path, tensors_path = folder / META_FILE, folder / TENSORS_FILE
        for p in (meta_path, tensors_path):
            if not p.is_file():
                raise DataError("missing; run the decompose stage", file=p)
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
                            "rerun the decompose stage", file=meta_path)
        tensors = load_tensors(tensors_path.read_bytes())
        missing = {"mean", "eigenvalues", "eigenvectors"} - tensors.keys()
        if missing:
            raise DataError(f"missing tensors {sorted(missing)}", file=tensors_path)
        # format 1 as written by 0.1.0 before 2026-11-26 spelled d / d_null as dim / null_dims
        for key, old in (("d", "dim"), ("d_null", "null_dims")):
            if key not in meta and old in meta:
                meta[key] = meta[old]
        absent = [k for k in ("d", "d_null", "whiten", "scale") if k not in meta]
        if absent:
            raise DataError(f"missing keys {absent}; rerun the decompose stage", file=meta_path)
        return cls(tensors["mean"], tensors["eigenvalues"], tensors["eigenvectors"], meta["d"], meta["d_null"],
                   meta["whiten"], meta["scale"], meta.get("total_variance"))


def threshold_null_dims(eigenvalues: np.ndarray, threshold: float) -> int:
    """d_n under the threshold rule: the number of eigenvalues ``<= threshold``.

    Args:
        eigenvalues: all d_l eigenvalues of the covariance of ``scale * E`` (the threshold refers
            to that scale: DreamRec uses scale 40 with threshold 0.25).
        threshold: ``decompose.null_threshold``.
    """
    return int(np.count_nonzero(np.asarray(eigenvalues) <= threshold))
