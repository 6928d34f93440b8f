"""Distributed covariance, the null-space basis and the decompose stage, checked against numpy."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from safetensors.numpy import load_file

from alphafuse_dist.config import DecomposeConfig
from alphafuse_dist.decompose.basis import NullSpaceBasis
from alphafuse_dist.decompose import covariance
from alphafuse_dist.decompose.covariance import (FixedPointGram, ScatterAccumulator, batch_moments, covariance_eigh,
                                                 covariance_pieces, distributed_covariance, fragment_pieces, openblas_syrk, partial_moments,
                                                 pieces_moments, task_layout)
from alphafuse_dist.decompose import stage as stage_module
from alphafuse_dist.decompose.stage import decompose, semantic_table
from alphafuse_dist.errors import ConfigError, DataError

N, D_L = 3000, 48


def write_fragments(folder, X, idx, sizes, row_group_rows=128):
    """Rows (idx[i], X[i]) split into part-*.parquet files of the given sizes, as embed writes them
    (in row groups of ``row_group_rows``, so that the decompose tasks read pieces of files)."""
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


def test_distributed_covariance_equals_numpy(ray_session, embeddings):
    _, files, X = embeddings
    reference = np.cov(X, rowvar=False)
    n, mean, cov = distributed_covariance(files)  # float32 GEMMs on centred batches (the default)
    assert n == N
    assert rel_err(mean, X.mean(0, dtype=np.float64)) < 1e-12
    assert rel_err(cov, reference) < 1e-6
    # float64 GEMMs: round-off only
    _, _, cov64 = distributed_covariance(files, precision="float64")
    assert rel_err(cov64, reference) < 1e-12
    # the reduce tree's shape does not matter beyond round-off
    _, _, cov8 = distributed_covariance(files, fan_in=8, precision="float64")
    assert rel_err(cov8, cov64) < 1e-12
    with pytest.raises(ValueError, match="precision"):
        distributed_covariance(files, precision="float16")


def test_fragment_pieces_split_files_by_row_groups(ray_session, embeddings, tmp_path):
    _, files, X = embeddings  # 700, 1, 999, 800, 500 rows in row groups of 128
    groups = {f: pq.ParquetFile(f).metadata.num_row_groups for f in files}
    assert list(groups.values()) == [6, 1, 8, 7, 4]
    for k in (1, 5, 12, 26, 100):
        pieces = fragment_pieces(files, pieces=k)
        # every row group of every file exactly once, in order, and no piece spans two files
        assert [(f, g) for f, gs in pieces for g in gs] == [(f, g) for f in files for g in range(groups[f])]
        assert len(pieces) >= len(files)
        assert len(pieces) <= k + len(files)  # ceil(rows / target) per file
        target = -(-N // k)
        for f, gs in pieces:  # no piece holds more than its target and one row group
            meta = pq.ParquetFile(f).metadata
            assert sum(meta.row_group(g).num_rows for g in gs) < target + 128
    assert len(fragment_pieces(files, pieces=26)) == 26  # one per row group
    assert len(fragment_pieces(files)) >= 2  # default: 1 per CPU of the 2-CPU test cluster
    # pieces of at least min_rows where the file has them (files of 700, 999, 800 and 500 rows)
    assert [len(gs) for _, gs in fragment_pieces(files, pieces=26, min_rows=600)] == [3, 3, 1, 4, 4, 4, 3, 4]

    # the moments of the pieces of one file add up to the file's
    pieces = [p for p in fragment_pieces(files, pieces=26) if p[0] == files[2]]
    whole = partial_moments(files[2], precision="float64")
    total = partial_moments(pieces[0], precision="float64")
    for piece in pieces[1:]:
        total = total + partial_moments(piece, precision="float64")
    assert total.count == whole.count == 999
    assert rel_err(total.scatter, whole.scatter) < 1e-12 and rel_err(total.mean, whole.mean) < 1e-12

    empty = tmp_path / "part-empty.parquet"
    pq.write_table(pq.read_table(files[0]).slice(0, 0), empty)
    with pytest.raises(DataError, match="has no rows") as e:
        fragment_pieces([files[0], str(empty)])
    assert str(empty) in str(e.value)


def test_threads_and_tasks_add_up_deterministically(ray_session, embeddings):
    """pieces_moments: threads sharing the pieces, about one shift, give the moments of all rows
    whatever the thread count, and (float32) the same bits on every run and for every thread
    count; distributed_covariance gives the same with one task per node or one per CPU."""
    _, files, X = embeddings
    pieces = fragment_pieces(files, pieces=20)
    centred = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    for threads in (1, 3, 7):
        m = pieces_moments(pieces, threads=threads, precision="float64", batch_rows=100)
        assert m.count == N and m.weight == N
        assert rel_err(m.mean, X.mean(0, dtype=np.float64)) < 1e-12
        assert rel_err(m.scatter, centred.T @ centred) < 1e-12
    m32 = pieces_moments(pieces, threads=4)  # float32 products, the default
    assert rel_err(m32.scatter, centred.T @ centred) < 1e-6
    for threads in (4, 4, 1, 3, 7):  # neither the threads' timing nor their number reaches the sums
        again = pieces_moments(pieces, threads=threads)
        assert np.array_equal(again.scatter, m32.scatter) and np.array_equal(again.mean, m32.mean)
        assert again.count == N and again.weight == N
    # weights reach every thread; a bad one names its file
    w = np.random.default_rng(2).integers(1, 9, size=N).astype(np.float64)
    mw = pieces_moments(pieces, w, threads=3, precision="float64")
    assert rel_err(mw.mean, np.average(X, axis=0, weights=w)) < 1e-12 and mw.weight == w.sum()
    with pytest.raises(DataError, match="item_idx .* has no weight") as e:
        pieces_moments(pieces, w[:-1], threads=3)
    assert "part-" in str(e.value)

    assert task_layout() == (1, 2)  # the 2-CPU test cluster: one task of 2 CPUs
    assert task_layout(task_cpus=1) == (2, 1)

    @ray.remote(num_cpus=1)
    class Resident:
        def ping(self):
            return 1

    resident = Resident.remote()  # holds one of the 2 CPUs: a 2-CPU task would never start
    ray.get(resident.ping.remote())
    try:
        assert task_layout() == (2, 1)
        _, _, cov_busy = distributed_covariance(files, precision="float64")
        assert rel_err(cov_busy, np.cov(X, rowvar=False)) < 1e-12
    finally:
        ray.kill(resident)
    for _ in range(200):  # ray.kill returns before the CPU is free; the calls below need the default layout
        if task_layout() == (1, 2):
            break
        time.sleep(0.05)
    assert task_layout() == (1, 2)
    with pytest.raises(ValueError, match="task_cpus=0"):
        task_layout(task_cpus=0)
    _, mean1, cov1 = distributed_covariance(files, precision="float64")
    _, mean2, cov2 = distributed_covariance(files, precision="float64", task_cpus=1)
    assert rel_err(cov1, np.cov(X, rowvar=False)) < 1e-12 and rel_err(cov2, cov1) < 1e-12
    assert rel_err(mean2, mean1) < 1e-12
    _, mean32, cov32 = distributed_covariance(files)
    assert np.array_equal(distributed_covariance(files)[2], cov32)
    # float32: the same bits with one task per CPU (two tasks' integer grams added) as with one task
    _, mean_tasks, cov_tasks = distributed_covariance(files, task_cpus=1)
    assert np.array_equal(cov_tasks, cov32) and np.array_equal(mean_tasks, mean32)
    pieces32 = covariance_pieces(files)
    assert rel_err(cov32, np.cov(X, rowvar=False)) < 1e-6
    local = pieces_moments(pieces32, threads=5).scatter / (N - 1)  # in this process, 5 threads
    assert np.array_equal((local + local.T) / 2, cov32)

    a, b = ScatterAccumulator(D_L, shift=np.zeros(D_L)), ScatterAccumulator(D_L, shift=np.ones(D_L))
    b.add(X[:10])
    with pytest.raises(ValueError, match="same shift"):
        a.absorb(b)


def test_fixed_point_gram_sums_in_any_order_to_the_same_bits():
    rng = np.random.default_rng(7)
    products = []
    for _ in range(6):
        Z = rng.normal(size=(50, 20)).astype(np.float32) * rng.uniform(0.1, 10)
        products.append(Z.T @ Z)
    exact = np.sum([p.astype(np.float64) for p in products], axis=0)
    sums = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        gram = FixedPointGram.for_rows(20, weight=300, spread=1.0)
        for k in order:
            A = products[k].copy()
            A[np.tril_indices(20, -1)] = 1e30  # the lower triangle is never added
            gram.add(A, start=k)
        assert not gram.overflowed
        sums.append(gram.to_float())
    assert np.array_equal(sums[0], sums[1])
    assert np.array_equal(sums[0], sums[0].T)
    assert np.abs(sums[0] - exact).max() <= 6 * gram.quantum / 2  # half a quantum per add at most
    # past 2**62 quanta an entry could wrap: the gram says so and ignores further adds
    small = FixedPointGram.for_rows(20, weight=1, spread=1e-12)
    small.add(products[0])
    assert small.overflowed and not small.values.any()


def test_float32_pass_falls_back_where_needed(ray_session, embeddings, monkeypatch, caplog):
    """numpy's matmul stands in where no OpenBLAS syrk is found; a spread the fixed-point gram
    cannot hold is summed again the float64 way, with a warning; NaN names its file."""
    _, files, X = embeddings
    pieces = fragment_pieces(files, pieces=20)
    centred = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    assert openblas_syrk() is not None  # numpy's OpenBLAS here: the in-place path is the one measured
    fast = pieces_moments(pieces, threads=3)
    monkeypatch.setattr(covariance, "openblas_syrk", lambda: None)
    plain = pieces_moments(pieces, threads=3)
    assert rel_err(plain.scatter, centred.T @ centred) < 1e-6 and rel_err(plain.scatter, fast.scatter) < 1e-6
    monkeypatch.setattr(covariance, "HEADROOM_BITS", -40)
    with caplog.at_level("WARNING", logger=covariance.__name__):
        again = pieces_moments(pieces, threads=3)
    assert "outgrew the fixed-point gram" in caplog.text
    assert rel_err(again.scatter, centred.T @ centred) < 1e-6 and again.count == N
    monkeypatch.undo()

    bad = X[:300].copy()
    bad[123, 7] = np.nan
    folder = embeddings[0].parent / "nan"
    folder.mkdir(exist_ok=True)
    nan_files = write_fragments(folder, bad, np.arange(300), [150, 150])
    with pytest.raises(DataError, match="NaN or inf") as e:  # in the first rows: the shift finds it
        pieces_moments(fragment_pieces(nan_files, pieces=2), threads=2)
    assert "part-000.parquet" in str(e.value) and "vector" in str(e.value)
    bad[123, 7], bad[200, 3] = X[123, 7], np.inf  # in the second file: its thread finds it
    nan_files = write_fragments(folder, bad, np.arange(300), [150, 150])
    with pytest.raises(DataError, match="NaN or inf") as e:
        pieces_moments(fragment_pieces(nan_files, pieces=2), threads=2)
    assert "part-001.parquet" in str(e.value) and "vector" in str(e.value)
    holed = folder / "part-holed.parquet"  # a null float inside a vector (not a null vector)
    values = pa.array([None if i == 5 else float(i) for i in range(3 * D_L)], pa.float32())
    pq.write_table(pa.table({"item_idx": pa.array([0, 1, 2], pa.int32()),
                             "vector": pa.FixedSizeListArray.from_arrays(values, D_L)}), holed)
    with pytest.raises(DataError, match="null entries inside a vector") as e:
        pieces_moments([str(holed)])
    assert "part-holed.parquet" in str(e.value)


def test_wide_vectors_take_the_in_place_rank_one_update(tmp_path):
    """From d_l = SCIPY_EIGH_MIN_DIM on, the shift-to-mean correction runs as BLAS ger in place."""
    rng = np.random.default_rng(11)
    d = covariance.SCIPY_EIGH_MIN_DIM + 6
    X = (rng.normal(size=(400, d)) * np.geomspace(2, 0.1, d) + 3.0).astype(np.float32)
    files = write_fragments(tmp_path, X, np.arange(400), [150, 250], row_group_rows=100)
    m = pieces_moments(fragment_pieces(files, pieces=4), threads=2)
    centred = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    assert rel_err(m.scatter, centred.T @ centred) < 1e-6 and np.array_equal(m.scatter, m.scatter.T)


def test_numpy_view_is_to_numpy_without_pandas():
    for values, dtype in (([1.5, -2.0, 3.25, 4.0], pa.float32()), ([1.5, -2.0, 3.25, 4.0], pa.float64()),
                          ([7, -1, 3, 9], pa.int32()), ([7, 1, 3, 2**40], pa.int64()), ([1, 2, 3, 4], pa.uint16())):
        array = pa.array(values, dtype).slice(1, 3)  # an offset into the buffer
        view = covariance.numpy_view(array)
        assert view.dtype == array.to_numpy().dtype and np.array_equal(view, array.to_numpy())
    with_null = pa.array([1.0, None, 2.0], pa.float32())
    assert np.isnan(covariance.numpy_view(with_null)[1])  # arrays with nulls go through to_numpy
    assert list(covariance.numpy_view(pa.array(["a", "b"]))) == ["a", "b"]


def test_iter_fragment_reads_every_row_once_without_pyarrow_compute(tmp_path):
    """Batches that cut row groups (Arrow slices with offsets) give the file's rows in order, and
    reading does not import pyarrow.compute (its import held every thread of a fresh Ray
    worker's first pass: 0.05-0.1 s under the GIL, 2026-11-27)."""
    X = np.random.default_rng(5).normal(size=(500, 12)).astype(np.float32)
    files = write_fragments(tmp_path, X, np.arange(500), [500], row_group_rows=128)
    for rows in (7, 100, 128, 500):
        parts = list(covariance.iter_fragment(files[0], rows, use_threads=False))
        assert np.array_equal(np.concatenate([p[1] for p in parts]), X)
        assert np.array_equal(np.concatenate([p[0] for p in parts]), np.arange(500))
    parts = list(covariance.iter_fragment((files[0], (1, 2)), 50))  # a piece: row groups 1 and 2
    assert np.array_equal(np.concatenate([p[1] for p in parts]), X[128:384])
    code = ("import sys; from alphafuse_dist.decompose.covariance import iter_fragment; "
            f"list(iter_fragment({files[0]!r}, 100, use_threads=False)); "
            "assert 'pyarrow.compute' not in sys.modules, 'pyarrow.compute was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float32_semantic_table_is_float64_within_its_rounding(ray_session, embeddings, tmp_path):
    """The default (decompose.precision auto, count rule) transforms in float32: within
    ~6e-8 * sqrt(trace / S_k) of the float64 coordinates, direction by direction (measured:
    a tenth of the 1e-6 asserted; 3.8e-6 relative at worst on this spectrum spanning 1e5)."""
    folder, _, X = embeddings
    decompose(folder, DecomposeConfig(null_dims=8), dim=32, num_items=N, out_dir=tmp_path)
    basis = NullSpaceBasis.load(tmp_path)
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    exact = basis.transform(X)  # float64
    assert not np.array_equal(table, exact)  # it did take the float32 path
    trace = np.clip(basis.eigenvalues, 0, None).sum()
    bound = 1e-6 * np.sqrt(trace / basis.eigenvalues[:32]) * np.abs(exact).max(0)
    assert (np.abs(table - exact).max(0) <= bound).all()
    assert np.array_equal(basis.transform(X[:100], "float32"), basis.transform(X[:100], "float32"))
    with pytest.raises(ValueError, match="precision='float16'"):
        basis.transform(X[:2], "float16")


def test_covariance_eigh_equals_numpy():
    rng = np.random.default_rng(5)
    A = rng.normal(size=(200, 120)) * np.geomspace(1, 1e-3, 120)
    C = np.cov(A, rowvar=False)
    values, vectors = covariance_eigh(C)
    ref_values, ref_vectors = np.linalg.eigh(C)
    assert np.all(np.diff(values) >= 0)  # ascending, as numpy's
    assert rel_err(values, ref_values) < 1e-12
    assert rel_err(vectors @ np.diag(values) @ vectors.T, C) < 1e-12
    assert np.allclose(vectors.T @ vectors, np.eye(120), atol=1e-12)
    top = np.abs(np.sum(vectors[:, -10:] * ref_vectors[:, -10:], axis=0))  # same directions up to sign
    assert np.allclose(top, 1, atol=1e-9)
    # from SCIPY_EIGH_MIN_DIM on, scipy's dsyevd: the same decomposition
    big = rng.normal(size=(1100, 1030))
    C = big.T @ big / 1100
    values, vectors = covariance_eigh(C)
    assert rel_err(values, np.linalg.eigvalsh(C)) < 1e-12
    assert rel_err(vectors @ np.diag(values) @ vectors.T, C) < 1e-12


def test_mixed_precision_eigh_refines_the_top_pairs_to_float64():
    """decompose.precision float32 + the count rule: float32 ssyevd, the top pairs refined in float64."""
    rng = np.random.default_rng(8)
    d, top = 1100, 64  # d >= SCIPY_EIGH_MIN_DIM and refine_block(64) = 128 <= d / 2: the mixed path
    A = rng.normal(size=(d, d)) * 0.99 ** np.arange(d)
    C = A @ A.T / d
    ref_values, ref_vectors = np.linalg.eigh(C)
    values, vectors = covariance_eigh(C, "float32", top=top)
    assert values.dtype == vectors.dtype == np.float64 and vectors.shape == (d, d)
    assert np.all(np.diff(values) >= 0)
    # the top pairs: float64-accurate
    assert np.abs(values[-top:] / ref_values[-top:] - 1).max() < 1e-10
    cosines = np.linalg.svd(ref_vectors[:, -top:].T @ vectors[:, -top:], compute_uv=False)
    assert cosines.min() > 1 - 1e-10
    residual = np.linalg.norm(C @ vectors[:, -top:] - vectors[:, -top:] * values[-top:], axis=0)
    assert residual.max() < 1e-8 * ref_values[-1]
    # the rest: float32-accurate (so the float32 solver did run), and all columns orthonormal to that class
    rest = np.abs(values[:-top] - ref_values[:-top]) / ref_values[-1]
    assert 1e-12 < rest.max() < 1e-5
    assert np.abs(vectors.T @ vectors - np.eye(d)).max() < 1e-5
    # near-equal eigenvalues across the top's edge: refined as a whole block, and no float32
    # column below it repeats a refined direction
    S = np.geomspace(1e-4, 1, d)
    S[-66:-61] = S[-64] * (1 + 1e-9 * np.arange(5))
    U, _ = np.linalg.qr(rng.normal(size=(d, d)))
    C = (U * S) @ U.T
    C = (C + C.T) / 2
    ref_values, ref_vectors = np.linalg.eigh(C)
    values, vectors = covariance_eigh(C, "float32", top=top)
    assert np.abs(values[-top:] / ref_values[-top:] - 1).max() < 1e-12
    assert np.abs(vectors[:, -top:].T @ vectors[:, -top:] - np.eye(top)).max() < 1e-12
    # the top 64 lie in the true top 69 (the cluster's 5 cannot be told apart)
    assert np.linalg.svd(ref_vectors[:, -top - 5:].T @ vectors[:, -top:], compute_uv=False).min() > 1 - 1e-12
    assert np.abs(vectors[:, :-top].T @ vectors[:, -top:]).max() < 1e-12
    assert np.abs(vectors.T @ vectors - np.eye(d)).max() < 1e-4
    # a block over half of d_l, float64 asked, or no top: the float64 solver, bit for bit
    for args in [("float32", 600), ("float64", top), ("float32", None)]:
        v, _ = covariance_eigh(C, *args)
        assert np.array_equal(v, covariance_eigh(C)[0])
    with pytest.raises(ValueError, match="precision='float16'"):
        covariance_eigh(C, "float16", top=top)
    with pytest.raises(ValueError, match="top=0"):
        covariance_eigh(C, "float32", top=0)


def test_float32_scatter_is_exact_to_1e6_with_a_huge_mean():
    """Centring each batch on its float64 mean first: a mean 1e4 x the spread costs nothing."""
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(20_000, 16)) * np.geomspace(1, 0.05, 16) + 1e4).astype(np.float32)
    parts = [batch_moments(X[s:s + 4096]) for s in range(0, len(X), 4096)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    reference = np.cov(X, rowvar=False)
    assert total.count == 20_000
    assert rel_err(total.scatter / (total.weight - 1), reference) < 1e-6
    assert rel_err(total.mean, X.mean(0, dtype=np.float64)) < 1e-12


def test_weighted_and_scaled_covariance(ray_session, embeddings):
    _, files, X = embeddings
    w = np.random.default_rng(1).integers(1, 20, size=N)
    _, mean, cov = distributed_covariance(files, scale=40.0, weights=w)
    assert rel_err(mean, 40.0 * np.average(X, axis=0, weights=w)) < 1e-12
    assert rel_err(cov, np.cov(40.0 * X.astype(np.float64), rowvar=False, fweights=w)) < 1e-6


def test_partial_moments_reads_one_fragment(embeddings):
    _, files, X = embeddings
    m = partial_moments(files[0], batch_rows=64, precision="float64")  # several batches inside one file
    rows = pq.read_table(files[0])
    Xf = np.stack(rows.column("vector").to_numpy(zero_copy_only=False)).astype(np.float64)
    assert m.count == len(Xf) == 700 and m.weight == 700.0
    assert rel_err(m.total, Xf.sum(0)) < 1e-12
    centred = Xf - Xf.mean(0)
    assert rel_err(m.scatter, centred.T @ centred) < 1e-12


def test_whitened_coordinates_have_identity_covariance(embeddings):
    _, _, X = embeddings
    basis = NullSpaceBasis.fit(X.mean(0, dtype=np.float64), np.cov(X, rowvar=False), dim=32, null_dims=16)
    Z = basis.transform(X)
    assert Z.dtype == np.float32 and Z.shape == (N, 32)
    assert np.abs(np.cov(Z, rowvar=False) - np.eye(32)).max() < 1e-5
    assert np.abs(Z.mean(0)).max() < 1e-5
    assert np.all(np.diff(basis.eigenvalues) <= 0)
    # whitening makes the scale irrelevant (METHOD.md: it matters only for threshold rules)
    scaled = NullSpaceBasis.fit(40 * basis.mean, 1600 * np.cov(X, rowvar=False), dim=32, null_dims=16, scale=40.0)
    assert np.abs(scaled.transform(X) - Z).max() < 1e-4


def test_unwhitened_projection_is_the_numpy_eigenbasis(embeddings):
    _, _, X = embeddings
    d, d_n = 24, 8
    mu, C = X.mean(0, dtype=np.float64), np.cov(X, rowvar=False)
    basis = NullSpaceBasis.fit(mu, C, dim=d, null_dims=d_n, whiten=False)
    values, U = np.linalg.eigh(C)
    values, U = values[::-1], U[:, ::-1]
    U = U * np.sign((U * basis.eigenvectors).sum(0))  # eigenvectors are unique up to sign
    expected = (X.astype(np.float64) - mu) @ U[:, :d]
    Z = basis.transform(X)
    assert rel_err(Z, expected) < 1e-6
    assert basis.semantic_dims == d - d_n
    assert rel_err(Z[:, d - d_n:], (X.astype(np.float64) - mu) @ U[:, d - d_n:d]) < 1e-6
    P = basis.projection
    assert P.shape == (D_L, d)
    assert np.abs(P.T @ P - np.eye(d)).max() < 1e-12
    np.testing.assert_allclose(basis.eigenvalues, values, rtol=1e-10, atol=1e-12 * values[0])
    # deterministic sign: the largest-magnitude entry of each eigenvector is positive
    cols = np.arange(D_L)
    assert np.all(basis.eigenvectors[np.abs(basis.eigenvectors).argmax(0), cols] > 0)


def test_save_load_round_trip_is_exact(tmp_path, embeddings):
    _, _, X = embeddings
    basis = NullSpaceBasis.fit(X.mean(0, dtype=np.float64), np.cov(X, rowvar=False), dim=16, null_dims=4,
                               whiten=True, scale=40.0 / 3)
    basis.save(tmp_path)
    back = NullSpaceBasis.load(tmp_path)
    for name in ("mean", "eigenvalues", "eigenvectors"):
        assert getattr(back, name).dtype == np.float64
        assert np.array_equal(getattr(back, name), getattr(basis, name))
    assert (back.dim, back.null_dims, back.whiten, back.scale) == (16, 4, True, 40.0 / 3)
    assert np.array_equal(back.transform(X), basis.transform(X))
    assert json.loads((tmp_path / "basis.json").read_text())["format_version"] == 1


def test_invalid_sizes_and_rank_deficiency_name_the_config_key():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(10, D_L))  # 10 items span at most 9 centred directions
    mu, C = X.mean(0), np.cov(X, rowvar=False)
    with pytest.raises(ConfigError, match=r"model\.dim=16: eigenvalue 10 .* span only 9 directions"):
        NullSpaceBasis.fit(mu, C, dim=16, null_dims=8)
    assert NullSpaceBasis.fit(mu, C, dim=16, null_dims=8, whiten=False).transform(X).shape == (10, 16)
    with pytest.raises(ConfigError, match=r"decompose\.null_dims=8"):
        NullSpaceBasis.fit(mu, C, dim=8, null_dims=8)
    with pytest.raises(ConfigError, match=r"model\.dim=64: must be in 1\.\.48"):
        NullSpaceBasis.fit(mu, C, dim=64, null_dims=8)


