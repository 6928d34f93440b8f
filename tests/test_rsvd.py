"""The randomized (Halko) eigensolver over fragments against numpy's exact eigendecomposition."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from alphafuse_dist.config import DecomposeConfig
from alphafuse_dist.decompose import rsvd
from alphafuse_dist.decompose.basis import NullSpaceBasis
from alphafuse_dist.decompose.covariance import covariance_pieces
from alphafuse_dist.decompose.rsvd import column_sums, covariance_times, randomized_covariance_eigh, range_pass
from alphafuse_dist.decompose.stage import decompose
from alphafuse_dist.errors import ConfigError, DataError
from test_decompose import write_fragments

N, D_L, K = 5000, 512, 128


@pytest.fixture(scope="module")
def decaying(tmp_path_factory):
    """5,000 x 512 float32 rows, singular values decaying about geometrically (0.97^j), a large mean,
    stored shuffled in 4 fragments. Returns (folder, files, X ordered by item_idx)."""
    rng = np.random.default_rng(0)
    U = rng.normal(size=(N, D_L)) / np.sqrt(N)  # nearly orthonormal columns; a QR costs too long here
    V, _ = np.linalg.qr(rng.normal(size=(D_L, D_L)))
    X = ((U * (100.0 * 0.97 ** np.arange(D_L))) @ V.T + rng.uniform(-5, 5, size=D_L)).astype(np.float32)
    order = rng.permutation(N)
    folder = tmp_path_factory.mktemp("decaying")
    return folder, write_fragments(folder, X[order], order, [2000, 1500, 1000, 500]), X


def exact(X, center=None):
    Xc = X.astype(np.float64) - (X.mean(0, dtype=np.float64) if center is None else center)
    values, vectors = np.linalg.eigh(Xc.T @ Xc / (len(X) - 1))
    return values[::-1], vectors[:, ::-1]


def test_top_eigenpairs_match_exact(ray_session, decaying):
    _, files, X = decaying
    n, mean, values, vectors, total = randomized_covariance_eigh(files, k=K, oversample=16, power_iters=4)
    S, U = exact(X)
    assert n == N and np.abs(mean - X.mean(0, dtype=np.float64)).max() < 1e-9
    assert values.shape == (K,) and vectors.shape == (D_L, K)
    assert np.abs(values / S[:K] - 1).max() < 1e-3
    assert total == pytest.approx(S.sum(), rel=1e-10)
    assert np.abs(vectors.T @ vectors - np.eye(K)).max() < 1e-10
    # subspace agreement: cosines of the principal angles between the top-K spaces
    cosines = np.linalg.svd(U[:, :K].T @ vectors, compute_uv=False)
    assert cosines.min() > 1 - 1e-4
    # the individual leading directions agree up to sign
    assert np.abs(np.abs((U[:, :64] * vectors[:, :64]).sum(0)) - 1).max() < 1e-6


def test_passes_compute_the_moments_they_claim(ray_session, decaying):
    _, files, X = decaying
    X64 = X.astype(np.float64)
    w = np.random.default_rng(1).integers(0, 9, size=N).astype(np.float64)
    sums = column_sums(files, w)
    assert sums.count == N and sums.weight == w.sum()
    np.testing.assert_allclose(sums.mean(weighted=True), np.average(X64, axis=0, weights=w), rtol=1e-10, atol=1e-10)
    c = sums.mean(weighted=True)
    Q = np.random.default_rng(2).normal(size=(D_L, 3))
    expected = (X64 - c).T @ ((X64 - c) @ Q) / (N - 1)
    assert np.abs(covariance_times(files, c, Q, N) - expected).max() < 1e-9 * np.abs(expected).max()
    assert sums.trace(c) == pytest.approx(((X64 - c) ** 2).sum() / (N - 1), rel=1e-10)
    # float32 products (the solver's default): within float32's rounding of the float64 ones
    assert np.abs(covariance_times(files, c, Q, N, precision="float32") - expected).max() < 1e-5 * np.abs(expected).max()


def test_a_pass_gives_the_same_bits_for_any_thread_count(decaying):
    """Pieces are added in piece order whichever thread ends first; rows about the rounded shift."""
    _, files, X = decaying
    pieces = covariance_pieces(files)
    shift = X[:100].mean(0, dtype=np.float64)
    Q = np.linalg.qr(np.random.default_rng(3).normal(size=(D_L, 20)))[0]
    parts = [range_pass(pieces, None, threads, shift, Q, batch_rows=256) for threads in (1, 3, 4)]
    for part in parts[1:]:
        assert np.array_equal(part.product, parts[0].product)
        assert np.array_equal(part.sums.sumsq, parts[0].sums.sumsq)
    Y = (X.astype(np.float64) - parts[0].sums.shift)
    assert parts[0].sums.count == N and parts[0].sums.shift.dtype == np.float64
    np.testing.assert_allclose(parts[0].sums.total, Y.sum(0), rtol=1e-12, atol=1e-9)
    expected = Y.T @ (Y @ Q)
    assert np.abs(parts[0].product - expected).max() < 1e-5 * np.abs(expected).max()


def test_solver_makes_one_pass_per_power_iteration_plus_one(ray_session, decaying, monkeypatch):
    _, files, _ = decaying
    calls = []
    run = rsvd._Passes.run
    monkeypatch.setattr(rsvd._Passes, "run", lambda self, Q, sums: calls.append(sums) or run(self, Q, sums))
    randomized_covariance_eigh(files, k=8, power_iters=2)
    assert calls == [True, False, False]  # the column sums ride on the first product


def test_nan_in_a_vector_names_its_file(ray_session, tmp_path):
    bad = np.random.default_rng(4).normal(size=(300, 16)).astype(np.float32)
    bad[250, 3] = np.inf
    files = write_fragments(tmp_path, bad, np.arange(300), [150, 150])
    with pytest.raises(DataError, match="NaN or inf") as e:
        randomized_covariance_eigh(files, k=4)
    assert "part-001.parquet" in str(e.value)


def test_randomized_stage_gives_the_exact_table(ray_session, decaying, tmp_path):
    folder, _, X = decaying
    d, d_n = 64, 32
    tables = {}
    for method in ("exact", "randomized"):
        out = tmp_path / method
        out.mkdir()
        decompose(folder, DecomposeConfig(null_dims=d_n, method=method), dim=d, num_items=N, out_dir=out)
        tables[method] = load_file(str(out / "semantic.safetensors"))["semantic"]
    basis = NullSpaceBasis.load(tmp_path / "randomized")
    assert basis.eigenvalues.shape == (d,) and basis.total_variance is not None  # top-d spectrum only
    # same signs (deterministic sign rule), same whitened coordinates up to the solver's accuracy;
    # the last directions before d are the least resolved (neighbouring eigenvalues differ by 6%)
    error = np.abs(tables["randomized"] - tables["exact"]).max(0)
    assert error[:48].max() < 1e-3 and error.max() < 5e-2


def test_invalid_settings_name_the_config_key(ray_session, decaying):
    _, files, _ = decaying
    with pytest.raises(ConfigError, match=r"decompose\.power_iters=-1"):
        randomized_covariance_eigh(files, k=8, power_iters=-1)
    with pytest.raises(ConfigError, match=r"decompose\.oversample=-2"):
        randomized_covariance_eigh(files, k=8, oversample=-2)
    with pytest.raises(ConfigError, match=r"model\.dim=600: must be in 1\.\.512"):
        randomized_covariance_eigh(files, k=600)
