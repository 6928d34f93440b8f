"""Exact ranks over chunks, shards and threads, sampled-candidate ranks (LLM-ESR protocol) and per-group metrics."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alphafuse_dist.evaluate.metrics import (metrics_by_group, sample_negatives, sampled_ranks, sharded_target_ranks,
                                             target_ranks)


def _tie_case():
    """Integer-valued vectors: many exact score ties, and cosine scores that are zero in exact
    arithmetic (a float32 kernel gets 5.55e-17 for some chunk shapes and 0.0 for others)."""
    gen = torch.Generator().manual_seed(12)
    table = torch.randint(-2, 3, (29, 4), generator=gen).float()
    table[5] = table[20]  # a target's exact duplicate in another shard
    states = torch.randint(-2, 3, (11, 4), generator=gen).float()
    targets = torch.randint(0, 29, (11,), generator=gen)
    targets[0], targets[1] = 5, 20
    return states, table, targets


def _expected_ranks(states, table, targets):
    """The tie rule over the documented scores (integer arithmetic in numpy, see test_metrics)."""
    from test_metrics import reference_ranks

    return torch.from_numpy(reference_ranks(states.numpy(), table.numpy(), targets.numpy(), similarity="cosine"))


@pytest.mark.parametrize("threads", [1, 2])
def test_target_ranks_equal_for_every_chunk_size_and_thread_count(threads):
    states, table, targets = _tie_case()
    expected = _expected_ranks(states, table, targets)
    assert expected[0] != expected[1]  # the duplicates' ranks differ by the id rule, not at random
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for chunk in range(1, len(table) + 1):
            assert torch.equal(target_ranks(states, table, targets, similarity="cosine", item_chunk=chunk), expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_target_ranks_do_not_depend_on_summation_order(similarity):
    """The same features in another order are the same dot products in exact arithmetic, summed
    in another order by any kernel: the ranks must not move (float sums put 5.55e-17 or 0.0 there)."""
    states, table, targets = _tie_case()
    g = torch.Generator().manual_seed(4)
    float_states, float_table = torch.randn(30, 24, generator=g), torch.randn(300, 24, generator=g)
    float_targets = torch.randint(0, 300, (30,), generator=g)
    for s, t, y in ((states, table, targets), (float_states, float_table, float_targets)):
        expected = target_ranks(s, t, y, similarity=similarity)
        for seed in range(20):
            perm = torch.randperm(s.shape[1], generator=torch.Generator().manual_seed(seed))
            assert torch.equal(target_ranks(s[:, perm], t[:, perm], y, similarity=similarity, item_chunk=7), expected)


def _ranks_worker(rank, world, threads, store_path, states, table, targets, out):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        bounds = np.linspace(0, len(table), world + 1).astype(int)
        lo, hi = bounds[rank], bounds[rank + 1]
        ranks = [sharded_target_ranks(states, table[lo:hi], int(lo), targets, table[targets], similarity="cosine",
                                      item_chunk=chunk) for chunk in range(1, len(table) + 1)]
        torch.save(torch.stack(ranks), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_target_ranks_equal_single_process_exactly(tmp_path, world, threads):
    """Row shards on 1-3 processes, every chunk size of a shard, 1 or 2 threads per process: the
    summed counts equal the one-process ranks, including exact duplicates in different shards."""
    states, table, targets = _tie_case()
    expected = _expected_ranks(states, table, targets)
    mp.start_processes(_ranks_worker, args=(world, threads, str(tmp_path / "store"), states, table, targets,
                                            str(tmp_path / "out")), nprocs=world, start_method="spawn")
    for rank in range(world):
        for ranks in torch.load(f"{tmp_path / 'out'}.{rank}"):
            assert torch.equal(ranks, expected)


def _tiny_model():
    from alphafuse_dist.config import load_config
    from alphafuse_dist.model.recommender import build_model

    cfg = load_config("quickstart", ["method=sasrec_id", "model.dim=8", "model.id_dims=4", "model.max_len=5",
                                     "train.backend=torch", "model.dropout=0.0"])
    net = build_model(cfg, 23, None, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    hist = torch.randint(0, 24, (10, 5), generator=gen).numpy()  # id 23 = padding
    hist[:, -1] = torch.randint(0, 23, (10,), generator=gen).numpy()
    targets = torch.randint(0, 23, (10,), generator=gen).numpy()
    return net, hist, targets


def _tiny_exclude(hist):
    """The filtered protocol's exclusions: each user's window items (not the padding id 23)."""
    return [h[h < 23] for h in hist]


def _validate_worker(rank, world, store_path, out):
    from alphafuse_dist.evaluate.sharded import sharded_metrics

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        net, hist, targets = _tiny_model()
        torch.save([sharded_metrics(net, hist, targets, (1, 5, 10), torch.device("cpu"), item_chunk=4, user_batch=3,
                                    exclude=exclude) for exclude in (None, _tiny_exclude(hist))], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_validation_over_row_shards_equals_one_process(tmp_path, world):
    """The training recipe's validation: each worker holds a row range of the table and a share of
    the users (10 users, 23 items: uneven on 3 workers); the metrics equal one process's, with and
    without the histories excluded (the filtered protocol's model selection)."""
    from alphafuse_dist.evaluate.metrics import metrics_from_ranks
    from alphafuse_dist.evaluate.sharded import sharded_metrics

    net, hist, targets = _tiny_model()
    single = sharded_metrics(net, hist, targets, (1, 5, 10), torch.device("cpu"), item_chunk=4, user_batch=3)
    with torch.no_grad():  # and one process equals the plain whole-table kernel
        net.eval()
        table = net.normalize(net.items.full_table())
        states = net.normalize(net.user_states(torch.as_tensor(hist), table))
        direct = metrics_from_ranks(target_ranks(states, table, torch.as_tensor(targets)), (1, 5, 10))
        exclude = [torch.as_tensor(e) for e in _tiny_exclude(hist)]
        direct_filtered = metrics_from_ranks(target_ranks(states, table, torch.as_tensor(targets), exclude=exclude),
                                             (1, 5, 10))
    assert single == direct and single["users"] == 10
    filtered = sharded_metrics(net, hist, targets, (1, 5, 10), torch.device("cpu"), item_chunk=4, user_batch=3,
                               exclude=_tiny_exclude(hist))
    assert filtered == direct_filtered and filtered["MRR@10"] > single["MRR@10"]
    mp.start_processes(_validate_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "out")),
                       nprocs=world, start_method="spawn")
    for rank in range(world):
        assert torch.load(f"{tmp_path / 'out'}.{rank}") == [single, filtered]


