"""Evaluation kernels: hand-computed cases, the tie rule, chunking, exclusion, top-k, cosine."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alphafuse_dist.evaluate.metrics import full_ranking_topk, metrics_by_group, metrics_from_ranks, target_ranks

# Scores of user [1, 0] by dot product: [3, 1, 2, 2, 0]; items 2 and 3 tie.
TABLE = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 5.0], [0.0, 0.0]])
USER = torch.tensor([[1.0, 0.0]])

CHUNKS = [1, 2, 3, 7, 16, 33, 64, 100, 101, 1000]


def reference_order(scores: np.ndarray) -> np.ndarray:
    """Item ids of each row sorted best first: higher score, then smaller id (independent of the kernels)."""
    ids = np.arange(scores.shape[1])
    return np.stack([np.lexsort((ids, -row)) for row in scores])


def reference_scores(users: np.ndarray, table: np.ndarray, similarity: str = "dot") -> np.ndarray:
    """The documented scoring rule (each row rounded to b-bit fixed point with its own power-of-two
    scale, then an exact integer dot product), computed independently in numpy int64."""
    def fixed(x):
        x = x.astype(np.float64)
        if similarity == "cosine":
            x = x / np.maximum(np.sqrt((x * x).sum(axis=1, keepdims=True)), 1e-12)
        bits = (52 - math.ceil(math.log2(x.shape[1]))) // 2
        _, exponent = np.frexp(np.abs(x).max(axis=1, keepdims=True))
        scale = np.ldexp(1.0, exponent - bits)
        return np.round(x / scale).astype(np.int64), scale[:, 0]

    (qu, su), (qi, si) = fixed(users), fixed(table)
    return ((qu @ qi.T).astype(np.float64) * su[:, None] * si[None, :]).astype(np.float32)


def reference_ranks(users: np.ndarray, table: np.ndarray, targets: np.ndarray, exclude=None,
                    similarity: str = "dot") -> np.ndarray:
    scores = reference_scores(users, table, similarity)
    ranks = []
    for u, order in enumerate(reference_order(scores)):
        blocked = set() if exclude is None else set(exclude[u].tolist()) - {int(targets[u])}
        kept = [i for i in order if i not in blocked]
        ranks.append(kept.index(targets[u]))
    return np.array(ranks)


def random_case(seed: int, users: int = 40, items: int = 101, dim: int = 16, integer: bool = False):
    """Random states and items; integer values make many exact score ties."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        states = torch.randint(-2, 3, (users, dim), generator=g).float()
        table = torch.randint(-1, 2, (items, dim), generator=g).float()
    else:
        states, table = torch.randn(users, dim, generator=g), torch.randn(items, dim, generator=g)
    targets = torch.randint(0, items, (users,), generator=g)
    return states, table, targets


# ----------------------------------------------------------------------------- metrics

def test_metrics_from_ranks_hand_computed():
    m = metrics_from_ranks(torch.tensor([0, 1, 4, 30]), ks=(1, 5, 10, 31))
    assert m["users"] == 4
    assert m["HR@1"] == m["NDCG@1"] == m["MRR@1"] == 0.25
    for k in (5, 10):  # ranks 0, 1, 4 are hits, 30 is not
        assert m[f"HR@{k}"] == 0.75
        assert m[f"NDCG@{k}"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4, abs=1e-12)
        assert m[f"MRR@{k}"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 4, abs=1e-12)
    assert m["HR@31"] == 1.0
    assert m["NDCG@31"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / 5) / 4, abs=1e-12)
    assert m["MRR@31"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 31) / 4, abs=1e-12)
    assert list(metrics_from_ranks(torch.tensor([3]), ks=(10, 20))) == [
        "HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20", "users"]


def test_metrics_from_ranks_empty_and_bad_ks():
    m = metrics_from_ranks(torch.empty(0, dtype=torch.long), ks=(10,))
    assert m == {"HR@10": 0.0, "NDCG@10": 0.0, "MRR@10": 0.0, "users": 0}
    for ks in ((), (0,), (10, 2.5)):
        with pytest.raises(ValueError, match="ks="):
            metrics_from_ranks(torch.tensor([1]), ks=ks)


# ----------------------------------------------------------------------------- target ranks

def test_target_ranks_hand_computed_with_tie_rule():
    # scores [3, 1, 2, 2, 0]: item 2 ties item 3 and ranks ahead of it (smaller id)
    ranks = target_ranks(USER.expand(5, 2), TABLE, torch.arange(5))
    assert ranks.tolist() == [0, 3, 1, 2, 4]
    assert ranks.dtype == torch.long


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("integer", [False, True], ids=["float", "ties"])
def test_target_ranks_chunked_match_reference(chunk, integer):
    states, table, targets = random_case(seed=chunk, integer=integer)
    expected = reference_ranks(states.numpy(), table.numpy(), targets.numpy())
    assert target_ranks(states, table, targets, item_chunk=chunk).tolist() == expected.tolist()


