"""Drift of the basis, the refit rule and the ID-vector carry on a refit, checked against numpy / scipy."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from alphafuse_dist.decompose import drift
from alphafuse_dist.decompose.basis import NullSpaceBasis
from alphafuse_dist.decompose.drift import basis_drift, carry_id_vectors, id_vectors_after_refit, should_refit
from alphafuse_dist.errors import ConfigError, DataError

D_L, D, D_N = 48, 16, 8
SPREAD = np.geomspace(3.0, 0.05, D_L)


def rotation(rng, n=D_L):
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def sample(rng, n, Q, mean):
    """float32 [n, d_l]: independent directions Q[:, k] with standard deviations SPREAD[k], about mean."""
    return ((rng.normal(size=(n, D_L)) * SPREAD) @ Q.T + mean).astype(np.float32)


def fit(E, scale=1.0, whiten=True, dim=D, null_dims=D_N):
    Y = scale * E.astype(np.float64)
    return NullSpaceBasis.from_spectrum(Y.mean(0), *np.linalg.eigh(np.cov(Y, rowvar=False)), dim=dim,
                                        null_dims=null_dims, whiten=whiten, scale=scale)


@pytest.fixture(scope="module")
def world():
    """The old items' distribution, its basis (scale 2, as the stats live in scale * E space) and rng."""
    rng = np.random.default_rng(7)
    Q, mean = rotation(rng), rng.uniform(-2, 2, size=D_L)
    old = fit(sample(rng, 4000, Q, mean), scale=2.0)
    return rng, Q, mean, old


def test_same_distribution_keeps_the_basis(world):
    rng, Q, mean, old = world
    report = basis_drift(old, sample(rng, 3000, Q, mean))
    assert report.num_items == 3000 and (report.dim, report.semantic_dims) == (D, D - D_N)
    assert report.explained_ratio_old_mean > 0.99 and report.explained_ratio_new_mean > 0.99
    assert report.min_semantic_cosine > 0.9
    assert report.max_abs_eigenvalue_change < 0.15 and abs(report.median_eigenvalue_change) < 0.05
    assert report.mean_shift_relative < 0.05
    refit, reason = should_refit(report, threshold=0.9)
    assert not refit and "keep the basis" in reason and "ratio" in reason


def test_rotated_distribution_refits(world):
    rng, _, mean, old = world
    report = basis_drift(old, sample(rng, 3000, rotation(rng), mean))
    assert report.explained_ratio_old_mean < 0.7 and report.explained_ratio_new_mean < 0.7
    assert report.min_semantic_cosine < 0.5
    refit, reason = should_refit(report, threshold=0.9)
    assert refit and reason.startswith("refit:")
    # too few new items to judge: never a refit, whatever the ratio
    refit, reason = should_refit(report, threshold=0.9, min_items=10_000)
    assert not refit and "only 3000 new items" in reason


def test_mean_shift_counts_about_the_old_mean_only(world):
    rng, Q, mean, old = world
    direction = Q[:, -1]  # a direction the old basis drops
    report = basis_drift(old, sample(rng, 3000, Q, mean + 6.0 * direction))
    # centred on their own mean the new items fit the old basis as before ...
    assert report.explained_ratio_new_mean > 0.99 and report.min_semantic_cosine > 0.9
    # ... but transform() centres them on the old mean, where the shift is variance outside span(U_d)
    assert report.explained_ratio_old_mean < 0.7
    assert report.mean_shift_norm == pytest.approx(2.0 * 6.0, rel=0.02)  # measured on scale * E
    assert report.mean_shift_relative == pytest.approx(report.mean_shift_norm / np.sqrt(report.total_variance_old),
                                                     rel=1e-12)
    assert should_refit(report)[0]
    # a reference mean from the old items' statistics replaces the basis's centre
    stats = {"mean": old.mean + 2.0 * 6.0 * direction}
    assert basis_drift(old, sample(rng, 3000, Q, mean + 6.0 * direction),
                       old_embeddings_stats=stats).mean_shift_relative < 0.05


def test_numbers_equal_direct_numpy(world, monkeypatch):
    monkeypatch.setattr(drift, "_GRAM_BLOCK", 64)  # 500 rows in 8 blocks, the last one short
    rng, _, mean, old = world
    E = sample(rng, 500, rotation(rng), mean + 1.0)
    report = basis_drift(old, E)
    Y = old.scale * E.astype(np.float64)
    U = old.eigenvectors[:, :D]
    for centre, kept, best, ratio in (
            (old.mean, report.explained_old_old_mean, report.explained_best_old_mean, report.explained_ratio_old_mean),
            (Y.mean(0), report.explained_old_new_mean, report.explained_best_new_mean,
             report.explained_ratio_new_mean)):
        Z = Y - centre
        total = np.sum(Z ** 2)
        singular = np.linalg.svd(Z, compute_uv=False)
        assert kept == pytest.approx(np.sum((Z @ U) ** 2) / total, rel=1e-10)
        assert best == pytest.approx(np.sum(singular[:D] ** 2) / total, rel=1e-10)
        assert ratio == pytest.approx(kept / best, rel=1e-12)
    new_values = np.linalg.eigvalsh(np.cov(Y, rowvar=False))[::-1]
    np.testing.assert_allclose(report.new_eigenvalues, new_values[:D], rtol=1e-9)
    np.testing.assert_allclose(report.eigenvalue_relative_change, new_values[:D] / old.eigenvalues[:D] - 1, rtol=1e-9)
    assert report.total_variance_new == pytest.approx(new_values.sum(), rel=1e-9)
    assert report.total_variance_old == pytest.approx(old.eigenvalues.sum(), rel=1e-12)
    # principal angles against scipy, between span(U_old[:, :d_s]) and the new top-d_s eigenvectors
    _, vectors = np.linalg.eigh(np.cov(Y, rowvar=False))
    angles = subspace_angles(old.eigenvectors[:, :D - D_N], vectors[:, ::-1][:, :D - D_N])
    np.testing.assert_allclose(report.semantic_cosines, np.sort(np.cos(angles))[::-1], atol=1e-9)
    assert report.min_semantic_cosine == pytest.approx(np.cos(angles).min(), abs=1e-9)
    assert report.mean_semantic_cosine == pytest.approx(np.cos(angles).mean(), abs=1e-9)
    d = report.to_dict()
    assert isinstance(d["semantic_cosines"], list) and len(d["new_eigenvalues"]) == D
    assert d["explained_ratio_old_mean"] == report.explained_ratio_old_mean


