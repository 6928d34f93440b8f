"""Ranking on eval.device: the code path the GPUs run, forced onto the CPU, gives the ranks of
target_ranks exactly (ties, exclusion, unfoldable scales, shards over threads and Ray tasks);
on a CUDA machine the GPU's ranks equal the CPU's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alphafuse_dist.errors import ConfigError
from alphafuse_dist.evaluate.device import (ExactItems, RankJob, eval_device, exact_target_ranks, rank_job,
                                            rank_users, run_shards)
from alphafuse_dist.evaluate.metrics import target_ranks
from test_metrics import random_case, reference_ranks


def _tie_heavy(seed: int, users: int = 37, items: int = 211, dim: int = 8):
    """Values in {-1, 0, 1}: most scores tie with many others; exact duplicates of targets."""
    states, table, targets = random_case(seed, users, items, dim, integer=True)
    table[17] = table[targets[0]]  # a duplicate of a target, with another id
    table[200] = table[targets[1]]
    return states, table, targets


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("resident", [False, True], ids=["per-batch", "resident"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 211, 1000])
def test_device_path_equals_target_ranks_on_ties(similarity, resident, chunk):
    states, table, targets = _tie_heavy(seed=chunk)
    expected = target_ranks(states, table, targets, similarity=similarity, item_chunk=chunk)
    items = ExactItems(table, similarity, "cpu", chunk, resident=resident)
    assert torch.equal(exact_target_ranks(states, items, targets), expected)
    if similarity == "dot":  # and the documented rule, computed independently in integers
        assert expected.tolist() == reference_ranks(states.numpy(), table.numpy(), targets.numpy()).tolist()


@pytest.mark.parametrize("chunk", [1, 5, 32, 211])
def test_device_path_exclusion_equals_target_ranks(chunk):
    states, table, targets = _tie_heavy(seed=50 + chunk)
    g = torch.Generator().manual_seed(chunk)
    exclude = [torch.randint(0, 211, (int(n),), generator=g) for n in torch.randint(0, 30, (37,), generator=g)]
    exclude[0] = torch.cat([exclude[0], targets[:1], exclude[0]])  # the target, and every item twice
    exclude[1] = torch.empty(0, dtype=torch.long)
    expected = target_ranks(states, table, targets, item_chunk=chunk, exclude=exclude)
    for resident in (False, True):
        items = ExactItems(table, "dot", "cpu", chunk, resident=resident)
        assert torch.equal(exact_target_ranks(states, items, targets, exclude), expected)


def test_scales_outside_the_fold_range_take_the_unfolded_product():
    """Rows of magnitude 2**-600 or 2**600 cannot be folded (their products would leave float64's
    normal range): those users or chunks are scored like metrics.exact_scores, with the same ranks."""
    states, table, targets = _tie_heavy(seed=3)
    states, table = states.double(), table.double()  # float64 inputs: float32 cannot hold 2**600
    table[:50] *= 2.0 ** -600  # the first chunks only: folded and unfolded chunks in one table
    states[::3] *= 2.0 ** 600
    for chunk in (16, 211):
        expected = target_ranks(states, table, targets, item_chunk=chunk)
        assert torch.equal(exact_target_ranks(states, ExactItems(table, "dot", "cpu", chunk, True), targets), expected)
    cosine = target_ranks(states, table, targets, similarity="cosine", item_chunk=16)
    assert torch.equal(exact_target_ranks(states, ExactItems(table, "cosine", "cpu", 16, False), targets), cosine)


def test_scores_that_overflow_float32_keep_the_tie_rule_in_every_chunking():
    """A score below float32's range is -inf for every item: all tie, smaller ids ahead, and a
    blocked item is not counted, whatever the chunk size."""
    states = torch.tensor([[-2.0 ** 600], [-2.0 ** 600]], dtype=torch.float64)
    table = torch.ones(3, 1, dtype=torch.float64)
    targets, exclude = torch.tensor([2, 2]), [torch.tensor([], dtype=torch.long), torch.tensor([0])]
    for chunk in (1, 2, 3):
        assert target_ranks(states, table, targets, item_chunk=chunk, exclude=exclude).tolist() == [2, 1]
        items = ExactItems(table, "dot", "cpu", chunk, resident=True)
        assert exact_target_ranks(states, items, targets, exclude).tolist() == [2, 1]


def _job(seed: int = 9, users: int = 53, **kw) -> tuple[RankJob, torch.Tensor]:
    states, table, targets = _tie_heavy(seed, users=users)
    job = RankJob(targets=targets.numpy(), similarity="cosine", user_batch=8, item_chunk=50,
                  states=states.numpy(), **kw)
    return job, table


def test_rank_users_on_cpu_equals_target_ranks_and_shards_keep_user_order():
    job, table = _job()
    expected = target_ranks(torch.from_numpy(job.states), table, torch.from_numpy(job.targets), similarity="cosine")
    ranks, info = rank_users(job, table, "cpu")
    ranks = ranks["ranks"]
    assert ranks.dtype == np.int64 and ranks.tolist() == expected.tolist()
    assert info["device"] == "cpu" and info["gpus"] == 0 and info["shards"][0]["users"] == 53
    # the users split over "devices" (threads here; one GPU each on a CUDA machine), in user order
    for shards in (2, 3, 7):
        sharded, infos = run_shards(job, table, ["cpu"] * shards, via_ray=False)
        assert sharded["ranks"].tolist() == expected.tolist()
        assert sum(i["users"] for i in infos) == 53


def test_shards_as_ray_tasks_keep_user_order(ray_session):
    job, table = _job(users=41)
    expected = rank_job(job, table, "cpu")[0]["ranks"]
    ranks, infos = run_shards(job, table, ["cpu", "cpu"], via_ray=True)  # num_gpus=0 tasks
    assert ranks["ranks"].tolist() == expected.tolist() and [i["users"] for i in infos] == [20, 21]


def test_rank_job_with_encoder_equals_the_per_batch_loop():
    """States from the sequence encoder per batch (the stage's path): the ranks of computing the
    states and calling target_ranks batch by batch, also with masked histories and for the
    sampled protocol."""
    from alphafuse_dist.config import load_config
    from alphafuse_dist.evaluate.metrics import sampled_ranks
    from alphafuse_dist.model.backbones import build_encoder
    from alphafuse_dist.model.sasrec import user_states_from_table

    cfg = load_config("quickstart", ["model.dim=16", "model.id_dims=8", "model.max_len=5", "model.dropout=0.0"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model).eval()
    rng = np.random.default_rng(1)
    num_items, num_users = 90, 30
    table = torch.randn(num_items, 16)
    table[40:60] = table[:20]  # duplicates: ties between ids
    hist = rng.integers(0, num_items + 1, size=(num_users, 5))  # num_items is the pad id
    targets = rng.integers(0, num_items, size=num_users)
    exclude = [rng.integers(0, num_items, size=rng.integers(0, 9)) for _ in range(num_users)]
    negatives = np.stack([rng.choice(num_items, 12, replace=False) for _ in range(num_users)])
    base = dict(targets=targets, similarity="cosine", user_batch=7, item_chunk=32, hist=hist, encoder=encoder)

    def direct(kind):
        out = []
        for s in range(0, num_users, 7):
            with torch.no_grad():
                states = user_states_from_table(encoder, table, torch.as_tensor(hist[s:s + 7]))
            t = torch.as_tensor(targets[s:s + 7])
            if kind == "sampled":
                out.append(sampled_ranks(states, table, t, torch.as_tensor(negatives[s:s + 7]), similarity="cosine"))
            else:
                ex = [torch.as_tensor(e) for e in exclude[s:s + 7]] if kind == "masked" else None
                out.append(target_ranks(states, table, t, similarity="cosine", item_chunk=32, exclude=ex))
        return torch.cat(out).tolist()

    assert rank_users(RankJob(**base), table, "cpu")[0]["ranks"].tolist() == direct("full")
    assert rank_users(RankJob(**base, exclude=exclude), table, "cpu")[0]["ranks"].tolist() == direct("masked")
    assert rank_users(RankJob(**base, negatives=negatives), table, "cpu")[0]["ranks"].tolist() == direct("sampled")
    # three threads, each with its own copy of the encoder
    sharded = run_shards(RankJob(**base, exclude=exclude), table, ["cpu"] * 3, via_ray=False)[0]
    assert sharded["ranks"].tolist() == direct("masked")


def test_eval_device_setting():
    assert eval_device("cpu") == ("cpu", 0, False)
    with pytest.raises(ConfigError, match=r"eval\.device='gpu': expected auto, cpu or cuda"):
        eval_device("gpu")
    if not torch.cuda.is_available():
        import ray

        if not ray.is_initialized() or not ray.cluster_resources().get("GPU"):
            assert eval_device("auto") == ("cpu", 0, False)
            with pytest.raises(ConfigError, match=r"eval\.device=cuda: .* no GPU"):
                eval_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_cuda_ranks_equal_cpu_ranks_exactly(similarity):
    g = torch.Generator().manual_seed(5)
    states, table = torch.randn(3000, 128, generator=g), torch.randn(20_000, 128, generator=g)
    table[1000:2000] = table[:1000]  # duplicates
    table[5000:6000] = torch.randint(-1, 2, (1000, 128), generator=g).float()  # ties
    states[:500] = torch.randint(-1, 2, (500, 128), generator=g).float()
    targets = torch.randint(0, 20_000, (3000,), generator=g)
    targets[:300] = torch.randint(1000, 2000, (300,), generator=g)
    exclude = [torch.randint(0, 20_000, (int(n),), generator=g) for n in torch.randint(0, 50, (3000,), generator=g)]
    cpu = target_ranks(states, table, targets, similarity=similarity, item_chunk=4096)
    for resident in (True, False):
        items = ExactItems(table, similarity, "cuda", 3000, resident=resident)
        assert torch.equal(exact_target_ranks(states, items, targets).cpu(), cpu)
    masked = target_ranks(states, table, targets, similarity=similarity, item_chunk=4096, exclude=exclude)
    gpu_masked = exact_target_ranks(states, ExactItems(table, similarity, "cuda", 4096, True), targets,
                                    [e.cuda() for e in exclude])
    assert torch.equal(gpu_masked.cpu(), masked)
    job = RankJob(targets=targets.numpy(), similarity=similarity, user_batch=512, item_chunk=8192,
                  states=states.numpy())
    ranks, info = rank_users(job, table, "cuda")
    assert info["device"] == "cuda" and ranks["ranks"].tolist() == cpu.tolist()
    assert ranks["ranks"].tolist() == rank_users(job, table, "cpu")[0]["ranks"].tolist()
    # the evaluate stage's scan: both rankings and both top-10 lists, the two-stage top-k per chunk
    from alphafuse_dist.evaluate.device import scan_items

    scans = {device: scan_items(states, ExactItems(table, similarity, device, 4096, True), targets, exclude,
                                unfiltered=True, top_k=10) for device in ("cpu", "cuda")}
    for key, expected in scans["cpu"].items():
        assert torch.equal(scans["cuda"][key].cpu(), expected), key


def test_scan_items_gives_both_rankings_and_top_lists_of_the_reference_functions():
    from alphafuse_dist.evaluate.device import scan_items
    from alphafuse_dist.evaluate.metrics import full_ranking_topk

    states, table, targets = _tie_heavy(3, users=29)
    g = torch.Generator().manual_seed(1)
    exclude = [torch.randint(0, table.shape[0], (int(n),), generator=g)
               for n in torch.randint(0, 9, (29,), generator=g)]
    for chunk in (7, 50, 1000):
        out = scan_items(states, ExactItems(table, "cosine", "cpu", chunk, False), targets, exclude,
                         unfiltered=True, top_k=10)
        assert torch.equal(out["ranks"], target_ranks(states, table, targets, similarity="cosine", exclude=exclude))
        assert torch.equal(out["ranks_unfiltered"], target_ranks(states, table, targets, similarity="cosine"))
        assert torch.equal(out["top"], full_ranking_topk(states, table, 10, similarity="cosine", exclude=exclude)[1])
        assert torch.equal(out["top_unfiltered"], full_ranking_topk(states, table, 10, similarity="cosine")[1])
    job, table = _job(users=23, exclude=[e.numpy() for e in exclude[:23]], unfiltered=True, top_k=5)
    out, _ = run_shards(job, table, ["cpu"] * 3, via_ray=False)
    assert {k: v.shape for k, v in out.items()} == {"ranks": (23,), "ranks_unfiltered": (23,), "top": (23, 5),
                                                    "top_unfiltered": (23, 5)}
    # a larger catalogue: chunks that take the two-stage top-k, users with hundreds of excluded items
    # (one top-k of k + m candidates per chunk serves both lists), one user with fewer than k left
    states, table, targets = random_case(5, users=31, items=3000, dim=8, integer=True)
    many = [torch.randint(0, 3000, (int(n),), generator=g) for n in torch.randint(0, 400, (31,), generator=g)]
    many[3] = torch.cat([torch.arange(2994), targets[3:4]])
    for chunk in (1000, 1024, 3000):
        out = scan_items(states, ExactItems(table, "dot", "cpu", chunk, True), targets, many,
                         unfiltered=True, top_k=10)
        assert out["ranks"].tolist() == reference_ranks(states.numpy(), table.numpy(), targets.numpy(), many).tolist()
        assert out["ranks_unfiltered"].tolist() == reference_ranks(states.numpy(), table.numpy(), targets.numpy()).tolist()
        assert torch.equal(out["top"], full_ranking_topk(states, table, 10, exclude=many)[1])
        assert torch.equal(out["top_unfiltered"], full_ranking_topk(states, table, 10)[1])


def test_item_lists_slice_and_row_range_keep_each_users_items():
    """The flat (CSR) form of per-user exclusions: a batch slice and a row shard's local ids hold
    exactly the items of the list form, and a range check names the user."""
    from alphafuse_dist.evaluate.metrics import ItemLists, _pairs_by_item

    lists = [np.array([5, 1, 5]), np.array([], dtype=np.int64), np.array([9, 0, 3]), np.array([2])]
    flat = ItemLists.of(lists)
    assert flat.offsets.tolist() == [0, 3, 3, 6, 7] and flat.lengths().tolist() == [3, 0, 3, 1]
    assert [x.tolist() for x in flat.slice(1, 3).tolist()] == [[], [9, 0, 3]]
    assert [x.tolist() for x in flat.slice(3, 9).tolist()] == [[2]] and len(flat.slice(4, 4)) == 0
    assert [x.tolist() for x in flat.within(2, 6).tolist()] == [[3, 3], [], [1], [0]]  # items 2..5 as 0..3
    with pytest.raises(ValueError, match=r"exclude\[2\]: item ids must lie in 0\.\.8"):
        _pairs_by_item(flat, 4, 9, torch.device("cpu"))
    with pytest.raises(ValueError, match="offsets"):
        ItemLists(np.arange(3), np.array([0, 2]))
    with pytest.raises(ValueError, match="values: expected integers, got float64"):
        ItemLists(np.array([1.7, 2.2]), np.array([0, 2]))
    with pytest.raises(ValueError, match=r"slice\(-1, 2\): bounds must be >= 0"):
        flat.slice(-1, 2)
    assert flat.slice(2, 2).tolist() == [] and ItemLists(np.empty(0, np.int64), np.zeros(1, np.int64)).tolist() == []
    # the same pairs from either form
    pairs, pairs_flat = (_pairs_by_item(x, 4, 10, torch.device("cpu"))
                         for x in ([torch.as_tensor(x) for x in lists], flat))
    assert pairs.items_host.tolist() == pairs_flat.items_host.tolist() == [0, 1, 2, 3, 5, 9]  # distinct, by item
    assert pairs.users_host.tolist() == pairs_flat.users_host.tolist() == [2, 0, 3, 2, 0, 2]


def test_last_items_left_pads_each_list_and_takes_users_without_items():
    from alphafuse_dist.data.sequences import last_items

    values, offsets = np.array([1, 2, 3, 4, 5]), np.array([0, 4, 4, 5])
    assert last_items(values, offsets, 3, 9).tolist() == [[2, 3, 4], [9, 9, 9], [9, 9, 5]]
    assert last_items(np.empty(0, np.int64), np.zeros(3, np.int64), 2, 9).tolist() == [[9, 9], [9, 9]]