def test_target_ranks_exact_duplicates_follow_ids():
    """Float32 duplicates of the target: the kernel must score them bit-identically to the target."""
    g = torch.Generator().manual_seed(0)
    states, table = torch.randn(64, 48, generator=g), torch.randn(500, 48, generator=g)
    table[[10, 250, 499]] = table[123].clone()
    before, after = torch.full((64,), 123), torch.full((64,), 10)
    base = target_ranks(states, table, before, item_chunk=500)
    for chunk in (1, 7, 64, 100, 128, 500):
        ranks = target_ranks(states, table, before, item_chunk=chunk)
        assert torch.equal(ranks, base)
        # item 10 is the same vector with a smaller id: always one place ahead of item 123
        assert torch.equal(target_ranks(states, table, after, item_chunk=chunk), ranks - 1)


def test_target_ranks_exclusion_hand_computed():
    # scores [3, 1, 2, 2, 0]
    exclude = [torch.tensor([0, 3]),  # target 2: item 0 removed -> nothing ahead
               torch.tensor([0, 2, 3]),  # target 3 listed itself: it stays, items 0 and 2 removed
               torch.tensor([1, 1, 0])]  # target 4: duplicates remove item 1 once; items 2, 3 remain
    ranks = target_ranks(USER.expand(3, 2), TABLE, torch.tensor([2, 3, 4]), exclude=exclude, item_chunk=2)
    assert ranks.tolist() == [0, 0, 2]


@pytest.mark.parametrize("chunk", [1, 5, 32, 101])
def test_target_ranks_exclusion_matches_reference(chunk):
    states, table, targets = random_case(seed=100 + chunk, integer=True)
    g = torch.Generator().manual_seed(chunk)
    exclude = [torch.randint(0, 101, (int(n),), generator=g) for n in torch.randint(0, 30, (40,), generator=g)]
    exclude[0] = torch.cat([exclude[0], targets[:1]])  # a history that holds the target
    exclude[1] = torch.empty(0, dtype=torch.long)
    expected = reference_ranks(states.numpy(), table.numpy(), targets.numpy(), [e.numpy() for e in exclude])
    ranks = target_ranks(states, table, targets, item_chunk=chunk, exclude=exclude)
    assert ranks.tolist() == expected.tolist()
    assert (ranks <= target_ranks(states, table, targets, item_chunk=chunk)).all()


def test_cosine_differs_from_dot_and_ignores_norms():
    user = torch.tensor([[1.0, 0.0]])
    # dot scores [3, 1, 10]; cosine scores [1, 0.995, 0.707]
    table = torch.tensor([[3.0, 0.0], [1.0, 0.1], [10.0, 10.0]])
    targets = torch.tensor([1, 2])
    assert target_ranks(user.expand(2, 2), table, targets, similarity="dot").tolist() == [2, 0]
    assert target_ranks(user.expand(2, 2), table, targets, similarity="cosine").tolist() == [1, 2]

    states, table, targets = random_case(seed=7)
    row_scale = torch.rand(table.shape[0], 1) * 10 + 0.1
    cosine = target_ranks(states, table, targets, similarity="cosine", item_chunk=9)
    assert torch.equal(target_ranks(states * 3.0, table * row_scale, targets, similarity="cosine"), cosine)
    normalised = torch.nn.functional.normalize
    assert torch.equal(target_ranks(normalised(states, dim=1), normalised(table, dim=1), targets, similarity="dot"),
                       cosine)


def test_target_ranks_rejects_bad_input():
    with pytest.raises(ValueError, match="targets: item ids must lie in 0..4"):
        target_ranks(USER, TABLE, torch.tensor([5]))
    with pytest.raises(ValueError, match="width"):
        target_ranks(torch.ones(1, 3), TABLE, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"exclude\[0\]: item ids"):
        target_ranks(USER, TABLE, torch.tensor([0]), exclude=[torch.tensor([9])])
    # the user named is the one whose list holds the bad id, past users with empty lists
    three = USER.expand(3, -1)
    with pytest.raises(ValueError, match=r"exclude\[2\]: item ids"):
        target_ranks(three, TABLE, torch.tensor([0, 1, 2]),
                     exclude=[torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), torch.tensor([1, -1])])
    with pytest.raises(ValueError, match="item_table rows 2..3"):
        target_ranks(USER, TABLE.clone().index_fill_(0, torch.tensor([3]), math.nan), torch.tensor([0]), item_chunk=2)
    with pytest.raises(ValueError, match="similarity"):
        target_ranks(USER, TABLE, torch.tensor([0]), similarity="l2")


