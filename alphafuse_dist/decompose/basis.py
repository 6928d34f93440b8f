"""The eigenbasis of the embedding covariance and AlphaFuse's frozen projection (docs/method.md section 2).

With C = U S U^T (S descending), d = ``model.dim`` and d_n = ``model.id_dims``:

    P = U[:, :d] diag(S[:d])^-1/2   (whiten)      or      P = U[:, :d]   (no whitening)
    E_lang = (s E - mu) P           float32 [N, d]; its last d_n columns are the null space

The basis records d_n only when ``decompose.null_rule=threshold`` derived it
(:meth:`NullSpaceBasis.with_id_dims`). Only the top ``k >= d`` eigenpairs need to be stored.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from ..errors import ConfigError, DataError
from ..runtime.manifest import atomic_write_bytes, atomic_write_json

TENSORS_FILE = "basis.safetensors"
META_FILE = "basis.json"
FORMAT_VERSION = 1
# whitening divides by sqrt(S_k); eigenvalues at or below this fraction of the largest are rank
# deficiency (fewer items than directions) or round-off: their whitened coordinates are set to 0
MIN_RELATIVE_EIGENVALUE = 1e-12
# whitenrec drops principal directions whose variance is below this fraction of the largest
# (e.g. the d_l - N + 1 zero ones when there are fewer items than d_l)
WHITEN_MIN_RELATIVE_EIGENVALUE = 1e-5


@dataclass
class NullSpaceBasis:
    """mean mu [d_l] of ``scale * E`` (optionally popularity-weighted); eigenvalues S [k] descending,
    d <= k <= d_l; eigenvectors U [d_l, k], the largest-magnitude entry of each column positive (all
    float64); dim d; null_dims d_n (None: not recorded); total_variance: trace of C when k < d_l."""

    mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    dim: int
    null_dims: int | None = None
    whiten: bool = True
    scale: float = 1.0
    total_variance: float | None = None

    def __post_init__(self) -> None:
        d_l, k = self.mean.shape[0], self.eigenvalues.shape[0]
        if self.mean.shape != (d_l,) or self.eigenvectors.shape != (d_l, k) or k > d_l:
            raise ValueError(f"NullSpaceBasis: inconsistent shapes mean {self.mean.shape}, eigenvalues "
                             f"{self.eigenvalues.shape}, eigenvectors {self.eigenvectors.shape}")
        if k < d_l and self.total_variance is None:
            raise ValueError(f"NullSpaceBasis: only {k} of {d_l} eigenvalues given; total_variance is needed")
        if not 0 < self.dim <= min(k, d_l):
            raise ConfigError(f"model.dim={self.dim}: must be in 1..{d_l}, the dimension d_l of the language "
                              "embeddings" + (f" (and <= the {k} eigenpairs computed)" if k < d_l else ""))
        if self.null_dims is not None and not 0 < self.null_dims < self.dim:
            raise ConfigError(f"model.id_dims={self.null_dims}: must be in (0, model.dim={self.dim})")

    @classmethod
    def from_spectrum(cls, mean: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray, dim: int,
                      null_dims: int | None = None, whiten: bool = True, scale: float = 1.0,
                      total_variance: float | None = None) -> "NullSpaceBasis":
        """From (part of) an eigendecomposition in any order and signs; the sign rule makes the table
        reproducible across LAPACK builds and methods."""
        order = np.argsort(eigenvalues)[::-1]
        values, vectors = np.asarray(eigenvalues, np.float64)[order], np.asarray(eigenvectors, np.float64)[:, order]
        vectors = vectors * np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
        return cls(np.asarray(mean, dtype=np.float64).copy(), np.ascontiguousarray(values),
                   np.ascontiguousarray(vectors), int(dim), None if null_dims is None else int(null_dims),
                   bool(whiten), float(scale), None if total_variance is None else float(total_variance))

    def with_id_dims(self, id_dims: int, where: str = "the basis") -> "NullSpaceBasis":
        """This basis with d_n = ``model.id_dims``; a ConfigError when it recorded another d_n."""
        if self.null_dims is not None and self.null_dims != id_dims:
            raise ConfigError(f"model.id_dims={id_dims}: {where} has d_n={self.null_dims} (decompose.null_rule="
                              f"threshold derived it); set model.id_dims={self.null_dims}")
        return dataclasses.replace(self, null_dims=int(id_dims))

    @property
    def d_l(self) -> int:
        return self.mean.shape[0]

    @property
    def semantic_dims(self) -> int:
        """d_s = d - d_n (d when d_n is not recorded)."""
        return self.dim - (self.null_dims or 0)

    @property
    def spanned_dims(self) -> int:
        """Kept directions whose eigenvalue is above ``MIN_RELATIVE_EIGENVALUE`` x the largest."""
        floor = MIN_RELATIVE_EIGENVALUE * max(float(self.eigenvalues[0]), 0.0)
        return int(np.count_nonzero(self.eigenvalues[:self.dim] > floor))

    @property
    def projection(self) -> np.ndarray:
        """P, float64 [d_l, d]: ``U[:, :d] * S[:d]^-1/2`` with whitening (columns beyond
        :attr:`spanned_dims` zero), else ``U[:, :d]``."""
        P = self.eigenvectors[:, :self.dim].copy()
        if self.whiten:
            k = self.spanned_dims
            P[:, :k] /= np.sqrt(self.eigenvalues[:k])
            P[:, k:] = 0.0
        return P

    def transform(self, E: np.ndarray) -> np.ndarray:
        """Frozen semantic coordinates ``(scale * E - mean) @ P``, computed in float64: float [n, d_l]
        -> float32 [n, d]. Items not in the fit (new ones before a retrain) get comparable coordinates."""
        E = np.asarray(E)
        if E.ndim != 2 or E.shape[1] != self.d_l:
            raise ValueError(f"NullSpaceBasis.transform: expected embeddings [n, {self.d_l}], got {E.shape}")
        return ((self.scale * E.astype(np.float64) - self.mean) @ self.projection).astype(np.float32)

    def explained_variance(self) -> np.ndarray:
        """Cumulative explained-variance ratio, float64 [k] (round-off negative eigenvalues count as 0)."""
        values = np.clip(self.eigenvalues, 0.0, None)
        return np.cumsum(values) / (self.total_variance if self.total_variance is not None else values.sum())

    def save(self, folder: Path) -> None:
        """Write ``basis.safetensors`` (mean, eigenvalues, eigenvectors, float64) and ``basis.json``."""
        tensors = {k: np.ascontiguousarray(getattr(self, k)) for k in ("mean", "eigenvalues", "eigenvectors")}
        atomic_write_bytes(Path(folder) / TENSORS_FILE, save_tensors(tensors))
        atomic_write_json(Path(folder) / META_FILE, {
            "format_version": FORMAT_VERSION, "d_l": self.d_l, "d": self.dim, "d_null": self.null_dims,
            "whiten": self.whiten, "scale": self.scale, "total_variance": self.total_variance,
            "eigenpairs": int(self.eigenvalues.shape[0])})

    @classmethod
    def load(cls, folder: Path) -> "NullSpaceBasis":
        """Inverse of :meth:`save` (bit-exact)."""
        meta_path, tensors_path = Path(folder) / META_FILE, Path(folder) / TENSORS_FILE
        for p in (meta_path, tensors_path):
            if not p.is_file():
                raise DataError("missing; run the decompose stage", file=p)
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
                            "rerun the decompose stage", file=meta_path)
        t = load_tensors(tensors_path.read_bytes())
        return cls(t["mean"], t["eigenvalues"], t["eigenvectors"], meta["d"], meta["d_null"], meta["whiten"],
                   meta["scale"], meta["total_variance"])


def recorded_id_dims(folder: Path) -> int | None:
    """d_n as the decompose stage in ``folder`` recorded it (threshold rule), else None."""
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()).get("d_null") if path.is_file() else None


def whitened_features(E: np.ndarray, basis: NullSpaceBasis) -> np.ndarray:
    """WhitenRec's input float32 [N, k], identity covariance: ``(s E - mu) U_k diag(S_k)^-1/2`` over the
    stored eigenpairs above ``WHITEN_MIN_RELATIVE_EIGENVALUE`` x the largest (``whiten`` / ``dim`` unused)."""
    values = basis.eigenvalues
    keep = values > WHITEN_MIN_RELATIVE_EIGENVALUE * max(float(values[0]), 0.0)
    if not keep.any():
        raise ValueError("whitenrec: the language embeddings have no variance (all eigenvalues ~0)")
    P = basis.eigenvectors[:, keep] / np.sqrt(values[keep])
    return ((basis.scale * np.asarray(E, dtype=np.float64) - basis.mean) @ P).astype(np.float32)