def test_sampled_negatives_avoid_history_and_target_and_are_reproducible():
    rng = np.random.default_rng(0)
    num_items, n = 500, 100
    interacted = [rng.choice(num_items, size=rng.integers(1, 380), replace=False) for _ in range(300)]
    users = np.arange(300) * 7
    neg = sample_negatives(num_items, interacted, users, n, seed=5)
    assert neg.shape == (300, n)
    for row, seen in zip(neg, interacted):
        assert len(np.unique(row)) == n  # distinct
        assert not np.isin(row, seen).any()  # never the history or the target
        assert row.min() >= 0 and row.max() < num_items
    # a user's draw depends on (seed, user) only: same in another batch/order, different seed differs
    again = sample_negatives(num_items, interacted[::-1], users[::-1], n, seed=5)[::-1]
    assert np.array_equal(neg, again)
    assert not np.array_equal(neg, sample_negatives(num_items, interacted, users, n, seed=6))
    # roughly uniform over the free items: every item drawn, none hugely over-represented
    counts = np.bincount(sample_negatives(num_items, [np.array([0])] * 2000, np.arange(2000), n, 1).ravel(),
                         minlength=num_items)
    assert counts[0] == 0 and counts[1:].min() > 0.6 * counts[1:].mean() and counts.max() < 1.4 * counts[1:].mean()
    with pytest.raises(ValueError, match="user 3: only 2 items never interacted with, 5 negatives needed"):
        sample_negatives(10, [np.arange(8)], np.array([3]), 5, seed=0)


def test_sampled_ranks_hand_computed_and_equal_full_ranking_over_all_items():
    table = torch.tensor([[3.0], [1.0], [2.0], [2.0], [0.5]])
    states = torch.ones(2, 1)
    # user 0: target 3 (score 2) vs negatives 0 (3, ahead), 2 (2, tie, smaller id: ahead), 4 (behind)
    ranks = sampled_ranks(states, table, torch.tensor([3, 1]), torch.tensor([[0, 2, 4], [4, 0, 2]]))
    assert ranks.tolist() == [2, 2]
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(-3, 4, (30, 5), generator=gen).float()
    states = torch.randn(6, 5, generator=gen)
    targets = torch.randint(0, 30, (6,), generator=gen)
    everything = torch.stack([torch.tensor([i for i in range(30) if i != t]) for t in targets.tolist()])
    assert torch.equal(sampled_ranks(states, table, targets, everything, similarity="cosine"),
                       target_ranks(states, table, targets, similarity="cosine"))