# ----------------------------------------------------------------------------- top-k

def test_topk_hand_computed():
    scores, ids = full_ranking_topk(USER, TABLE, 4, item_chunk=2)
    assert ids.tolist() == [[0, 2, 3, 1]] and scores.tolist() == [[3.0, 2.0, 2.0, 1.0]]
    _, ids = full_ranking_topk(USER, TABLE, 2, item_chunk=3, exclude=[torch.tensor([0, 2])])
    assert ids.tolist() == [[3, 1]]
    scores, ids = full_ranking_topk(USER, TABLE, 5, exclude=[torch.tensor([0, 1, 4])])
    assert ids.tolist() == [[2, 3, 0, 1, 4]] and scores[0, 2:].tolist() == [-math.inf] * 3


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("integer", [False, True], ids=["float", "ties"])
@pytest.mark.parametrize("k", [1, 10, 101])
def test_topk_matches_reference_and_torch_topk(chunk, integer, k):
    states, table, _ = random_case(seed=chunk + k, integer=integer)
    scores, ids = full_ranking_topk(states, table, k, item_chunk=chunk)
    full = torch.from_numpy(reference_scores(states.numpy(), table.numpy()))
    assert ids.tolist() == reference_order(full.numpy())[:, :k].tolist()
    assert torch.equal(scores, torch.topk(full, k, dim=1).values)
    assert torch.equal(scores, full.gather(1, ids))


@pytest.mark.parametrize("chunk", [512, 1024, 2000, 4096])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_two_stage_topk_matches_reference_on_ties_and_exclusion(chunk, k):
    """Chunks that split into groups of 8..64 columns take the two-stage top-k (best groups, then
    their best columns); with integer scores most of them tie, and excluded items score -inf."""
    states, table, _ = random_case(seed=chunk + k, users=24, items=4096, integer=True)
    full = reference_scores(states.numpy(), table.numpy())
    _, ids = full_ranking_topk(states, table, k, item_chunk=chunk)
    assert ids.tolist() == reference_order(full)[:, :k].tolist()
    g = torch.Generator().manual_seed(k)
    exclude = [torch.randint(0, 4096, (int(n),), generator=g) for n in torch.randint(0, 600, (24,), generator=g)]
    exclude[0] = torch.arange(4096 - k // 2)  # fewer than k items left: excluded ones fill the tail, by id
    blocked = full.copy()
    for u, e in enumerate(exclude):
        blocked[u, e.numpy()] = -np.inf
    _, ids = full_ranking_topk(states, table, k, item_chunk=chunk, exclude=exclude)
    assert ids.tolist() == reference_order(blocked)[:, :k].tolist()


def test_topk_agrees_with_target_ranks():
    states, table, _ = random_case(seed=3, integer=True)
    _, ids = full_ranking_topk(states, table, 101, item_chunk=13)
    for position in (0, 5, 100):
        ranks = target_ranks(states, table, ids[:, position], item_chunk=13)
        assert (ranks == position).all()


def test_topk_rejects_bad_k():
    for k in (0, 6):
        with pytest.raises(ValueError, match=f"k={k}: must lie in 1..5"):
            full_ranking_topk(USER, TABLE, k)


def test_list_metrics_hand_computed():
    from alphafuse_dist.evaluate.metrics import list_metrics

    head = torch.tensor([True, True, False, False, False, False, False, False, False, False])  # items 0, 1 of 10
    top = torch.tensor([[0, 1, 2], [0, 3, 4], [5, 0, 1]])
    # head slots: 2 + 1 + 2 = 5 of 9; distinct items {0, 1, 2, 3, 4, 5}: 6 of 10
    assert list_metrics(top, head) == {"PopShare@3": pytest.approx(5 / 9), "Coverage@3": pytest.approx(0.6)}
    assert list_metrics(top[:0], head) == {"PopShare@3": 0.0, "Coverage@3": 0.0}
    groups = {"first": torch.tensor([True, False, False])}
    out = metrics_by_group(torch.tensor([0, 5, 20]), groups, (10,), top=top, head_items=head)
    assert out["first"]["PopShare@3"] == pytest.approx(2 / 3) and out["first"]["Coverage@3"] == pytest.approx(0.3)
    assert out["overall"]["HR@10"] == pytest.approx(2 / 3) and out["overall"]["Coverage@3"] == pytest.approx(0.6)