def test_bad_new_embeddings_are_clear_errors(world, monkeypatch):
    monkeypatch.setattr(drift, "_GRAM_BLOCK", 7)  # the bad row is in the third block
    rng, Q, mean, old = world
    E = sample(rng, 50, Q, mean)
    with pytest.raises(DataError, match=rf"\[M, {D_L}\]"):
        basis_drift(old, E[:, :-1])
    with pytest.raises(DataError, match="at least 2"):
        basis_drift(old, E[:1])
    E[17, 3] = np.nan
    with pytest.raises(DataError, match="row 17"):
        basis_drift(old, E)
    with pytest.raises(DataError, match="no variance"):
        basis_drift(old, np.repeat(E[:1], 5, axis=0))
    with pytest.raises(DataError, match="unknown keys"):
        basis_drift(old, E[:10], old_embeddings_stats={"cov": 1})
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        should_refit(basis_drift(old, sample(rng, 50, Q, mean)), threshold=1.5)


def direct_carry(old, new, ids):
    """Carry by construction: the language-space displacement that gives the old fused vector its ID
    part (least-norm solution through pinv of the old projection), then the difference it makes to
    the new basis's transform of an item, last d_n columns."""
    padded = np.concatenate([np.zeros((len(ids), old.semantic_dims)), ids], axis=1)
    delta = padded @ np.linalg.pinv(old.projection)  # in scale_old * E space
    E = np.random.default_rng(0).normal(size=(len(ids), old.d_l))
    shifted = new.transform(E + delta / old.scale).astype(np.float64)
    base = new.transform(E).astype(np.float64)
    return (shifted - base)[:, new.semantic_dims:], (padded, delta)


@pytest.mark.parametrize("whiten", [True, False])
def test_carry_id_vectors_equals_direct_construction(world, whiten):
    rng, Q, mean, _ = world
    old = fit(sample(rng, 3000, Q, mean), scale=2.0, whiten=whiten)
    new = fit(sample(rng, 3000, rotation(rng) @ Q, mean + 0.5), scale=3.0, whiten=whiten, null_dims=6)
    ids = rng.normal(size=(20, D_N)).astype(np.float32)
    carried = carry_id_vectors(old, new, ids)
    assert carried.dtype == np.float32 and carried.shape == (20, 6)
    expected, (padded, delta) = direct_carry(old, new, ids)
    assert np.allclose(delta @ old.projection, padded)  # delta does stand for the old ID part
    # float32 transforms in the reference: compare at their precision
    np.testing.assert_allclose(carried, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # an unchanged basis carries every ID vector unchanged
    np.testing.assert_allclose(carry_id_vectors(old, old, ids), ids, rtol=0, atol=1e-6)


def test_id_rules_after_refit(world):
    rng, Q, mean, old = world
    new = fit(sample(rng, 3000, rotation(rng), mean), scale=2.0)
    ids = rng.normal(size=(5, D_N))
    np.testing.assert_array_equal(id_vectors_after_refit(old, new, ids, rule="reset"), np.zeros((5, D_N), np.float32))
    np.testing.assert_array_equal(id_vectors_after_refit(old, new, ids, rule="carry"), carry_id_vectors(old, new, ids))
    with pytest.raises(ConfigError, match="carry, reset"):
        id_vectors_after_refit(old, new, ids, rule="keep")
    other = NullSpaceBasis.from_spectrum(np.zeros(D_L + 2), *np.linalg.eigh(np.diag(np.geomspace(3, 1, D_L + 2))),
                                         dim=D, null_dims=D_N)
    with pytest.raises(ConfigError, match="reset"):
        carry_id_vectors(old, other, ids)
    with pytest.raises(ValueError, match=rf"\[M, {D_N}\]"):
        carry_id_vectors(old, new, ids[:, :3])


def test_reliability_threshold_is_two_d_and_matches_the_refit_rule(world):
    rng, Q, mean, old = world
    assert drift.reliability(2 * D, D)[0] and not drift.reliability(2 * D - 1, D)[0]
    reliable, note = drift.reliability(5, D)
    assert not reliable and f"only 5 new items < {2 * D} (2 d, d={D})" in note
    # why: a few items of the UNCHANGED distribution already look drifted; many do not
    few = basis_drift(old, sample(rng, 2 * D - 1, Q, mean)).explained_ratio_old_mean
    many = basis_drift(old, sample(rng, 4000, Q, mean)).explained_ratio_old_mean
    assert few < many - 0.03 and many > 0.98
    # the refit rule never refits on an unreliable count, whatever the ratio
    report = basis_drift(old, sample(rng, 2 * D - 1, Q @ rotation(rng), mean))
    assert not should_refit(report, threshold=1.0)[0]