def test_decompose_stage_writes_the_semantic_table(ray_session, embeddings, tmp_path):
    folder, _, X = embeddings
    # float64 scatter: this spectrum spans 1e5 over the kept 32 directions, where float32's ~1e-7
    # relative error of C becomes ~2e-5 in the whitened covariance (covariance.py's notes)
    info = decompose(folder, DecomposeConfig(null_dims=8, whiten=True, scale=1.0, precision="float64"), dim=32,
                     num_items=N, out_dir=tmp_path)
    basis = NullSpaceBasis.load(tmp_path)
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    assert table.dtype == np.float32 and table.shape == (N, 32)
    # row i is item i even though the fragments hold the items shuffled
    assert np.array_equal(table, basis.transform(X))
    assert np.abs(np.cov(table, rowvar=False) - np.eye(32)).max() < 1e-5
    spectrum = json.loads((tmp_path / "spectrum.json").read_text())
    assert (spectrum["d"], spectrum["d_null"], spectrum["d_l"]) == (32, 8, D_L)
    assert len(spectrum["eigenvalues"]) == D_L and spectrum["cumulative_explained_variance"][-1] == pytest.approx(1)
    assert info["rows"] == {"items": N} and info["d_l"] == D_L
    assert info["explained_variance_semantic"] == pytest.approx(spectrum["cumulative_explained_variance"][31])


