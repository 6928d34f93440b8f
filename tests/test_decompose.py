"""The decompose stage against numpy: covariance, eigenpairs, whitening, the randomized method, rules."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from alphafuse_dist.config import DecomposeConfig, load_config
from alphafuse_dist.decompose.basis import NullSpaceBasis, recorded_id_dims
from alphafuse_dist.decompose.covariance import covariance, pieces, randomized_eigh
from alphafuse_dist.decompose.stage import decompose, semantic_table
from alphafuse_dist.errors import ConfigError, DataError

N, D_L = 3000, 48


def write_fragments(folder, X, idx, sizes, row_group_rows=128):
    """Rows (idx[i], X[i]) split into part-*.parquet files of the given sizes, as embed writes them."""
    files, start = [], 0
    for k, size in enumerate(sizes):
        rows = slice(start, start + size)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(X[rows].reshape(-1)), X.shape[1])
        path = folder / f"part-{k:03d}.parquet"
        pq.write_table(pa.table({"item_idx": pa.array(idx[rows], pa.int32()), "vector": vectors}), path,
                       row_group_size=row_group_rows)
        files.append(str(path))
        start += size
    assert start == len(X)
    return files


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """N x d_l float32 rows with a large non-zero mean and a decaying spectrum, stored shuffled in
    5 uneven fragments. Returns (folder, files, X ordered by item_idx)."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D_L, D_L)) * np.geomspace(3.0, 0.01, D_L)[:, None]
    X = (rng.normal(size=(N, D_L)) @ A + rng.uniform(2, 8, size=D_L)).astype(np.float32)
    order = rng.permutation(N)
    folder = tmp_path_factory.mktemp("embed")
    files = write_fragments(folder, X[order], order, [700, 1, 999, 800, 500])
    return folder, files, X


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def exact_basis(X, dim, null_dims=None, **kw):
    mu, C = X.mean(0, dtype=np.float64), np.cov(X, rowvar=False)
    return NullSpaceBasis.from_spectrum(mu, *np.linalg.eigh(C), dim=dim, null_dims=null_dims, **kw)


def test_covariance_equals_numpy_and_is_deterministic(ray_session, embeddings):
    _, files, X = embeddings
    n, mean, cov = covariance(files)
    assert n == N
    assert rel_err(mean, X.mean(0, dtype=np.float64)) < 1e-12
    assert rel_err(cov, np.cov(X, rowvar=False)) < 1e-10
    assert np.array_equal(cov, cov.T)
    again = covariance(files)
    assert np.array_equal(again[1], mean) and np.array_equal(again[2], cov)
    _, mean40, cov40 = covariance(files, scale=40.0)
    assert rel_err(mean40, 40 * mean) < 1e-12 and rel_err(cov40, 1600 * cov) < 1e-12
    # pieces are runs of whole row groups of one file
    assert [p for p in pieces(files, rows=256) if p[0] == files[0]] == [(files[0], (0, 1)), (files[0], (2, 3)),
                                                                       (files[0], (4, 5))]


def test_weighted_mean_is_the_centre_of_the_unweighted_scatter(ray_session, embeddings):
    _, files, X = embeddings
    w = np.random.default_rng(1).integers(0, 20, size=N).astype(np.float64)
    _, mean, cov = covariance(files, weights=w)
    X64 = X.astype(np.float64)
    mu_w = np.average(X64, axis=0, weights=w)
    assert rel_err(mean, mu_w) < 1e-12
    assert rel_err(cov, (X64 - mu_w).T @ (X64 - mu_w) / (N - 1)) < 1e-10


def test_eigh_of_the_stage_matches_numpy_and_whitening_gives_identity(ray_session, embeddings, tmp_path):
    folder, _, X = embeddings
    info = decompose(folder, DecomposeConfig(), dim=32, num_items=N, out_dir=tmp_path)
    basis = NullSpaceBasis.load(tmp_path)
    values, U = np.linalg.eigh(np.cov(X, rowvar=False))
    values, U = values[::-1], U[:, ::-1]
    np.testing.assert_allclose(basis.eigenvalues, values, rtol=1e-9, atol=1e-12 * values[0])
    assert np.abs(np.abs((U[:, :32] * basis.eigenvectors[:, :32]).sum(0)) - 1).max() < 1e-8
    assert np.all(basis.eigenvectors[np.abs(basis.eigenvectors).argmax(0), np.arange(D_L)] > 0)  # sign rule
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    assert table.dtype == np.float32 and table.shape == (N, 32)
    assert np.array_equal(table, basis.transform(X))  # row i is item i though the fragments are shuffled
    assert np.abs(np.cov(table, rowvar=False) - np.eye(32)).max() < 1e-5 and np.abs(table.mean(0)).max() < 1e-5
    spectrum = json.loads((tmp_path / "spectrum.json").read_text())
    assert (spectrum["d"], spectrum["d_null"], spectrum["d_l"], info["d_null"]) == (32, None, D_L, None)
    assert spectrum["cumulative_explained_variance"][-1] == pytest.approx(1)
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again"
    again.mkdir()
    decompose(folder, DecomposeConfig(), dim=32, num_items=N, out_dir=again)
    assert (again / "semantic.safetensors").read_bytes() == (tmp_path / "semantic.safetensors").read_bytes()
    assert (again / "basis.safetensors").read_bytes() == (tmp_path / "basis.safetensors").read_bytes()


