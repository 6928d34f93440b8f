"""The eigenbasis of the language-embedding covariance and AlphaFuse's frozen projection.

Shapes: ``d_l`` language-model dimension, ``d`` model width (``model.dim``), ``d_n`` null dims
(``decompose.null_dims``), ``d_s = d - d_n`` semantic (row-space) dims. With C = U S U^T
(S descending), METHOD.md section 2 defines

    P = U[:, :d] diag(S[:d])^-1/2   (whiten)      or      P = U[:, :d]   (no whitening)
    E_lang = (s E - mu) P           float32 [N, d]

whose last ``d_n`` columns are the null-space coordinates that the trainable ID part is added to.

Example::

    basis = NullSpaceBasis.fit(mu, cov, dim=128, null_dims=64)
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
        mean: mu, float64 [d_l], the mean of ``scale * E``.
        eigenvalues: S, float64 [d_l], descending.
        eigenvectors: U, float64 [d_l, d_l]; column k belongs to ``eigenvalues[k]``, its entry of
            largest magnitude is positive (a deterministic sign).
        dim: d, the model width (columns of the projection).
        null_dims: d_n, the trailing columns of the projection that form the null space.
        whiten: divide each kept direction by its standard deviation.
        scale: s, the factor the raw embeddings are multiplied by before centring.
    """

    mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    dim: int
    null_dims: int
    whiten: bool = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        d_l = self.mean.shape[0]
        if self.mean.shape != (d_l,) or self.eigenvalues.shape != (d_l,) or self.eigenvectors.shape != (d_l, d_l):
            raise ValueError(f"NullSpaceBasis: inconsistent shapes mean {self.mean.shape}, eigenvalues "
                             f"{self.eigenvalues.shape}, eigenvectors {self.eigenvectors.shape}")
        if not 0 < self.dim <= d_l:
            raise ConfigError(f"model.dim={self.dim}: must be in 1..{d_l}, the dimension d_l of the "
                              "language embeddings")
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
        """Exact eigendecomposition (``np.linalg.eigh``) of a symmetric covariance.

        Args:
            mean: float [d_l], the mean of ``scale * E``.
            cov: float [d_l, d_l], the covariance of ``scale * E``.
            dim, null_dims, whiten, scale: as the attributes.
        """
        cov = np.asarray(cov, dtype=np.float64)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        # eigenvectors are defined up to sign; fixing it makes the basis (and the semantic table
        # built from it) reproducible across LAPACK builds and machines
        pivots = np.argmax(np.abs(vectors), axis=0)
        vectors = vectors * np.sign(vectors[pivots, np.arange(vectors.shape[1])])
        return cls(np.asarray(mean, dtype=np.float64).copy(), np.ascontiguousarray(values),
                   np.ascontiguousarray(vectors), int(dim), int(null_dims), bool(whiten), float(scale))

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

    def transform(self, E: np.ndarray) -> np.ndarray:
        """Frozen semantic coordinates ``(scale * E - mean) @ P``, computed in float64.

        Args:
            E: raw language embeddings, float [n, d_l].

        Returns:
            float32 [n, d]; columns ``d - d_n ..`` are the null-space coordinates.
        """
        E = np.asarray(E)
        if E.ndim != 2 or E.shape[1] != self.d_l:
            raise ValueError(f"NullSpaceBasis.transform: expected embeddings [n, {self.d_l}], got {E.shape}")
        return ((self.scale * E.astype(np.float64) - self.mean) @ self.projection).astype(np.float32)

    def explained_variance(self) -> np.ndarray:
        """Cumulative explained-variance ratio, float64 [d_l]: entry k is the share of the total
        variance in the first k+1 directions (round-off negative eigenvalues count as 0)."""
        values = np.clip(self.eigenvalues, 0.0, None)
        return np.cumsum(values) / values.sum()

    def save(self, folder: Path) -> None:
        """Write ``basis.safetensors`` (mean, eigenvalues, eigenvectors, float64) and ``basis.json``
        (format_version, d_l, d, d_null, whiten, scale)."""
        folder = Path(folder)
        atomic_write_bytes(folder / TENSORS_FILE, save_tensors({
            "mean": np.ascontiguousarray(self.mean), "eigenvalues": np.ascontiguousarray(self.eigenvalues),
            "eigenvectors": np.ascontiguousarray(self.eigenvectors)}))
        atomic_write_json(folder / META_FILE, {
            "format_version": FORMAT_VERSION, "d_l": self.d_l, "d": self.dim, "d_null": self.null_dims,
            "whiten": self.whiten, "scale": self.scale})

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
        return cls(tensors["mean"], tensors["eigenvalues"], tensors["eigenvectors"], meta["d"], meta["d_null"],
                   meta["whiten"], meta["scale"])
