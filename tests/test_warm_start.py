"""Retraining foundations: a second period reuses the first one's basis (decompose.reuse_basis)
and starts from its model (train.warm_start) over stable ids (data.id_map)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alphafuse_dist.config import load_config
from alphafuse_dist.errors import ConfigError
from alphafuse_dist.pipeline import run_pipeline

GENRES = ["Comedy", "Drama", "Horror", "Western", "Musical", "Documentary", "Animation", "Crime"]


def _write_period(folder, n_items, n_users=80, seed=0):
    """Users walk a cycle over the first ``n_items`` items."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["user_id,item_id,timestamp"]
    for u in range(n_users):
        start, length = rng.integers(n_items), rng.integers(6, 12)
        rows += [f"u{u},m{(start + t) % n_items},{1000 + 10 * t}" for t in range(length)]
    (folder / "inter.csv").write_text("\n".join(rows) + "\n")
    items = ["item_id,title,genres"] + [f"m{i},The {GENRES[i % 8]} Story part {i},{GENRES[i % 8]}"
                                        for i in range(n_items)]
    (folder / "items.csv").write_text("\n".join(items) + "\n")


def _cfg(data, run_dir, cache, extra=()):
    return load_config("quickstart", [
        "method=alphafuse", "data.source=interactions", f"data.path={data / 'inter.csv'}",
        f"data.items_path={data / 'items.csv'}", "data.text_template={title}. Genres: {genres}.",
        f"run_dir={run_dir}", f"embed.cache_dir={cache}", "model.dim=32", "model.id_dims=16",
        "model.max_len=8", "train.backend=torch", "train.num_workers=1", "train.batch_size=32", "train.epochs=3",
        "train.num_negatives=16", "train.log_every=0", "model.dropout=0.0", *extra])