def test_metrics_by_group_at_paper_cutoffs():
    ranks = torch.tensor([0, 4, 9, 19, 49, 60])
    groups = {"tail_users": torch.tensor([True, True, False, False, False, False]),
              "never_seen": torch.zeros(6, dtype=torch.bool)}
    out = metrics_by_group(ranks, groups, ks=(1, 5, 10, 20, 50))
    o = out["overall"]
    assert o["HR@1"] == pytest.approx(1 / 6) and o["HR@5"] == pytest.approx(2 / 6)
    assert o["HR@50"] == pytest.approx(5 / 6)
    assert o["NDCG@10"] == pytest.approx((1 + 1 / np.log2(6) + 1 / np.log2(11)) / 6)
    assert o["MRR@50"] == pytest.approx((1 + 1 / 5 + 1 / 10 + 1 / 20 + 1 / 50) / 6)
    assert out["tail_users"]["users"] == 2 and out["tail_users"]["MRR@5"] == pytest.approx((1 + 1 / 5) / 2)
    assert out["never_seen"]["users"] == 0 and out["never_seen"]["NDCG@10"] == 0.0
    with pytest.raises(ValueError, match="group 'x'"):
        metrics_by_group(ranks, {"x": torch.ones(3, dtype=torch.bool)})


def _popularity(num_items):
    popularity = 1 + np.arange(num_items) % 7
    popularity[59] = 0
    return popularity