def numpy_table(X, d, *, scale=1.0, whiten=True, weights=None):
    """docs/method.md section 2 written out in numpy: mu, C about mu, C = U S U^T, P, (sE - mu) P."""
    E = scale * X.astype(np.float64)
    mu = E.mean(0) if weights is None else np.average(E, axis=0, weights=weights)
    C = (E - mu).T @ (E - mu) / (len(E) - 1)
    S, U = np.linalg.eigh(C)
    S, U = S[::-1], U[:, ::-1]
    U = U * np.sign(U[np.abs(U).argmax(0), np.arange(U.shape[1])])
    P = U[:, :d] / np.sqrt(S[:d]) if whiten else U[:, :d]
    return (E - mu) @ P, S


@pytest.mark.parametrize("whiten", [True, False])
def test_stage_equals_the_numpy_construction(ray_session, embeddings, tmp_path, whiten):
    folder, _, X = embeddings
    expected, _ = numpy_table(X, 24, scale=40.0, whiten=whiten)
    decompose(folder, DecomposeConfig(whiten=whiten, scale=40.0), dim=24, num_items=N, out_dir=tmp_path)
    assert rel_err(load_file(str(tmp_path / "semantic.safetensors"))["semantic"], expected) < 1e-6


def test_popularity_weighted_mean(ray_session, embeddings, tmp_path):
    folder, _, X = embeddings
    popularity = np.random.default_rng(4).integers(0, 50, size=N).astype(np.float64)
    decompose(folder, DecomposeConfig(weighted_mean=True), dim=24, num_items=N, out_dir=tmp_path, weights=popularity)
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    assert rel_err(table, numpy_table(X, 24, weights=popularity)[0]) < 1e-6
    assert np.abs(table.mean(0)).max() > 1e-3  # the weighted centre is not the row mean
    with pytest.raises(ConfigError, match=r"decompose\.weighted_mean=true needs item popularities"):
        decompose(folder, DecomposeConfig(weighted_mean=True), dim=24, num_items=N, out_dir=tmp_path,
                  weights=np.zeros(N))


def test_threshold_rule_keeps_all_dims_and_records_d_n(ray_session, embeddings, tmp_path):
    folder, _, X = embeddings
    cfg = DecomposeConfig(null_rule="threshold", null_threshold=0.25, scale=40.0)
    expected, S = numpy_table(X, D_L, scale=40.0)
    d_n = int((S <= 0.25).sum())
    assert 0 < d_n < D_L  # the fixture's spectrum straddles the threshold
    with pytest.raises(ConfigError, match=rf"set model\.dim={D_L} \(now 32\); the rule gives d_n={d_n} "
                                          rf"\(set model\.id_dims={d_n}\)"):
        decompose(folder, cfg, dim=32, num_items=N, out_dir=tmp_path)
    info = decompose(folder, cfg, dim=D_L, num_items=N, out_dir=tmp_path)
    meta = json.loads((tmp_path / "basis.json").read_text())
    assert (meta["d"], meta["d_null"], info["d"], info["d_null"]) == (D_L, d_n, D_L, d_n)
    assert rel_err(load_file(str(tmp_path / "semantic.safetensors"))["semantic"], expected) < 1e-5
    basis = NullSpaceBasis.load(tmp_path)
    assert basis.with_id_dims(d_n).null_dims == d_n and recorded_id_dims(tmp_path) == d_n
    with pytest.raises(ConfigError, match=rf"model\.id_dims=8: .* set model\.id_dims={d_n}"):
        basis.with_id_dims(8)
    with pytest.raises(ConfigError, match=r"^decompose\.null_threshold=None: required for decompose\.null_rule=threshold"):
        load_config("quickstart", ["decompose.null_rule=threshold"])
    with pytest.raises(ConfigError, match=r"^decompose\.method=randomized: .* only decompose\.method=exact computes$"):
        load_config("quickstart", ["decompose.null_rule=threshold", "decompose.null_threshold=0.25",
                                   "decompose.method=randomized"])


@pytest.fixture(scope="module")
def decaying(tmp_path_factory):
    """3,000 x 256 float32 rows, singular values decaying geometrically (0.96^j), a large mean."""
    rng = np.random.default_rng(0)
    n, d_l = 3000, 256
    U = rng.normal(size=(n, d_l)) / np.sqrt(n)
    V, _ = np.linalg.qr(rng.normal(size=(d_l, d_l)))
    X = ((U * (100.0 * 0.96 ** np.arange(d_l))) @ V.T + rng.uniform(-5, 5, size=d_l)).astype(np.float32)
    order = rng.permutation(n)
    folder = tmp_path_factory.mktemp("decaying")
    return folder, write_fragments(folder, X[order], order, [1500, 1000, 500]), X