@pytest.fixture(scope="module")
def two_periods(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("periods")
    _write_period(root / "d1", 30)
    _write_period(root / "d2", 40, seed=1)
    cache = root / "cache"
    first = _cfg(root / "d1", root / "r1", cache)
    run_pipeline(first)
    train1 = root / "r1" / "train-alphafuse-s22"
    warm = _cfg(root / "d2", root / "r2", cache, [
        f"data.id_map={root / 'r1' / 'prepare'}", f"decompose.reuse_basis={root / 'r1' / 'decompose'}",
        f"train.warm_start={train1}", "train.epochs=0"])
    run_pipeline(warm)
    return root, warm


def test_second_period_reuses_the_basis_and_starts_from_the_previous_model(two_periods):
    root, _ = two_periods
    r1, r2 = root / "r1", root / "r2"
    drift = json.loads((r2 / "decompose" / "drift.json").read_text())
    assert drift["previous_items"] == 30 and drift["items"] == 40 and drift["new_items"] == 10
    assert drift["refit"] is False and "explained_ratio_old_mean" in drift["drift"]
    # the same basis, and old items keep their semantic rows exactly (cached texts, same projection)
    assert (r1 / "decompose" / "basis.safetensors").read_bytes() == (r2 / "decompose" / "basis.safetensors").read_bytes()
    sem1 = load_file(str(r1 / "decompose" / "semantic.safetensors"))["semantic"]
    sem2 = load_file(str(r2 / "decompose" / "semantic.safetensors"))["semantic"]
    assert torch.equal(sem2[:30], sem1)

    old = load_file(str(r1 / "train-alphafuse-s22" / "model.safetensors"))
    new = load_file(str(r2 / "train-alphafuse-s22" / "model.safetensors"))
    # epochs=0: old items are the previous fused rows, new items their semantic vector alone
    assert torch.allclose(new["item_table"][:30], old["item_table"], atol=1e-6)
    assert torch.equal(new["item_table"][30:], sem2[30:])
    for k, v in old.items():
        if k.startswith("encoder."):
            assert torch.equal(new[k], v), k
    # the previous model's ID part was non-zero (it trained), so the check above is not vacuous
    assert (old["item_table"][:, 16:] - sem1[:, 16:]).abs().max() > 1e-3


def test_warm_start_trains_on_and_reruns_skip(two_periods, caplog):
    root, warm = two_periods
    trained = _cfg(root / "d2", root / "r2", root / "cache", [
        f"data.id_map={root / 'r1' / 'prepare'}", f"decompose.reuse_basis={root / 'r1' / 'decompose'}",
        f"train.warm_start={root / 'r1' / 'train-alphafuse-s22'}", "train.epochs=2", "seed=23"])
    out = run_pipeline(trained)
    assert out["metrics"]["metrics"]["overall"]["users"] == 80
    caplog.set_level(logging.INFO, logger="alphafuse_dist")
    caplog.clear()
    run_pipeline(warm)  # the epochs=0 run again: every stage is up to date
    log = caplog.text
    for stage in ("prepare", "embed", "decompose", "train-alphafuse-s22"):
        assert f"[{stage}] up to date" in log, log


def test_warm_start_errors_name_the_key(two_periods):
    root, _ = two_periods
    train1 = root / "r1" / "train-alphafuse-s22"
    base = [f"decompose.reuse_basis={root / 'r1' / 'decompose'}", f"train.warm_start={train1}", "train.epochs=0"]
    with pytest.raises(ConfigError, match="previous model is method=alphafuse, this run method=sasrec_id"):
        run_pipeline(_cfg(root / "d2", root / "r3", root / "cache", base[1:] + [
            f"data.id_map={root / 'r1' / 'prepare'}", "method=sasrec_id"]))
    with pytest.raises(ConfigError, match="decompose.reuse_basis=.*: needs data.id_map"):
        run_pipeline(_cfg(root / "d2", root / "r4", root / "cache", base))
    with pytest.raises(ConfigError, match="train.epochs=0"):
        _cfg(root / "d2", root / "r3", root / "cache", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="train.warm_start=.*not a finished stage"):
        run_pipeline(_cfg(root / "d2", root / "r2", root / "cache", [
            f"data.id_map={root / 'r1' / 'prepare'}", f"train.warm_start={root / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="model.max_len"):
        run_pipeline(_cfg(root / "d2", root / "r2", root / "cache", [
            f"data.id_map={root / 'r1' / 'prepare'}", *base, "model.max_len=6"]))


def test_refit_carries_id_vectors_into_the_new_null_space(tmp_path):
    """With drift.json saying refit, old ID rows go through decompose.drift's carry map."""
    from alphafuse_dist.decompose.basis import NullSpaceBasis
    from alphafuse_dist.model.item_table import FusedItemTable
    from alphafuse_dist.model.backbones import build_encoder
    from alphafuse_dist.decompose.drift import carry_id_vectors
    from alphafuse_dist.train.warm_start import apply_warm_start
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    d_l, d, d_n, n_old, n = 24, 16, 8, 12, 15

    def basis(seed):
        r = np.random.default_rng(seed)
        q, _ = np.linalg.qr(r.normal(size=(d_l, d_l)))
        return NullSpaceBasis(r.normal(size=d_l), np.sort(r.uniform(0.5, 3, size=d_l))[::-1].copy(), q, d, d_n,
                              True, 1.0, None)

    old_b, new_b = basis(1), basis(2)
    prev_run = tmp_path / "r1"
    (prev_run / "decompose").mkdir(parents=True)
    sem_old = torch.from_numpy(rng.normal(size=(n_old, d)).astype(np.float32))
    save_file({"semantic": sem_old}, str(prev_run / "decompose" / "semantic.safetensors"))
    ids_old = torch.from_numpy(rng.normal(size=(n_old, d_n)).astype(np.float32))
    fused = torch.cat([sem_old[:, : d - d_n], sem_old[:, d - d_n:] + ids_old], dim=1)
    cfg = load_config("quickstart", ["model.dim=16", "model.id_dims=8", "model.max_len=4",
                                     f"data.id_map={tmp_path}", f"train.warm_start={prev_run / 'train'}"])
    enc = build_encoder(cfg.model)
    (prev_run / "train").mkdir()
    save_file({"item_table": fused, **{f"encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()}},
              str(prev_run / "train" / "model.safetensors"))
    (prev_run / "train" / "config.json").write_text(json.dumps(cfg.to_dict()))
    dec = tmp_path / "r2" / "decompose"
    new_b.save(dec)
    old_b.save(dec / "previous_basis")
    (dec / "drift.json").write_text(json.dumps({"refit": True}))
    sem_new = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    for rule in ("carry", "reset"):
        cfg.train.warm_start_ids = rule
        items = FusedItemTable(n, d, d_n, semantic=sem_new)
        facts = apply_warm_start(cfg, items, build_encoder(cfg.model), semantic_path=str(dec / "semantic.safetensors"))
        assert facts["ids"] == f"refit: {rule}" and facts["previous_items"] == n_old
        expect = carry_id_vectors(old_b, new_b, ids_old.numpy()) if rule == "carry" else np.zeros((n_old, d_n))
        np.testing.assert_allclose(items.ids.weight[:n_old].detach().numpy(), expect, atol=1e-5)
        assert torch.equal(items.ids.weight[n_old:].detach(), torch.zeros(n - n_old, d_n))
    assert np.abs(carry_id_vectors(old_b, new_b, ids_old.numpy())).max() > 0.1  # the carried rows are not zero


def _knn_fill(table, semantic, counts, id_dim, k, injection):
    """Direct numpy construction of train/cold_items.py's rule, item by item."""
    table, semantic = table.astype(np.float64), semantic.astype(np.float64)
    s = table.shape[1] - id_dim
    ids = table[:, s:] - (semantic[:, s:] if injection == "add" else 0)
    warm = np.flatnonzero(counts > 0)
    unit = semantic[:, :s] / np.linalg.norm(semantic[:, :s], axis=1, keepdims=True)
    out = table.copy()
    for c in np.flatnonzero(counts == 0):
        near = warm[np.argsort(-(unit[warm] @ unit[c]), kind="stable")[:k]]
        w = counts[near] / counts[near].sum()
        out[c, s:] = w @ ids[near] + (semantic[c, s:] if injection == "add" else 0)
    return out


@pytest.mark.parametrize("injection", ["add", "cover"])
def test_fill_cold_items_matches_a_direct_construction(injection):
    from alphafuse_dist.train.cold_items import fill_cold_items

    rng = np.random.default_rng(3)
    n, d, d_n = 300, 12, 5
    semantic = rng.normal(size=(n, d)).astype(np.float32)
    table = semantic + np.concatenate([np.zeros((n, d - d_n)), rng.normal(size=(n, d_n))], 1).astype(np.float32)
    if injection == "cover":
        table[:, d - d_n:] = rng.normal(size=(n, d_n))
    counts = rng.integers(0, 5, size=n)
    counts[:200:3] = 0
    got, n_cold = fill_cold_items(torch.from_numpy(table), torch.from_numpy(semantic), torch.from_numpy(counts),
                                  id_dim=d_n, k=7, injection=injection)
    assert n_cold == int((counts == 0).sum()) > 60
    np.testing.assert_allclose(got.numpy(), _knn_fill(table, semantic, counts, d_n, 7, injection), atol=1e-5)
    assert torch.equal(got[counts > 0], torch.from_numpy(table)[counts > 0])  # trained rows untouched
    with pytest.raises(ValueError, match="same items"):
        fill_cold_items(torch.from_numpy(table), torch.from_numpy(semantic[:-1]), torch.from_numpy(counts),
                        id_dim=d_n, k=7)


def test_cold_items_neighbours_fills_never_trained_rows_after_a_warm_start(two_periods):
    """Period 3 brings 6 items that occur only as test targets (the last item of 6 new users): with
    train.cold_items=neighbours their ID part is the popularity-weighted mean of their nearest
    trained items'; every other row is the warm start's."""
    import polars as pl

    root, _ = two_periods
    d3 = root / "d3"
    _write_period(d3, 40, seed=2)
    (d3 / "items.csv").write_text((d3 / "items.csv").read_text() + "".join(
        f"m{i},The {GENRES[i % 8]} Story part {i},{GENRES[i % 8]}\n" for i in range(40, 46)))
    (d3 / "inter.csv").write_text((d3 / "inter.csv").read_text() + "".join(
        f"x{i},m{j},{2000 + t}\n" for i in range(6) for t, j in enumerate([i, i + 1, i + 2, 40 + i])))
    common = [f"data.id_map={root / 'r2' / 'prepare'}", f"decompose.reuse_basis={root / 'r2' / 'decompose'}",
              f"train.warm_start={root / 'r2' / 'train-alphafuse-s22'}", "train.epochs=0"]
    plain = run_pipeline(_cfg(d3, root / "r5", root / "cache", common))
    filled = run_pipeline(_cfg(d3, root / "r6", root / "cache", common + ["train.cold_items=neighbours",
                                                                         "train.cold_neighbours=4"]))
    assert plain and filled
    counts = pl.read_parquet(root / "r6" / "prepare" / "items.parquet").sort("item_idx")["popularity"].to_numpy()
    assert (counts[40:] == 0).all() and (counts == 0).sum() >= 6
    sem = load_file(str(root / "r6" / "decompose" / "semantic.safetensors"))["semantic"].numpy()
    before = load_file(str(root / "r5" / "train-alphafuse-s22" / "model.safetensors"))["item_table"].numpy()
    after = load_file(str(root / "r6" / "train-alphafuse-s22" / "model.safetensors"))["item_table"].numpy()
    np.testing.assert_allclose(after, _knn_fill(before, sem, counts, 16, 4, "add"), atol=1e-5)
    np.testing.assert_array_equal(after[counts > 0], before[counts > 0])
    assert np.abs(after[40:, 16:] - sem[40:, 16:]).min(axis=1).max() > 0  # new items got a non-zero ID part
    with pytest.raises(ConfigError, match="train.cold_items=neighbours: only for method=alphafuse"):
        _cfg(d3, root / "r7", root / "cache", ["method=sasrec_id", "train.cold_items=neighbours"])