def test_decompose_rejects_duplicate_and_missing_items(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    idx = np.arange(200)
    idx[150] = 7  # item 7 twice, item 150 missing
    (tmp_path / "embed").mkdir()
    write_fragments(tmp_path / "embed", X, idx, [100, 100])
    with pytest.raises(DataError, match=r"column .item_idx.: item_idx 7 occurs more than once"):
        decompose(tmp_path / "embed", DecomposeConfig(null_dims=2), dim=4, num_items=200, out_dir=tmp_path)
    with pytest.raises(DataError, match="embeddings have 200 rows but prepare has 201 items"):
        decompose(tmp_path / "embed", DecomposeConfig(null_dims=2), dim=4, num_items=201, out_dir=tmp_path)
    with pytest.raises(DataError, match=r"nothing: no part-\*\.parquet embedding fragments"):
        decompose(tmp_path / "nothing", DecomposeConfig(null_dims=2), dim=4, num_items=200, out_dir=tmp_path)


def test_semantic_table_streams_pieces_from_threads(ray_session, tmp_path, monkeypatch):
    """One generator task per node, threads over pieces: the same bits for 1 and 2 threads and
    for one piece per row group; every row at its item_idx; bad ids named with their file."""
    rng = np.random.default_rng(12)
    X = rng.normal(size=(1000, 8)).astype(np.float32)
    order = rng.permutation(1000)
    files = write_fragments(tmp_path, X[order], order, [300, 1, 699], row_group_rows=64)
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    basis = NullSpaceBasis.from_spectrum(X.mean(0), np.geomspace(4, 0.5, 8), Q, dim=6, null_dims=2)
    one = semantic_table(files, basis, 1000, "float32", task_cpus=1)
    two = semantic_table(files, basis, 1000, "float32", task_cpus=2)
    monkeypatch.setattr(stage_module, "TRANSFORM_PIECE_ROWS", 64)  # 17 pieces for 2 threads
    small = semantic_table(files, basis, 1000, "float32", task_cpus=2)
    assert np.array_equal(one, two)  # the same pieces: the same batches, whatever the threads
    # other batch sizes: equal up to the GEMM's blocking
    assert np.allclose(one, small, rtol=1e-6, atol=1e-6)
    assert np.allclose(one, basis.transform(X, "float32"), rtol=1e-6, atol=1e-6)

    def table_of(idx, num_items=1000):
        folder = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
        folder.mkdir()
        return semantic_table(write_fragments(folder, X, idx, [500, 500], row_group_rows=64), basis, num_items,
                              "float32", task_cpus=2)

    same_piece = np.arange(1000)
    same_piece[10] = 20  # both rows in one piece: item 20 twice, item 10 missing
    with pytest.raises(DataError, match=r"part-000.parquet, column 'item_idx': item_idx 20 occurs more than once"):
        table_of(same_piece)
    other_file = np.arange(1000)
    other_file[900] = 5  # item 5 in both files
    with pytest.raises(DataError, match=r"column 'item_idx': item_idx 5 occurs more than once"):
        table_of(other_file)
    with pytest.raises(DataError, match=r"part-001.parquet, column 'item_idx': item_idx 1000 is outside 0..999"):
        table_of(np.arange(1001)[np.r_[0:900, 901:1001]])
    with pytest.raises(DataError, match=r"case\d+: 1 items have no embedding .first item_idx 1000."):
        table_of(np.arange(1000), num_items=1001)


def numpy_table(X, d, d_n, *, scale=1.0, whiten=True, weights=None):
    """METHOD.md section 2 written out in numpy: mu, C about mu, C = U S U^T, P, (sE - mu) P."""
    E = scale * X.astype(np.float64)
    mu = E.mean(0) if weights is None else np.average(E, axis=0, weights=weights)
    C = (E - mu).T @ (E - mu) / (len(E) - 1)
    S, U = np.linalg.eigh(C)
    S, U = S[::-1], U[:, ::-1]
    U = U * np.sign(U[np.abs(U).argmax(0), np.arange(U.shape[1])])  # the basis's sign rule
    P = U[:, :d] / np.sqrt(S[:d]) if whiten else U[:, :d]
    return (E - mu) @ P, S


@pytest.mark.parametrize("whiten", [True, False])
def test_stage_equals_the_numpy_construction(ray_session, embeddings, tmp_path, whiten):
    folder, _, X = embeddings
    d, d_n = 24, 8
    expected, _ = numpy_table(X, d, d_n, scale=40.0, whiten=whiten)
    # the formulas, with float64 products: only the float32 table's rounding is left
    decompose(folder, DecomposeConfig(null_dims=d_n, whiten=whiten, scale=40.0, precision="float64"), dim=d,
              num_items=N, out_dir=tmp_path)
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    assert rel_err(table, expected) < 1e-6
    # "cover" keeps the first d_s = d - d_n columns of this table and replaces the rest by the ID part
    assert rel_err(table[:, :d - d_n], expected[:, :d - d_n]) < 1e-6
    # the default float32 products (batches of a whole 600-row fragment here): C is off by ~1e-6
    # relative, and whitening divides direction k by sqrt(S_k), so the table by more
    decompose(folder, DecomposeConfig(null_dims=d_n, whiten=whiten, scale=40.0), dim=d, num_items=N, out_dir=tmp_path)
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    assert rel_err(table, expected) < 1e-4
    assert (tmp_path / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_popularity_weighted_mean(ray_session, embeddings, tmp_path):
    folder, _, X = embeddings
    popularity = np.random.default_rng(4).integers(0, 50, size=N).astype(np.float64)
    # float64 products: the formula, up to the float32 table's rounding (see the test above)
    info = decompose(folder, DecomposeConfig(null_dims=8, weighted_mean=True, precision="float64"), dim=24,
                     num_items=N, out_dir=tmp_path, weights=popularity)
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    expected, _ = numpy_table(X, 24, 8, weights=popularity)
    assert rel_err(table, expected) < 1e-6
    basis = NullSpaceBasis.load(tmp_path)
    assert rel_err(basis.mean, np.average(X.astype(np.float64), axis=0, weights=popularity)) < 1e-10
    # the weighted centre is not the row mean, so the table's columns are not centred
    assert np.abs(table.mean(0)).max() > 1e-3 and info["d_null"] == 8
    with pytest.raises(ConfigError, match=r"decompose\.weighted_mean=true needs item popularities"):
        decompose(folder, DecomposeConfig(null_dims=8, weighted_mean=True), dim=24, num_items=N, out_dir=tmp_path,
                  weights=np.zeros(N))


def test_threshold_rule_keeps_all_dims_and_counts_small_eigenvalues(ray_session, embeddings, tmp_path):
    folder, _, X = embeddings
    cfg = DecomposeConfig(null_rule="threshold", null_threshold=0.25, scale=40.0, null_dims=8)
    _, S = numpy_table(X, D_L, 1, scale=40.0)
    d_n = int((S <= 0.25).sum())
    assert 0 < d_n < D_L  # the fixture's spectrum straddles the threshold
    with pytest.raises(ConfigError, match=rf"set model\.dim={D_L} and decompose\.null_dims={d_n} "
                                          r"\(now model\.dim=32, decompose\.null_dims=8\)"):
        decompose(folder, cfg, dim=32, num_items=N, out_dir=tmp_path)
    cfg.null_dims = d_n
    info = decompose(folder, cfg, dim=D_L, num_items=N, out_dir=tmp_path)
    meta = json.loads((tmp_path / "basis.json").read_text())
    assert (meta["d"], meta["d_null"], info["d"], info["d_null"]) == (D_L, d_n, D_L, d_n)
    table = load_file(str(tmp_path / "semantic.safetensors"))["semantic"]
    expected, _ = numpy_table(X, D_L, d_n, scale=40.0)
    assert rel_err(table, expected) < 1e-4
    with pytest.raises(ConfigError, match=r"decompose\.null_rule=threshold needs decompose\.null_threshold"):
        decompose(folder, DecomposeConfig(null_rule="threshold"), dim=D_L, num_items=N, out_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"use decompose\.method=exact"):
        decompose(folder, DecomposeConfig(null_rule="threshold", null_threshold=0.25, method="randomized"),
                  dim=D_L, num_items=N, out_dir=tmp_path)


def test_project_maps_new_items_with_the_frozen_basis(embeddings):
    _, _, X = embeddings
    basis = NullSpaceBasis.fit(X[:2000].mean(0, dtype=np.float64), np.cov(X[:2000], rowvar=False), dim=16,
                               null_dims=4)
    new = X[2000:]  # items that were not part of the fit
    assert np.array_equal(basis.project(new), basis.transform(new))
    assert np.array_equal(basis.project(X)[:2000], basis.transform(X[:2000]))  # old rows unchanged


def test_top_d_spectrum_is_enough(embeddings):
    _, _, X = embeddings
    mu, C = X.mean(0, dtype=np.float64), np.cov(X, rowvar=False)
    full = NullSpaceBasis.fit(mu, C, dim=16, null_dims=4)
    values, vectors = np.linalg.eigh(C)
    top = NullSpaceBasis.from_spectrum(mu, values[-16:], vectors[:, -16:], dim=16, null_dims=4,
                                       total_variance=np.trace(C))
    assert np.abs(top.transform(X) - full.transform(X)).max() < 1e-4
    np.testing.assert_allclose(top.explained_variance(), full.explained_variance()[:16], rtol=1e-10)
    with pytest.raises(ValueError, match="total_variance is needed"):
        NullSpaceBasis.from_spectrum(mu, values[-16:], vectors[:, -16:], dim=16, null_dims=4)