def test_randomized_top_k_is_close_to_exact(ray_session, decaying, tmp_path):
    folder, files, X = decaying
    k = 64
    n, mean, values, vectors, total = randomized_eigh(files, k=k, oversample=16, power_iters=4)
    S, U = np.linalg.eigh(np.cov(X, rowvar=False))
    S, U = S[::-1], U[:, ::-1]
    assert n == len(X) and rel_err(mean, X.mean(0, dtype=np.float64)) < 1e-12
    assert np.abs(values / S[:k] - 1).max() < 1e-3 and total == pytest.approx(S.sum(), rel=1e-10)
    assert np.abs(vectors.T @ vectors - np.eye(k)).max() < 1e-10
    assert np.linalg.svd(U[:, :k].T @ vectors, compute_uv=False).min() > 1 - 1e-4
    tables = {}
    for method in ("exact", "randomized"):
        (tmp_path / method).mkdir()
        decompose(folder, DecomposeConfig(method=method), dim=32, num_items=len(X), out_dir=tmp_path / method)
        tables[method] = load_file(str(tmp_path / method / "semantic.safetensors"))["semantic"]
    assert NullSpaceBasis.load(tmp_path / "randomized").eigenvalues.shape == (32,)
    error = np.abs(tables["randomized"] - tables["exact"]).max(0)  # the last directions are the least resolved
    assert error[:24].max() < 1e-3 and error.max() < 5e-2
    with pytest.raises(ConfigError, match=r"^decompose\.power_iters=-1: must be >= 0$"):
        load_config("quickstart", ["decompose.power_iters=-1"])
    with pytest.raises(ConfigError, match=r"model\.dim=600: must be in 1\.\.256"):
        randomized_eigh(files, k=600)


def test_bad_rows_and_items_name_the_file(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    idx = np.arange(200)
    idx[150] = 7  # item 7 twice, item 150 missing
    (tmp_path / "embed").mkdir()
    write_fragments(tmp_path / "embed", X, idx, [100, 100])
    with pytest.raises(DataError, match=r"part-001.parquet, column .item_idx.: item_idx 7 occurs more than once"):
        decompose(tmp_path / "embed", DecomposeConfig(), dim=4, num_items=200, out_dir=tmp_path)
    with pytest.raises(DataError, match="embeddings have 200 rows but prepare has 201 items"):
        decompose(tmp_path / "embed", DecomposeConfig(), dim=4, num_items=201, out_dir=tmp_path)
    with pytest.raises(DataError, match=r"nothing: no part-\*\.parquet embedding fragments"):
        decompose(tmp_path / "nothing", DecomposeConfig(), dim=4, num_items=200, out_dir=tmp_path)
    basis = exact_basis(X, 4)
    files = write_fragments(tmp_path, X, np.arange(200) + 1, [100, 100])
    with pytest.raises(DataError, match=r"part-001.parquet, column 'item_idx': item_idx 200 is outside 0..199"):
        semantic_table(files, basis, 200)
    with pytest.raises(DataError, match=r"1 items have no embedding .first item_idx 0."):
        semantic_table(files, basis, 201)
    X[150, 3] = np.inf
    files = write_fragments(tmp_path, X, np.arange(200), [100, 100])
    with pytest.raises(DataError, match=r"part-001.parquet, column 'vector': a vector holds NaN or inf"):
        covariance(files)


def test_basis_round_trip_and_config_errors(tmp_path, embeddings):
    _, _, X = embeddings
    basis = exact_basis(X, 16, 4, scale=40.0 / 3)
    basis.save(tmp_path)
    back = NullSpaceBasis.load(tmp_path)
    for name in ("mean", "eigenvalues", "eigenvectors"):
        assert np.array_equal(getattr(back, name), getattr(basis, name))
    assert (back.dim, back.null_dims, back.whiten, back.scale) == (16, 4, True, 40.0 / 3)
    top = NullSpaceBasis.from_spectrum(basis.mean, basis.eigenvalues[:16], basis.eigenvectors[:, :16], dim=16,
                                       scale=basis.scale, total_variance=basis.eigenvalues.sum())
    assert np.array_equal(top.transform(X), basis.transform(X))
    with pytest.raises(ValueError, match="total_variance is needed"):
        NullSpaceBasis.from_spectrum(basis.mean, basis.eigenvalues[:16], basis.eigenvectors[:, :16], dim=16)
    few = np.random.default_rng(2).normal(size=(10, D_L))  # 10 items span at most 9 centred directions
    deficient = exact_basis(few, 16)  # whitened coordinates of the directions the items do not span are 0
    assert deficient.spanned_dims == 9
    Z = deficient.transform(few)
    assert np.abs(np.cov(Z[:, :9], rowvar=False) - np.eye(9)).max() < 1e-6 and not Z[:, 9:].any()
    assert exact_basis(few, 16, whiten=False).transform(few).shape == (10, 16)
    with pytest.raises(ConfigError, match=r"model\.id_dims=8: must be in \(0, model\.dim=8\)"):
        exact_basis(few, 8, 8)
    with pytest.raises(ConfigError, match=r"model\.dim=64: must be in 1\.\.48"):
        exact_basis(few, 64)