def _prepared(tmp_path, num_items=60, num_users=40, dim=16, max_len=6):
    """A hand-made prepare folder and model file: popularity 1 + i % 7, item 59 never seen (0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from alphafuse_dist.config import load_config
    from alphafuse_dist.model.backbones import build_encoder

    rng = np.random.default_rng(0)
    prep = tmp_path / "prepare"
    prep.mkdir()
    popularity = _popularity(num_items)
    never_seen = popularity == 0
    pq.write_table(pa.table({"item_idx": pa.array(np.arange(num_items), pa.int32()),
                             "popularity": pa.array(popularity, pa.int32()),
                             "is_head": popularity >= 5, "never_seen": never_seen}), prep / "items.parquet")
    hists = [rng.choice(58, size=rng.integers(1, 12), replace=False).tolist() for _ in range(num_users)]
    targets = rng.integers(0, num_items, size=num_users)
    targets[:3] = 59
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(num_users), pa.int32()),
                             "history": pa.array(hists, pa.list_(pa.int32())),
                             "target": pa.array(targets, pa.int32())}), prep / "test.parquet")
    cfg = load_config("quickstart", [f"model.dim={dim}", "model.id_dims=8", f"model.max_len={max_len}",
                                     "model.dropout=0.0"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model)
    tensors = {"item_table": torch.randn(num_items, dim)} | {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return cfg, prep, hists, targets


def test_evaluate_split_full_and_sampled_protocols_with_groups(tmp_path):
    from alphafuse_dist.errors import ConfigError
    from alphafuse_dist.evaluate.stage import evaluate_split

    cfg, prep, hists, targets = _prepared(tmp_path)
    cfg.eval.ks = [1, 5, 10, 20, 50]
    full = evaluate_split(cfg, tmp_path / "model.safetensors", prep)
    assert full["protocol"] == "full" and full["sampled_negatives"] is None
    m = full["metrics"]
    assert m["overall"]["users"] == 40
    assert m["head"]["users"] + m["tail"]["users"] == 40
    assert m["head"]["users"] == int((_popularity(60) >= 5)[targets].sum())  # is_head: popularity >= 5
    assert m["never_seen"]["users"] == int((targets == 59).sum()) >= 3
    assert m["head_users"]["users"] + m["tail_users"]["users"] == 40
    lengths = np.array([len(h) for h in hists])
    threshold = int(np.quantile(lengths, 0.8, method="higher"))
    assert m["tail_users"]["users"] == int((lengths < threshold).sum())
    assert set(m["overall"]) >= {"HR@1", "NDCG@5", "MRR@50", "HR@50"}

    cfg.eval.protocol, cfg.eval.sampled_negatives = "sampled", 20
    cfg.eval.tail_item_threshold, cfg.eval.tail_user_threshold = 4, 5
    sampled = evaluate_split(cfg, tmp_path / "model.safetensors", prep)
    s = sampled["metrics"]
    assert sampled["sampled_negatives"] == 20
    # 21 candidates instead of 60: every target ranks at least as high, so HR@k can only grow
    assert s["overall"]["HR@10"] >= m["overall"]["HR@10"] and s["overall"]["HR@50"] == 1.0
    assert s["tail"]["users"] == int((_popularity(60) < 4)[targets].sum())
    assert s["tail_users"]["users"] == int((lengths < 5).sum())
    assert "tail users: fewer than 5 history items" == sampled["groups"]["users"]
    # the same negatives for every model: a rerun gives identical metrics
    assert evaluate_split(cfg, tmp_path / "model.safetensors", prep)["metrics"] == s
    cfg.eval.sampled_negatives = 55
    with pytest.raises(ConfigError, match=r"eval\.sampled_negatives=55: user \d+: only \d+ items never"):
        evaluate_split(cfg, tmp_path / "model.safetensors", prep)


def test_evaluate_split_reports_filtered_and_unfiltered_with_list_metrics(tmp_path):
    """Both rankings from one pass, the lead one by eval.exclude_history, each equal to
    target_ranks with / without the history excluded; PopShare and Coverage of the top-10 lists
    as computed by hand from full_ranking_topk."""
    from alphafuse_dist.data.sequences import eval_inputs
    from alphafuse_dist.evaluate.metrics import full_ranking_topk, metrics_from_ranks
    from alphafuse_dist.evaluate.stage import evaluate_split, format_table, load_model
    from alphafuse_dist.model.sasrec import user_states_from_table

    cfg, prep, hists, targets = _prepared(tmp_path)
    cfg.eval.ks = [10]
    table, encoder = load_model(tmp_path / "model.safetensors", cfg)
    _, hist, _ = eval_inputs(prep / "test.parquet", cfg.model.max_len, 60)
    with torch.no_grad():
        states = user_states_from_table(encoder, table, torch.as_tensor(hist))
    exclude = [torch.as_tensor(h, dtype=torch.long) for h in hists]
    y = torch.as_tensor(targets, dtype=torch.long)
    expected = {"unfiltered": (target_ranks(states, table, y, similarity=cfg.model.similarity), None),
                "filtered": (target_ranks(states, table, y, similarity=cfg.model.similarity, exclude=exclude), exclude)}
    head = _popularity(60) >= 5

    unfiltered_first = evaluate_split(cfg, tmp_path / "model.safetensors", prep)
    cfg.eval.exclude_history = True
    filtered_first = evaluate_split(cfg, tmp_path / "model.safetensors", prep)
    assert list(unfiltered_first["by_protocol"]) == ["unfiltered", "filtered"]
    assert list(filtered_first["by_protocol"]) == ["filtered", "unfiltered"]
    assert filtered_first["ranking"] == "filtered" and filtered_first["history_masked"] is True
    assert filtered_first["protocol_name"] == "full ranking, filtered (the user's seen items removed)"
    assert filtered_first["metrics"] == filtered_first["by_protocol"]["filtered"]
    assert unfiltered_first["metrics"] == unfiltered_first["by_protocol"]["unfiltered"]
    for name, (ranks, excluded) in expected.items():
        got = filtered_first["by_protocol"][name]
        assert got == unfiltered_first["by_protocol"][name]  # the same scores whichever leads
        assert got["overall"]["NDCG@10"] == pytest.approx(metrics_from_ranks(ranks, (10,))["NDCG@10"])
        _, top = full_ranking_topk(states, table, 10, similarity=cfg.model.similarity, exclude=excluded)
        top = top.numpy()
        assert got["overall"]["PopShare@10"] == pytest.approx(head[top].sum() / (40 * 10))
        assert got["overall"]["Coverage@10"] == pytest.approx(len(np.unique(top)) / 60)
        tail = ~head[targets]
        assert got["tail"]["Coverage@10"] == pytest.approx(len(np.unique(top[tail])) / 60)
    assert expected["filtered"][0].le(expected["unfiltered"][0]).all()  # removing items only lifts targets
    text = format_table([("alphafuse", filtered_first)], ks=(10,))
    assert text.index("protocol: full ranking, filtered") < text.index("protocol: full ranking, unfiltered")
    assert "PopShare@10" in text and "Coverage@10" in text
